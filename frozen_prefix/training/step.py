"""One optimizer step: micro-batches weighted by tokens, the joint objective, the non-finite guard, the scaler, EMA.

Collectives go through the process group object (`Dist`), whose sums are the values themselves in one process,
and gradients through the strategy (`Parallel`: one process, DDP or FSDP): the step reads the same either way.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..captioner import FrozenPrefixCaptioner
from ..cli import Stopped
from ..config import Config, TrainConfig
from ..data.layout import Batch
from ..parallel.distributed import Dist
from .ema import WeightAverage
from .strategies import Parallel

log = logging.getLogger("frozen_prefix")

TrainingStopped = Stopped  # training stopped early (signal, non-finite streak); the last checkpoint is intact


@dataclass
class TrainerState:
    """Everything about the loop's progress that a checkpoint must carry; only the training step changes it."""

    step: int = 0
    epoch: int = 0
    position: int = 0  # examples of this epoch already trained on (for exact resume)
    bad_streak: int = 0  # consecutive non-finite steps
    bad_total: int = 0
    skipped: int = 0  # bad records skipped (data.bad_data=skip)
    best: dict[str, Any] | None = None  # {"metric", "value", "step"} of RUN/best/
    scaler: dict[str, Any] | None = None  # fp16 gradient scaler state
    world_size: int = 1  # processes that trained up to this state (a resume may use another number)

    def to_dict(self) -> dict[str, Any]:
        """Plain types, as torch.load(weights_only=True) accepts them."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainerState:
        """From a checkpoint's dict (older checkpoints may lack newer fields)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def objective_weights(model: FrozenPrefixCaptioner, tc: TrainConfig) -> dict[str, float]:
    """Each term of the objective and its weight: the text loss (alpha) and each variant's losses (e.g. beta)."""
    weights = {"loss": tc.text_loss_weight}
    for variant in model.variants.values():
        weights.update(variant.loss_weights())
    return weights


def term_name(key: str) -> str:
    """How metrics.jsonl names a term: loss_text for the text loss, the variant's own name for the others."""
    return "loss_text" if key == "loss" else key


