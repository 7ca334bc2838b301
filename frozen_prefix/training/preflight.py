"""Everything a user gave, checked before the run folder is touched: the world, the context, one forward pass."""

from __future__ import annotations

from typing import Any

import torch

from .. import cli
from ..captioner import FrozenPrefixCaptioner
from ..config import Config
from ..data import CaptionCollator, TrainExamples
from ..data.layout import Batch
from ..errors import FrozenPrefixError
from ..models.packing import packing_supported
from ..parallel import distributed
from .step import model_inputs


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
