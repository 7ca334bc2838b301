"""Is data loading the bottleneck? Images/s of the training loader next to images/s of a training step.

    python scripts/benchmark_data.py [--config configs/shapes.yaml] [--batches 40] [--steps 4] [section.key=value ...]

Both are measured in one run on the recipe's own data, transforms, loader (data.num_workers) and model.
The loader is timed alone (decode, transform, tokenize, collate); the step is timed on batches already
loaded (forward, backward to the prefix, optimizer update), so neither hides behind the other.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from frozen_prefix.cli import resolve_device  # noqa: E402
from frozen_prefix.config import load_config  # noqa: E402
from frozen_prefix.data import CaptionCollator, TrainExamples, build_source  # noqa: E402
from frozen_prefix.errors import FrozenPrefixError  # noqa: E402
from frozen_prefix.models.captioner import FrozenPrefixCaptioner  # noqa: E402
from frozen_prefix.models.encoder import build_transform  # noqa: E402
from frozen_prefix.train import autocast_for, build_optimizer, train_loader  # noqa: E402


def loader_rate(loader: torch.utils.data.DataLoader, batches: int) -> tuple[float, float, int]:
    """(images/s after the first batch, seconds to the first batch, batches timed)."""
    start = time.perf_counter()
    iterator = iter(loader)
    first = next(iterator)
    ready = time.perf_counter()
    images, timed = 0, 0
    for batch in iterator:
        images += batch.size
        timed += 1
        if timed >= batches:
            break
    elapsed = time.perf_counter() - ready
    del first
    return images / elapsed, ready - start, timed


def step_rate(model: FrozenPrefixCaptioner, batches: list[dict], config, device: torch.device) -> tuple[float, float]:
    """(images/s, seconds per step) of full training steps; the first step is a warm-up and not timed."""
    optimizer = build_optimizer(model, config)
    amp = autocast_for(device, config.train.precision)
    trainable = model.trainable_parameters()
    model.train()
    times = []
    for batch in batches:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with amp:
            loss = model(**batch.model_inputs(device))["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, config.train.grad_clip)
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    per_step = sum(times[1:]) / max(len(times) - 1, 1)
    return batches[0]["size"] / per_step, per_step


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "shapes.yaml"))
    parser.add_argument("--batches", type=int, default=40, help="loader batches to time (after the first)")
    parser.add_argument("--steps", type=int, default=4, help="training steps to time (after one warm-up step)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. data.num_workers=2")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        config = load_config(args.config, args.overrides)
        dc, tc = config.data, config.train
        device = resolve_device(tc.device, "train.device")
        model = FrozenPrefixCaptioner(config, device=device)
        collate = CaptionCollator(
            model.tokenizer, build_transform(model.image_config, train=dc.augment), model.prefix_length,
            dc.max_caption_tokens, model.start_ids,
        )
        examples = TrainExamples(build_source(dc.train), dc.bad_data)
        images_per_s, first, timed = loader_rate(train_loader(examples, collate, config, 0, 0), args.batches)
        batches = []
        for batch in train_loader(examples, collate, config, 1, 0):
            batches.append(batch)
            if len(batches) > args.steps:
                break
        train_per_s, per_step = step_rate(model, batches, config, device)
    except FrozenPrefixError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    precision = tc.precision if tc.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    print(f"recipe   : {args.config} (batch {tc.batch_size}, data.num_workers={dc.num_workers}, "
          f"{torch.get_num_threads()} torch threads)")
    print(f"loader   : {images_per_s:8.1f} images/s  ({timed} batches; {first:.2f} s to the first batch)")
    print(f"training : {train_per_s:8.1f} images/s  ({per_step:.2f} s per step of {tc.batch_size} on {device}, "
          f"{precision}; {len(batches) - 1} steps timed)")
    ratio = images_per_s / train_per_s
    verdict = "data loading is not the bottleneck" if ratio > 1.5 else "data loading IS a bottleneck"
    print(f"the loader delivers {ratio:.1f}x the images a training step consumes: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
