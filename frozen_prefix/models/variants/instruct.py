"""The instruction-aware prefix (model.instruction_aware): the text after an image conditions its prefix.

A frozen LM reads an image only through its k prefix embeddings. To answer "What colour is the square?" it must
find the square among them and name its colour, and a frozen 135M LM does that poorly: given the scene as text it
answers about a third of the shapes questions right (README). InstructBLIP (Dai et al., 2023) gives the
instruction to the module that makes the visual tokens, so that they carry what the instruction asks for. Here an
image's instruction is the text that follows it up to the first labelled token (the reply the model learns to
give), the next image or the end: the mean of its frozen token embeddings joins the image's k prefix embeddings in
a small transformer, whose output, through a zero-initialised map, is added to the prefix. A model therefore
starts as the plain prefix model, and a captions-only run's weights are a valid start for a second stage.
A prompt has no labels, so in a few-shot prompt a worked example's image also reads its answer; in training, in
a zero-shot question and in a chat (whose earlier replies are labelled) the instruction never holds the reply.
"""

from __future__ import annotations

import torch
from torch import nn

from ...config import Config
from ...errors import ConfigError
from .base import LMInfo, PrefixInputs, Variant, register_variant
from .deep import slot_index


@register_variant("instruct")
class InstructionMixer(Variant):
    """(prefix (N, k, D), instruction (N, D)) -> the prefix plus a term that depends on both, zero at the start."""

    starts_at_zero = True

    def __init__(self, config: Config, lm_info: LMInfo, width: int = 256, layers: int = 2, heads: int = 4) -> None:
        super().__init__(config, lm_info)
        dim, k = lm_info.dim, lm_info.prefix_length
        self.slots_in = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, width))
        self.text_in = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, width))
        # One learned embedding per place (the instruction, then each slot): attention alone ignores order
        self.places = nn.Parameter(torch.randn(k + 1, width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.mixer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, dim))
        nn.init.zeros_(self.out[1].weight)
        nn.init.zeros_(self.out[1].bias)

    @classmethod
    def switched_on(cls, config: Config) -> bool:
        """model.instruction_aware=true."""
        return config.model.instruction_aware

    @classmethod
    def check(cls, config: Config) -> None:
        """It conditions the prefix itself: a fusion or a deep prefix would read another prefix than it makes."""
        if config.model.fusion != "prefix" or config.model.deep_prefix:
            raise ConfigError(
                "model.instruction_aware=true conditions the prefix itself, so it needs model.fusion=prefix and "
                "model.deep_prefix=false; set those or model.instruction_aware=false"
            )

    def condition_prefix(self, prefix: torch.Tensor, inputs: PrefixInputs) -> torch.Tensor:
        """Each image's prefix conditioned on its instruction: the text after it up to a label, image or padding."""
        text = instruction_vectors(
            inputs.embeds, inputs.image_mask, self.lm_info.prefix_length, inputs.attention_mask, inputs.labels
        )
        return self(prefix, text.to(prefix.dtype))

    def forward(self, prefix: torch.Tensor, instruction: torch.Tensor) -> torch.Tensor:
        """The conditioned prefix (N, k, D)."""
        tokens = torch.cat([self.text_in(instruction)[:, None], self.slots_in(prefix)], dim=1) + self.places
        # In the LM's embedding units, beside a trained prefix ~50x a token embedding: the term grows gently under
        # Adam. Measured in units of each slot's own size instead, it swamped the trained prefix within ten steps
        # and cost 13 points of captions (README).
        return prefix + self.out(self.mixer(tokens)[:, 1:]).to(prefix.dtype)


def instruction_vectors(
    embeds: torch.Tensor, image_mask: torch.Tensor, k: int,
    attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each image's instruction (images, D): the mean embedding of the text after it, up to a label or image.

    Images are counted row by row in reading order, as the prefix holds them. An image whose next position is a
    label, an image, padding or the end has no instruction: its vector is zero.
    """
    slots = slot_index(image_mask)  # each slot's global index (row-major), -1 elsewhere
    stop = image_mask.clone()
    if labels is not None:
        stop |= labels != -100  # a labelled position (-100: not learned)
    if attention_mask is not None:
        stop |= attention_mask == 0
    places = torch.arange(image_mask.shape[1], device=image_mask.device).expand_as(image_mask)
    last_slot = torch.where(image_mask, places, -1).cummax(dim=1).values
    last_stop = torch.where(stop, places, -1).cummax(dim=1).values
    owner = torch.where(image_mask, slots // k, -1).cummax(dim=1).values  # the last image seen in the row
    # A position reads as its image's instruction when nothing stopped it since that image's last slot
    reads = ~stop & (last_slot >= 0) & (last_slot >= last_stop)
    images = int(image_mask.sum()) // k
    whose = owner[reads]
    sums = embeds.new_zeros(images, embeds.shape[-1], dtype=torch.float32).index_add_(0, whose, embeds[reads].float())
    counts = torch.zeros(images, device=embeds.device).index_add_(0, whose, torch.ones_like(whose, dtype=torch.float32))
    return sums / counts.clamp(min=1)[:, None]
