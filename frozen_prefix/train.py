"""The training loop (`fit`) and `python -m frozen_prefix.train --config X.yaml [section.key=value ...]`."""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import json
import logging
import math
import os
import platform
import random
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import cli, distributed, parallel
from .captioner import FrozenPrefixCaptioner
from .checkpoint import load_checkpoint, resume_latest, rng_state, save_checkpoint, swap_in
from .config import Config, TrainConfig, config_changes, load_config, save_config
from .data import (
    CaptionCollator,
    EpochSampler,
    StreamSource,
    TrainCollator,
    TrainExamples,
    TrainStream,
    build_train_source,
)
from .data.layout import Batch
from .ema import WeightAverage, averaged
from .errors import DataError, FrozenPrefixError
from .evaluate import evaluate_and_write, evaluate_source, format_metrics, split_source
from .feature_cache import CachedExamples, build_feature_cache
from .model_card import write_model_card
from .models.encoder import build_transform
from .models.packing import packing_supported
from .plots import save_curves
from .precision import autocast_for, resolve_precision
from .sinks import Sinks, check_sinks, open_sinks
from .speedups import apply_speedups, with_resolved_workers

log = logging.getLogger("frozen_prefix")

TrainingStopped = cli.Stopped  # training stopped early (signal, non-finite streak); the last checkpoint is intact


@dataclass
class TrainerState:
    """Everything about the loop's progress that a checkpoint must carry; only the loop in `fit` changes it."""

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


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(model: FrozenPrefixCaptioner, config: Config) -> torch.optim.AdamW:
    """AdamW over the trainable modules only; no weight decay on biases and norms."""
    tc = config.train
    groups = []
    for name, module in model.trainable_modules().items():
        lr = tc.encoder_lr if name == "encoder" and tc.encoder_lr is not None else tc.lr
        lr = tc.lm_lr if name == "lm" else lr  # model.lm_trainable: the fine-tuned-LM baseline's own rate
        lr = tc.deep_lr if name == "deep" and tc.deep_lr is not None else lr
        params = [p for p in module.parameters() if p.requires_grad]
        groups.append({"params": [p for p in params if p.ndim >= 2], "lr": lr, "weight_decay": tc.weight_decay})
        groups.append({"params": [p for p in params if p.ndim < 2], "lr": lr, "weight_decay": 0.0})
    groups = [g for g in groups if g["params"]]
    # one kernel for every weight's update: ~2 ms a step on the recipe, against ~12 tensor by tensor
    fused = tc.fused_adamw and fused_adamw_fits([p for g in groups for p in g["params"]])
    return torch.optim.AdamW(groups, betas=(0.9, 0.98), fused=fused or None)


def fused_adamw_fits(params: list[torch.Tensor]) -> bool:
    """Whether AdamW's fused kernel takes these weights: plain floating-point tensors on a device it supports."""
    # AdamW checks this only at its first step; the list is private, so CPU and CUDA where it is missing
    from torch.optim import optimizer  # the submodule, not re-exported by torch.optim

    supported = getattr(optimizer, "_get_fused_kernels_supported_devices", lambda: ["cpu", "cuda"])()
    # FSDP's sharded weights (DTensors) keep the per-tensor update: one subclass fewer to trust in a fused kernel
    return bool(params) and all(
        type(p.data) is torch.Tensor and p.is_floating_point() and p.device.type in supported for p in params
    )


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


