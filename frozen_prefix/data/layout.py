"""The one sequence layout: images and text segments -> input_ids, attention_mask, image_mask, labels.

Training (right padding), evaluation and decoding (left padding, so every row continues at its last position)
all build their sequences here. A sequence is `[start ids]` followed by segments in any order: an image takes
k slots (filled with its prefix embeddings by the model), a text segment its token ids, labelled or not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

IGNORE = -100  # the label of every position that carries no loss (padding is masked here, never by token id)


@dataclass
class TokenSequence:
    """One laid-out sequence: token ids (image slots hold pad ids), where the image slots are, and the labels."""

    ids: list[int] = field(default_factory=list)
    image_mask: list[bool] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    images: int = 0

    def __len__(self) -> int:
        return len(self.ids)


class SequenceBuilder:
    """Builds one TokenSequence segment by segment: `SequenceBuilder(k, start).image().text(ids, labelled=True)`."""

    def __init__(self, prefix_length: int, start_ids: Sequence[int] = (), slot_id: int = 0) -> None:
        self.k, self.slot_id = prefix_length, slot_id
        self.seq = TokenSequence()
        self.text(list(start_ids))

    def image(self) -> SequenceBuilder:
        """k image slots, filled later with the next image's prefix embeddings."""
        self.seq.ids += [self.slot_id] * self.k
        self.seq.image_mask += [True] * self.k
        self.seq.labels += [IGNORE] * self.k
        self.seq.images += 1
        return self

    def text(self, ids: Sequence[int], labelled: bool = False) -> SequenceBuilder:
        """Text tokens; labelled tokens carry the loss (the model learns to produce them)."""
        ids = list(ids)
        self.seq.ids += ids
        self.seq.image_mask += [False] * len(ids)
        self.seq.labels += ids if labelled else [IGNORE] * len(ids)
        return self

    def build(self) -> TokenSequence:
        """The finished sequence."""
        return self.seq


@dataclass
class Layout:
    """A padded batch of sequences as tensors (B, T)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    image_mask: torch.Tensor
    labels: torch.Tensor

    def tensors(self) -> dict[str, torch.Tensor]:
        """The four tensors by the names the model's forward takes."""
        return {
            "input_ids": self.input_ids, "attention_mask": self.attention_mask,
            "image_mask": self.image_mask, "labels": self.labels,
        }


def pad(sequences: Sequence[TokenSequence], pad_id: int, side: Literal["right", "left"] = "right") -> Layout:
    """Stack sequences into tensors; right padding for training, left padding for decoding."""
    n = len(sequences)
    length = max((len(s) for s in sequences), default=0)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, length), dtype=torch.long)
    image_mask = torch.zeros((n, length), dtype=torch.bool)
    labels = torch.full((n, length), IGNORE, dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(0, len(seq)) if side == "right" else slice(length - len(seq), length)
        input_ids[row, span] = torch.tensor(seq.ids, dtype=torch.long)
        attention_mask[row, span] = 1
        image_mask[row, span] = torch.tensor(seq.image_mask, dtype=torch.bool)
        labels[row, span] = torch.tensor(seq.labels, dtype=torch.long)
    return Layout(input_ids, attention_mask, image_mask, labels)


@dataclass
class CachedImages:
    """data.feature_cache bookkeeping of a batch: one key per image, and the features of the images the cache held."""

    keys: list[Any]  # per image, in reading order
    hits: list[bool]  # per image: its features came from the cache (pixel_values holds the others, in order)
    features: torch.Tensor | None = None  # the hits' encoder features, stacked in reading order


@dataclass
class Batch:
    """What a collate function gives the loops: the model's tensors plus what evaluation needs to score."""

    pixel_values: torch.Tensor | None = None  # (images, 3, H, W): every image of every row, in reading order
    layout: Layout | None = None
    image_ids: list[Any] = field(default_factory=list)
    references: list[list[str]] = field(default_factory=list)
    objects: list[Any] | None = None  # shapes: the (colour, shape) pairs drawn, for the exact score
    skipped: int = 0  # bad records left out of this batch (data.bad_data=skip)
    error: str | None = None  # a bad record met in a DataLoader worker (data.bad_data=error)
    extra: dict[str, list[Any]] = field(default_factory=dict)  # per-row fields of other tasks (questions, ...)
    cached: CachedImages | None = None  # data.feature_cache: which images the cache held, and their features

    @property
    def size(self) -> int:
        """Rows in the batch."""
        return 0 if self.layout is None else int(self.layout.input_ids.shape[0])

    def model_inputs(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The tensors FrozenPrefixCaptioner.forward takes, on its device."""
        assert self.layout is not None, "an empty batch has no model inputs"
        inputs = {k: v.to(device, non_blocking=True) for k, v in self.layout.tensors().items()}
        pixels = self.pixel_values
        return {"pixel_values": None if pixels is None else pixels.to(device, non_blocking=True), **inputs}

    def labelled_tokens(self) -> int:
        """Tokens that carry the loss."""
        return 0 if self.layout is None else int((self.layout.labels != IGNORE).sum())
