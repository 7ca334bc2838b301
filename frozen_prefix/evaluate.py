"""Evaluation loops per task, and `python -m frozen_prefix.evaluate`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm.auto import tqdm

from . import cli, distributed, parallel
from .captioner import FrozenPrefixCaptioner
from .config import SOURCE_KINDS, Config, EvalConfig, SourceConfig, load_config, parse_source
from .data import (
    CaptionCollator,
    ShapesDialogue,
    ShapesVQA,
    build_source,
    build_vqa_source,
    eval_examples,
    read_conversations_jsonl,
)
from .data.layout import Batch
from .dialogue_eval import evaluate_dialogue
from .errors import FrozenPrefixError
from .fewshot import blank_image, evaluate_binding, evaluate_vqa
from .generate import decoding_options, generate_captions
from .metrics import CocoScorer, Scorer, ShapesScorer, apply_scorers
from .report import fewshot_table, sample_images, save_samples, write_results, write_task_results


def caption_scorers(eval_config: EvalConfig, rows: list[dict[str, Any]]) -> list[Scorer]:
    """The scorers that apply to captioned rows: the shapes score where objects are known, COCO metrics if asked."""
    scorers: list[Scorer] = []
    if rows and "objects" in rows[0]:
        scorers.append(ShapesScorer())
    if eval_config.metrics:
        scorers.append(CocoScorer(spice=eval_config.spice))
    return scorers


class _Share(Dataset):
    """This rank's images of a map-style set (indices rank, rank + N, ...), each with its index in the whole set."""

    def __init__(self, examples: Any, rank: int, world: int) -> None:
        self.examples, self.indices = examples, range(rank, len(examples), world)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        return self.indices[i], self.examples[self.indices[i]]


class _StreamShare(IterableDataset):
    """This rank's images of a stream (every N-th, from the rank's own), each with its index in the stream."""

    def __init__(self, stream: IterableDataset, rank: int, world: int) -> None:
        self.stream, self.rank, self.world = stream, rank, world

    def __iter__(self) -> Any:
        for index, item in enumerate(self.stream):
            if index % self.world == self.rank:
                yield index, item


class _IndexedCollate:
    """The caption collate on (index, item) pairs; the indices of the kept items go into batch.extra['index']."""

    def __init__(self, collate: CaptionCollator) -> None:
        self.collate = collate

    def __call__(self, pairs: list[tuple[int, Any]]) -> Batch:
        batch = self.collate([item for _, item in pairs])
        batch.extra["index"] = [index for index, item in pairs if item is not None]  # the collate drops the Nones
        return batch


def _lockstep(loader: DataLoader, ctx: distributed.Dist) -> Any:
    """The loader's batches until every rank has run out; a rank that ran out first gets None meanwhile.

    Under FSDP every generate call is a collective (each layer gathers its weights): all ranks must make the same
    number of calls, so one that has no images left still decodes a placeholder.
    """
    batches = iter(loader)
    while True:
        batch = next(batches, None)
        if not ctx.max([float(batch is not None)])[0]:
            return
        yield batch


def blind_pixels(model: FrozenPrefixCaptioner, n: int) -> torch.Tensor:
    """n black images as pixel values: the test-blind control, as fewshot.blind shows it to few-shot prompts."""
    return model.image_transform(blank_image()).unsqueeze(0).expand(n, -1, -1, -1).to(model.device)


