"""Decoding: batched captions through HF generate with inputs_embeds and the KV cache."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from .images import ImageLike
from .models.captioner import FrozenPrefixCaptioner


def generation_kwargs(
    max_new_tokens: int = 24,
    min_new_tokens: int = 0,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop_at: Sequence[str] = (),
) -> dict[str, Any]:
    """Keyword arguments for HF generate from our decoding options."""
    kwargs: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, num_beams=num_beams,
        length_penalty=length_penalty, do_sample=do_sample, repetition_penalty=repetition_penalty,
    )
    if do_sample:
        kwargs.update(temperature=temperature, top_k=top_k, top_p=top_p)
    if stop_at:
        kwargs["stop_strings"] = list(stop_at)
    return kwargs


def clean_caption(text: str, stop_at: Sequence[str] = ()) -> str:
    """Cut the decoded text at the first stop string (kept if it is a period) and trim it."""
    for stop in stop_at:
        cut = text.find(stop)
        if cut >= 0:
            text = text[: cut + (1 if stop == "." else 0)]
    return text.strip()


@torch.no_grad()
def generate_captions(
    model: FrozenPrefixCaptioner,
    images: Sequence[ImageLike] | torch.Tensor,
    prompt: str | Sequence[str] = "",
    batch_size: int = 32,
    progress: bool = False,
    stop_at: Sequence[str] = (),
    **options: Any,
) -> list[str]:
    """Captions for images (PIL, paths or a pixel tensor); prompt tokens are not part of the result."""
    was_training = model.training
    model.eval()
    n = len(images)
    prompts = [prompt] * n if isinstance(prompt, str) else list(prompt)
    kwargs = generation_kwargs(stop_at=stop_at, **options)
    if "stop_strings" in kwargs:
        kwargs["tokenizer"] = model.tokenizer
    captions: list[str] = []
    for start in tqdm(range(0, n, batch_size), desc="captioning", disable=not progress, leave=False):
        chunk = images[start : start + batch_size]
        pixel_values = chunk if isinstance(chunk, torch.Tensor) else model.pixel_values(chunk)
        new_tokens = model.generate(pixel_values, prompts[start : start + batch_size], **kwargs)
        texts = model.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        captions.extend(clean_caption(t, stop_at) for t in texts)
    model.train(was_training)
    return captions
