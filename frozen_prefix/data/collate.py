"""Batches: transform images, tokenize captions with EOS, place the k image slots, mask labels."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase


class CaptionCollator:
    """[start ids][k image slots][caption tokens][EOS][padding]; labels are -100 except on caption and EOS."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        transform: Callable,
        prefix_length: int,
        max_caption_tokens: int,
        start_ids: Sequence[int] = (),
    ) -> None:
        self.tokenizer, self.transform = tokenizer, transform
        self.k, self.max_tokens, self.start_ids = prefix_length, max_caption_tokens, list(start_ids)

    def caption_ids(self, caption: str) -> list[int]:
        """Caption tokens, truncated, then EOS so that decoding learns where to stop."""
        ids = self.tokenizer(caption, add_special_tokens=False).input_ids[: self.max_tokens]
        return ids + [self.tokenizer.eos_token_id]

    def pixels(self, item: dict[str, Any]) -> torch.Tensor:
        """Transform one image; with a per-example seed, random augmentation does not touch global RNG state."""
        if "seed" not in item:
            return self.transform(item["image"])
        state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            random.seed(item["seed"])  # timm's crop parameters come from Python's random
            torch.manual_seed(item["seed"])  # torchvision's colour jitter from torch's
            pixels = self.transform(item["image"])
        random.setstate(state)
        return pixels

    def __call__(self, items: list[dict[str, Any] | Exception | None]) -> dict[str, Any]:
        errors = [item for item in items if isinstance(item, Exception)]
        if errors:  # a bad record read in a DataLoader worker: the training loop raises it as one line
            return {"error": str(errors[0]), "skipped": 0, "size": 0}
        skipped = sum(item is None for item in items)
        items = [item for item in items if item is not None]
        batch: dict[str, Any] = {"skipped": skipped, "size": len(items)}
        if not items:
            return batch
        captions = [self.caption_ids(item["caption"]) for item in items] if "caption" in items[0] else None
        s = len(self.start_ids)
        text = s + self.k  # where the caption starts
        length = text + (max(map(len, captions)) if captions else 0)
        n = len(items)
        input_ids = torch.full((n, length), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, length), dtype=torch.long)
        labels = torch.full((n, length), -100, dtype=torch.long)  # padding is masked here, never by token id
        image_mask = torch.zeros((n, length), dtype=torch.bool)
        if s:
            input_ids[:, :s] = torch.tensor(self.start_ids)
        image_mask[:, s:text] = True
        attention_mask[:, :text] = 1
        for row, ids in enumerate(captions or []):
            end = text + len(ids)
            input_ids[row, text:end] = torch.tensor(ids)
            attention_mask[row, text:end] = 1
            labels[row, text:end] = torch.tensor(ids)
        batch.update(
            pixel_values=torch.stack([self.pixels(item) for item in items]),
            input_ids=input_ids, attention_mask=attention_mask, image_mask=image_mask, labels=labels,
            image_ids=[item["image_id"] for item in items],
            references=[item["captions"] for item in items],
        )
        if "objects" in items[0]:
            batch["objects"] = [item["objects"] for item in items]
        return batch