def caption_source(
    model: FrozenPrefixCaptioner, source: SourceConfig, eval_config: EvalConfig, bad_data: str = "error",
    base_dir: str | Path | None = None, progress: bool = False, blind: bool = False,
) -> tuple[list[dict[str, Any]], int]:
    """Caption every image of a source: rows of (image_id, caption, references[, objects]) and the skipped count.

    blind: every image is captioned as a black one (Frozen's blind control); the rows keep the real references.

    Under torchrun each rank captions every N-th image and all ranks get all rows back, in the source's order:
    the same rows as one process makes.
    """
    examples = eval_examples(build_source(source, base_dir), bad_data, eval_config.max_images)  # map-style or stream
    ctx = distributed.current(model.device)
    share = (_StreamShare if isinstance(examples, IterableDataset) else _Share)(examples, ctx.rank, ctx.world)
    collate = CaptionCollator(model.tokenizer, model.image_transform, model.prefix_length, 1, model.start_ids)
    # Its own generator: a DataLoader otherwise draws its base seed from the global RNG, shifting training's stream.
    loader = DataLoader(
        share, batch_size=eval_config.batch_size, collate_fn=_IndexedCollate(collate),
        generator=torch.Generator().manual_seed(0),
    )
    options = decoding_options(eval_config)
    found: list[tuple[int, Any, str, list[str], Any]] = []  # (index, image_id, caption, references, objects)
    skipped = 0
    lockstep = ctx.active and parallel.is_fsdp(model)
    bar = tqdm(
        total=len(loader) if isinstance(share, _Share) else None, desc=f"captioning {source_label(source)}",
        disable=not progress or not ctx.main, leave=False,
    )
    with parallel.gathered(model):
        for batch in _lockstep(loader, ctx) if lockstep else loader:
            bar.update()
            skipped += batch.skipped if batch is not None else 0
            if batch is None or not batch.size:
                if lockstep:  # join the other ranks' generate calls; nothing of this one is kept
                    generate_captions(model, torch.zeros(1, *model.image_config["input_size"]), **options)
                continue
            pixels = blind_pixels(model, batch.size) if blind else batch.pixel_values
            captions = generate_captions(model, pixels, **options)
            for i, caption in enumerate(captions):
                objects = batch.objects[i] if batch.objects is not None else None
                found.append((batch.extra["index"][i], batch.image_ids[i], caption, list(batch.references[i]), objects))
    bar.close()
    if ctx.active:
        shares = ctx.gather((found, skipped))
        found = sorted((row for part, _ in shares for row in part), key=lambda row: row[0])
        skipped = sum(n for _, n in shares)
    rows: dict[Any, dict[str, Any]] = {}
    for _, image_id, caption, references, objects in found:
        if image_id in rows:  # the same image listed twice: one prediction, scored against all its references
            known = rows[image_id]["references"]
            known.extend(r for r in references if r not in known)
            continue
        row = {"image_id": image_id, "caption": caption, "references": references}
        if objects is not None:
            row["objects"] = [list(o) for o in objects]
        rows[image_id] = row
    return list(rows.values()), skipped


