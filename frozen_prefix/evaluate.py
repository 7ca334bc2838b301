"""Caption metrics (pycocoevalcap, the shapes exact score) and `python -m frozen_prefix.evaluate`."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .checkpoint import swap_in
from .config import Config, EvalConfig, SourceConfig, load_config, parse_source
from .data import CaptionCollator, build_source, eval_examples
from .data.shapes import match_parts
from .errors import DataError, FrozenPrefixError
from .generate import add_generation_args, apply_generation_args, decoding_options, generate_captions, resolve_device
from .models.captioner import FrozenPrefixCaptioner

log = logging.getLogger(__name__)


def java_available() -> bool:
    """METEOR and the PTB tokenizer run on Java."""
    return shutil.which("java") is not None


def spice_unavailable() -> str | None:
    """Why SPICE cannot run here, or None: it needs Java and Stanford CoreNLP, which pycocoevalcap downloads."""
    if not java_available():
        return "SPICE not computed: it needs Java; the other metrics are reported"
    import pycocoevalcap.spice as spice_pkg

    lib = Path(spice_pkg.__file__).parent / "lib"
    if not all((lib / f"stanford-corenlp-3.6.0{suffix}.jar").is_file() for suffix in ("", "-models")):
        return (
            "SPICE not computed: it needs Stanford CoreNLP 3.6.0, which pycocoevalcap downloads on first use "
            "(not possible offline); the other metrics are reported"
        )
    return None


_METEOR: Any = None  # one METEOR JVM per process: starting it takes about 10 s
_SPICE_NOTED = False


def _meteor() -> Any:
    """The process's METEOR scorer, (re)started when needed."""
    global _METEOR
    if _METEOR is None or _METEOR.meteor_p.poll() is not None:
        from pycocoevalcap.meteor.meteor import Meteor

        _METEOR = Meteor()
    return _METEOR


@contextlib.contextmanager
def _quiet_fd(fd: int) -> Iterator[None]:
    """Silence a file descriptor: the Java tokenizer prints progress lines straight to the process's stderr."""
    saved = os.dup(fd)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)


def coco_scores(
    predictions: dict[Any, str], references: dict[Any, list[str]], spice: bool = True
) -> tuple[dict[str, float], dict[Any, dict[str, float]]]:
    """Corpus and per-image BLEU-1..4, METEOR, ROUGE-L, CIDEr (SPICE when it can run), exactly as pycocoevalcap gives.

    Captions go through pycocoevalcap's PTB tokenizer, then its scorers; scores stay on their own 0-1 scale.
    """
    global _SPICE_NOTED
    if not java_available():
        raise FrozenPrefixError(
            "caption metrics need Java (PTB tokenizer, METEOR); install a JRE or set eval.metrics=false"
        )
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ids = list(predictions)
    missing = [i for i in ids if not references.get(i)]
    if missing:
        raise FrozenPrefixError(f"image {missing[0]!r} has no reference captions; every scored image needs one")
    tokenizer = PTBTokenizer()
    with _quiet_fd(2):
        gts = tokenizer.tokenize({i: [{"caption": c} for c in references[i]] for i in ids})
        res = tokenizer.tokenize({i: [{"caption": predictions[i]}] for i in ids})
    corpus: dict[str, float] = {}
    per_image: dict[Any, dict[str, float]] = {i: {} for i in ids}

    def add(name: str, score: Any, scores: Any) -> None:
        corpus[name] = float(score)
        for i, value in zip(gts.keys(), scores, strict=True):  # scorers walk gts.keys() in order
            per_image[i][name] = float(value)

    bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        add(f"bleu{n + 1}", bleu[n], bleu_each[n])
    try:
        add("meteor", *_meteor().compute_score(gts, res))
    except Exception:
        global _METEOR
        _METEOR = None  # a half-read METEOR pipe cannot be reused
        raise
    add("rouge_l", *Rouge().compute_score(gts, res))
    add("cider", *Cider().compute_score(gts, res))
    reason = spice_unavailable() if spice else None
    if spice and reason is None:
        from pycocoevalcap.spice.spice import Spice

        try:
            with _quiet_fd(2):
                score, scores = Spice().compute_score(gts, res)
            add("spice", score, [s["All"]["f"] for s in scores])
        except (OSError, subprocess.SubprocessError, ValueError) as e:
            first = (str(e).splitlines() or [""])[0][:100]
            reason = f"SPICE not computed: it failed ({type(e).__name__}: {first}); the other metrics are reported"
    if reason is not None and spice and not _SPICE_NOTED:
        log.warning(reason)
        _SPICE_NOTED = True
    return corpus, per_image


