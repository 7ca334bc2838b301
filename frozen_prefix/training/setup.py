"""Everything a run needs before its first step, in the order that keeps runs exact: checks, the model, the data,
the optimizer, the strategy (one process, DDP, FSDP), a resumed checkpoint, the run folder and the batches."""

from __future__ import annotations

import atexit
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import Config
from ..data import TrainCollator, TrainExamples, build_train_source
from ..data.layout import Batch
from ..errors import FrozenPrefixError
from ..models.encoder import build_transform
from ..models.precision import autocast_for, resolve_precision
from ..parallel import distributed
from ..parallel.sharding import full_state
from . import strategies
from .checkpoint import load_checkpoint, resume_latest, rng_state, save_checkpoint
from .ema import WeightAverage
from .feature_cache import CachedExamples, build_feature_cache
from .loaders import batch_stream, fixed_val_batches
from .optim import build_optimizer, build_scheduler, seed_everything
from .preflight import check_context_length, check_world, dry_run
from .run_folder import MetricsLog, NoMetricsLog, check_run_dir, prepare_run_dir, warn_config_changes
from .sinks import check_sinks, open_sinks
from .speedups import apply_speedups, with_resolved_workers
from .step import Trainer, TrainerState, model_inputs, objective_weights

log = logging.getLogger("frozen_prefix")


@dataclass
class Run:
    """A trainer with what the loop needs around it: the run folder, the validation batches, the precision used."""

    trainer: Trainer
    folder: Path
    val_batches: list[Batch]
    precision: str

    def checkpoint(self) -> None:
        """RUN/checkpoints/step_N: weights, optimizer, schedule, state, RNGs (FSDP: all ranks gather, rank 0 writes)."""
        t = self.trainer
        t.state.scaler = t.scaler.state_dict() if t.scaler.is_enabled() else None
        t.state.world_size = t.ctx.world
        weights, optimizer_state = strategies.checkpoint_state(t.model, t.optimizer)
        rngs = t.ctx.gather(rng_state()) if t.ctx.active else None
        average = full_state(t.ema.state_dict()) if t.ema is not None else None
        if t.ctx.main:
            save_checkpoint(
                self.folder, t.model, t.optimizer, t.scheduler, t.state.to_dict(), t.config.train.keep_last, weights,
                optimizer_state, rngs, ema=average,
            )


def check_request(config: Config, ctx: distributed.Dist) -> None:
    """What a config asks for that cannot start: no data, a world it does not split over, a missing checkpoint."""
    tc = config.train
    if config.data.train is None:
        raise FrozenPrefixError("data.train is not set; give a source, e.g. data.train=shapes:train or a .jsonl file")
    check_world(config, ctx)
    if tc.resume not in ("none", "auto") and not Path(tc.resume).is_dir():
        raise FrozenPrefixError(f"train.resume: checkpoint folder {tc.resume} not found; use auto or a path")
    check_run_dir(config)
    check_sinks(config)  # a requested logging package that is missing fails now, not after the first steps


