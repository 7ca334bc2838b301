"""The visual loss (train.visual_loss_weight > 0): the design document's joint objective, text + visual.

A head on the pooled prefix is pulled towards the frozen LM's own pooled representation of the sequence's text:
InfoNCE over the batch (symmetric; image i's positive is text i, the others in the batch its negatives), or MSE.
The objective is then text_loss_weight x the caption cross-entropy + visual_loss_weight x this loss.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...config import Config
from ...errors import ConfigError, FrozenPrefixError
from .base import LMInfo, Variant, register_variant
from .fusion import pooled


@register_variant("visual_head")
class VisualHead(Variant):
    """The pooled prefix -> the space of the LM's caption representation, and the InfoNCE temperature."""

    def __init__(self, config: Config, lm_info: LMInfo) -> None:
        super().__init__(config, lm_info)
        tc = config.train
        self.kind, self.target, self.weight = tc.visual_loss, tc.visual_target, tc.visual_loss_weight
        self.proj = nn.Linear(lm_info.dim, lm_info.dim)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(tc.visual_temperature)))

    @classmethod
    def switched_on(cls, config: Config) -> bool:
        """train.visual_loss_weight > 0."""
        return config.train.visual_loss_weight > 0

    @classmethod
    def check(cls, config: Config) -> None:
        """A temperature above zero, and one image per sequence: each image is paired with its own text."""
        if config.train.visual_temperature <= 0:
            raise ConfigError(f"train.visual_temperature: must be > 0, got {config.train.visual_temperature}")
        if config.data.images_per_sequence > 1:
            raise ConfigError(
                f"train.visual_loss_weight>0 needs one image per sequence, but data.images_per_sequence="
                f"{config.data.images_per_sequence}; set data.images_per_sequence=1"
            )

    def loss_weights(self) -> dict[str, float]:
        """beta: the visual term's weight in the objective."""
        return {"loss_visual": self.weight}

    def extra_losses(self, core: nn.Module, batch: dict[str, Any], prefix: torch.Tensor) -> dict[str, Any]:
        """The visual loss of the batch's images against their texts."""
        target = text_representation(core, batch, prefix.shape[0], self.target)
        return {"loss_visual": self.loss(prefix, target)}

    def loss(self, prefix: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """InfoNCE (symmetric, image i's positive is text i, the others in the batch negatives) or MSE."""
        image = self.proj(pooled(prefix)).float()
        target = target.float()
        if self.kind == "mse":
            return F.mse_loss(image, target)
        # CLIP clamps the logit scale at 100: a temperature below 0.01 only makes the loss unstable.
        temperature = self.log_temperature.exp().clamp(min=0.01)
        logits = F.normalize(image, dim=-1) @ F.normalize(target, dim=-1).T / temperature
        labels = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


@torch.no_grad()
def text_representation(core: nn.Module, batch: dict[str, Any], images: int, kind: str) -> torch.Tensor:
    """What the visual loss pulls each image towards (B, D): the LM's pooled view of its labelled text.

    train.visual_target=hidden: the mean of the LM's last hidden states over the labelled tokens (the caption
    and its EOS) of a text-only pass (the image slots left out); embeddings: the mean of their input
    embeddings. No gradient: a target, never a path into the LM.
    """
    input_ids, image_mask = batch["input_ids"], batch["image_mask"]
    k = core.prefix_length
    if images != input_ids.shape[0] or bool((image_mask.sum(dim=1) != k).any()):
        raise FrozenPrefixError(
            f"train.visual_loss_weight>0 pairs each image with the text of its sequence, but this batch has "
            f"{images} images in {input_ids.shape[0]} sequences (packed, interleaved or text-only rows); "
            "train on one image per sequence or set train.visual_loss_weight=0"
        )
    rows = input_ids.shape[0]
    ids, mask, labels = (t[~image_mask].view(rows, -1) for t in (input_ids, batch["attention_mask"], batch["labels"]))
    if kind == "embeddings":
        states = core.lm.get_input_embeddings()(ids)
    else:
        states = core.lm.base_model(input_ids=ids, attention_mask=mask, use_cache=False)[0]
    keep = (labels != -100).unsqueeze(-1).to(states.dtype)
    return (states * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1)
