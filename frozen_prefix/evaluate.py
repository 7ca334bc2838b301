"""Caption metrics (pycocoevalcap, the shapes exact score) and `python -m frozen_prefix.evaluate`."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .config import Config, EvalConfig, SourceConfig, load_config
from .data import CaptionCollator, EvalExamples, build_source
from .data.shapes import exact_match
from .errors import FrozenPrefixError
from .generate import generate_captions
from .models.captioner import FrozenPrefixCaptioner

log = logging.getLogger(__name__)


def java_available() -> bool:
    """METEOR and the PTB tokenizer run on Java."""
    return shutil.which("java") is not None


def coco_metrics(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE when it can run) via pycocoevalcap, x100."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if not java_available():
        raise FrozenPrefixError(
            "caption metrics need Java (PTB tokenizer, METEOR); install a JRE or set eval.metrics=false"
        )
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ids = list(predictions)
    with contextlib.redirect_stdout(io.StringIO()):  # the tokenizer prints progress lines
        tokenizer = PTBTokenizer()
        gts = tokenizer.tokenize({i: [{"caption": c} for c in references[i]] for i in ids})
        res = tokenizer.tokenize({i: [{"caption": predictions[i]}] for i in ids})
    scores: dict[str, float] = {}
    with contextlib.redirect_stdout(io.StringIO()):
        bleu, _ = Bleu(4).compute_score(gts, res)
        scores.update({f"bleu{n + 1}": 100 * b for n, b in enumerate(bleu)})
        scores["meteor"] = 100 * Meteor().compute_score(gts, res)[0]
        scores["rouge_l"] = 100 * Rouge().compute_score(gts, res)[0]
        scores["cider"] = 100 * Cider().compute_score(gts, res)[0]
    return scores


def evaluate_source(
    model: FrozenPrefixCaptioner, source: SourceConfig, eval_config: EvalConfig, bad_data: str = "error",
    base_dir: str | Path | None = None, progress: bool = False,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Caption every image of a source; return metrics and per-image rows (id, prediction, references)."""
    examples = EvalExamples(build_source(source, base_dir), bad_data)
    if eval_config.max_images is not None and len(examples) > eval_config.max_images:
        examples = torch.utils.data.Subset(examples, range(eval_config.max_images))
    collate = CaptionCollator(model.tokenizer, model.image_transform, model.prefix_length, 1)
    loader = DataLoader(examples, batch_size=eval_config.batch_size, collate_fn=collate)
    rows: list[dict[str, Any]] = []
    skipped = 0
    for batch in tqdm(loader, desc=f"evaluating {source.kind}:{source.split}", disable=not progress, leave=False):
        skipped += batch["skipped"]
        if not batch["size"]:
            continue
        captions = generate_captions(
            model, batch["pixel_values"], prompt=eval_config.prompt, batch_size=eval_config.batch_size,
            max_new_tokens=eval_config.max_new_tokens, num_beams=eval_config.num_beams,
        )
        for i, caption in enumerate(captions):
            row = {"image_id": batch["image_ids"][i], "caption": caption, "references": batch["references"][i]}
            if "objects" in batch:
                row["objects"] = batch["objects"][i]
                row["exact"] = exact_match(caption, batch["objects"][i])
            rows.append(row)
    metrics: dict[str, float] = {"images": len(rows), "skipped": skipped}
    if rows and "exact" in rows[0]:
        metrics["shapes_exact"] = 100 * sum(r["exact"] for r in rows) / len(rows)
    if eval_config.metrics and rows:
        metrics.update(
            coco_metrics({r["image_id"]: r["caption"] for r in rows}, {r["image_id"]: r["references"] for r in rows})
        )
    return metrics, rows


def split_source(config: Config, split: str) -> SourceConfig:
    """The data source a split name refers to in a config."""
    source = config.data.extra.get(split) if split not in ("train", "val", "test") else getattr(config.data, split)
    if source is None:
        raise FrozenPrefixError(f"the config has no data for split {split!r}; set data.{split}")
    return source


def write_results(out_dir: Path, split: str, metrics: dict[str, float], rows: list[dict[str, Any]]) -> None:
    """metrics.json, COCO-format predictions and per-image rows for one split."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{split}_metrics.json").write_text(json.dumps(metrics, indent=2))
    (out_dir / f"{split}_predictions.json").write_text(
        json.dumps([{"image_id": r["image_id"], "caption": r["caption"]} for r in rows], indent=1)
    )
    (out_dir / f"{split}_per_image.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def format_metrics(metrics: dict[str, float]) -> str:
    """One readable line."""
    return "  ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


def main(argv: list[str] | None = None) -> int:
    """python -m frozen_prefix.evaluate --model DIR [--config X.yaml] [--split S ...] [overrides]."""
    parser = argparse.ArgumentParser(prog="python -m frozen_prefix.evaluate", description=main.__doc__)
    parser.add_argument("--model", required=True, help="a saved model folder (a run's model/)")
    parser.add_argument("--config", help="YAML whose data/eval sections to use (default: the model's own)")
    parser.add_argument("--split", action="append", help="split(s) to evaluate (default: eval.splits)")
    parser.add_argument("--out", help="output folder (default: MODEL/eval)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        model = FrozenPrefixCaptioner.from_pretrained(args.model)
        config = load_config(args.config or Path(args.model) / "config.yaml", args.overrides)
        out = Path(args.out or Path(args.model) / "eval")
        for split in args.split or config.eval.splits:
            metrics, rows = evaluate_source(
                model, split_source(config, split), config.eval, config.data.bad_data, progress=True
            )
            write_results(out, split, metrics, rows)
            print(f"{split}: {format_metrics(metrics)}")
    except FrozenPrefixError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
