"""Captioning a data set and scoring it: the loop behind `evaluate --task caption` and training's evaluations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm

from ..captioner import FrozenPrefixCaptioner
from ..config import Config, EvalConfig, SourceConfig
from ..data import CaptionCollator, build_source, eval_examples
from ..data.layout import Batch
from ..errors import FrozenPrefixError
from ..generate import decoding_options, generate_captions
from ..parallel.decoding import Decoding
from .fewshot import blank_image
from .metrics import CocoScorer, Scorer, ShapesScorer, apply_scorers
from .report import sample_images, save_samples, write_results


def caption_scorers(eval_config: EvalConfig, rows: list[dict[str, Any]]) -> list[Scorer]:
    """The scorers that apply to captioned rows: the shapes score where objects are known, COCO metrics if asked."""
    scorers: list[Scorer] = []
    if rows and "objects" in rows[0]:
        scorers.append(ShapesScorer())
    if eval_config.metrics:
        scorers.append(CocoScorer(spice=eval_config.spice))
    return scorers


class _IndexedCollate:
    """The caption collate on (index, item) pairs; the indices of the kept items go into batch.extra['index']."""

    def __init__(self, collate: CaptionCollator) -> None:
        self.collate = collate

    def __call__(self, pairs: list[tuple[int, Any]]) -> Batch:
        batch = self.collate([item for _, item in pairs])
        batch.extra["index"] = [index for index, item in pairs if item is not None]  # the collate drops the Nones
        return batch


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
    decoding = Decoding(model)  # under torchrun: this rank's share, FSDP's lockstep, the rows gathered back
    share = decoding.share(examples)
    collate = CaptionCollator(model.tokenizer, model.image_transform, model.prefix_length, 1, model.start_ids)
    # Its own generator: a DataLoader otherwise draws its base seed from the global RNG, shifting training's stream.
    loader = DataLoader(
        share, batch_size=eval_config.batch_size, collate_fn=_IndexedCollate(collate),
        generator=torch.Generator().manual_seed(0),
    )
    options = decoding_options(eval_config)
    found: list[tuple[int, Any, str, list[str], Any]] = []  # (index, image_id, caption, references, objects)
    skipped = 0
    bar = tqdm(
        total=len(loader) if not isinstance(share, IterableDataset) else None,
        desc=f"captioning {source_label(source)}", disable=not progress or not decoding.main, leave=False,
    )
    placeholder = torch.zeros(1, *model.image_config["input_size"])
    with decoding.gathered():
        for batch in decoding.batches(loader):
            bar.update()
            skipped += batch.skipped if batch is not None else 0
            if batch is None or not batch.size:  # join the other ranks' decoding (FSDP); nothing of it is kept
                decoding.join(lambda: generate_captions(model, placeholder, **options))
                continue
            pixels = blind_pixels(model, batch.size) if blind else batch.pixel_values
            captions = generate_captions(model, pixels, **options)
            for i, caption in enumerate(captions):
                objects = batch.objects[i] if batch.objects is not None else None
                found.append((batch.extra["index"][i], batch.image_ids[i], caption, list(batch.references[i]), objects))
    bar.close()
    found, skipped = decoding.collect(found, skipped)
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

    def score() -> tuple[dict[str, Any], list[dict[str, Any]]]:  # the metrics, and the rows with their own scores
        metrics, scored = apply_scorers(caption_scorers(eval_config, rows), rows)
        return {"images": len(rows), "skipped": skipped, **metrics}, scored

    return Decoding(model).once(score)  # under torchrun rank 0 scores (the COCO metrics' Java runs once)


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
    if not Decoding(model).main:  # the other ranks captioned their share; rank 0 writes
        return metrics, rows
    write_results(out, label, metrics, rows, prefixed=prefixed)
    shown = rows[: config.eval.grid]
    if shown and not blind:  # a blind caption next to the real image it never saw would mislead
        images = sample_images(source, [r["image_id"] for r in shown], base_dir)
        save_samples(out / (f"{label}_samples.png" if prefixed else "samples.png"), shown, images)
    return metrics, rows


def format_metrics(metrics: dict[str, Any]) -> str:
    """One readable line."""
    return "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
