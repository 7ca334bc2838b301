"""One benchmark of a recipe, every number measured side by side in one run; prints a table, writes JSON.

    python scripts/benchmark.py [--config configs/shapes.yaml] [--parts step,flops,decode,cache,memory,data]
        [--steps 3] [--out benchmark.json] [--compare train.channels_last=true ...] [section.key=value ...]

Parts (default: all):
  step    training-step time with the LM frozen vs the same model with the LM's weights requiring gradients
          (what code pays that only leaves the LM out of the optimizer); the same batches, steps interleaved
  flops   FLOPs of one training step (torch.utils.flop_counter) / its time, as a fraction of this machine's
          matmul FLOP/s in the same precision (a loop of model-shaped and of big square torch.matmul), and the
          profiler's self-time breakdown of the step (matmul and convolution vs the rest)
  decode  batched, KV-cached greedy decoding vs one image at a time without a cache (ClipCap-style)
  cache   epochs with a frozen encoder, without and with data.feature_cache, on --cache-images images: the
          image part (load + decode + transform + encoder, or the cache) and the whole epoch (with the steps)
  memory  peak memory of a training step, frozen vs trainable LM, each in a fresh process (CPU: peak RSS
          during the step, /proc VmHWM reset before it; CUDA: max_memory_allocated)
  data    images/s of the training loader vs images/s a training step consumes
--compare KEY=VALUE (repeatable) times training steps with and without that override, interleaved; several
          overrides compared together go in one quoted, space-separated --compare.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from frozen_prefix import FrozenPrefixCaptioner  # noqa: E402
from frozen_prefix.cli import resolve_device  # noqa: E402
from frozen_prefix.config import Config, load_config  # noqa: E402
from frozen_prefix.data import EvalExamples, TrainCollator, TrainExamples, build_source, build_train_source  # noqa: E402
from frozen_prefix.data.layout import Batch  # noqa: E402
from frozen_prefix.errors import FrozenPrefixError  # noqa: E402
from frozen_prefix.generate import generate_captions  # noqa: E402
from frozen_prefix.models.encoder import build_transform  # noqa: E402
from frozen_prefix.models.precision import autocast_for, cpu_has_native_bf16, resolve_precision  # noqa: E402
from frozen_prefix.training.feature_cache import CachedExamples, FeatureCache, cache_identity  # noqa: E402
from frozen_prefix.training.loaders import train_loader  # noqa: E402
from frozen_prefix.training.optim import build_optimizer  # noqa: E402
from frozen_prefix.training.speedups import apply_speedups, usable_cpus, with_resolved_workers  # noqa: E402
from frozen_prefix.training.step import model_inputs  # noqa: E402

PARTS = ("step", "flops", "decode", "cache", "memory", "data")
DEFAULT_RUN_MODEL = ROOT / "runs" / "shapes" / "model"
# Ops whose time is matrix products (or convolutions, the encoder's matmuls): the rest is "other"
MATMUL_OPS = (
    "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
    "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_flash_attention", "aten::mkldnn_convolution", "aten::convolution_backward",
    "aten::_convolution", "aten::cudnn_convolution", "aten::_flash_attention_backward",
)
COMPILED_GRAPHS = "compiled graphs"  # the profiler's rows of torch.compile'd graphs, summed into one


# ---------------------------------------------------------------------------- shared pieces


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock times are real."""
    if device.type == "cuda":
        torch.cuda.synchronize()


@dataclasses.dataclass
class Setup:
    """A model built from a config, with its speed-ups, optimizer and a few training batches."""

    config: Config
    model: FrozenPrefixCaptioner
    device: torch.device
    amp: Any
    optimizer: torch.optim.Optimizer
    batches: list[Batch]
    applied: dict[str, Any]


def build_collate(model: FrozenPrefixCaptioner, config: Config) -> TrainCollator:
    """The training collate of the recipe (as train.py builds it)."""
    dc = config.data
    return TrainCollator(
        model.tokenizer, build_transform(model.image_config, train=dc.augment), model.prefix_length,
        dc.max_caption_tokens, model.start_ids, images_per_sequence=dc.images_per_sequence,
        blank_images=dc.blank_images, chat_style=dc.chat_style, vqa_template=config.eval.vqa.template,
        max_sequence_tokens=model.context_length,
    )


