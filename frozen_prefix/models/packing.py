"""Padding-free packing of a padded batch: its sequences laid end to end in fewer rows (train.padding_free)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class PackPlan:
    """Where each token of a padded (B, T) batch goes in the packed (R, L) batch, and its position there."""

    source: torch.Tensor  # (R * L,) index into the padded batch flattened to B * T; -1 where a row is padded
    position_ids: torch.Tensor  # (R, L) 0, 1, ... within each sequence: the LM's cue that a new sequence starts
    rows: int
    length: int

    def gather(self, values: torch.Tensor, fill: float | int) -> torch.Tensor:
        """values (B, T, ...) laid out as (R, L, ...); padded places hold fill."""
        flat = values.reshape(-1, *values.shape[2:])
        out = flat.new_full((self.source.numel(), *values.shape[2:]), fill)
        keep = self.source >= 0
        out[keep] = flat[self.source[keep]]
        return out.view(self.rows, self.length, *values.shape[2:])


# Rows hold at least this many tokens: a batch of short captions packs several to a row, while attention over
# a row (quadratic in its length) stays a few percent of the step
ROW_TOKENS = 128


def plan_packing(attention_mask: torch.Tensor, row_tokens: int = ROW_TOKENS) -> PackPlan | None:
    """Rows of about max(longest sequence, row_tokens) tokens, filled evenly; None when packing saves nothing.

    Longest first, each sequence goes to the emptiest of ceil(tokens / row length) rows, so the rows end up about
    equally long and the padding is what the longest row has over the others. Each sequence keeps its tokens in
    order (the attended positions of its row, so either padding side works). A row's padding restarts at position
    0: a sequence of its own that nothing attends to.
    """
    device, attention_mask = attention_mask.device, attention_mask.bool().cpu()  # one copy: the plan is made here
    lengths = attention_mask.sum(dim=1).tolist()
    rows = max(1, math.ceil(sum(lengths) / max(attention_mask.shape[1], row_tokens)))
    bins: list[list[int]] = [[] for _ in range(rows)]
    fill = [0] * rows
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # stable: ties keep the batch order
        emptiest = fill.index(min(fill))
        bins[emptiest].append(i)
        fill[emptiest] += lengths[i]
    length = max(fill)
    if rows * length >= attention_mask.numel():
        return None
    attended = attention_mask.flatten().nonzero().flatten().split(lengths)  # each sequence's places, in order
    source = torch.full((rows, length), -1, dtype=torch.long)
    position_ids = torch.zeros((rows, length), dtype=torch.long)
    for b, members in enumerate(bins):
        start = 0
        for i in members:
            n = lengths[i]
            source[b, start : start + n] = attended[i]
            position_ids[b, start : start + n] = torch.arange(n)
            start += n
        position_ids[b, start:] = torch.arange(length - start)
    return PackPlan(source.flatten().to(device), position_ids.to(device), rows, length)


@torch.no_grad()
def packing_supported(lm: torch.nn.Module) -> bool:
    """Whether this LM keeps packed sequences apart: the hidden states of three short sequences, packed or not."""
    lengths = torch.tensor([4, 2, 2])
    mask = (torch.arange(4)[None] < lengths[:, None]).long()
    embeds = torch.randn(3, 4, lm.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.02
    weight = lm.get_input_embeddings().weight
    embeds, mask = embeds.to(weight.device, weight.dtype), mask.to(weight.device)
    plan = plan_packing(mask)
    padded = lm.base_model(inputs_embeds=embeds, attention_mask=mask, use_cache=False)[0]
    packed = lm.base_model(inputs_embeds=plan.gather(embeds, 0.0), position_ids=plan.position_ids, use_cache=False)[0]
    keep = plan.source >= 0
    reference = padded.reshape(-1, padded.shape[-1])[plan.source[keep]].float()
    got = packed.reshape(-1, packed.shape[-1])[keep].float()
    return torch.allclose(got, reference, rtol=1e-2, atol=1e-2 * float(reference.abs().max()))
