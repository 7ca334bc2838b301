"""The switchable speed-ups of a training step: torch.compile, channels-last, frozen-LM checkpointing, workers."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..captioner import FrozenPrefixCaptioner
from ..config import Config
from ..models.lm import decoder_layers

log = logging.getLogger(__name__)


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def resolve_num_workers(value: int | str, device: torch.device) -> int:
    """data.num_workers as a number; auto leaves the CPU step its cores (none up to 4 of them), CUDA half, at most 8."""
    if value != "auto":
        return int(value)
    cpus = usable_cpus()
    if device.type == "cuda":
        return min(8, cpus // 2)
    return 0 if cpus <= 4 else min(4, cpus // 4)


def with_resolved_workers(config: Config, device: torch.device) -> Config:
    """A copy of the config whose data.num_workers is a number (what the DataLoader takes)."""
    workers = resolve_num_workers(config.data.num_workers, device)
    if workers == config.data.num_workers:
        return config
    log.info("data.num_workers=auto: %d worker processes (%d usable cores, %s)", workers, usable_cpus(), device.type)
    return dataclasses.replace(config, data=dataclasses.replace(config.data, num_workers=workers))


@functools.cache
def compile_problem() -> str | None:
    """Why torch.compile cannot run here (None when a tiny function compiles and runs)."""
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(2))
    except Exception as e:  # noqa: BLE001 - any failure means: run without compiling
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:120] if str(e).strip() else ''}"
    return None


def compile_model(model: FrozenPrefixCaptioner, what: str) -> bool:
    """train.compile: the encoder's features, the LM's layers or the captioner's forward; False if not possible."""
    if what == "none":
        return False
    problem = compile_problem()
    if problem is not None:
        log.warning("train.compile=%s: torch.compile cannot run here (%s); training without it", what, problem)
        return False
    if what == "encoder":
        # forward_features is what the captioner calls (and what the encoder's own forward calls): an instance
        # attribute, so the state dict keeps its names
        model.encoder.forward_features = torch.compile(model.encoder.forward_features)
    elif what == "layers":
        # regional compilation: the layers run the same code on their own weights, so the graph compiled for
        # the first is reused by the rest (weights are graph inputs), and compiling takes one layer's time
        for layer in decoder_layers(model.lm):
            _when_grad_use(layer, torch.compile(layer.forward))
        # and the loss over the vocabulary, a few seconds more: fused, the cast, log-softmax and their backward make
        # one pass over the (N, vocabulary) logits instead of several over an fp32 copy (0.06 s of a 0.8 s bf16 step
        # on two cores); dynamic: N changes with every batch
        model.token_loss.compile(dynamic=True)
    else:
        model.compile()  # nn.Module.compile: in place, parameter names unchanged
    log.info("train.compile=%s: compiled (the first steps are slower while it compiles)", what)
    return True


def use_channels_last(model: FrozenPrefixCaptioner) -> bool:
    """train.channels_last: the encoder's weights and its input images in NHWC order (CNNs only)."""
    if not any(isinstance(m, nn.Conv2d) for m in model.encoder.modules()):
        log.warning("train.channels_last: %s has no convolutions; left as it is", model.config.model.encoder)
        return False
    model.encoder.to(memory_format=torch.channels_last)
    # the images too, where the encoder's features start (an instance attribute, as train.compile=encoder sets)
    forward_features = model.encoder.forward_features
    model.encoder.forward_features = functools.partial(_channels_last_input, forward_features)
    return True


def _channels_last_input(forward_features: Any, pixel_values: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """forward_features on the images in channels-last order."""
    return forward_features(pixel_values.contiguous(memory_format=torch.channels_last), *args, **kwargs)


def checkpoint_lm_layers(lm: nn.Module) -> int:
    """Recompute each decoder layer's activations in the backward pass; returns the layers wrapped.

    Hugging Face's own gradient_checkpointing_enable only acts on modules in training mode, and the frozen LM
    stays in eval mode (dropout off), so each layer's forward is wrapped here instead: non-reentrant checkpoints,
    which need no input that requires grad and pass keyword arguments through.
    """
    layers = decoder_layers(lm)
    for layer in layers:
        _when_grad_use(layer, functools.partial(checkpoint, layer.forward, use_reentrant=False))
    return len(layers)


def _when_grad_use(layer: nn.Module, training_forward: Any) -> None:
    """layer.forward becomes training_forward where a backward pass will follow, and stays as it is elsewhere."""
    layer.forward = functools.partial(_grad_or_eager, training_forward, layer.forward)


def _grad_or_eager(training_forward: Any, forward: Any, *args: Any, **kwargs: Any) -> Any:
    """training_forward with grad enabled; forward as it is without (evaluation, decoding with its KV cache)."""
    return training_forward(*args, **kwargs) if torch.is_grad_enabled() else forward(*args, **kwargs)


def apply_speedups(model: FrozenPrefixCaptioner, config: Config) -> dict[str, Any]:
    """Apply the train.* speed-ups the config asks for; returns what was applied."""
    tc = config.train
    applied: dict[str, Any] = {}
    if tc.channels_last:
        applied["channels_last"] = use_channels_last(model)
    if tc.lm_gradient_checkpointing:
        applied["lm_gradient_checkpointing"] = checkpoint_lm_layers(model.lm)
    if tc.compile != "none":
        applied["compile"] = tc.compile if compile_model(model, tc.compile) else "none"
    return applied
