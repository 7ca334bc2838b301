"""What an evaluation leaves behind: metrics JSON, predictions, per-example rows, and a picture of samples."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

from PIL import Image

from ..config import SourceConfig
from ..data import build_source
from ..errors import DataError


def write_results(
    out_dir: Path, split: str, metrics: dict[str, Any], rows: list[dict[str, Any]], prefixed: bool = True
) -> None:
    """metrics.json, per-example rows with scores (per_image.jsonl) and, for captions, COCO-format predictions.

    Files are named SPLIT_metrics.json etc., or plain metrics.json etc. with prefixed=False.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    name = (lambda base: f"{split}_{base}") if prefixed else (lambda base: base)
    (out_dir / name("metrics.json")).write_text(json.dumps(metrics, indent=2) + "\n")
    if rows and "caption" in rows[0]:  # COCO results format, for captioning
        (out_dir / name("predictions.json")).write_text(
            json.dumps([{"image_id": r["image_id"], "caption": r["caption"]} for r in rows], indent=1) + "\n"
        )
    (out_dir / name("per_image.jsonl")).write_text("".join(json.dumps(r) + "\n" for r in rows))


def sample_images(
    source: SourceConfig, image_ids: list[Any], base_dir: str | Path | None = None
) -> dict[Any, Image.Image]:
    """The images of the given ids, read again from the source in order (stops once all are found)."""
    data = build_source(source, base_dir)
    wanted, found = set(image_ids), {}
    if not hasattr(data, "__getitem__"):
        return found
    for index in range(len(data)):
        if len(found) == len(wanted):
            break
        try:
            item = data[index]
        except DataError:  # already reported (or fatal) during evaluation
            continue
        if item["image_id"] in wanted and item["image_id"] not in found:
            found[item["image_id"]] = item["image"]
    return found


def save_samples(path: Path, rows: list[dict[str, Any]], images: dict[Any, Image.Image], columns: int = 4) -> None:
    """A grid of images, each with its predicted caption and first reference underneath (PNG, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not rows:
        return
    columns = min(columns, len(rows))
    lines = -(-len(rows) // columns)
    cell_w, title_h, image_h, text_h = 3.2, 0.3, 2.9, 1.0  # inches
    row_h = title_h + image_h + text_h
    fig_w, fig_h = cell_w * columns, row_h * lines
    fig = Figure(figsize=(fig_w, fig_h))
    FigureCanvasAgg(fig)  # an explicit Agg canvas: no pyplot, no global backend switch in the caller's process
    wrap = textwrap.TextWrapper(width=44, max_lines=3, placeholder=" ...")
    for n, row in enumerate(rows):
        col, line = n % columns, n // columns
        left, top = col * cell_w + 0.1, fig_h - line * row_h
        ax = fig.add_axes(((left) / fig_w, (top - title_h - image_h) / fig_h, (cell_w - 0.2) / fig_w, image_h / fig_h))
        ax.set_axis_off()
        image = images.get(row["image_id"])
        if image is not None:
            ax.imshow(image)
        title = str(row["image_id"])
        if "cider" in row:
            title += f"  CIDEr {row['cider']:.2f}"
        if "exact" in row:
            title += "  exact" if row["exact"] else "  not exact"
        ax.set_title(textwrap.shorten(title, 50), fontsize=7)
        text = "pred: " + wrap.fill(row["caption"] or "(empty)") + "\nref:  " + wrap.fill(row["references"][0])
        y = (top - title_h - image_h - 0.08) / fig_h
        fig.text(left / fig_w, y, text, ha="left", va="top", fontsize=6.5, family="monospace")
    fig.savefig(path, dpi=90)


def write_task_results(out_dir: Path, name: str, results: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """NAME_metrics.json (the nested results) and NAME_examples.jsonl (one line per example: prompt, output, score)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}_metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / f"{name}_examples.jsonl").write_text("".join(json.dumps(r, default=str) + "\n" for r in rows))


def fewshot_table(results: dict[str, Any], metric: str, title: str) -> str:
    """A Markdown table of a few-shot result: one line per setting, real and controls as mean ± spread."""
    lines = []
    for setting, cell in results.items():
        modes = cell if "real" not in cell else {"": cell}
        for mode, by_control in modes.items():
            parts = []
            for control, value in by_control.items():
                if isinstance(value, dict) and metric in value:
                    stat = value[metric]
                    spread = f" ± {stat['std']:.3f}" if len(stat["trials"]) > 1 else ""
                    parts.append(f"{control} {stat['mean']:.3f}{spread}")
            diffs = [f"{k} {v:+.3f}" for k, v in by_control.items() if k.startswith("real_minus_")]
            label = f"{setting} {mode}".strip()
            lines.append(f"| {title} {label} | " + " | ".join(parts) + " | " + " | ".join(diffs) + " |")
    return "\n".join(lines)
