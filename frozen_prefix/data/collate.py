"""Caption batches: transform images, tokenize captions with EOS, and lay them out through `layout`."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from .layout import Batch, SequenceBuilder, pad


class CaptionCollator:
    """[start ids][k image slots][caption tokens][EOS][padding]; labels are -100 except on caption and EOS.

    With `images_per_sequence` > 1, that many (image, caption) pairs are packed one after another into one
    sequence (Flamingo-style interleaved training: the LM learns to read the image next to each caption).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        transform: Callable,
        prefix_length: int,
        max_caption_tokens: int,
        start_ids: Sequence[int] = (),
        images_per_sequence: int = 1,
        blank_images: bool = False,
    ) -> None:
        self.tokenizer, self.transform = tokenizer, transform
        self.k, self.max_tokens, self.start_ids = prefix_length, max_caption_tokens, list(start_ids)
        self.images_per_sequence, self.blank_images = images_per_sequence, blank_images

    def caption_ids(self, caption: str) -> list[int]:
        """Caption tokens, truncated, then EOS so that decoding learns where to stop."""
        ids = self.tokenizer(caption, add_special_tokens=False).input_ids[: self.max_tokens]
        return ids + [self.tokenizer.eos_token_id]

    def pixels(self, item: dict[str, Any]) -> torch.Tensor:
        """Transform one image; with a per-example seed, random augmentation does not touch global RNG state."""
        if self.blank_images:  # the train-blind control: the model never sees what the caption describes
            item = {**item, "image": Image.new("RGB", item["image"].size, (0, 0, 0))}
        if "seed" not in item:
            return self.transform(item["image"])
        state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            random.seed(item["seed"])  # timm's crop parameters come from Python's random
            torch.manual_seed(item["seed"])  # torchvision's colour jitter from torch's
            pixels = self.transform(item["image"])
        random.setstate(state)
        return pixels

    def __call__(self, items: list[dict[str, Any] | Exception | None]) -> Batch:
        errors = [item for item in items if isinstance(item, Exception)]
        if errors:  # a bad record read in a DataLoader worker: the training loop raises it as one line
            return Batch(error=str(errors[0]))
        skipped = sum(item is None for item in items)
        items = [item for item in items if item is not None]
        if not items:
            return Batch(skipped=skipped)
        groups = [items[i : i + self.images_per_sequence] for i in range(0, len(items), self.images_per_sequence)]
        sequences = []
        for group in groups:
            builder = SequenceBuilder(self.k, self.start_ids, self.tokenizer.pad_token_id)
            for item in group:
                builder.image()
                if "caption" in item:
                    builder.text(self.caption_ids(item["caption"]), labelled=True)
            sequences.append(builder.build())
        return Batch(
            pixel_values=torch.stack([self.pixels(item) for item in items]),
            layout=pad(sequences, self.tokenizer.pad_token_id, side="right"),
            image_ids=[item["image_id"] for item in items],
            references=[item["captions"] for item in items],
            objects=[item["objects"] for item in items] if "objects" in items[0] else None,
            skipped=skipped,
        )