def build_run(config: Config, ctx: distributed.Dist) -> Run:
    """The model, data, optimizer and strategy of a run (resumed where it says so), checked before a file is written."""
    tc, dc = config.train, config.data
    device = ctx.device
    check_request(config, ctx)
    # Everything a user gave is checked before the run folder is touched: data, model, one forward pass.
    train_source = build_train_source(dc.train, mixture_size=dc.mixture_size, seed=tc.seed)
    seed_everything(tc.seed)
    model = strategies.build_model(config, ctx)  # the same initial weights on every rank: the same seed
    check_context_length(model, config)
    strategies.prepare(model, config, ctx)  # SyncBatchNorm, FSDP sharding: before the optimizer sees the parameters
    if ctx.rank:  # rank 0 keeps one process's random stream; the others draw their own (dropout, drop-path)
        seed_everything(tc.seed + 1_000_003 * ctx.rank)
    model.train()
    transform = build_transform(model.image_config, train=dc.augment)
    collate = TrainCollator(  # captions exactly as CaptionCollator lays them out; questions, conversations too
        model.tokenizer, transform, model.prefix_length, dc.max_caption_tokens, model.start_ids,
        images_per_sequence=dc.images_per_sequence, blank_images=dc.blank_images, chat_style=dc.chat_style,
        vqa_template=config.eval.vqa.template, max_sequence_tokens=model.context_length,
    )
    eval_collate = TrainCollator(
        model.tokenizer, model.image_transform, model.prefix_length, dc.max_caption_tokens, model.start_ids,
        chat_style=dc.chat_style, vqa_template=config.eval.vqa.template, max_sequence_tokens=model.context_length,
    )
    examples = TrainExamples(train_source, dc.bad_data, dc.caption_sampling)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)
    precision = resolve_precision(device, tc.precision)
    amp = autocast_for(device, precision)
    # fp16 needs loss scaling (its small exponent range underflows gradients); bf16 and fp32 do not.
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    lm_dtype = str(model.lm.dtype).removeprefix("torch.")
    attention = getattr(model.lm.config, "_attn_implementation", None)
    log.info("precision: %s on %s, frozen LM weights in %s, %s attention", precision, device.type, lm_dtype, attention)
    # eval mode, seeded transforms: leaves no trace; its batch stands in for a rank's empty one under torchrun
    filler = dry_run(model, examples, collate, device, amp)
    applied = apply_speedups(model, config)  # train.compile, channels_last, lm_gradient_checkpointing
    if applied:
        log.info("speed-ups: %s", applied)
    # DDP over the trainable modules only (the LM is replicated, never synchronised), or FSDP's own reduction.
    par = strategies.wrap(model, ctx, model_inputs(filler, device, config) if filler is not None else None)
    # train.ema_decay: the average of the unwrapped model's weights, from model.init_from's or a checkpoint's on
    ema = WeightAverage(model, tc.ema_decay) if tc.ema_decay > 0 else None
    state, resumed = resume(config, ctx, model, optimizer, scheduler, ema)
    if state.scaler:
        scaler.load_state_dict(state.scaler)
    val_batches = fixed_val_batches(model, config, eval_collate)
    run, metrics = open_run_folder(config, ctx, state.step if resumed else None)
    # data.feature_cache: built from the encoder as it trains (after a resume), refused where it cannot be right
    cache = build_feature_cache(model, config, transform, train_source)
    if cache is not None:
        examples = CachedExamples(examples, cache)
    batches = batch_stream(examples, collate, with_resolved_workers(config, device), state.epoch, state.position)
    trainer = Trainer(
        config, model, par, ctx, optimizer, scheduler, scaler, ema, amp, state, batches, filler, metrics, cache,
        objective_weights(model, tc),
    )
    return Run(trainer, run, val_batches, precision)


def resume(
    config: Config, ctx: distributed.Dist, model: Any, optimizer: Any, scheduler: Any, ema: WeightAverage | None
) -> tuple[TrainerState, bool]:
    """The state a run goes on from (train.resume=auto: the latest checkpoint, if any; a path: that one); resumed?"""
    tc = config.train
    resumed = None
    if tc.resume == "auto":
        resumed = resume_latest(tc.output_dir, model, optimizer, scheduler, ema=ema)
    elif tc.resume != "none":
        resumed = (Path(tc.resume), load_checkpoint(tc.resume, model, optimizer, scheduler, ema=ema))
    if resumed is None:
        return TrainerState(), False
    state = TrainerState.from_dict(resumed[1])
    log.info("resumed from %s at step %d", resumed[0], state.step)
    if ctx.main:
        warn_config_changes(Path(resumed[0]).resolve().parent.parent, config)  # RUN/checkpoints/step_N -> RUN
    if state.world_size != ctx.world:
        log.info(
            "the run trained in %d processes and goes on in %d: the same examples in the same global order "
            "(streams: with data.num_workers=0), sums taken in another order", state.world_size, ctx.world,
        )
    return state, True


def open_run_folder(
    config: Config, ctx: distributed.Dist, resume_step: int | None
) -> tuple[Path, MetricsLog | NoMetricsLog]:
    """Rank 0 writes the run folder (config, versions, metrics.jsonl and its sinks); the other ranks log nothing."""
    run = Path(config.train.output_dir)
    if not ctx.main:
        return run, NoMetricsLog()
    run = prepare_run_dir(config)
    if resume_step is None and (run / "metrics.jsonl").exists():
        (run / "metrics.jsonl").unlink()
    metrics = MetricsLog(run / "metrics.jsonl", resume_step, open_sinks(config, run, resume_step))
    # A run that stops early (signal, non-finite streak, error) still flushes TensorBoard / finishes W&B;
    # close() is idempotent, so the normal end closing them first is fine.
    atexit.register(metrics.sinks.close)
    return run, metrics
