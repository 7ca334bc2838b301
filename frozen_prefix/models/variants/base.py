"""The variant plug-in interface: a trainable module the Frozen core calls at a few fixed hooks, and its registry.

A variant changes how the image reaches the frozen LM (fusion into the text, a deep prefix, an instruction-aware
prefix) or what training optimises (an extra loss). It is a `torch.nn.Module` holding its own trainable weights,
saved under its registry name beside the encoder's and the projection's. Every hook has a no-op default, so a
variant overrides only what it changes:

  condition_prefix   the prefix (N, k, D) of a batch's images, before it is written into the sequence
  write_embeddings   write the prefix into the token embeddings itself (None: the core fills the image slots)
  lm_context         a context around every LM call (training, decoding, scoring, chat): hooks into the LM
  extra_losses       named losses beside the text loss, each weighted by loss_weights()
  refuses            a one-line reason this variant cannot serve a task ("chat"), or None
  check              (classmethod) one-line ConfigErrors for settings it cannot work with
  starts_at_zero     (class attribute) a no-op at its initial weights: model.init_from may start it fresh

A variant is on when `model.variants` names it, or when its own switch in the config is set (`switched_on`: how the
built-ins keep their keys, e.g. model.fusion=sum). Register one from any file with `@register_variant("name")`.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ...config import Config, register_validator
from ...errors import ConfigError, FrozenPrefixError


@dataclass(frozen=True)
class LMInfo:
    """What a variant may need to know about the frozen LM it works with."""

    dim: int  # the LM's hidden width (= its token embeddings' width)
    layers: int  # decoder layers
    embed_rms: float  # the root mean square of the LM's token embeddings: the scale its inputs have
    prefix_length: int  # k: prefix embeddings per image


@dataclass
class PrefixInputs:
    """The batch a prefix is written into: token embeddings and the layout tensors (B, T)."""

    input_ids: torch.Tensor
    embeds: torch.Tensor
    image_mask: torch.Tensor
    attention_mask: torch.Tensor | None = None
    labels: torch.Tensor | None = None  # where a sequence's labelled reply starts (training, a chat's earlier turns)


@dataclass
class LMCall:
    """One call of the LM: the layout of the sequences it continues and the positions it runs.

    The call runs image_mask[:, start:] (a chat session runs only what its cache lacks; a scoring pass over
    candidates runs none of them: start = T), or, with a packing plan, the packed rows of the batch; tokens the
    LM embeds by id after those positions (HF generate's new tokens, scored candidates) belong to the same rows,
    repeated for beams or candidates.
    """

    lm: nn.Module  # the frozen LM
    image_mask: torch.Tensor
    prefix: torch.Tensor
    start: int = 0
    plan: Any = None  # models.packing.PackPlan when training padding-free


class Variant(nn.Module):
    """A plug-in of the Frozen core; see the module docstring for its hooks."""

    name: ClassVar[str] = ""  # set by register_variant: the key its weights are saved under
    starts_at_zero: ClassVar[bool] = False

    def __init__(self, config: Config, lm_info: LMInfo) -> None:
        super().__init__()
        self.lm_info = lm_info

    @classmethod
    def switched_on(cls, config: Config) -> bool:
        """Whether the config turns this variant on by a key of its own (besides model.variants)."""
        return False

    @classmethod
    def check(cls, config: Config) -> None:
        """Raise a one-line ConfigError for settings this variant cannot work with."""

    @classmethod
    def options(cls, config: Config) -> dict[str, Any]:
        """This variant's entry of model.variant_options (an empty mapping when it has none)."""
        return dict(config.model.variant_options.get(cls.name, {}))

    def condition_prefix(self, prefix: torch.Tensor, inputs: PrefixInputs) -> torch.Tensor:
        """The prefix (N, k, D) to write, given the batch it goes into."""
        return prefix

    def write_embeddings(
        self, embeds: torch.Tensor, image_mask: torch.Tensor, prefix: torch.Tensor
    ) -> torch.Tensor | None:
        """Token embeddings with the image written in, or None for the core's own (the prefix in the slots)."""
        return None

    def lm_context(self, call: LMCall) -> contextlib.AbstractContextManager[Any]:
        """A context manager around an LM call."""
        return contextlib.nullcontext()

    def extra_losses(self, core: nn.Module, batch: dict[str, torch.Tensor], prefix: torch.Tensor) -> dict[str, Any]:
        """Named losses (means over the batch's images) beside the text loss; computed outside any LM context."""
        return {}

    def loss_weights(self) -> dict[str, float]:
        """The weight of each of extra_losses' terms in the objective."""
        return {}

    def refuses(self, task: str) -> str | None:
        """Why this variant cannot serve a task ("chat"), as the one-line error to give; None when it can."""
        return None


VARIANTS: dict[str, type[Variant]] = {}  # registry order is construction order: the same seed, the same weights


def register_variant(name: str) -> Callable[[type[Variant]], type[Variant]]:
    """Class decorator: make a Variant subclass available as model.variants=[name]."""

    def add(cls: type[Variant]) -> type[Variant]:
        if not (isinstance(cls, type) and issubclass(cls, Variant)):
            raise TypeError(f"register_variant({name!r}) decorates a subclass of frozen_prefix.Variant")
        if name in VARIANTS and _origin(VARIANTS[name]) != _origin(cls):  # the same file again replaces itself
            raise ValueError(f"a variant named {name!r} is registered already ({_origin(VARIANTS[name])})")
        cls.name = name
        VARIANTS[name] = cls
        return cls

    return add


def _origin(cls: type) -> str:
    """Where a class was defined: module and qualified name."""
    return f"{cls.__module__}.{cls.__qualname__}"


def active_variants(config: Config) -> list[type[Variant]]:
    """The variant classes this config turns on, in registry order."""
    return [cls for name, cls in VARIANTS.items() if name in config.model.variants or cls.switched_on(config)]


def build_variants(config: Config, lm_info: LMInfo) -> nn.ModuleDict:
    """The config's variants, built in registry order, keyed by name."""
    return nn.ModuleDict({cls.name: cls(config, lm_info) for cls in active_variants(config)})


def _check_variants(config: Config) -> None:
    """model.variants names registered variants; each active variant checks the rest of the config."""
    for name in config.model.variants:
        if name not in VARIANTS:
            near = difflib.get_close_matches(name, list(VARIANTS), n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise ConfigError(
                f"model.variants: no variant named {name!r} is registered; {hint}import the file that registers it "
                f"(--plugin FILE on the commands) or use one of: {', '.join(VARIANTS)}"
            )
    unknown = sorted(set(config.model.variant_options) - {cls.name for cls in active_variants(config)})
    if unknown:
        raise ConfigError(
            f"model.variant_options.{unknown[0]}: that variant is not on; add it to model.variants or drop its options"
        )
    for cls in active_variants(config):
        cls.check(config)


register_validator(_check_variants)


def refused(variants: nn.ModuleDict, task: str) -> None:
    """Raise the first variant's reason for refusing a task."""
    for variant in variants.values():
        reason = variant.refuses(task)
        if reason:
            raise FrozenPrefixError(reason)
