"""`python -m frozen_prefix.evaluate`: caption a split or data set with a saved model, or run a few-shot task."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import cli
from .captioner import FrozenPrefixCaptioner
from .config import SOURCE_KINDS, load_config, parse_source
from .errors import FrozenPrefixError
from .evaluation.captions import evaluate_and_write, format_metrics, split_source
from .evaluation.tasks import evaluate_task
from .parallel import distributed


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
