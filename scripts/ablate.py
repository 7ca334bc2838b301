"""Train and evaluate a grid of variants of one recipe, one after another, into one Markdown + JSON table.

    python scripts/ablate.py --config configs/shapes.yaml --grid issue12 --out runs/ablate_issue12 \\
        --eval-images 200 train.max_steps=300
    python scripts/ablate.py --config configs/tiny.yaml --out runs/abl \\
        --variant "base=" --variant "sum=model.fusion=sum train.visual_loss_weight=0.1" train.max_steps=5

A variant is NAME=OVERRIDES: dotted overrides (split like a shell line) on top of the base config and the common
overrides given at the end. Each one trains in its own subprocess (`python -m frozen_prefix.train`, in
OUT/NAME/run) and is then evaluated by `python -m frozen_prefix.evaluate` on the shapes test and
held-out-compositions splits, and blind on test (every image black: what the LM says without seeing anything).
Its row goes to OUT/NAME/result.json; OUT/results.json and OUT/results.md hold the whole table.

Resumable: a variant whose result.json says "ok" is not run again; a failed one is recorded with its error (the
last lines of its log) and the grid goes on; running the same command again retries the failed ones (a run
folder left half-trained resumes from its last checkpoint).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# Issue 12: one factor at a time, from the base recipe, which is itself the "spatial projection, prefix fusion,
# beta 0, frozen LM, trained encoder" cell of every factor (so those cells are not run twice).
GRIDS: dict[str, dict[str, list[str]]] = {
    "issue12": {
        "base": [],
        "proj_linear": ["model.projection=linear"],
        "proj_mlp": ["model.projection=mlp"],
        # at the LM's width (576 for SmolLM2): with the recipe's mlp_hidden=1024 the mapper alone is 35M parameters
        "proj_queries": ["model.projection=queries", "model.mlp_hidden=null"],
        "fusion_sum": ["model.fusion=sum"],
        "fusion_product": ["model.fusion=product"],
        "visual_0.1": ["train.visual_loss_weight=0.1"],
        "visual_1": ["train.visual_loss_weight=1"],
        "visual_mse_0.1": ["train.visual_loss_weight=0.1", "train.visual_loss=mse"],
        "lm_finetuned": ["model.lm_trainable=true"],  # a baseline, not Frozen
        "encoder_random_frozen": ["model.freeze_encoder=true"],  # only the projection learns
    },
}
SPLITS = {"test": "shapes:test", "compositional": "shapes:compositional"}
BLIND_SPLIT = "test"
NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")
COLUMNS = ("variant", "overrides", "status", "steps", "train_s", "val_loss", "test_exact", "compositional_exact",
           "blind_test_exact")


def parse_variant(text: str) -> tuple[str, list[str]]:
    """'NAME=a.b=1 c.d=2' -> (NAME, ['a.b=1', 'c.d=2'])."""
    name, sep, rest = text.partition("=")
    if not sep or not NAME.match(name):
        raise SystemExit(
            f"--variant {text!r}: give NAME=OVERRIDES, NAME of letters, digits and _.+- (e.g. 'sum=model.fusion=sum')"
        )
    return name, shlex.split(rest)


def variants_from(args: argparse.Namespace) -> dict[str, list[str]]:
    """The grid preset, then the --variant ones, filtered by --only."""
    chosen = dict(GRIDS[args.grid]) if args.grid else {}
    for text in args.variant or []:
        name, overrides = parse_variant(text)
        chosen[name] = overrides
    if args.only:
        unknown = sorted(set(args.only) - set(chosen))
        if unknown:
            raise SystemExit(f"--only: no variant named {', '.join(unknown)}; known: {', '.join(chosen)}")
        chosen = {name: o for name, o in chosen.items() if name in args.only}
    if not chosen:
        raise SystemExit("no variants: give --grid issue12 and/or --variant NAME=OVERRIDES")
    return chosen


def run_logged(command: list[str], log: Path, timeout: float | None) -> float:
    """Run a command with its output appended to log; its wall time in seconds; raise with the log's tail on failure."""
    start = time.perf_counter()
    with log.open("a") as f:
        f.write(f"$ {shlex.join(command)}\n")
        f.flush()
        begin = f.tell()
        done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, timeout=timeout, check=False)
    if done.returncode:  # the last lines this command wrote: its error
        with log.open("rb") as f:
            f.seek(begin)
            tail = f.read().decode(errors="replace").strip().splitlines()[-2:]
        raise RuntimeError(f"exit {done.returncode}: " + " | ".join(tail))
    return time.perf_counter() - start