def first_batches(model: FrozenPrefixCaptioner, config: Config, n: int, device: torch.device) -> list[Batch]:
    """The first n batches of the recipe's second epoch (its own loader, order and collate)."""
    examples = TrainExamples(build_train_source(config.data.train, mixture_size=config.data.mixture_size),
                             config.data.bad_data, config.data.caption_sampling)
    batches = []
    for batch in train_loader(examples, build_collate(model, config), with_resolved_workers(config, device), 1, 0):
        batches.append(batch)
        if len(batches) >= n:
            break
    return batches


def build_setup(config: Config, n_batches: int, lm: Any = None, tokenizer: Any = None) -> Setup:
    """A seeded model (the same initial weights for every variant), its speed-ups, optimizer and batches."""
    device = resolve_device(config.train.device, "train.device")
    torch.manual_seed(config.train.seed)
    model = FrozenPrefixCaptioner(config, lm=lm, tokenizer=tokenizer, device=device).train()
    applied = apply_speedups(model, config)
    amp = autocast_for(device, config.train.precision)
    batches = first_batches(model, config, n_batches, device)
    return Setup(config, model, device, amp, build_optimizer(model, config), batches, applied)


def train_step(setup: Setup, batch: Batch, lm_grads: bool = False) -> float:
    """One full training step (forward, backward, clip, update); lm_grads: the LM's weights require gradients."""
    model = setup.model
    setup.optimizer.zero_grad(set_to_none=True)
    with setup.amp:
        loss = model(**model_inputs(batch, setup.device, setup.config))["loss"]
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), setup.config.train.grad_clip)
    setup.optimizer.step()
    if lm_grads:  # computed, never used (not in the optimizer): dropped so the next step starts the same
        for p in model.lm.parameters():
            p.grad = None
    return float(loss.detach())


@contextlib.contextmanager
def lm_requires_grad(model: FrozenPrefixCaptioner, on: bool) -> Iterator[None]:
    """The LM's weights requiring gradients (on) or frozen, for the duration; frozen afterwards."""
    model.lm.requires_grad_(on)
    try:
        yield
    finally:
        model.lm.requires_grad_(False)


def timed(fn: Any, device: torch.device) -> float:
    """Seconds fn() takes, GPU work included."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleaved(variants: dict[str, Any], rounds: int, warmup: int, device: torch.device) -> dict[str, list[float]]:
    """Times of each variant's step, the variants taking turns every round (drift on a shared machine hits all).

    The warm-up steps' times are kept too, under "NAME warm-up": what compiling costs shows there.
    """
    times: dict[str, list[float]] = {name: [] for name in variants}
    times.update({f"{name} warm-up": [] for name in variants})
    for r in range(warmup + rounds):
        for name, fn in variants.items():
            seconds = timed(lambda fn=fn, r=r: fn(r), device)
            times[name if r >= warmup else f"{name} warm-up"].append(seconds)
    return times


# ---------------------------------------------------------------------------- parts


def part_step(setup: Setup, steps: int, warmup: int) -> dict[str, Any]:
    """Step time, LM frozen vs LM weights requiring gradients (not optimised); the same batches in turn."""
    model, batches = setup.model, setup.batches
    grads: dict[str, bool] = {}

    def step(trainable: bool, r: int) -> None:
        with lm_requires_grad(model, trainable):
            setup.optimizer.zero_grad(set_to_none=True)
            with setup.amp:
                loss = model(**model_inputs(batches[r % len(batches)], setup.device, setup.config))["loss"]
            loss.backward()
            grads["trainable" if trainable else "frozen"] = any(p.grad is not None for p in model.lm.parameters())
            torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), setup.config.train.grad_clip)
            setup.optimizer.step()
            for p in model.lm.parameters():
                p.grad = None

    times = interleaved({"frozen": lambda r: step(False, r), "trainable": lambda r: step(True, r)}, steps, warmup,
                        setup.device)
    frozen, trainable = statistics.median(times["frozen"]), statistics.median(times["trainable"])
    return {
        "frozen_s": frozen, "trainable_lm_s": trainable, "ratio": frozen / trainable, "goal": "<= 0.70",
        "lm_weight_grads": grads, "times": times, "batch_size": len(batches[0].image_ids),
    }


def matmul_rate(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device, seconds: float = 1.0) -> float:
    """FLOP/s of repeated (m, k) @ (k, n) products in one precision, after a warm-up."""
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    torch.matmul(a, b)
    sync(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.matmul(a, b)
        count += 1
        if count % 8 == 0:
            sync(device)
    sync(device)
    return 2 * m * k * n * count / (time.perf_counter() - start)


def model_matmul_shapes(setup: Setup) -> list[tuple[int, int, int]]:
    """The frozen LM's own products for these batches: (tokens, width) x (width, MLP width) and back, and attention."""
    cfg = setup.model.lm.config
    width = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 768)
    inner = getattr(cfg, "intermediate_size", None) or 4 * width
    layout = setup.batches[0].layout
    tokens = int(layout.input_ids.numel())
    return [(tokens, width, inner), (tokens, inner, width), (tokens, width, width)]