def joint_loss(
    out: dict[str, torch.Tensor], weights: dict[str, float], token_weight: float, image_weight: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """One micro-batch's share of the step's objective, alpha * text + beta * visual + ..., and each term's share.

    The text loss is weighted by the micro-batch's share of the step's labelled tokens, the variants' losses (means
    over images) by its share of the step's images: each term is then its mean over the whole step. InfoNCE
    draws its negatives from the micro-batch on this process alone.
    """
    text = out["loss"] * token_weight
    loss, terms = weights["loss"] * text, {"loss_text": text.item()}
    for key, weight in weights.items():
        if key != "loss" and key in out:
            term = out[key] * image_weight
            loss = loss + weight * term
            terms[key] = term.item()
    return loss, terms


def model_inputs(batch: Batch, device: torch.device, config: Config) -> dict[str, Any]:
    """A batch as the model's training forward takes it (train.padding_free: laid out without padding)."""
    return {**batch.model_inputs(device), "packed": config.train.padding_free}


@dataclass
class StepResult:
    """What one step did, for the log and the loop."""

    loss: float
    terms: dict[str, float]
    grad_norm: float
    tokens: int
    lr: float


@dataclass
class Trainer:
    """The parts of a run the training step works with; built once by training.setup."""

    config: Config
    model: FrozenPrefixCaptioner
    par: Parallel
    ctx: Dist
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    ema: WeightAverage | None
    amp: Any
    state: TrainerState
    batches: Iterator[tuple[Batch, int, int]]
    filler: Batch | None  # a rank with an empty micro-batch runs this one, with weight 0, to join the reduction
    metrics: Any  # training.run_folder.MetricsLog (rank 0) or NoMetricsLog
    cache: Any = None  # data.feature_cache: the frozen encoder's features
    weights: dict[str, float] = dataclasses.field(default_factory=dict)

    def micro_batches(self) -> tuple[list[Batch | None], int]:
        """train.grad_accum batches (under torchrun an empty one stays as None: every rank joins each reduction),
        and the bad records skipped on the way."""
        micro: list[Batch | None] = []
        skipped = 0
        for _ in range(self.config.train.grad_accum):
            batch, self.state.epoch, self.state.position = next(self.batches)
            skipped += batch.skipped
            if batch.size:
                micro.append(batch)
            elif self.ctx.active:  # every rank joins every micro-batch's gradient reduction; this one adds nothing
                micro.append(None)
        return micro, skipped

    def inputs(self, batch: Batch) -> dict[str, Any]:
        """A micro-batch as the forward takes it: its pixels, or (data.feature_cache) its cached features."""
        device = self.ctx.device
        if self.cache is None:
            return model_inputs(batch, device, self.config)
        cached = self.cache.model_inputs(self.model, batch, device, self.amp)
        return {**cached, "packed": self.config.train.padding_free}

    def step(self) -> StepResult:
        """One optimizer step over train.grad_accum micro-batches."""
        tc, ctx, model, state, k = self.config.train, self.ctx, self.model, self.state, self.model.prefix_length
        self.optimizer.zero_grad(set_to_none=True)
        micro, skipped = self.micro_batches()
        present = [b for b in micro if b is not None]
        # the whole step's labelled tokens and images, over all ranks (one process: the sums are its own)
        tokens, images = (int(n) for n in ctx.sum([sum(b.labelled_tokens() for b in present),
                                                   sum(int(b.layout.image_mask.sum()) // k for b in present)]))
        terms = dict.fromkeys(map(term_name, self.weights), 0.0)  # the objective's terms, logged apart
        loss_sum, world = 0.0, ctx.world
        for i, batch in enumerate(micro):
            # Weighted by tokens: the step's loss is the mean over all its labelled tokens, as one big batch's.
            # DDP/FSDP average gradients over ranks, so each rank's share is scaled up by the world size.
            weight = (batch.labelled_tokens() * world / tokens) if batch is not None else 0.0
            shown = int(batch.layout.image_mask.sum()) // k if batch is not None else 0
            image_weight = shown * world / images if images else 0.0  # the variants' losses: means over images
            inputs = self.inputs(batch if batch is not None else self.filler)
            with self.par.sync(last=i == len(micro) - 1):  # gradient accumulation: reduce once, after the last
                with self.amp:
                    loss, parts = joint_loss(self.par(**inputs), self.weights, weight, image_weight)
                self.scaler.scale(loss).backward()
            loss_sum += loss.item()
            terms.update({key: terms[key] + value for key, value in parts.items()})
        self.scaler.unscale_(self.optimizer)
        grad_norm = self.par.clip_grad_norm(model.trainable_parameters(), tc.grad_clip)  # FSDP: the current shards
        # one view of the step on every rank: its loss, its terms, its skipped records
        loss_sum, skipped, *totals = ctx.sum([loss_sum, skipped, *terms.values()])
        terms = {key: total / world for key, total in zip(terms, totals)}
        loss_sum /= world
        state.skipped += int(skipped)
        state.step += 1
        self.apply_update(loss_sum, grad_norm)
        lr = self.scheduler.get_last_lr()[0]  # the rate this step used (logged), before the schedule moves on
        self.scheduler.step()
        return StepResult(loss_sum, terms, grad_norm, tokens, lr)

    def apply_update(self, loss: float, grad_norm: float) -> None:
        """The optimizer's update, skipped for a non-finite loss or gradient (the guard), then the scaler and EMA."""
        tc, state, scaler = self.config.train, self.state, self.scaler
        # With fp16 the scaler skips steps whose gradients overflowed (and lowers its scale): not a bad step.
        stepped = math.isfinite(loss) and (math.isfinite(grad_norm) or scaler.is_enabled())
        if stepped:
            scaler.step(self.optimizer)
            state.bad_streak = 0
        else:  # skip the update: the weights stay as they were before this step
            state.bad_streak += 1
            state.bad_total += 1
            log.warning("step %d: non-finite loss/grad norm (%s, %s); update skipped", state.step, loss, grad_norm)
            if state.bad_streak > tc.max_bad_steps:
                self.metrics.write({"step": state.step, "loss": None, "bad_steps": state.bad_total})
                raise TrainingStopped(
                    f"{state.bad_streak} non-finite steps in a row (limit train.max_bad_steps={tc.max_bad_steps}); "
                    f"lower train.lr; the last good checkpoint is in {Path(tc.output_dir) / 'checkpoints'}"
                )
        scale = scaler.get_scale() if self.ema is not None else None  # on CUDA a sync: only when it is needed
        scaler.update()
        # The average follows applied updates only: no skipped non-finite step, no step fp16's scaler dropped
        # (it lowers its scale when it does)
        if self.ema is not None and stepped and scaler.get_scale() >= scale:
            self.ema.update(self.model, state.step)