def build_scheduler(optimizer: torch.optim.Optimizer, config: Config) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then cosine decay to min_lr_ratio * lr."""
    tc = config.train

    def factor(step: int) -> float:
        warmup = min(tc.warmup_steps, tc.max_steps)
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, tc.max_steps - warmup)
        return tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class SignalGuard:
    """First SIGINT/SIGTERM asks the loop to checkpoint and stop; a second one exits at once.

    Under torchrun a Ctrl-C reaches every worker from the terminal and again from torchrun, which relays it:
    the same signal again within `relay_grace` seconds is that relay, not a second request.
    """

    def __init__(self, relay_grace: float = 0.0) -> None:
        self.received: str | None = None
        self.relay_grace, self._at = relay_grace, 0.0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        relayed = signal.Signals(signum).name == self.received and time.monotonic() - self._at < self.relay_grace
        if relayed:
            return
        if self.received is not None:
            print(f"\nsecond {signal.Signals(signum).name}: exiting now without a checkpoint", file=sys.stderr)
            os._exit(128 + signum)
        self.received, self._at = signal.Signals(signum).name, time.monotonic()
        print(f"\n{self.received}: finishing this step, writing a checkpoint, then stopping", file=sys.stderr)

    def __enter__(self) -> SignalGuard:
        if threading_is_main():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def threading_is_main() -> bool:
    """Signal handlers can only be installed from the main thread."""
    import threading

    return threading.current_thread() is threading.main_thread()


def check_run_dir(config: Config) -> None:
    """Refuse to start a fresh run on top of an existing one."""
    run = Path(config.train.output_dir)
    if config.train.resume == "none" and (run / "checkpoints").is_dir() and any((run / "checkpoints").iterdir()):
        raise FrozenPrefixError(
            f"{run} already holds a run; set train.resume=auto to continue it, or choose another train.output_dir"
        )


# What may differ between a run and its resumption without changing what it learns: where it is, how it reports.
RESUME_NEUTRAL = ("train.resume", "train.output_dir", "train.progress", "train.log_every", "train.val_every",
                  "train.val_batches", "train.checkpoint_every", "train.keep_last", "train.tensorboard", "train.wandb",
                  "train.wandb_project")


def warn_config_changes(run: Path, config: Config) -> None:
    """Say what a resumption changes: a run continued with other settings is neither the old recipe nor the new."""
    changes = config_changes(run / "config.yaml", config, ignore=RESUME_NEUTRAL)
    if changes:
        shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
        log.warning(
            "resuming %s with settings it did not last run with (%s); to train with them from the start, "
            "choose another train.output_dir", run, shown,
        )


def prepare_run_dir(config: Config) -> Path:
    """Create the run folder and write the resolved config and library versions into it."""
    run = Path(config.train.output_dir)
    run.mkdir(parents=True, exist_ok=True)
    tmp = run / "config.yaml.tmp"
    save_config(config, tmp)
    tmp.replace(run / "config.yaml")
    import timm
    import transformers

    versions = {
        "seed": config.train.seed, "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "timm": timm.__version__,
    }
    (run / "versions.json").write_text(json.dumps(versions, indent=2))
    return run


class NoMetricsLog:
    """What ranks other than 0 log to under torchrun: nothing (rank 0 writes metrics.jsonl and feeds the sinks)."""

    sinks = Sinks()

    def write(self, record: dict[str, Any]) -> None:
        """Drop the record."""


class MetricsLog:
    """metrics.jsonl: one JSON object per line, appended and flushed as it goes; each also goes to the sinks."""

    def __init__(self, path: Path, resume_step: int | None, sinks: Sinks | None = None) -> None:
        self.path = path
        self.sinks = sinks or Sinks()  # TensorBoard / W&B (sinks.py), when the config asks for them
        if resume_step is not None and path.is_file():
            # Drop lines logged after the checkpoint we resume from: they will be logged again.
            lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
            kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= resume_step]
            path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.sinks.log(record)


def train_loader(
    examples: TrainExamples, collate: CaptionCollator, config: Config, epoch: int, start: int
) -> DataLoader:
    """One epoch of batches, starting `start` examples in (for exact resume); under torchrun, this rank's share.

    `start` and train.batch_size are global (all ranks together); each rank reads 1/N of both.
    """
    tc, dc = config.train, config.data
    _, world = distributed.rank_and_world()
    batch_size, start = tc.batch_size // world, start // world
    if isinstance(examples.source, StreamSource):  # streamed: shuffled, sharded and batched by TrainStream itself
        stream = TrainStream(
            examples.source, dc.bad_data, seed=tc.seed, epoch=epoch, start=start, batch_size=batch_size,
            caption_sampling=dc.caption_sampling,
        )
        return DataLoader(
            stream, batch_size=None, collate_fn=collate, num_workers=dc.num_workers,
            pin_memory=torch.cuda.is_available(), persistent_workers=False,
        )
    sampler = EpochSampler(
        examples.num_captions() if dc.caption_sampling == "all" else len(examples),
        seed=tc.seed, epoch=epoch, start=start, expand_all=dc.caption_sampling == "all",
        length=examples.length_key if dc.group_by_length and examples.can_group_by_length() else None,
        batch_size=tc.batch_size,  # grouping by length makes global batches, before they are dealt out to ranks
    )
    return DataLoader(
        examples, batch_size=batch_size, sampler=sampler, collate_fn=collate, num_workers=dc.num_workers,
        pin_memory=torch.cuda.is_available(), drop_last=True, persistent_workers=False,
    )


def batch_stream(
    examples: TrainExamples, collate: CaptionCollator, config: Config, epoch: int, position: int
) -> Iterator[tuple[Batch, int, int]]:
    """Endless batches from (epoch, position) on, each with the (epoch, position) that follows it."""
    streaming = isinstance(examples.source, StreamSource)
    while True:
        loader = train_loader(examples, collate, config, epoch, position)
        if not streaming and len(loader) == 0 and position == 0:
            raise FrozenPrefixError(
                f"the training data has fewer examples ({len(examples)}) than "
                f"train.batch_size={config.train.batch_size}; lower it"
            )
        delivered = False
        for batch in loader:
            if batch.error is not None:  # a bad record met in a DataLoader worker (data.bad_data=error)
                raise DataError(batch.error)
            delivered = True
            position += config.train.batch_size
            yield batch, epoch, position
        if streaming and not delivered and position == 0:
            raise FrozenPrefixError(
                f"the streaming training data gave no full batch of train.batch_size={config.train.batch_size} "
                "(per data.num_workers worker); lower them or check the source"
            )
        epoch, position = epoch + 1, 0


@torch.no_grad()
def dry_run(
    model: FrozenPrefixCaptioner, examples: TrainExamples, collate: CaptionCollator, device: torch.device, amp: Any
) -> Batch | None:
    """One forward pass on two training examples, so that a bad setup fails now and not hours in; returns them."""
    batch = collate(examples.first_examples(2))
    if not batch.size:
        return None
    size = tuple(batch.pixel_values.shape[-2:])
    model.eval()  # eval mode: the check must not move normalisation statistics
    try:
        with amp:
            loss = model(**model_inputs(batch, device, model.config))["loss"]
    except (RuntimeError, AssertionError, ValueError) as e:  # timm asserts on input sizes
        if cli.debugging():
            raise
        raise FrozenPrefixError(
            f"a first forward pass failed with images of size {size} for encoder {model.config.model.encoder!r} "
            f"({str(e).splitlines()[0][:160]}); check model.image_size and model.encoder"
        ) from e
    finally:
        model.train()
    if not torch.isfinite(loss):
        raise FrozenPrefixError("the first forward pass gave a non-finite loss; check model.lm_dtype and the data")
    if model.config.train.padding_free and not packing_supported(model.lm):
        raise FrozenPrefixError(
            f"model.lm {model.config.model.lm!r} lets packed sequences attend to each other (it ignores restarting "
            "position ids); set train.padding_free=false"
        )
    return batch


@torch.no_grad()
def validation_loss(
    model: FrozenPrefixCaptioner, batches: list[Batch], device: torch.device, amp: Any,
    ctx: distributed.Dist | None = None,
) -> float:
    """Mean loss over fixed validation batches; under torchrun each rank takes every N-th batch."""
    ctx = ctx or distributed.Dist()
    parallel.share_buffers(model)
    lockstep = parallel.is_fsdp(model)  # FSDP: every forward is a collective, so every rank makes as many
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


def fixed_val_batches(model: FrozenPrefixCaptioner, config: Config, collate: CaptionCollator) -> list[dict]:
    """The same validation batches every time (epoch 0, no shuffle)."""
    if config.data.val is None:
        return []
    examples = TrainExamples(build_train_source(config.data.val), config.data.bad_data, config.data.caption_sampling)
    sampler = EpochSampler(len(examples), seed=config.train.seed, shuffle=False, shard=False)  # the same on every rank
    loader = DataLoader(examples, batch_size=config.train.batch_size, sampler=sampler, collate_fn=collate)
    batches = []
    for batch in loader:
        if batch.size:
            batches.append(batch)
        if len(batches) >= config.train.val_batches:
            break
    return batches


def periodic_evaluation(
    model: FrozenPrefixCaptioner, config: Config, step: int, run_dir: Path, best: dict[str, Any] | None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Caption metrics on the first eval.every_images val images; RUN/best/ is rewritten when they improve.

    Returns the metrics.jsonl record and the best so far (which the trainer keeps in its state).
    """
    ec = config.eval
    started = time.perf_counter()
    device = model.device
    parallel.share_buffers(model)  # under torchrun: every rank captions with the model rank 0 will save
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
        save_best(model, run_dir, best)
    record: dict[str, Any] = {"step": step, **{f"val/{k}": v for k, v in scores.items()}}
    record.update(
        best_metric=ec.best_metric, best_value=best["value"], best_step=best["step"], is_best=improved,
        eval_sec=round(time.perf_counter() - started, 2),
    )
    return record, best