def step_dtype(setup: Setup) -> torch.dtype:
    """The precision the step's matmuls run in: autocast's, else the LM's weights'."""
    precision = resolve_precision(setup.device, setup.config.train.precision)
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    return next(setup.model.lm.parameters()).dtype


def profile_step(setup: Setup, top: int) -> dict[str, Any]:
    """torch.profiler's self time per op over one training step: the top ops and the matmul share."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    cuda = setup.device.type == "cuda"
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        train_step(setup, setup.batches[0])
        sync(setup.device)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    ops: dict[str, list[float]] = {}  # op -> [self time, calls]
    for e in prof.key_averages():
        # train.compile: each compiled graph is one entry named by a hash; its self time is its fused kernels
        name = COMPILED_GRAPHS if e.key.startswith("## Call CompiledFxGraph") else e.key
        ops.setdefault(name, [0.0, 0])
        ops[name][0] += getattr(e, key)
        ops[name][1] += e.count
    total = sum(t for t, _ in ops.values()) or 1.0
    matmul = sum(t for name, (t, _) in ops.items() if name in MATMUL_OPS)
    rows = sorted(ops.items(), key=lambda item: item[1][0], reverse=True)[:top]
    return {
        "clock": "device" if cuda else "cpu", "matmul_share": matmul / total, "other_share": 1 - matmul / total,
        "top_ops": [{"op": name, "share": t / total, "calls": int(calls)} for name, (t, calls) in rows],
    }


def step_flops(setup: Setup, batch: Batch, lm_grads: bool) -> float:
    """FLOPs of one training step (FlopCounterMode), with the LM frozen or its weights requiring gradients."""
    counter = FlopCounterMode(display=False)
    # counted on the eager step (the same arithmetic): a compiled one hides its fused kernels from the counter
    eager = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6; before it, nothing to undo
    with eager("force_eager") if eager else contextlib.nullcontext(), lm_requires_grad(setup.model, lm_grads), \
            counter:
        train_step(setup, batch, lm_grads=lm_grads)
    return counter.get_total_flops()


def part_flops(
    setup: Setup, step_seconds: float | None, steps: int, warmup: int, top: int, matmul_seconds: float
) -> dict[str, Any]:
    """Achieved FLOP/s of a training step as a fraction of this machine's matmul FLOP/s, and what is left."""
    batch = setup.batches[0]
    flops = step_flops(setup, batch, lm_grads=False)
    # row 1 if time followed FLOPs: a frozen-LM step skips the LM's weight-gradient products, a third of the LM's
    # products, so with the products most of both steps this ratio (about 2/3) is about where row 1 can go
    flop_ratio = flops / step_flops(setup, batch, lm_grads=True)
    if step_seconds is None:
        times = interleaved({"frozen": lambda r: train_step(setup, setup.batches[r % len(setup.batches)])}, steps,
                            warmup, setup.device)["frozen"]
        step_seconds = statistics.median(times)
    # FLOPs counted on batch 0; the timed steps cycle the batches: scale by their token counts
    tokens = [int(b.layout.attention_mask.sum()) for b in setup.batches]
    flops_per_step = flops * statistics.mean(tokens) / tokens[0]
    dtype = step_dtype(setup)
    shapes = model_matmul_shapes(setup)
    shaped = [matmul_rate(*s, dtype, setup.device, matmul_seconds) for s in shapes]
    shaped_rate = sum(2 * m * k * n for m, k, n in shapes) / sum(2 * m * k * n / r for (m, k, n), r in
                                                                 zip(shapes, shaped, strict=True))
    square = 8192 if setup.device.type == "cuda" else 2048
    square_rate = matmul_rate(square, square, square, dtype, setup.device, matmul_seconds)
    peak = max(shaped_rate, square_rate)
    achieved = flops_per_step / step_seconds
    profile = profile_step(setup, top)
    return {
        "step_flops": flops_per_step, "step_s": step_seconds, "achieved_flops_per_s": achieved,
        "dtype": str(dtype).removeprefix("torch."), "matmul_model_shapes": [list(s) for s in shapes],
        "matmul_model_shaped_flops_per_s": shaped_rate, f"matmul_square_{square}_flops_per_s": square_rate,
        "peak_flops_per_s": peak, "utilisation": achieved / peak, "utilisation_vs_model_shaped": achieved / shaped_rate,
        "goal": ">= 0.85 (CPU, default recipe)", "profile": profile,
        "frozen_over_trainable_flops": flop_ratio,
        # what row 2 could reach if everything but the products and convolutions took no time: their speed caps it
        "utilisation_ceiling": achieved / peak / profile["matmul_share"],
    }