def evaluate_source(
    model: FrozenPrefixCaptioner, source: SourceConfig, eval_config: EvalConfig, bad_data: str = "error",
    base_dir: str | Path | None = None, progress: bool = False, blind: bool = False,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Caption every image of a source (black ones if blind); return metrics and per-image rows with scores."""
    rows, skipped = caption_source(model, source, eval_config, bad_data, base_dir, progress, blind)
    ctx = distributed.current(model.device)
    scores = None
    if ctx.main:  # under torchrun rank 0 scores (the COCO metrics' Java runs once) and tells the others
        metrics, rows = apply_scorers(caption_scorers(eval_config, rows), rows)
        scores = {"images": len(rows), "skipped": skipped, **metrics}
    return ctx.broadcast(scores), rows


def source_label(source: SourceConfig) -> str:
    """A short name for a data source: 'shapes:val', 'captions.jsonl'."""
    return f"{source.kind}:{source.split}" if source.kind == "shapes" or not source.path else Path(source.path).name


def split_source(config: Config, split: str) -> SourceConfig:
    """The data source a split name refers to in a config."""
    source = config.data.extra.get(split) if split not in ("train", "val", "test") else getattr(config.data, split)
    if source is None:
        raise FrozenPrefixError(f"the config has no data for split {split!r}; set data.{split}")
    if isinstance(source, list):
        raise FrozenPrefixError(f"data.{split} is a mixture of sources; evaluate one of them with --data SOURCE")
    return source


def evaluate_and_write(
    model: FrozenPrefixCaptioner, label: str, source: SourceConfig, config: Config, out: Path,
    base_dir: str | Path | None = None, prefixed: bool = True, progress: bool = False, blind: bool = False,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Caption one set; write its metrics, predictions, per-image scores and samples picture into out (rank 0)."""
    metrics, rows = evaluate_source(
        model, source, config.eval, config.data.bad_data, base_dir, progress=progress, blind=blind
    )
    if not distributed.current(model.device).main:
        return metrics, rows
    write_results(out, label, metrics, rows, prefixed=prefixed)
    shown = rows[: config.eval.grid]
    if shown and not blind:  # a blind caption next to the real image it never saw would mislead
        images = sample_images(source, [r["image_id"] for r in shown], base_dir)
        save_samples(out / (f"{label}_samples.png" if prefixed else "samples.png"), shown, images)
    return metrics, rows


def vqa_demo_pool(config: Config, source: SourceConfig, base_dir: str | Path | None = None) -> Any:
    """Where demonstrations come from: eval.vqa.demo_source, the shapes train questions, or VQA training data."""
    vc = config.eval.vqa
    demo = vc.demo_source
    if demo is None and source.kind in ("shapes", "shapes_vqa"):
        return ShapesVQA("train", vc.demo_pool, source.seed)
    trains = config.data.train if isinstance(config.data.train, list) else [config.data.train]
    if demo is None:  # the training data's questions, when it has some (the first VQA source of a mixture)
        demo = next((s for s in trains if s is not None and s.kind in ("vqa", "vqav2", "shapes_vqa")), None)
    if demo is None:
        if max(vc.shots) == 0:
            return ShapesVQA("train", 1)  # never read: no demonstrations at 0 shots
        raise FrozenPrefixError("few-shot VQA needs demonstrations; set eval.vqa.demo_source to a VQA training split")
    return build_vqa_source(demo, base_dir, size=vc.demo_pool)


def dialogue_source(source: SourceConfig, base_dir: str | Path | None = None) -> Any:
    """Conversations to evaluate: a shapes split's embedded dialogues, or a conversations .jsonl."""
    if source.kind.startswith("shapes"):
        return ShapesDialogue(source.split, source.size, source.seed)
    if source.kind == "conversations":
        return read_conversations_jsonl(source.path, source.size, source.image_dir)
    raise FrozenPrefixError(f"a {source.kind} source holds no conversations; give shapes or conversations data")


def evaluate_task(
    model: FrozenPrefixCaptioner, task: str, label: str, source: SourceConfig | None, config: Config, out: Path,
    base_dir: str | Path | None = None, progress: bool = False,
) -> dict[str, Any]:
    """Run vqa, binding or dialogue on one split; write LABEL_TASK_metrics.json and LABEL_TASK_examples.jsonl."""
    ec = config.eval
    if task == "vqa":
        queries = build_vqa_source(source, base_dir, size=ec.vqa.max_questions)
        pool = vqa_demo_pool(config, source, base_dir)
        results, rows = evaluate_vqa(model, queries, pool, ec.vqa, ec.batch_size, progress)
        table = fewshot_table(results, "vqa_accuracy", f"{label} vqa shots")
    elif task == "dialogue":
        conversations = dialogue_source(source, base_dir)
        dc = ec.dialogue
        results, rows = evaluate_dialogue(
            model, conversations, config.data.chat_style, dc.modes, dc.controls, ec.batch_size, dc.max_new_tokens,
            dc.max_conversations, progress,
        )
        table = "\n".join(
            f"| {label} dialogue, {mode} history | "
            + " | ".join(f"{c} {v['accuracy']:.3f}" for c, v in by.items() if isinstance(v, dict) and "accuracy" in v)
            + f" | real-blind {by.get('real_minus_blind', float('nan')):+.3f} |"
            for mode, by in results.items()
        )
    else:
        split = source.split if source is not None and source.kind.startswith("shapes") else "test"
        results, rows = evaluate_binding(model, ec.binding, split, ec.batch_size, progress)
        table = fewshot_table(results, "binding_accuracy", f"{label}")
    write_task_results(out, f"{label}_{task}", results, rows)
    print(table)
    return results


def format_metrics(metrics: dict[str, Any]) -> str:
    """One readable line."""
    return "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


def _data_label(value: str) -> str:
    """The name a --data source gets in output files: 'shapes_test', or the file's stem ('vqa:q.jsonl': 'q')."""
    if value.startswith("shapes"):
        return value.replace(":", "_")
    kind, sep, rest = value.partition(":")
    return Path(rest if sep and kind in SOURCE_KINDS else value).stem


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
        "--data", action="append", metavar="SOURCE",
        help="evaluate this data instead: a .jsonl file, shapes:SPLIT, vqa:FILE.jsonl, conversations:FILE.jsonl, ...",
    )
    parser.add_argument("--out", help="output folder (default: MODEL/eval)")
    parser.add_argument(
        "--task", choices=["caption", "vqa", "binding", "dialogue"], help="what to measure (default: eval.task)"
    )
    parser.add_argument("--shots", help="few-shot counts, e.g. 0,1,4 (VQA demonstrations; binding inner shots)")
    parser.add_argument(
        "--blind", action="store_true",
        help="captions: the blind control, every image black; files are named SPLIT_blind_* (the real ones stay)",
    )
    cli.add_device_arg(parser)
    cli.add_trust_arg(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    cli.add_generation_args(parser)
    parser.add_argument("overrides", nargs="*", help="config overrides, section.key=value (e.g. eval.max_images=100)")
    cli.add_plugin_arg(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Caption a split (or data given directly) with a saved model; write metrics, predictions and samples."""
    args = build_parser().parse_args(argv)
    cli.setup_logging()

    def command() -> None:
        cli.import_plugins(args.plugin)
        # Under torchrun every rank loads the model, captions its share of the images, and rank 0 writes.
        ctx = distributed.setup(cli.resolve_device(args.device))
        try:
            evaluate_command(args, ctx)
        except BaseException:
            distributed.teardown(ctx, clean=False)  # the other ranks may never reach a barrier
            raise
        distributed.teardown(ctx)

    return cli.run(command)


def evaluate_command(args: argparse.Namespace, ctx: distributed.Dist) -> None:
    """The body of `main`, in one process or as one rank of a torchrun group."""
    say = print if ctx.main else (lambda *a, **k: None)
    config = load_config(args.config, args.overrides) if args.config else None
    model = FrozenPrefixCaptioner.from_pretrained(
        args.model, device=ctx.device, trust_remote_code=args.trust_remote_code
    )
    config = cli.apply_generation_args(config or load_config(model.config, args.overrides), args)
    task = args.task or config.eval.task
    if args.blind and task != "caption":
        raise FrozenPrefixError(f"--blind is for captions; --task {task} has its own (eval.{task}.controls)")
    if task != "caption" and ctx.active:
        raise FrozenPrefixError(f"--task {task} runs in one process; run it without torchrun")
    if args.shots:
        try:
            shots = [int(n) for n in args.shots.split(",")]
        except ValueError as e:
            raise FrozenPrefixError(f"--shots {args.shots!r}: give counts separated by commas, e.g. 0,1,4") from e
        section = "vqa" if task == "vqa" else "binding"
        config = load_config(config, [f"eval.{section}.shots={shots}"])
    if args.data:
        sources = [(_data_label(d), parse_source(d, "--data")) for d in args.data]
    else:
        sources = [(split, split_source(config, split)) for split in args.split or config.eval.splits]
    if len({label for label, _ in sources}) < len(sources):
        raise FrozenPrefixError("two evaluated sets have the same name; give each split or file once")
    base_dir = Path(args.config).parent if args.config else None
    local = Path(args.model).is_dir()  # a Hub repo id gets ./eval/USER--NAME, not a folder named like the repo
    out = Path(args.out or (Path(args.model) / "eval" if local else Path("eval") / args.model.replace("/", "--")))
    single = len(sources) == 1
    results = {}
    if task != "caption":
        for label, source in sources:
            results[label] = evaluate_task(model, task, label, source, config, out, base_dir, not args.no_progress)
        print(f"results written to {out}")
        return
    for label, source in sources:
        label = f"{label}_blind" if args.blind else label
        metrics, _ = evaluate_and_write(
            model, label, source, config, out, base_dir, prefixed=not single or args.blind,
            progress=not args.no_progress, blind=args.blind,
        )
        results[label] = metrics
        say(f"{label}: {format_metrics(metrics)}")
    if not single and ctx.main:
        (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    say(f"results written to {out}")


if __name__ == "__main__":
    sys.exit(main())
