"""Tokenisation, EOS, image slots and label masking in the collate function."""

from __future__ import annotations

import torch

from frozen_prefix.data import CaptionCollator, ShapesDataset, TrainExamples
from frozen_prefix.models.lm import build_tiny_tokenizer


def test_labels_mask_prefix_and_padding():
    tok = build_tiny_tokenizer()
    k = 3
    collate = CaptionCollator(tok, lambda im: torch.zeros(3, 8, 8), prefix_length=k, max_caption_tokens=16)
    items = [
        {"image": None, "caption": "a red circle.", "captions": ["x"], "image_id": "a"},
        {"image": None, "caption": "a big blue square on the left.", "captions": ["y"], "image_id": "b"},
    ]
    batch = collate(items)
    short = tok("a red circle.", add_special_tokens=False).input_ids
    long = tok("a big blue square on the left.", add_special_tokens=False).input_ids
    assert batch["input_ids"].shape == (2, k + len(long) + 1)
    assert batch["image_mask"][:, :k].all() and not batch["image_mask"][:, k:].any()
    assert (batch["labels"][:, :k] == -100).all()  # prefix positions carry no loss
    assert batch["labels"][0, k : k + len(short) + 1].tolist() == short + [tok.eos_token_id]
    assert (batch["labels"][0, k + len(short) + 1 :] == -100).all()  # padding carries no loss
    assert batch["attention_mask"][0].tolist() == [1] * (k + len(short) + 1) + [0] * (len(long) - len(short))
    assert batch["labels"][1, -1] == tok.eos_token_id


def test_truncation_keeps_eos():
    tok = build_tiny_tokenizer()
    collate = CaptionCollator(tok, lambda im: torch.zeros(3, 8, 8), prefix_length=2, max_caption_tokens=3)
    batch = collate([{"image": None, "caption": "a red circle and a blue square", "captions": [], "image_id": "a"}])
    assert batch["labels"].shape[1] == 2 + 3 + 1 and batch["labels"][0, -1] == tok.eos_token_id


def test_training_view_picks_a_reference():
    examples = TrainExamples(ShapesDataset("train", size=4), "error")
    item = examples[(0, 7)]
    assert item["caption"] == item["captions"][7 % 5]