@torch.no_grad()
def full_rerun_loop(model: FrozenPrefixCaptioner, pixel_values: torch.Tensor, new_tokens: int) -> list[list[int]]:
    """ClipCap-style greedy decoding: one image at a time, the whole sequence re-run for every token, no cache."""
    embed = model.lm.get_input_embeddings()
    eos = model.tokenizer.eos_token_id
    captions = []
    for image in pixel_values:
        start = embed(torch.tensor([model.start_ids], dtype=torch.long, device=image.device))
        prefix = model.embed_images(image[None])
        sequence = torch.cat([start, prefix.to(embed.weight.dtype)], dim=1)
        tokens: list[int] = []
        for _ in range(new_tokens):
            mask = torch.zeros(sequence.shape[:2], dtype=torch.bool, device=image.device)
            mask[:, start.shape[1] : start.shape[1] + prefix.shape[1]] = True
            with model.lm_context(mask, prefix):  # the variants' hooks (a deep prefix at every layer), as decoding has
                logits = model.lm(inputs_embeds=sequence, use_cache=False).logits[0, -1].float()
            logits[eos] = -float("inf")  # as min_new_tokens does on the batched side: both make new_tokens tokens
            token = int(logits.argmax())
            tokens.append(token)
            sequence = torch.cat([sequence, embed(torch.tensor([[token]], device=sequence.device))], dim=1)
        captions.append(tokens)
    return captions


def decode_model(args: argparse.Namespace, setup: Setup) -> tuple[FrozenPrefixCaptioner, str]:
    """A trained model (--model, or runs/shapes/model when there), else the benchmark's own untrained one."""
    path = Path(args.model) if args.model else DEFAULT_RUN_MODEL
    if args.model != "untrained" and (args.model or path.is_dir()):
        return FrozenPrefixCaptioner.from_pretrained(path, device=setup.device), f"trained model {path}"
    return setup.model, f"untrained captioner from {args.config} (no {path}; the same compute)"


