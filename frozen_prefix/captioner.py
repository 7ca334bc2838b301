"""FrozenPrefixCaptioner: the Frozen core (models/captioner.py) with decoding at hand, as notebooks use it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from . import generate
from .images import ImageLike
from .models.captioner import FrozenCore


class FrozenPrefixCaptioner(FrozenCore):
    """Image -> k prefix embeddings -> frozen LM, plus caption / complete / chat (all decoding is generate.py's)."""

    def caption(self, images: Sequence[ImageLike] | ImageLike | torch.Tensor, **options: Any) -> list[str]:
        """Captions for PIL images, image paths or pixel values; options as in generate.generate_captions."""
        if not isinstance(images, (list, tuple, torch.Tensor)):
            images = [images]
        return generate.generate_captions(self, images, **options)

    def complete(self, prompts: Sequence[generate.Prompt] | generate.Prompt, **options: Any) -> list[str]:
        """Continue interleaved prompts (lists of images and text); options as in generate.complete."""
        return generate.complete(self, prompts, **options)

    def chat(self, messages: Sequence[dict[str, Any]], **options: Any) -> str:
        """The reply to {"role", "content"} messages (content: text, or text and images); see generate.chat."""
        return generate.chat(self, messages, **options)
