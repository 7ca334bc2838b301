"""Fusion into the text (model.fusion=sum|product): the design document's weighted-sum and product fusions.

Each sequence holds one image; its pooled vector v (the mean of its k projected embeddings) is fused into the
embedding e of every text token after it:
  sum      e + g * W LN(v)        g: a learned per-channel gate, zero at the start
  product  e * (1 + W LN(v))      W: zero at the start
Both start as the LM's own input. The image slots stay in the layout (every collator, the decoding and the
checkpoints work as they are) but carry a learned, image-independent marker: the image reaches the LM only
through the fused text, so the fusions compare ways in rather than "prefix plus more".
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ...config import Config
from ...errors import ConfigError, FrozenPrefixError
from .base import LMCall, LMInfo, Variant, register_variant


def image_rows(image_mask: torch.Tensor, k: int, option: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows that hold an image (B,), text positions after it (B, T)); refuses a row with several images."""
    slots = image_mask.sum(dim=1)
    if bool((slots > k).any()):
        raise FrozenPrefixError(
            f"{option} fuses one image into the text of its sequence, but a sequence here holds "
            f"{int(slots.max()) // k} images (an interleaved or few-shot prompt, a chat, or packed training "
            "sequences); use model.fusion=prefix for those"
        )
    seen = image_mask.long().cumsum(dim=1) > 0
    return slots > 0, seen & ~image_mask


def pooled(prefix: torch.Tensor) -> torch.Tensor:
    """One vector per image (N, D): the mean of its k prefix embeddings."""
    return prefix.mean(dim=1)


@register_variant("fusion")
class TextFusion(Variant):
    """Fuses each sequence's pooled image vector into its text embeddings (sum or product)."""

    def __init__(self, config: Config, lm_info: LMInfo) -> None:
        super().__init__(config, lm_info)
        self.kind = kind = config.model.fusion
        dim, self.k = lm_info.dim, lm_info.prefix_length
        # What the image slots hold instead of the image: one learned embedding per slot, token-sized.
        self.marker = nn.Parameter(torch.randn(self.k, dim) * lm_info.embed_rms)
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)
        if kind == "sum":
            self.gate = nn.Parameter(torch.zeros(dim))  # Flamingo-style: the added term starts at zero
        elif kind == "product":
            nn.init.zeros_(self.proj.weight)  # the scale starts at exactly 1
            nn.init.zeros_(self.proj.bias)
        else:
            raise ValueError(f"unknown fusion {kind!r}")

    @classmethod
    def switched_on(cls, config: Config) -> bool:
        """model.fusion=sum|product."""
        return config.model.fusion != "prefix"

    @classmethod
    def check(cls, config: Config) -> None:
        """One image per training sequence: a fused token must know whose image it carries."""
        if config.data.images_per_sequence > 1:
            raise ConfigError(
                f"model.fusion={config.model.fusion} needs one image per sequence, but data.images_per_sequence="
                f"{config.data.images_per_sequence}; set data.images_per_sequence=1"
            )

    @property
    def option(self) -> str:
        """The setting, as error lines name it."""
        return f"model.fusion={self.kind}"

    def condition(self, vectors: torch.Tensor) -> torch.Tensor:
        """What each row's image contributes (B, D): the added term (sum) or the scale minus one (product)."""
        term = self.proj(self.norm(vectors))
        return self.gate * term if self.kind == "sum" else term

    def fuse(self, embeds: torch.Tensor, condition: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """Text embeddings (B, T, D) with each row's condition (B, D) fused in wherever `where` (B, T) is set."""
        term = condition[:, None, :].to(embeds.dtype) * where[..., None].to(embeds.dtype)
        return embeds + term if self.kind == "sum" else embeds * (1 + term)

    def _row_conditions(self, prefix: torch.Tensor, has_image: torch.Tensor) -> torch.Tensor:
        """The condition (B, D) of each row's image (zeros for rows without one: they fuse nothing)."""
        vectors = prefix.new_zeros(has_image.shape[0], prefix.shape[-1])
        vectors[has_image] = pooled(prefix).to(vectors.dtype)
        return self.condition(vectors)

    def write_embeddings(
        self, embeds: torch.Tensor, image_mask: torch.Tensor, prefix: torch.Tensor
    ) -> torch.Tensor | None:
        """The slots hold the learned marker; the image enters through the text that follows it."""
        has_image, after = image_rows(image_mask, self.k, self.option)
        marker = self.marker.expand(prefix.shape[0], -1, -1).to(embeds.dtype)
        embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), marker)
        return self.fuse(embeds, self._row_conditions(prefix, has_image), after)

    @contextlib.contextmanager
    def lm_context(self, call: LMCall) -> Iterator[None]:
        """Every token the LM embeds by id during the call (decoding's new tokens, scored candidates) gets its image.

        The prompt went in as embeddings (write_embeddings fused it); new tokens go through the LM's embedding
        layer, where a forward hook fuses them too. Rows repeated for beams or candidates (each prompt's n copies
        next to each other) get their prompt's image.
        """
        rows: list[tuple[torch.Tensor, torch.Tensor]] = []  # at the first token embedded by id: training embeds none

        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
            if not rows:
                has_image, _ = image_rows(call.image_mask, self.k, self.option)
                rows.append((has_image, self._row_conditions(call.prefix, has_image)))
            has_image, condition = rows[0]
            n = output.shape[0] // condition.shape[0]
            where = has_image.repeat_interleave(n)[:, None].expand(output.shape[:2])
            return self.fuse(output, condition.repeat_interleave(n, dim=0), where)

        handle = call.lm.get_input_embeddings().register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def refuses(self, task: str) -> str | None:
        """A chat's turns may show several images, and a session embeds its tokens itself."""
        if task != "chat":
            return None
        return (
            f"chat is not supported with {self.option} (it fuses one image into plain text decoding); "
            "caption or complete one-image prompts, or chat with a model trained with model.fusion=prefix"
        )
