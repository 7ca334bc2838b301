"""What training measures as it goes: the validation loss, and caption metrics on data.val (RUN/best/)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..captioner import FrozenPrefixCaptioner
from ..config import Config
from ..data.layout import Batch
from ..errors import FrozenPrefixError
from ..evaluation.captions import evaluate_source, split_source
from ..parallel import distributed
from ..parallel.sharding import is_fsdp
from . import strategies
from .run_folder import save_best
from .step import model_inputs


@torch.no_grad()
def validation_loss(
    model: FrozenPrefixCaptioner, batches: list[Batch], device: torch.device, amp: Any,
    ctx: distributed.Dist | None = None,
) -> float:
    """Mean loss over fixed validation batches; under torchrun each rank takes every N-th batch."""
    ctx = ctx or distributed.Dist()
    strategies.share_buffers(model)
    lockstep = is_fsdp(model)  # FSDP: every forward is a collective, so every rank makes as many
    model.eval()
    losses = []
    rounds = -(-len(batches) // ctx.world) if lockstep else 0
    own = [ctx.rank + j * ctx.world for j in range(rounds)] if lockstep else range(ctx.rank, len(batches), ctx.world)
    for i in own:
        with amp:
            loss = model(**model_inputs(batches[min(i, len(batches) - 1)], device, model.config))["loss"].item()
        if i < len(batches):
            losses.append(loss)
    model.train()
    if ctx.active:
        total, count = ctx.sum([sum(losses), len(losses)])
        return total / count
    return float(np.mean(losses))


def periodic_evaluation(
    model: FrozenPrefixCaptioner, config: Config, step: int, run_dir: Path, best: dict[str, Any] | None,
    precision: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Caption metrics on the first eval.every_images val images; RUN/best/ is rewritten when they improve.

    Returns the metrics.jsonl record and the best so far (which the trainer keeps in its state).
    """
    ec = config.eval
    started = time.perf_counter()
    device = model.device
    strategies.share_buffers(model)  # under torchrun: every rank captions with the model rank 0 will save
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # training's RNG stream stays as is
        scores, _ = evaluate_source(
            model, split_source(config, "val"), dataclasses.replace(ec, max_images=ec.every_images),
            config.data.bad_data,
        )
    if ec.best_metric not in scores:
        raise FrozenPrefixError(
            f"eval.best_metric={ec.best_metric} was not computed on data.val (got {', '.join(scores)}); choose another"
        )
    value = float(scores[ec.best_metric])  # under torchrun: rank 0's scores, the same on every rank
    improved = best is None or value > best["value"]
    if improved:
        best = {"metric": ec.best_metric, "value": value, "step": step}
        save_best(model, run_dir, best, precision)
    record: dict[str, Any] = {"step": step, **{f"val/{k}": v for k, v in scores.items()}}
    record.update(
        best_metric=ec.best_metric, best_value=best["value"], best_step=best["step"], is_best=improved,
        eval_sec=round(time.perf_counter() - started, 2),
    )
    return record, best
