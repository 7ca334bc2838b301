"""Training batches: transform images, tokenize captions, VQA answers and conversations, lay them out via `layout`."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from .conversations import (
    VQA_TEMPLATE,
    normalize_turns,
    place_images,
    render_conversation,
    render_vqa,
    truncate,
    vqa_target,
)
from .layout import Batch, CachedImages, SequenceBuilder, TokenSequence, pad

KINDS = ("caption", "vqa", "dialogue")


def item_kind(item: dict[str, Any]) -> str:
    """An item's "kind", or what its fields say: turns -> dialogue, a question -> vqa, else caption."""
    if "kind" in item:
        return item["kind"]
    return "dialogue" if "turns" in item else "vqa" if "question" in item else "caption"


def screen(items: list[dict[str, Any] | Exception | None]) -> tuple[Batch | None, list[dict[str, Any]], int]:
    """A batch to return at once (a worker's error, or nothing left), else the good items and the skipped count."""
    errors = [item for item in items if isinstance(item, Exception)]
    if errors:  # a bad record read in a DataLoader worker: the training loop raises it as one line
        return Batch(error=str(errors[0])), [], 0
    skipped = sum(item is None for item in items)
    good = [item for item in items if item is not None]
    return (None if good else Batch(skipped=skipped)), good, skipped


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

    def packed_sequence(self, group: list[dict[str, Any]]) -> TokenSequence:
        """One sequence of (image, caption) pairs, one after another (a caption-less item: the image alone)."""
        builder = SequenceBuilder(self.k, self.start_ids, self.tokenizer.pad_token_id)
        for item in group:
            builder.image()
            if "caption" in item:
                builder.text(self.caption_ids(item["caption"]), labelled=True)
        return builder.build()

    def __call__(self, items: list[dict[str, Any] | Exception | None]) -> Batch:
        early, items, skipped = screen(items)
        if early is not None:
            return early
        step = self.images_per_sequence
        sequences = [self.packed_sequence(items[i : i + step]) for i in range(0, len(items), step)]
        return Batch(
            layout=pad(sequences, self.tokenizer.pad_token_id, side="right"),
            image_ids=[item["image_id"] for item in items],
            references=[item["captions"] for item in items],
            objects=[item.get("objects") for item in items] if "objects" in items[0] else None,
            skipped=skipped,
            **self.image_fields(items),
        )

    def image_fields(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """pixel_values of the items' images; with data.feature_cache, the cached features of those it held."""
        if "cache_key" not in items[0]:
            return {"pixel_values": torch.stack([self.pixels(item) for item in items])}
        hits = ["features" in item for item in items]
        pixels = [self.pixels(item) for item, hit in zip(items, hits, strict=True) if not hit]
        features = [item["features"] for item in items if "features" in item]
        cached = CachedImages([item["cache_key"] for item in items], hits, torch.stack(features) if features else None)
        return {"pixel_values": torch.stack(pixels) if pixels else None, "cached": cached}


class TrainCollator(CaptionCollator):
    """Captions as CaptionCollator lays them out, plus VQA items and conversations, mixed freely in one batch.

    VQA: [start][image]["Question: q Answer:"][" answer"][EOS], labels on the answer and EOS. Dialogue: the
    conversation in `chat_style` (see conversations.render_conversation), labels on the assistant turns only,
    cut to `max_sequence_tokens` (the LM's context) where given. `pixel_values` holds every image of every row
    in reading order.
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
        chat_style: str = "auto",
        vqa_template: str = VQA_TEMPLATE,
        max_sequence_tokens: int | None = None,
    ) -> None:
        super().__init__(
            tokenizer, transform, prefix_length, max_caption_tokens, start_ids, images_per_sequence, blank_images
        )
        self.chat_style, self.vqa_template = chat_style, vqa_template
        self.max_sequence_tokens = max_sequence_tokens

    def __call__(self, items: list[dict[str, Any] | Exception | None]) -> Batch:
        early, items, skipped = screen(items)
        if early is not None:
            return early
        kinds = [item_kind(item) for item in items]
        unknown = sorted(set(kinds) - set(KINDS))
        if unknown:
            return Batch(error=f"unknown item kind(s) {', '.join(map(str, unknown))}; use {', '.join(KINDS)}")
        if all(kind == "caption" for kind in kinds):
            batch = super().__call__(items)  # exactly CaptionCollator's batch
            batch.skipped = skipped  # the bad records were screened out above, before the parent saw them
            return batch
        sequences: list[TokenSequence] = []
        pixels: list[torch.Tensor] = []
        captions: list[dict[str, Any]] = []
        for item, kind in zip(items, kinds, strict=True):
            if kind == "caption":  # packed images_per_sequence at a time, in the order they come
                captions.append(item)
                if len(captions) == self.images_per_sequence:
                    self._add_captions(captions, sequences, pixels)
                    captions = []
                continue
            seq, images = self._vqa(item) if kind == "vqa" else self._dialogue(item)
            sequences.append(seq)
            pixels += [self.pixels(image) for image in images[: seq.images]]
        if captions:
            self._add_captions(captions, sequences, pixels)
        return Batch(
            pixel_values=torch.stack(pixels) if pixels else None,
            layout=pad(sequences, self.tokenizer.pad_token_id, side="right"),
            image_ids=[item.get("image_id", item.get("question_id")) for item in items],
            references=[_references(item, kind) for item, kind in zip(items, kinds, strict=True)],
            objects=[item.get("objects") for item in items] if any("objects" in item for item in items) else None,
            skipped=skipped,
            extra={"kind": kinds},
        )

    def _add_captions(self, group: list[dict[str, Any]], sequences: list[TokenSequence], pixels: list) -> None:
        """One sequence of packed (image, caption) pairs, as CaptionCollator builds it."""
        sequences.append(self.packed_sequence(group))
        pixels += [self.pixels(item) for item in group]

    def _vqa(self, item: dict[str, Any]) -> tuple[TokenSequence, list[dict[str, Any]]]:
        """A question about one image, the answer (the most common one) labelled."""
        seq = render_vqa(
            self.tokenizer, self.k, self.start_ids, item["question"], vqa_target(item), self.vqa_template,
            self.max_tokens,
        )
        return seq, [item]

    def _dialogue(self, item: dict[str, Any]) -> tuple[TokenSequence, list[dict[str, Any]]]:
        """A conversation about its images; image j gets the item's seed + j for its augmentation."""
        images = list(item.get("images") or [])
        where = str(item.get("image_id", "conversation"))
        turns = place_images(normalize_turns(item["turns"], where), len(images), where)
        seq = render_conversation(self.tokenizer, turns, self.k, self.start_ids, self.chat_style)
        if self.max_sequence_tokens is not None:
            seq = truncate(seq, self.max_sequence_tokens, self.k)
        seed = item.get("seed")
        views = [{"image": im} if seed is None else {"image": im, "seed": seed + j} for j, im in enumerate(images)]
        return seq, views


def _references(item: dict[str, Any], kind: str) -> list[str]:
    """What a row should say: the captions, the VQA answers, or the assistant turns."""
    if kind == "caption":
        return item.get("captions", [])
    if kind == "vqa":
        return list(item.get("answers") or [item.get("answer", "")])
    return list(item.get("answers") or [t["content"] for t in item["turns"] if t["role"] == "assistant"])