def save_best(model: FrozenPrefixCaptioner, run_dir: Path, info: dict[str, Any]) -> None:
    """Write RUN/best/ (a save_pretrained folder plus best.json) under a temporary name, then swap it in (rank 0)."""
    weights, _ = parallel.checkpoint_state(model)  # FSDP: every rank joins the gathering of the shards
    if not distributed.current(model.device).main:
        return
    tmp = run_dir / f".best-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, weights=weights, precision=resolve_precision(model.device, model.config.train.precision))
    (tmp / "best.json").write_text(json.dumps(info, indent=2) + "\n")
    swap_in(tmp, run_dir / "best")


def fit(config: Config | str | Path | dict, overrides: list[str] | None = None) -> FrozenPrefixCaptioner:
    """Train the encoder and projection against the frozen LM; return the trained captioner.

    Under torchrun this process is one rank of the group: it trains on its share of each global batch, and
    rank 0 alone writes the run folder. Without torchrun it is the whole run, exactly as it always was.
    """
    config = load_config(config, overrides)
    ctx = distributed.setup(cli.resolve_device(config.train.device, "train.device"))
    try:
        model = _fit(config, ctx)
    except BaseException as e:
        if ctx.active:
            # The DDP wrapper lives on in _fit's frame, which the traceback keeps: free it before the group ends.
            traceback.clear_frames(e.__traceback__)
            # A signal or the non-finite guard stops every rank at the same step; after other errors the other
            # ranks may never reach a barrier.
            distributed.teardown(ctx, clean=isinstance(e, TrainingStopped))
        raise
    distributed.teardown(ctx)  # _fit's frame, and the DDP wrapper in it, are gone: collected before the barrier
    return model


