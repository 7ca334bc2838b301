"""FrozenPrefixCaptioner: the Frozen core (models/captioner.py) with decoding and the folder format at hand."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import generate
from .config import Config
from .images import ImageLike
from .models import saving
from .models.captioner import FrozenCore


class FrozenPrefixCaptioner(FrozenCore):
    """Image -> k prefix embeddings -> frozen LM, plus caption / complete / chat (generate.py) and the folder format."""

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

    def save_pretrained(
        self, path: str | Path, metrics: dict[str, Any] | None = None, repo_id: str | None = None,
        weights: dict[str, torch.Tensor] | None = None, precision: str | None = None,
    ) -> Path:
        """Write the config, the trainable weights (never the frozen LM's) and a model card; see saving.py."""
        return saving.save_pretrained(self, path, metrics, repo_id, weights, precision)

    def push_to_hub(
        self, repo_id: str, private: bool = False, token: str | None = None, metrics: dict[str, Any] | None = None
    ) -> str:
        """Upload the saved folder to a Hub model repo; return its URL."""
        return saving.push_to_hub(self, repo_id, private, token, metrics)

    @classmethod
    def from_config(cls, config: Config | dict | str | Path, **kwargs: Any) -> FrozenPrefixCaptioner:
        """An untrained model built from a config."""
        return cls(config, **kwargs)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: torch.device | str = "cpu", trust_remote_code: bool = False, **kwargs: Any
    ) -> FrozenPrefixCaptioner:
        """Rebuild a saved model (a folder or a Hub repo id); the LM's own code runs only with trust_remote_code."""
        return saving.from_pretrained(cls, path, device, trust_remote_code, **kwargs)
