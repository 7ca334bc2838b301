"""Evaluation loops per task, and `python -m frozen_prefix.evaluate`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import cli
from .config import Config, EvalConfig, SourceConfig, load_config, parse_source
from .data import CaptionCollator, ShapesVQA, build_source, build_vqa_source, eval_examples
from .errors import FrozenPrefixError
from .fewshot import evaluate_binding, evaluate_vqa
from .generate import decoding_options, generate_captions
from .metrics import CocoScorer, Scorer, ShapesScorer, apply_scorers
from .models.captioner import FrozenPrefixCaptioner
from .report import fewshot_table, sample_images, save_samples, write_results, write_task_results


def caption_scorers(eval_config: EvalConfig, rows: list[dict[str, Any]]) -> list[Scorer]:
    """The scorers that apply to captioned rows: the shapes score where objects are known, COCO metrics if asked."""
    scorers: list[Scorer] = []
    if rows and "objects" in rows[0]:
        scorers.append(ShapesScorer())
    if eval_config.metrics:
        scorers.append(CocoScorer(spice=eval_config.spice))
    return scorers


def caption_source(
    model: FrozenPrefixCaptioner, source: SourceConfig, eval_config: EvalConfig, bad_data: str = "error",
    base_dir: str | Path | None = None, progress: bool = False,
) -> tuple[list[dict[str, Any]], int]:
    """Caption every image of a source: rows of (image_id, caption, references[, objects]) and the skipped count."""
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
        skipped += batch.skipped
        if not batch.size:
            continue
        for i, caption in enumerate(generate_captions(model, batch.pixel_values, **options)):
            image_id = batch.image_ids[i]
            if image_id in rows:  # the same image listed twice: one prediction, scored against all its references
                known = rows[image_id]["references"]
                known.extend(r for r in batch.references[i] if r not in known)
                continue
            row = {"image_id": image_id, "caption": caption, "references": list(batch.references[i])}
            if batch.objects is not None:
                row["objects"] = [list(o) for o in batch.objects[i]]
            rows[image_id] = row
    return list(rows.values()), skipped


def evaluate_source(
    model: FrozenPrefixCaptioner, source: SourceConfig, eval_config: EvalConfig, bad_data: str = "error",
    base_dir: str | Path | None = None, progress: bool = False,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Caption every image of a source; return metrics and per-image rows (id, caption, references, scores)."""
    rows, skipped = caption_source(model, source, eval_config, bad_data, base_dir, progress)
    metrics, rows = apply_scorers(caption_scorers(eval_config, rows), rows)
    return {"images": len(rows), "skipped": skipped, **metrics}, rows


def source_label(source: SourceConfig) -> str:
    """A short name for a data source: 'shapes:val', 'captions.jsonl'."""
    return f"{source.kind}:{source.split}" if source.kind == "shapes" or not source.path else Path(source.path).name


def split_source(config: Config, split: str) -> SourceConfig:
    """The data source a split name refers to in a config."""
    source = config.data.extra.get(split) if split not in ("train", "val", "test") else getattr(config.data, split)
    if source is None:
        raise FrozenPrefixError(f"the config has no data for split {split!r}; set data.{split}")
    return source


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


def vqa_demo_pool(config: Config, source: SourceConfig, base_dir: str | Path | None = None) -> Any:
    """Where demonstrations come from: eval.vqa.demo_source, the shapes train questions, or VQA training data."""
    vc = config.eval.vqa
    demo = vc.demo_source
    if demo is None and source.kind == "shapes":
        return ShapesVQA("train", vc.demo_pool, source.seed)
    if demo is None and config.data.train is not None and config.data.train.kind in ("vqa", "vqav2"):
        demo = config.data.train
    if demo is None:
        if max(vc.shots) == 0:
            return ShapesVQA("train", 1)  # never read: no demonstrations at 0 shots
        raise FrozenPrefixError("few-shot VQA needs demonstrations; set eval.vqa.demo_source to a VQA training split")
    return build_vqa_source(demo, base_dir, size=vc.demo_pool)


def evaluate_task(
    model: FrozenPrefixCaptioner, task: str, label: str, source: SourceConfig | None, config: Config, out: Path,
    base_dir: str | Path | None = None, progress: bool = False,
) -> dict[str, Any]:
    """Run a few-shot task (vqa or binding) on one split; write LABEL_TASK_metrics.json and _examples.jsonl."""
    ec = config.eval
    if task == "vqa":
        queries = build_vqa_source(source, base_dir, size=ec.vqa.max_questions)
        pool = vqa_demo_pool(config, source, base_dir)
        results, rows = evaluate_vqa(model, queries, pool, ec.vqa, ec.batch_size, progress)
        table = fewshot_table(results, "vqa_accuracy", f"{label} vqa shots")
    else:
        split = source.split if source is not None and source.kind == "shapes" else "test"
        results, rows = evaluate_binding(model, ec.binding, split, ec.batch_size, progress)
        table = fewshot_table(results, "binding_accuracy", f"{label}")
    write_task_results(out, f"{label}_{task}", results, rows)
    print(table)
    return results


def format_metrics(metrics: dict[str, Any]) -> str:
    """One readable line."""
    return "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


def _data_label(value: str) -> str:
    """The name a --data source gets in output files: 'shapes_test', or a .jsonl file's stem."""
    return value.replace(":", "_") if value.startswith("shapes") else Path(value).stem


def build_parser() -> argparse.ArgumentParser:
    """The evaluate command's flags."""
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
    parser.add_argument(
        "--task", choices=["caption", "vqa", "binding"], help="what to measure (default: eval.task, i.e. caption)"
    )
    parser.add_argument("--shots", help="few-shot counts, e.g. 0,1,4 (VQA demonstrations; binding inner shots)")
    cli.add_device_arg(parser)
    cli.add_trust_arg(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    cli.add_generation_args(parser)
    parser.add_argument("overrides", nargs="*", help="config overrides, section.key=value (e.g. eval.max_images=100)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Caption a split (or data given directly) with a saved model; write metrics, predictions and samples."""
    args = build_parser().parse_args(argv)
    cli.setup_logging()

    def command() -> None:
        config = load_config(args.config, args.overrides) if args.config else None
        model = FrozenPrefixCaptioner.from_pretrained(
            args.model, device=cli.resolve_device(args.device), trust_remote_code=args.trust_remote_code
        )
        config = cli.apply_generation_args(config or load_config(model.config, args.overrides), args)
        task = args.task or config.eval.task
        if args.shots:
            shots = [int(n) for n in args.shots.split(",")]
            section = "vqa" if task == "vqa" else "binding"
            config = load_config(config, [f"eval.{section}.shots={shots}"])
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
        if task != "caption":
            for label, source in sources:
                results[label] = evaluate_task(model, task, label, source, config, out, base_dir, not args.no_progress)
            print(f"results written to {out}")
            return
        for label, source in sources:
            metrics, _ = evaluate_and_write(
                model, label, source, config, out, base_dir, prefixed=not single, progress=not args.no_progress
            )
            results[label] = metrics
            print(f"{label}: {format_metrics(metrics)}")
        if not single:
            (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
        print(f"results written to {out}")

    return cli.run(command)


if __name__ == "__main__":
    sys.exit(main())
