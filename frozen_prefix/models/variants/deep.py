"""The deep prefix (model.deep_prefix): the image also written into the frozen LM's residual stream at every layer.

Prompt tuning that only sets a frozen LM's input embeddings works at ~10B parameters but falls well short of
fine-tuning in small LMs (Lester et al., 2021); setting the prompt's activations at every layer closes most of that
gap at a few hundred million (prefix-tuning, Li & Liang, 2021; P-tuning v2, Liu et al., 2022). The deep prefix does
that for the image: after each LM layer but the last, each image slot's hidden state gets an image-dependent term
W_l LN(p) (p: that slot's prefix embedding), so every layer's keys and values at the image slots are the image's.
W starts at zero (LLaMA-Adapter's zero-init gating): a model starts exactly as the plain prefix model, and a
captions-only run's weights are a valid start for a second stage. The LM's weights stay frozen; gradients pass
through its layers to W as they pass to the prefix.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ...config import Config
from ...errors import ConfigError, FrozenPrefixError
from ..lm import decoder_layers
from .base import LMCall, LMInfo, Variant, register_variant


def slot_index(image_mask: torch.Tensor) -> torch.Tensor:
    """(B, T): each image slot's index in the batch's prefix (row-major, as the core fills it), else -1."""
    flat = image_mask.flatten()
    index = flat.long().cumsum(0) - 1
    return torch.where(flat, index, torch.full_like(index, -1)).view(image_mask.shape)


@register_variant("deep")
class DeepPrefix(Variant):
    """Per-layer residual terms (layers, slots, D) for the image slots, linear in the prefix, zero at the start."""

    starts_at_zero = True

    def __init__(self, config: Config, lm_info: LMInfo) -> None:
        super().__init__(config, lm_info)
        if lm_info.layers < 2:
            raise FrozenPrefixError(
                "model.deep_prefix=true: cannot find the decoder layers of this LM (it needs two or more); "
                "set model.deep_prefix=false"
            )
        dim, self.layers = lm_info.dim, lm_info.layers - 1
        # The prefix's scale is whatever training made it (~50x a token embedding in the default recipe): normed,
        # the terms grow at the same rate under Adam whatever it is, instead of swamping the hidden states
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim * self.layers)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    @classmethod
    def switched_on(cls, config: Config) -> bool:
        """model.deep_prefix=true."""
        return config.model.deep_prefix

    @classmethod
    def check(cls, config: Config) -> None:
        """The terms are added at the prefix's slots: a fusion that replaces the prefix leaves nothing to deepen."""
        if config.model.fusion != "prefix":
            raise ConfigError(
                f"model.deep_prefix=true writes the prefix into every layer, but model.fusion={config.model.fusion} "
                "replaces the prefix with a marker; set model.fusion=prefix or model.deep_prefix=false"
            )

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        """Prefix (N, k, D) -> the terms (layers, N * k, D), slot order as the prefix (image by image)."""
        slots = prefix.reshape(-1, prefix.shape[-1])
        return self.proj(self.norm(slots)).view(slots.shape[0], self.layers, -1).transpose(0, 1)

    def lm_context(self, call: LMCall) -> contextlib.AbstractContextManager[None]:
        """While open, the call's image slots get the image at every layer.

        With a packing plan the slots are found in the packed rows the LM runs (padding-free training); else in
        image_mask from position `start` on (a chat that runs only what its cache lacks).
        """
        slots = slot_index(call.image_mask)
        where = call.plan.gather(slots, -1) if call.plan is not None else slots[:, call.start :]
        return writing_into(decoder_layers(call.lm), where, self(call.prefix))


@contextlib.contextmanager
def writing_into(layers: nn.ModuleList, slots: torch.Tensor, terms: torch.Tensor) -> Iterator[None]:
    """While open: layer l's output gets terms[l] at the positions where slots >= 0 (slot slots[b, t]).

    Only calls whose sequence has slots' length see it (the prompt, or a training batch): the tokens HF generate
    adds one at a time hold no image slot. Rows repeated for beams or candidates get their prompt's terms.
    """
    if terms.shape[0] != len(layers) - 1:
        raise FrozenPrefixError(
            f"model.deep_prefix: the weights hold terms for {terms.shape[0] + 1} layers, the LM has {len(layers)}; "
            "use the LM the model was trained with"
        )

    def hook_for(layer: int):  # noqa: ANN202 - a forward hook
        def hook(module: nn.Module, args: object, output: torch.Tensor | tuple) -> torch.Tensor | tuple:
            hidden = output[0] if isinstance(output, tuple) else output
            if hidden.shape[1] != slots.shape[1] or hidden.shape[0] % slots.shape[0]:
                return output
            where = slots.repeat_interleave(hidden.shape[0] // slots.shape[0], dim=0)
            rows, cols = (where >= 0).nonzero(as_tuple=True)
            added = terms[layer][where[rows, cols]].to(hidden.dtype)
            hidden = hidden.index_put((rows, cols), added, accumulate=True)  # out of place: autograd keeps both
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    handles = [layer.register_forward_hook(hook_for(i)) for i, layer in enumerate(layers[:-1])]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