def coco_metrics(predictions: dict[Any, str], references: dict[Any, list[str]], spice: bool = True) -> dict[str, float]:
    """Corpus BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE when it can run), as pycocoevalcap's scorers give them."""
    return coco_scores(predictions, references, spice)[0]


def evaluate_source(
    model: FrozenPrefixCaptioner, source: SourceConfig, eval_config: EvalConfig, bad_data: str = "error",
    base_dir: str | Path | None = None, progress: bool = False,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Caption every image of a source; return metrics and per-image rows (id, caption, references, scores)."""
    examples = eval_examples(build_source(source, base_dir), bad_data, eval_config.max_images)  # map-style or stream
    collate = CaptionCollator(model.tokenizer, model.image_transform, model.prefix_length, 1, model.start_ids)
    # Its own generator: a DataLoader otherwise draws its base seed from the global RNG, shifting training's stream.
    loader = DataLoader(
        examples, batch_size=eval_config.batch_size, collate_fn=collate, generator=torch.Generator().manual_seed(0)
    )
    options = decoding_options(eval_config)
    rows: dict[Any, dict[str, Any]] = {}
    skipped = 0
    for batch in tqdm(loader, desc=f"captioning {source_label(source)}", disable=not progress, leave=False):
        skipped += batch["skipped"]
        if not batch["size"]:
            continue
        for i, caption in enumerate(generate_captions(model, batch["pixel_values"], **options)):
            image_id = batch["image_ids"][i]
            if image_id in rows:  # the same image listed twice: one prediction, scored against all its references
                known = rows[image_id]["references"]
                known.extend(r for r in batch["references"][i] if r not in known)
                continue
            row = {"image_id": image_id, "caption": caption, "references": list(batch["references"][i])}
            if "objects" in batch:
                row["objects"] = [list(o) for o in batch["objects"][i]]
                parts = match_parts(caption, batch["objects"][i])
                row["exact"] = parts.pop("exact")
                row["right"] = [name for name, ok in parts.items() if ok]  # count, colours, shapes
            rows[image_id] = row
    return score_rows(list(rows.values()), eval_config, skipped)


def score_rows(
    rows: list[dict[str, Any]], eval_config: EvalConfig, skipped: int = 0
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Corpus metrics for captioned rows, and the same rows with their per-image scores added."""
    metrics: dict[str, Any] = {"images": len(rows), "skipped": skipped}
    if rows and "exact" in rows[0]:
        # The shapes task's own exact score: every object's colour and shape named, nothing more.
        metrics["shapes_exact"] = sum(r["exact"] for r in rows) / len(rows)
        if "right" in rows[0]:  # what is learned first: how many objects, then their colours, then their shapes
            for part in ("count", "colours", "shapes"):
                metrics[f"shapes_{part}"] = sum(part in r["right"] for r in rows) / len(rows)
    if eval_config.metrics and rows:
        corpus, per_image = coco_scores(
            {r["image_id"]: r["caption"] for r in rows}, {r["image_id"]: r["references"] for r in rows},
            spice=eval_config.spice,
        )
        metrics.update(corpus)
        rows = [{**r, **per_image[r["image_id"]]} for r in rows]
    return metrics, rows


def source_label(source: SourceConfig) -> str:
    """A short name for a data source: 'shapes:val', 'captions.jsonl'."""
    return f"{source.kind}:{source.split}" if source.kind == "shapes" or not source.path else Path(source.path).name


def split_source(config: Config, split: str) -> SourceConfig:
    """The data source a split name refers to in a config."""
    source = config.data.extra.get(split) if split not in ("train", "val", "test") else getattr(config.data, split)
    if source is None:
        raise FrozenPrefixError(f"the config has no data for split {split!r}; set data.{split}")
    return source


def write_results(
    out_dir: Path, split: str, metrics: dict[str, Any], rows: list[dict[str, Any]], prefixed: bool = True
) -> None:
    """metrics.json, COCO-format predictions ([{image_id, caption}]) and per-image rows with scores for one split.

    Files are named SPLIT_metrics.json etc., or plain metrics.json etc. with prefixed=False.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    name = (lambda base: f"{split}_{base}") if prefixed else (lambda base: base)
    (out_dir / name("metrics.json")).write_text(json.dumps(metrics, indent=2) + "\n")
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


def evaluate_and_write(
    model: FrozenPrefixCaptioner, label: str, source: SourceConfig, config: Config, out: Path,
    base_dir: str | Path | None = None, prefixed: bool = True, progress: bool = False,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Caption one set; write its metrics, predictions, per-image scores and samples picture into out."""
    metrics, rows = evaluate_source(model, source, config.eval, config.data.bad_data, base_dir, progress=progress)
    write_results(out, label, metrics, rows, prefixed=prefixed)
    shown = rows[: config.eval.grid]
    if shown:
        images = sample_images(source, [r["image_id"] for r in shown], base_dir)
        save_samples(out / (f"{label}_samples.png" if prefixed else "samples.png"), shown, images)
    return metrics, rows


def format_metrics(metrics: dict[str, Any]) -> str:
    """One readable line."""
    return "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


def evaluate_during_training(
    model: FrozenPrefixCaptioner, config: Config, step: int, run_dir: str | Path, state: dict[str, Any]
) -> dict[str, Any]:
    """Caption metrics on the first eval.every_images val images; keep RUN/best/ when eval.best_metric improves.

    The best so far lives in state["best"], so it travels with checkpoints and survives a resume.
    Returns the metrics.jsonl record.
    """
    ec = config.eval
    started = time.perf_counter()
    device = model.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # training's RNG stream stays as is
        scores, _ = evaluate_source(
            model, split_source(config, "val"), dataclasses.replace(ec, max_images=ec.every_images),
            config.data.bad_data,
        )
    if ec.best_metric not in scores:
        raise FrozenPrefixError(
            f"eval.best_metric={ec.best_metric} was not computed on data.val (got {', '.join(scores)}); choose another"
        )
    value = float(scores[ec.best_metric])
    best = state.get("best")
    improved = best is None or value > best["value"]
    if improved:
        best = {"metric": ec.best_metric, "value": value, "step": step}
        _save_best(model, Path(run_dir), best)
        state["best"] = best
    record: dict[str, Any] = {"step": step, **{f"val/{k}": v for k, v in scores.items()}}
    record.update(
        best_metric=ec.best_metric, best_value=best["value"], best_step=best["step"], is_best=improved,
        eval_sec=round(time.perf_counter() - started, 2),
    )
    return record


def _save_best(model: FrozenPrefixCaptioner, run_dir: Path, info: dict[str, Any]) -> None:
    """Write RUN/best/ (a save_pretrained folder plus best.json) under a temporary name, then swap it in."""
    tmp = run_dir / f".best-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    (tmp / "best.json").write_text(json.dumps(info, indent=2) + "\n")
    swap_in(tmp, run_dir / "best")


def _quiet_libraries() -> None:
    """Our warnings as plain lines on stderr; the libraries' chatter off."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for noisy in ("transformers", "httpx", "huggingface_hub", "timm"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    """Caption a split (or data given directly) with a saved model; write metrics, predictions and samples."""
    parser = argparse.ArgumentParser(
        prog="python -m frozen_prefix.evaluate", description=main.__doc__,
        epilog="Writes to --out: metrics.json, predictions.json (COCO results format), per_image.jsonl and "
        "samples.png for one split; for several, SPLIT_-prefixed files and metrics.json as {split: metrics}.",
    )
    parser.add_argument("--model", required=True, help="a saved model folder (a run's model/ or best/)")
    parser.add_argument("--config", help="YAML whose data/eval sections to use (default: the model's own)")
    parser.add_argument("--split", action="append", help="split(s) of the config to evaluate (default: eval.splits)")
    parser.add_argument(
        "--data", action="append", metavar="SOURCE", help="evaluate this data instead: a .jsonl file or shapes:SPLIT"
    )
    parser.add_argument("--out", help="output folder (default: MODEL/eval)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_generation_args(parser)
    parser.add_argument("overrides", nargs="*", help="config overrides, section.key=value (e.g. eval.max_images=100)")
    args = parser.parse_args(argv)
    _quiet_libraries()
    try:
        config = load_config(args.config, args.overrides) if args.config else None
        model = FrozenPrefixCaptioner.from_pretrained(args.model, device=resolve_device(args.device))
        config = apply_generation_args(config or load_config(model.config, args.overrides), args)
        if args.data:
            sources = [(_data_label(d), parse_source(d, "--data")) for d in args.data]
        else:
            sources = [(split, split_source(config, split)) for split in args.split or config.eval.splits]
        if len({label for label, _ in sources}) < len(sources):
            raise FrozenPrefixError("two evaluated sets have the same name; give each split or file once")
        base_dir = Path(args.config).parent if args.config else None
        out = Path(args.out or Path(args.model) / "eval")
        single = len(sources) == 1
        results = {}
        for label, source in sources:
            metrics, _ = evaluate_and_write(
                model, label, source, config, out, base_dir, prefixed=not single, progress=not args.no_progress
            )
            results[label] = metrics
            print(f"{label}: {format_metrics(metrics)}")
        if not single:
            (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
        print(f"results written to {out}")
    except FrozenPrefixError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _data_label(value: str) -> str:
    """The name a --data source gets in output files: 'shapes_test', or a .jsonl file's stem."""
    return value.replace(":", "_") if value.startswith("shapes") else Path(value).stem


if __name__ == "__main__":
    sys.exit(main())
