"""Other ways in for the image than the prefix (sum / product fusion into the text), and the visual alignment loss.

Fusion (model.fusion=sum|product): each sequence holds one image; its pooled vector v (the mean of its k projected
embeddings) is fused into the embedding e of every text token after it:
  sum      e + g * W LN(v)        g: a learned per-channel gate, zero at the start
  product  e * (1 + W LN(v))      W: zero at the start
Both start as the LM's own input. The image slots stay in the layout (every collator, the decoding and the
checkpoints work as they are) but carry a learned, image-independent marker: the image reaches the LM only
through the fused text, so the fusions compare ways in rather than "prefix plus more".

The visual loss (train.visual_loss_weight > 0) pulls a head on the pooled prefix towards the frozen LM's own
pooled representation of the sequence's text: InfoNCE over the batch, or MSE.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FrozenPrefixError


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


class TextFusion(nn.Module):
    """Fuses each sequence's pooled image vector into its text embeddings (sum or product)."""

    def __init__(self, kind: str, dim: int, k: int, embed_rms: float) -> None:
        super().__init__()
        self.kind = kind
        # What the image slots hold instead of the image: one learned embedding per slot, token-sized.
        self.marker = nn.Parameter(torch.randn(k, dim) * embed_rms)
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)
        if kind == "sum":
            self.gate = nn.Parameter(torch.zeros(dim))  # Flamingo-style: the added term starts at zero
        elif kind == "product":
            nn.init.zeros_(self.proj.weight)  # the scale starts at exactly 1
            nn.init.zeros_(self.proj.bias)
        else:
            raise ValueError(f"unknown fusion {kind!r}")

    def condition(self, vectors: torch.Tensor) -> torch.Tensor:
        """What each row's image contributes (B, D): the added term (sum) or the scale minus one (product)."""
        term = self.proj(self.norm(vectors))
        return self.gate * term if self.kind == "sum" else term

    def fuse(self, embeds: torch.Tensor, condition: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """Text embeddings (B, T, D) with each row's condition (B, D) fused in wherever `where` (B, T) is set."""
        term = condition[:, None, :].to(embeds.dtype) * where[..., None].to(embeds.dtype)
        return embeds + term if self.kind == "sum" else embeds * (1 + term)


class VisualHead(nn.Module):
    """The pooled prefix -> the space of the LM's caption representation, and the InfoNCE temperature."""

    def __init__(self, dim: int, target_dim: int, temperature: float) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, target_dim)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))

    def loss(self, prefix: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
        """InfoNCE (symmetric, image i's positive is text i, the others in the batch negatives) or MSE."""
        image = self.proj(pooled(prefix)).float()
        target = target.float()
        if kind == "mse":
            return F.mse_loss(image, target)
        # CLIP clamps the logit scale at 100: a temperature below 0.01 only makes the loss unstable.
        temperature = self.log_temperature.exp().clamp(min=0.01)
        logits = F.normalize(image, dim=-1) @ F.normalize(target, dim=-1).T / temperature
        labels = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