def final_record(run: Path) -> dict[str, Any]:
    """The run's last metrics.jsonl record (the final one: step, val_loss)."""
    lines = [ln for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return json.loads(lines[-1]) if lines else {}


def exact(folder: Path, label: str) -> float | None:
    """The shapes exact score an evaluate call wrote for one --data label."""
    path = folder / f"{label}_metrics.json"
    return json.loads(path.read_text()).get("shapes_exact") if path.is_file() else None


def run_variant(name: str, overrides: list[str], args: argparse.Namespace, common: list[str]) -> dict[str, Any]:
    """Train, evaluate and evaluate blind one variant; its result row."""
    folder = Path(args.out) / name
    folder.mkdir(parents=True, exist_ok=True)
    run, log, python = folder / "run", folder / "log.txt", sys.executable
    train = [python, "-m", "frozen_prefix.train", "--config", str(Path(args.config).resolve()), *common, *overrides,
             f"train.output_dir={run.resolve()}", "train.resume=auto", "eval.splits=[]", "train.progress=false"]
    row: dict[str, Any] = {"variant": name, "overrides": " ".join(overrides)}
    timing = folder / "train.json"  # written once training finished: a retry after a failed evaluation reuses it
    if timing.is_file() and (run / "model").is_dir():
        train_s = json.loads(timing.read_text())["train_s"]
    else:
        train_s = run_logged(train, log, args.timeout)
        timing.write_text(json.dumps({"train_s": train_s}) + "\n")
    record = final_record(run)
    row.update(steps=record.get("step"), train_s=round(train_s, 1), val_loss=record.get("val_loss"))
    evaluate = [python, "-m", "frozen_prefix.evaluate", "--model", str((run / "model").resolve()),
                "--out", str((folder / "eval").resolve()), "--no-progress", f"eval.max_images={args.eval_images}",
                "eval.metrics=false"]
    run_logged([*evaluate, *(f"--data={SPLITS[s]}" for s in SPLITS)], log, args.timeout)
    for split, source in SPLITS.items():
        row[f"{split}_exact"] = exact(folder / "eval", source.replace(":", "_"))
    if not args.no_blind:
        run_logged([*evaluate, "--blind", f"--data={SPLITS[BLIND_SPLIT]}"], log, args.timeout)
        row[f"blind_{BLIND_SPLIT}_exact"] = exact(folder / "eval", SPLITS[BLIND_SPLIT].replace(":", "_") + "_blind")
    return row


def cell(value: Any) -> str:
    """A table cell: numbers to 3 places, nothing as a dash."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value).replace("|", "\\|")


def write_table(out: Path, rows: list[dict[str, Any]], base: str, common: list[str]) -> None:
    """OUT/results.json (every row as it is) and OUT/results.md (one Markdown table)."""
    (out / "results.json").write_text(json.dumps({"config": base, "common": common, "rows": rows}, indent=2) + "\n")
    lines = [f"Base config `{base}`, common overrides `{' '.join(common) or '(none)'}`.", "",
             "| " + " | ".join(COLUMNS) + " | error |", "|" + "---|" * (len(COLUMNS) + 1)]
    for row in rows:
        error = (row.get("error") or "")[:200]
        lines.append("| " + " | ".join(cell(row.get(c)) for c in COLUMNS) + f" | {cell(error or None)} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


def build_parser() -> argparse.ArgumentParser:
    """The script's flags."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 2)[-1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="the base recipe, e.g. configs/shapes.yaml")
    parser.add_argument("--out", default="runs/ablate", help="the grid's folder (one subfolder per variant)")
    parser.add_argument("--grid", choices=sorted(GRIDS), help="a built-in set of variants")
    parser.add_argument("--variant", action="append", help="NAME=OVERRIDES, e.g. 'sum=model.fusion=sum' (repeatable)")
    parser.add_argument("--only", nargs="+", help="run only these variants (names)")
    parser.add_argument("--eval-images", type=int, default=200, help="images per evaluated split (eval.max_images)")
    parser.add_argument("--no-blind", action="store_true", help="skip the blind control")
    parser.add_argument("--timeout", type=float, help="seconds allowed to each train or evaluate call")
    parser.add_argument("--list", action="store_true", help="print the variants and exit")
    parser.add_argument("overrides", nargs="*", help="common overrides for every variant, e.g. train.max_steps=100")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the grid, one variant at a time; the table is rewritten after each."""
    args = build_parser().parse_args(argv)
    variants = variants_from(args)
    if args.list:
        for name, overrides in variants.items():
            print(f"{name}: {' '.join(overrides) or '(the base config)'}")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, overrides in variants.items():
        result = out / name / "result.json"
        if result.is_file() and json.loads(result.read_text()).get("status") == "ok":
            print(f"{name}: done before, kept")
            rows.append(json.loads(result.read_text()))
            continue
        print(f"{name}: {' '.join(overrides) or '(the base config)'}", flush=True)
        try:
            row = {**run_variant(name, overrides, args, args.overrides), "status": "ok"}
        except (RuntimeError, subprocess.TimeoutExpired, OSError, ValueError) as e:  # record it, go on
            row = {"variant": name, "overrides": " ".join(overrides), "status": "failed", "error": str(e)}
            print(f"{name}: FAILED ({str(e)[:300]})", flush=True)
        result.write_text(json.dumps(row, indent=2) + "\n")
        rows.append(row)
        write_table(out, rows, args.config, args.overrides)
    write_table(out, rows, args.config, args.overrides)
    print(f"table: {out / 'results.md'}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