def check_context_length(model: FrozenPrefixCaptioner, config: Config) -> None:
    """A training sequence must fit the LM: every packed (image, caption) pair is k slots, the caption and its EOS."""
    limit = model.context_length
    pair = config.model.prefix_length + config.data.max_caption_tokens + 1
    needed = len(model.start_ids) + config.data.images_per_sequence * pair
    if limit is not None and needed > limit:
        raise FrozenPrefixError(
            f"BOS + data.images_per_sequence x (model.prefix_length + data.max_caption_tokens + EOS) = {needed} "
            f"exceeds the LM's context of {limit} positions; lower one of them"
        )


def check_world(config: Config, ctx: distributed.Dist) -> None:
    """train.batch_size is global: it must split evenly over the processes (and into whole packed sequences)."""
    tc, dc = config.train, config.data
    if tc.batch_size % ctx.world:
        raise FrozenPrefixError(
            f"train.batch_size={tc.batch_size} (images per step, all processes together) does not split over "
            f"{ctx.world} processes; make it a multiple of {ctx.world}"
        )
    if (tc.batch_size // ctx.world) % dc.images_per_sequence:
        raise FrozenPrefixError(
            f"train.batch_size / {ctx.world} processes = {tc.batch_size // ctx.world} images per process is not a "
            f"multiple of data.images_per_sequence={dc.images_per_sequence}; change one of them"
        )


def _fit(config: Config, ctx: distributed.Dist) -> FrozenPrefixCaptioner:
    """The body of fit, in one process or as one rank of a torchrun group."""
    tc, dc = config.train, config.data
    if dc.train is None:
        raise FrozenPrefixError("data.train is not set; give a source, e.g. data.train=shapes:train or a .jsonl file")
    device = ctx.device
    check_world(config, ctx)
    if tc.resume not in ("none", "auto") and not Path(tc.resume).is_dir():
        raise FrozenPrefixError(f"train.resume: checkpoint folder {tc.resume} not found; use auto or a path")
    check_run_dir(config)
    check_sinks(config)  # a requested logging package that is missing fails now, not after the first steps
    # Everything a user gave is checked before the run folder is touched: data, model, one forward pass.
    train_source = build_train_source(dc.train, mixture_size=dc.mixture_size, seed=tc.seed)
    seed_everything(tc.seed)
    model = parallel.build_model(config, ctx)  # the same initial weights on every rank: the same seed
    check_context_length(model, config)
    parallel.prepare(model, config, ctx)  # SyncBatchNorm, FSDP sharding: before the optimizer sees the parameters
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
    weights = objective_weights(model, tc)
    scheduler = build_scheduler(optimizer, config)
    precision = resolve_precision(device, tc.precision)
    amp = autocast_for(device, precision)
    # fp16 needs loss scaling (its small exponent range underflows gradients); bf16 and fp32 do not.
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    lm_dtype = str(model.lm.dtype).removeprefix("torch.")
    attention = getattr(model.lm.config, "_attn_implementation", None)
    log.info("precision: %s on %s, frozen LM weights in %s, %s attention", precision, device.type, lm_dtype, attention)
    state = TrainerState()
    # eval mode, seeded transforms: leaves no trace; its batch stands in for a rank's empty one under torchrun
    filler = dry_run(model, examples, collate, device, amp)
    applied = apply_speedups(model, config)  # train.compile, channels_last, lm_gradient_checkpointing
    if applied:
        log.info("speed-ups: %s", applied)
    # DDP over the trainable modules only (the LM is replicated, never synchronised), or FSDP's own reduction.
    par = parallel.wrap(model, ctx, model_inputs(filler, device, config) if filler is not None else None)
    # train.ema_decay: the average of the unwrapped model's weights, from model.init_from's or a checkpoint's on
    ema = WeightAverage(model, tc.ema_decay) if tc.ema_decay > 0 else None
    resumed = None
    if tc.resume == "auto":
        resumed = resume_latest(tc.output_dir, model, optimizer, scheduler, ema=ema)
    elif tc.resume != "none":
        resumed = (Path(tc.resume), load_checkpoint(tc.resume, model, optimizer, scheduler, ema=ema))
    if resumed is not None:
        state = TrainerState.from_dict(resumed[1])
        if state.scaler:
            scaler.load_state_dict(state.scaler)
        log.info("resumed from %s at step %d", resumed[0], state.step)
        if ctx.main:
            warn_config_changes(Path(resumed[0]).resolve().parent.parent, config)  # RUN/checkpoints/step_N -> RUN
        if state.world_size != ctx.world:
            log.info(
                "the run trained in %d processes and goes on in %d: the same examples in the same global order "
                "(streams: with data.num_workers=0), sums taken in another order", state.world_size, ctx.world,
            )
    val_batches = fixed_val_batches(model, config, eval_collate)
    run = Path(tc.output_dir)
    metrics: MetricsLog | NoMetricsLog = NoMetricsLog()
    if ctx.main:  # rank 0 alone writes the run folder
        run = prepare_run_dir(config)
        if resumed is None and (run / "metrics.jsonl").exists():
            (run / "metrics.jsonl").unlink()
        resume_step = state.step if resumed else None
        metrics = MetricsLog(run / "metrics.jsonl", resume_step, open_sinks(config, run, resume_step))
        # A run that stops early (signal, non-finite streak, error) still flushes TensorBoard / finishes W&B;
        # close() is idempotent, so the normal end closing them first is fine.
        atexit.register(metrics.sinks.close)
    # data.feature_cache: built from the encoder as it trains (after a resume), refused where it cannot be right
    cache = build_feature_cache(model, config, transform, train_source)
    if cache is not None:
        examples = CachedExamples(examples, cache)
    batches = batch_stream(examples, collate, with_resolved_workers(config, device), state.epoch, state.position)
    bar = tqdm(
        total=tc.max_steps, initial=state.step, disable=not tc.progress or not ctx.main, desc="training",
        dynamic_ncols=True,
    )
    last_log = time.perf_counter()
    world = ctx.world

    def checkpoint() -> None:
        state.scaler = scaler.state_dict() if scaler.is_enabled() else None
        state.world_size = world
        weights, optimizer_state = parallel.checkpoint_state(model, optimizer)  # FSDP: every rank gathers
        rngs = ctx.gather(rng_state()) if ctx.active else None
        average = parallel.full_state(ema.state_dict()) if ema is not None else None  # FSDP: every rank gathers
        if ctx.main:
            save_checkpoint(
                run, model, optimizer, scheduler, state.to_dict(), tc.keep_last, weights, optimizer_state, rngs,
                ema=average,
            )

    with SignalGuard(relay_grace=5.0 if ctx.active else 0.0) as guard:
        while state.step < tc.max_steps:
            optimizer.zero_grad(set_to_none=True)
            micro: list[Batch | None] = []
            skipped = 0
            for _ in range(tc.grad_accum):
                batch, state.epoch, state.position = next(batches)
                skipped += batch.skipped
                if batch.size:
                    micro.append(batch)
                elif ctx.active:  # every rank joins every micro-batch's gradient reduction; this one adds nothing
                    micro.append(None)
            tokens, loss_sum = sum(b.labelled_tokens() for b in micro if b is not None), 0.0
            images = sum(int(b.layout.image_mask.sum()) // model.prefix_length for b in micro if b is not None)
            terms = dict.fromkeys(map(term_name, weights), 0.0)  # the objective's terms, logged apart
            if ctx.active:  # the whole step's labelled tokens and images, over all ranks
                tokens, images = (int(n) for n in ctx.sum([tokens, images]))
            for i, batch in enumerate(micro):
                # Weighted by tokens: the step's loss is the mean over all its labelled tokens, as one big batch's.
                # DDP/FSDP average gradients over ranks, so each rank's share is scaled up by the world size.
                weight = (batch.labelled_tokens() * world / tokens) if batch is not None else 0.0
                shown = int(batch.layout.image_mask.sum()) // model.prefix_length if batch is not None else 0
                image_weight = shown * world / images if images else 0.0  # the visual loss: a mean over images
                step_batch = batch if batch is not None else filler
                if cache is not None:  # data.feature_cache: the frozen encoder's features, cached or computed now
                    inputs = {**cache.model_inputs(model, step_batch, device, amp), "packed": tc.padding_free}
                else:
                    inputs = model_inputs(step_batch, device, config)
                with par.sync(last=i == len(micro) - 1):  # gradient accumulation: reduce once, after the last
                    with amp:
                        loss, parts = joint_loss(par(**inputs), weights, weight, image_weight)
                    scaler.scale(loss).backward()
                loss_sum += loss.item()
                terms.update({key: terms[key] + value for key, value in parts.items()})
            scaler.unscale_(optimizer)
            grad_norm = par.clip_grad_norm(model.trainable_parameters(), tc.grad_clip)  # FSDP: the current shards
            stop = guard.received
            if ctx.active:  # one view of the step on every rank: its loss, its skipped records, any signal
                flags = [float(guard.received == name) for name in ("SIGINT", "SIGTERM")]
                loss_sum, skipped, *totals = ctx.sum([loss_sum, skipped, *terms.values(), *flags])
                terms = {key: total / world for key, total in zip(terms, totals)}
                flags = totals[len(terms):]
                loss_sum /= world
                stop = "SIGTERM" if flags[1] else "SIGINT" if flags[0] else None
            state.skipped += int(skipped)
            state.step += 1
            # With fp16 the scaler skips steps whose gradients overflowed (and lowers its scale): not a bad step.
            stepped = math.isfinite(loss_sum) and (math.isfinite(grad_norm) or scaler.is_enabled())
            if stepped:
                scaler.step(optimizer)
                state.bad_streak = 0
            else:  # skip the update: the weights stay as they were before this step
                state.bad_streak += 1
                state.bad_total += 1
                log.warning(
                    "step %d: non-finite loss/grad norm (%s, %s); update skipped", state.step, loss_sum, grad_norm
                )
                if state.bad_streak > tc.max_bad_steps:
                    metrics.write({"step": state.step, "loss": None, "bad_steps": state.bad_total})
                    raise TrainingStopped(
                        f"{state.bad_streak} non-finite steps in a row (limit train.max_bad_steps="
                        f"{tc.max_bad_steps}); lower train.lr; the last good checkpoint is in {run / 'checkpoints'}"
                    )
            scale = scaler.get_scale() if ema is not None else None  # on CUDA a sync: only when it is needed
            scaler.update()
            # The average follows applied updates only: no skipped non-finite step, no step fp16's scaler dropped
            # (it lowers its scale when it does)
            if ema is not None and stepped and scaler.get_scale() >= scale:
                ema.update(model, state.step)
            lr = scheduler.get_last_lr()[0]  # the rate this step used (logged), before the schedule moves on
            scheduler.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.3f}")
            step = state.step
            if step % tc.log_every == 0 or step == tc.max_steps:
                now = time.perf_counter()
                record = {
                    "step": step, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm,
                    "tokens": tokens, "sec_per_step": (now - last_log) / tc.log_every, "epoch": state.epoch,
                    "bad_steps": state.bad_total, "skipped_examples": state.skipped,
                }
                last_log = now
                if len(weights) > 1 or weights["loss"] != 1:  # a joint objective: each term apart
                    record.update(terms)
                if val_batches and tc.val_every and step % tc.val_every == 0:
                    with averaged(ema, model):  # train.ema_decay: the average is judged, the live weights train
                        record["val_loss"] = validation_loss(model, val_batches, device, amp, ctx)
                metrics.write(record)
            if config.eval.every and step % config.eval.every == 0:  # before the checkpoint: it saves state.best
                with averaged(ema, model):  # RUN/best/ too holds the average
                    record, state.best = periodic_evaluation(model, config, step, run, state.best)
                metrics.write(record)
            if tc.checkpoint_every and step % tc.checkpoint_every == 0 and not state.bad_streak:
                checkpoint()
            stop = stop if ctx.active else guard.received  # one process: a signal up to the end of the step counts
            if stop:
                checkpoint()
                bar.close()
                raise TrainingStopped(
                    f"stopped by {stop} at step {step}; checkpoint written, "
                    f"continue with train.resume=auto train.output_dir={run}",
                    exit_code=128 + signal.Signals[stop].value,
                )
    bar.close()
    # A finished run resumed: keep its checkpoint (rank 0 looks, every rank follows: saving may be a collective).
    if ctx.broadcast(not (run / "checkpoints" / f"step_{state.step:08d}").is_dir()):
        checkpoint()
    if ema is not None:  # from here on the model is the average: what is validated, saved, evaluated and returned
        ema.copy_to(model)
    final: dict[str, Any] = {"step": state.step, "final": True}
    parallel.share_buffers(model)  # under torchrun: every rank evaluates the model rank 0 saves
    if val_batches:
        final["val_loss"] = validation_loss(model, val_batches, device, amp, ctx)
    model.eval()
    weights, _ = parallel.checkpoint_state(model)  # FSDP: the shards gathered whole, by every rank
    if ctx.main:
        model.save_pretrained(run / "model", weights=weights, precision=precision)
    for split in config.eval.splits:
        source = split_source(config, split) if split != "val" or dc.val is not None else None
        if source is None:
            continue
        scores, rows = evaluate_and_write(model, split, source, config, run / "eval", progress=tc.progress)
        final.update({f"{split}/{k}": v for k, v in scores.items()})
        if not ctx.main:  # the other ranks captioned their share; rank 0 reports
            continue
        print(f"{split}: {format_metrics(scores)}")
        for row in rows[: config.eval.samples]:
            print(f"  {row['image_id']}: {row['caption']!r}   reference: {row['references'][0]!r}")
    metrics.write(final)
    if not ctx.main:
        return model
    # After the final evaluation: the sinks get its samples, the model card its metrics, RUN/curves.png the run.
    metrics.sinks.finish(run / "eval", config.eval.splits, config.eval.samples, state.step)
    write_model_card(run / "model", model.config, final, precision=precision)
    save_curves([run], run / "curves.png")
    return model


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m frozen_prefix.train", description=__doc__)
    parser.add_argument("--config", required=True, help="a YAML recipe, e.g. configs/shapes.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4 model.prefix_length=4")
    cli.add_plugin_arg(parser)
    args = parser.parse_args(argv)
    cli.setup_logging(logging.INFO)

    def command() -> None:
        cli.import_plugins(args.plugin)  # before the config is read: it may name what they register
        model = fit(args.config, args.overrides)
        if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 saved it
            print(f"model saved to {Path(model.config.train.output_dir) / 'model'}")

    return cli.run(command)


if __name__ == "__main__":
    sys.exit(main())
