"""Training curves from metrics.jsonl, and `frozen-prefix plot RUN [RUN ...] --out curves.png`."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import cli
from ..errors import FrozenPrefixError

FIXED_CURVES = ("loss", "lr", "val_loss")
NOT_SCORES = ("images", "skipped")  # val/ numbers that count rather than score


def read_metrics(run: str | Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl (run: a run folder or the file itself)."""
    path = Path(run)
    path = path / "metrics.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise FrozenPrefixError(f"{path} not found; give run folders (train.output_dir) that hold a metrics.jsonl")
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a run killed mid-write leaves a partial last line: the rest is still good
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def curve_names(runs: Sequence[list[dict[str, Any]]]) -> list[str]:
    """What to draw: loss, learning rate, validation loss, then every val/ score, as far as any run logged them."""
    present = {k for records in runs for r in records for k, v in r.items() if _number(v)}
    scores = sorted(k for k in present if k.startswith("val/") and k.split("/", 1)[1] not in NOT_SCORES)
    return [k for k in FIXED_CURVES if k in present] + scores


def _labels(runs: Sequence[Path]) -> list[str]:
    """Short legend labels: the folder names, or the full paths when two names are the same."""
    names = [Path(r).name if Path(r).is_dir() else Path(r).parent.name for r in runs]
    return names if len(set(names)) == len(names) else [str(r) for r in runs]


def save_curves(runs: Sequence[str | Path], out: str | Path, columns: int = 2) -> Path:
    """Draw the curves of one or several runs into a PNG (an Agg canvas: no display, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not runs:
        raise FrozenPrefixError("no runs given; name at least one run folder")
    records = [read_metrics(run) for run in runs]
    names = curve_names(records)
    if not names:
        raise FrozenPrefixError(f"{', '.join(map(str, runs))}: no loss or validation metrics logged yet; train first")
    columns = min(columns, len(names))
    rows = -(-len(names) // columns)
    fig = Figure(figsize=(5.0 * columns, 3.2 * rows))
    FigureCanvasAgg(fig)
    for n, name in enumerate(names):
        ax = fig.add_subplot(rows, columns, n + 1)
        for label, run_records in zip(_labels([Path(r) for r in runs]), records, strict=True):
            points = [(r["step"], r[name]) for r in run_records if _number(r.get(name))]
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, marker="o" if len(points) < 20 else None, markersize=3, label=label)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if name == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        if len(runs) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


def main(argv: list[str] | None = None) -> int:
    """Draw loss, learning rate, validation loss and val/ metrics over steps for one or several runs."""
    parser = argparse.ArgumentParser(prog="frozen-prefix plot", description=main.__doc__)
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders (train.output_dir) or metrics.jsonl files")
    parser.add_argument("--out", default="curves.png", help="the PNG to write (default: curves.png)")
    args = parser.parse_args(argv)

    def command() -> None:
        print(f"curves written to {save_curves(args.runs, args.out)}")

    return cli.run(command)


if __name__ == "__main__":
    sys.exit(main())