def part_decode(args: argparse.Namespace, setup: Setup) -> dict[str, Any]:
    """Captions/s: batched + KV cache (the library's generate_captions) vs one at a time without a cache."""
    model, which = decode_model(args, setup)
    model.eval()
    n, device = args.decode_batch, setup.device
    source = model.config.data.val or model.config.data.test or setup.config.data.val or setup.config.data.train
    examples = EvalExamples(build_source(source), "skip")
    images = [examples[i]["image"] for i in range(min(n, len(examples)))]
    pixels = model.pixel_values((images * (-(-n // len(images))))[:n])
    options = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, num_beams=1, do_sample=False,
                   prompt="", stop_at=[], batch_size=n)
    generate_captions(model, pixels[:2], **{**options, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
    full_rerun_loop(model, pixels[:1], 2)
    batched: list[str] = []
    batched_s = timed(lambda: batched.extend(generate_captions(model, pixels, **options)), device)
    loop_images = min(args.loop_images, n)
    looped: list[list[int]] = []
    loop_s = timed(lambda: looped.extend(full_rerun_loop(model, pixels[:loop_images], args.new_tokens)), device)
    same = sum(model.tokenizer.decode(t, skip_special_tokens=True).strip() == c for t, c in zip(looped, batched))
    model.train()
    return {
        "model": which, "new_tokens": args.new_tokens, "batched_captions_per_s": n / batched_s,
        "loop_captions_per_s": loop_images / loop_s, "speedup": (n / batched_s) / (loop_images / loop_s),
        "same_caption": f"{same}/{loop_images}", "example": batched[0] if batched else "",
    }


def frozen_encoder_setup(setup: Setup, images: int) -> tuple[Config, FrozenPrefixCaptioner]:
    """The recipe with model.freeze_encoder=true on its first `images` training images (sharing the loaded LM)."""
    config = setup.config
    train = config.data.train
    if isinstance(train, list):
        raise FrozenPrefixError("the cache part needs one training source (data.train is a mixture)")
    size = images if train.size is None else min(images, train.size)
    data = dataclasses.replace(config.data, train=dataclasses.replace(train, size=size), augment=False)
    config = dataclasses.replace(config, data=data, model=dataclasses.replace(config.model, freeze_encoder=True))
    torch.manual_seed(config.train.seed)
    model = FrozenPrefixCaptioner(config, lm=setup.model.lm, tokenizer=setup.model.tokenizer, device=setup.device)
    apply_speedups(model, dataclasses.replace(config, train=dataclasses.replace(config.train, compile="none")))
    return config, model.train()


def cache_epochs(
    config: Config, model: FrozenPrefixCaptioner, cache: FeatureCache | None, epochs: int, device: torch.device
) -> list[dict[str, float]]:
    """Per epoch: seconds of the image part (loading + encoder, or the cache) and of the whole epoch."""
    amp = autocast_for(device, config.train.precision)
    collate = build_collate(model, config)
    examples: Any = TrainExamples(build_train_source(config.data.train), config.data.bad_data,
                                  config.data.caption_sampling)
    if cache is not None:
        examples = CachedExamples(examples, cache)
    optimizer = build_optimizer(model, config)
    loader_config = with_resolved_workers(config, device)
    results = []
    for epoch in range(epochs):
        image_s, start = 0.0, time.perf_counter()
        loader = iter(train_loader(examples, collate, loader_config, epoch, 0))
        while True:
            t0 = time.perf_counter()
            batch = next(loader, None)
            if batch is None:
                image_s += time.perf_counter() - t0
                break
            if cache is not None:
                inputs = {**cache.model_inputs(model, batch, device, amp), "packed": config.train.padding_free}
            else:  # what the step does with a frozen encoder: its features, without a graph
                inputs = model_inputs(batch, device, config)
                with torch.no_grad(), amp:
                    inputs = {**inputs, "pixel_values": None, "features": model.image_features(inputs["pixel_values"])}
            sync(device)
            image_s += time.perf_counter() - t0
            optimizer.zero_grad(set_to_none=True)
            with amp:
                loss = model(**inputs)["loss"]
            loss.backward()
            optimizer.step()
        sync(device)
        results.append({"image_s": image_s, "epoch_s": time.perf_counter() - start})
    return results


def part_cache(args: argparse.Namespace, setup: Setup) -> dict[str, Any]:
    """Epochs with a frozen encoder, without and with the feature cache (epoch 1 fills it; 2+ are compared)."""
    config, model = frozen_encoder_setup(setup, args.cache_images)
    transform = build_transform(model.image_config, train=False)
    with tempfile.TemporaryDirectory(prefix="fp-bench-cache-") as folder:
        cache = FeatureCache(args.cache_kind, cache_identity(model, config, transform), folder)
        plain = cache_epochs(config, model, None, args.cache_epochs, setup.device)
        cached = cache_epochs(config, model, cache, args.cache_epochs, setup.device)
    later = slice(1, None)

    def mean(rows: list[dict[str, float]], key: str) -> float:
        return statistics.mean(r[key] for r in rows[later])

    return {
        "images": config.data.train.size, "epochs": args.cache_epochs, "kind": args.cache_kind,
        "no_cache": plain, "cache": cached,
        "image_part_speedup": mean(plain, "image_s") / mean(cached, "image_s"),
        "epoch_speedup": mean(plain, "epoch_s") / mean(cached, "epoch_s"), "goal": ">= 5x from epoch 2",
    }


def proc_status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (VmHWM, VmRSS) in MiB; None where /proc is missing."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return None


def read_peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; ru_maxrss where /proc is missing), in MiB."""
    peak = proc_status_mb("VmHWM")
    if peak is not None:
        return peak
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1024 / 1024


def current_rss_mb() -> float:
    """This process's resident memory now, in MiB."""
    now = proc_status_mb("VmRSS")
    return now if now is not None else read_peak_rss_mb()


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs); False where not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def memory_child(config: Config, variant: str) -> dict[str, Any]:
    """In a fresh process: one warm-up step, then the peak memory of one more step (frozen or trainable LM)."""
    setup = build_setup(config, 1)
    trainable = variant == "trainable"
    with lm_requires_grad(setup.model, trainable):
        train_step(setup, setup.batches[0], lm_grads=trainable)  # optimizer state exists from here on
        if setup.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated() / 2**20
            train_step(setup, setup.batches[0], lm_grads=trainable)
            return {"peak_mb": torch.cuda.max_memory_allocated() / 2**20, "before_mb": before, "measure": "cuda"}
        exact = reset_peak_rss()
        before = current_rss_mb()
        train_step(setup, setup.batches[0], lm_grads=trainable)
        return {"peak_mb": read_peak_rss_mb(), "before_mb": before, "measure": "rss" if exact else "rss (lifetime)"}


def part_memory(args: argparse.Namespace, overrides: list[str]) -> dict[str, Any]:
    """Peak memory of a step, frozen vs trainable LM, each measured in a process of its own (or, --memory-here, in
    this one: the peak is reset before the step, but memory this process's allocator kept can hide growth)."""
    result: dict[str, Any] = {"fresh_processes": not args.memory_here}
    for variant in ("frozen", "trainable"):
        if args.memory_here:
            result[variant] = memory_child(load_config(args.config, overrides), variant)
            continue
        command = [sys.executable, __file__, "--config", args.config, "--memory-child", variant, *overrides]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
        if done.returncode or not lines:
            raise FrozenPrefixError(f"the memory child ({variant}) failed: {done.stderr.strip()[-300:]}")
        result[variant] = json.loads(lines[-1])
    frozen, trainable = result["frozen"], result["trainable"]
    result["peak_ratio"] = frozen["peak_mb"] / trainable["peak_mb"]
    step_frozen = frozen["peak_mb"] - frozen["before_mb"]
    step_trainable = trainable["peak_mb"] - trainable["before_mb"]
    result["step_growth_ratio"] = step_frozen / step_trainable if step_trainable > 0 else None
    return result


def loader_rate(loader: torch.utils.data.DataLoader, batches: int) -> tuple[float, float, int]:
    """(images/s after the first batch, seconds to the first batch, batches timed)."""
    start = time.perf_counter()
    iterator = iter(loader)
    next(iterator)
    ready = time.perf_counter()
    images, count = 0, 0
    for batch in iterator:
        images += batch.size
        count += 1
        if count >= batches:
            break
    return images / (time.perf_counter() - ready), ready - start, count


def part_data(args: argparse.Namespace, setup: Setup, step_seconds: float | None) -> dict[str, Any]:
    """The loader's images/s (decode, transform, tokenize, collate) vs the images/s a training step consumes."""
    config, device = setup.config, setup.device
    loader_config = with_resolved_workers(config, device)
    examples = TrainExamples(build_train_source(config.data.train, mixture_size=config.data.mixture_size),
                             config.data.bad_data, config.data.caption_sampling)
    rate, first, count = loader_rate(train_loader(examples, build_collate(setup.model, config), loader_config, 0, 0),
                                     args.data_batches)
    if step_seconds is None:
        times = interleaved({"s": lambda r: train_step(setup, setup.batches[r % len(setup.batches)])}, args.steps,
                            args.warmup, device)["s"]
        step_seconds = statistics.median(times)
    consumed = config.train.batch_size / step_seconds
    return {
        "loader_images_per_s": rate, "first_batch_s": first, "batches": count,
        "num_workers": loader_config.data.num_workers, "step_images_per_s": consumed, "ratio": rate / consumed,
    }


def part_compare(args: argparse.Namespace, setup: Setup, overrides: list[str]) -> list[dict[str, Any]]:
    """Training-step time with and without each --compare override, the two models' steps in turn."""
    results = []
    for change in args.compare:
        config = load_config(args.config, [*overrides, *shlex.split(change)])  # several: space-separated
        variant = build_setup(config, args.steps)
        times = interleaved(
            {"base": lambda r: train_step(setup, setup.batches[r % len(setup.batches)]),
             "variant": lambda r, v=variant: train_step(v, v.batches[r % len(v.batches)])},
            args.steps, args.warmup + args.compare_warmup, setup.device,
        )
        base, other = statistics.median(times["base"]), statistics.median(times["variant"])
        results.append({"override": change, "base_s": base, "variant_s": other, "ratio": other / base,
                        "variant_warmup_s": sum(times["variant warm-up"]), "applied": variant.applied,
                        "times": times})
    return results


# ---------------------------------------------------------------------------- report


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    if info.exists():
        names = [ln.split(":", 1)[1].strip() for ln in info.read_text().splitlines() if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "cpu": cpu, "usable_cores": usable_cpus(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
        "cpu_native_bf16": cpu_has_native_bf16(),  # what precision=auto and lm_dtype=auto follow on the CPU
        "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
    }


def table(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(measure, value, goal) rows of everything measured."""
    rows: list[tuple[str, str, str]] = []
    if "step" in results:
        r = results["step"]
        flop_ratio = results.get("flops", {}).get("frozen_over_trainable_flops")
        rows.append(("1 step time, LM frozen / LM requiring grads",
                     f"{r['ratio']:.2f}x  ({r['frozen_s']:.3f} s / {r['trainable_lm_s']:.3f} s)",
                     r["goal"] + (f"; FLOP ratio {flop_ratio:.2f}" if flop_ratio else "")))
    if "flops" in results:
        r = results["flops"]
        rows.append(("2 step FLOP/s / matmul FLOP/s (" + r["dtype"] + ")",
                     f"{r['utilisation']:.0%}  ({r['achieved_flops_per_s'] / 1e9:.1f} of "
                     f"{r['peak_flops_per_s'] / 1e9:.1f} GFLOP/s)",
                     r["goal"]))
        p = r["profile"]
        top = ", ".join(f"{o['op'].removeprefix('aten::')} {o['share']:.0%}" for o in p["top_ops"][:5])
        rows.append(("  profiler self time: matmul+conv / other", f"{p['matmul_share']:.0%} / {p['other_share']:.0%}",
                     top))
        rows.append(("  ceiling: the products and convolutions alone", f"{r['utilisation_ceiling']:.0%}",
                     "row 2 if all the rest took no time"))
    if "decode" in results:
        r = results["decode"]
        rows.append(("3 decoding, batched+KV cache / one-image no-cache loop",
                     f"{r['speedup']:.1f}x  ({r['batched_captions_per_s']:.2f} / {r['loop_captions_per_s']:.2f} "
                     "captions/s)", f"same caption {r['same_caption']}"))
    if "cache" in results:
        r = results["cache"]
        rows.append((f"4 frozen-encoder epoch, no cache / {r['kind']} cache (epochs 2+)",
                     f"image part {r['image_part_speedup']:.1f}x, whole epoch {r['epoch_speedup']:.2f}x",
                     f"{r['goal']} ({r['images']} images)"))
    if "memory" in results:
        r = results["memory"]
        rows.append(("5 peak step memory, LM frozen / LM requiring grads",
                     f"{r['peak_ratio']:.2f}x  ({r['frozen']['peak_mb']:.0f} / {r['trainable']['peak_mb']:.0f} MiB "
                     f"{r['frozen']['measure']})",
                     "step growth " + (f"{r['step_growth_ratio']:.2f}x" if r["step_growth_ratio"] else "n/a")))
    if "data" in results:
        r = results["data"]
        rows.append(("6 loader images/s / images/s a step consumes",
                     f"{r['ratio']:.1f}x  ({r['loader_images_per_s']:.0f} / {r['step_images_per_s']:.1f})",
                     f"data.num_workers={r['num_workers']}"))
    for r in results.get("compare", []):
        rows.append((f"  step with {r['override']} / without", f"{r['ratio']:.2f}x  ({r['variant_s']:.3f} s / "
                     f"{r['base_s']:.3f} s)", f"{r['applied'] or ''} warm-up {r['variant_warmup_s']:.1f} s".strip()))
    return rows


def print_table(rows: list[tuple[str, str, str]]) -> None:
    """Aligned columns: measure, value, goal or note."""
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    for measure, value, goal in rows:
        print(f"{measure:<{widths[0]}}  {value:<{widths[1]}}  {goal}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure the requested parts; returns everything measured."""
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise FrozenPrefixError(f"--parts: unknown part(s) {', '.join(unknown)}; use {', '.join(PARTS)}")
    config = load_config(args.config, args.overrides)
    results: dict[str, Any] = {"config": args.config, "overrides": args.overrides, "machine": machine(), "parts": parts}
    needs_model = set(parts) - {"memory"} or args.compare
    setup = build_setup(config, max(args.steps, 1)) if needs_model else None
    seconds: dict[str, float] = {}

    def measure(name: str, fn: Any) -> None:
        start = time.perf_counter()
        results[name] = fn()
        seconds[name] = round(time.perf_counter() - start, 2)

    if "step" in parts:
        measure("step", lambda: part_step(setup, args.steps, args.warmup))
    step_seconds = results["step"]["frozen_s"] if "step" in results else None
    if "flops" in parts:
        measure("flops", lambda: part_flops(setup, step_seconds, args.steps, args.warmup, args.top,
                                            args.matmul_seconds))
    if "data" in parts:
        measure("data", lambda: part_data(args, setup, step_seconds))
    if args.compare:
        measure("compare", lambda: part_compare(args, setup, args.overrides))
    if "cache" in parts:
        measure("cache", lambda: part_cache(args, setup))
    if "decode" in parts:
        measure("decode", lambda: part_decode(args, setup))
    if "memory" in parts:
        measure("memory", lambda: part_memory(args, args.overrides))
    results["seconds"] = seconds
    results["table"] = [list(r) for r in table(results)]
    return results


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "shapes.yaml"))
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of: {', '.join(PARTS)}")
    parser.add_argument("--out", default="benchmark.json", help="the JSON file written")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per variant (after warm-up)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    parser.add_argument("--compare", action="append", default=[], help="KEY=VALUE [...]: step time with vs without")
    parser.add_argument("--compare-warmup", type=int, default=1, help="extra warm-up steps for --compare (compile)")
    parser.add_argument("--top", type=int, default=12, help="profiler ops listed")
    parser.add_argument("--matmul-seconds", type=float, default=1.0, help="flops: seconds per matmul-rate shape")
    parser.add_argument("--model", help="decode: a saved model folder, or 'untrained' for the benchmark's own "
                        "model (default: runs/shapes/model if present)")
    parser.add_argument("--decode-batch", type=int, default=32, help="decode: images on the batched path")
    parser.add_argument("--new-tokens", type=int, default=20, help="decode: tokens per caption")
    parser.add_argument("--loop-images", type=int, default=4, help="decode: images on the one-at-a-time path")
    parser.add_argument("--cache-images", type=int, default=128, help="cache: training images per epoch")
    parser.add_argument("--cache-epochs", type=int, default=3, help="cache: epochs per variant (the first fills)")
    parser.add_argument("--cache-kind", default="memory", choices=["memory", "disk"])
    parser.add_argument("--data-batches", type=int, default=40, help="data: loader batches timed")
    parser.add_argument("--memory-here", action="store_true", help="memory: measure in this process (quicker)")
    parser.add_argument("--memory-child", choices=["frozen", "trainable"], help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.batch_size=16")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for noisy in ("transformers", "timm", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        if args.memory_child:
            print(json.dumps(memory_child(load_config(args.config, args.overrides), args.memory_child)))
            return 0
        results = run(args)
    except FrozenPrefixError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m = results["machine"]
    print(f"{args.config} {' '.join(args.overrides)}".strip())
    print(f"machine: {m['cpu']}, {m['usable_cores']} cores, {m['torch_threads']} torch threads"
          + (f", {m['gpu']}" if m["gpu"] else "") + f"; torch {m['torch']}"
          + ("; native bf16" if m["cpu_native_bf16"] else "; no native bf16"))
    print_table([tuple(r) for r in results["table"]])
    Path(args.out).write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
