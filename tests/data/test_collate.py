"""Tokenisation, EOS, BOS, image slots and label masking in the collate function."""

from __future__ import annotations

import torch

from frozen_prefix.data import CaptionCollator, ShapesDataset, TrainExamples
from frozen_prefix.models.lm import build_tiny_tokenizer


def test_labels_mask_start_prefix_and_padding():
    tok = build_tiny_tokenizer()
    k, bos = 3, tok.bos_token_id
    collate = CaptionCollator(tok, lambda im: torch.zeros(3, 8, 8), prefix_length=k, max_caption_tokens=16,
                              start_ids=[bos])
    items = [
        {"image": None, "caption": "a red circle.", "captions": ["x"], "image_id": "a"},
        {"image": None, "caption": "a big blue square on the left.", "captions": ["y"], "image_id": "b"},
    ]
    batch = collate(items)
    short = tok("a red circle.", add_special_tokens=False).input_ids
    long = tok("a big blue square on the left.", add_special_tokens=False).input_ids
    text = 1 + k
    assert batch.layout.input_ids.shape == (2, text + len(long) + 1)
    assert (batch.layout.input_ids[:, 0] == bos).all()  # [BOS] first: the prefix is not the attention sink
    assert batch.layout.image_mask[:, 1:text].all() and not batch.layout.image_mask[:, 0].any()
    assert not batch.layout.image_mask[:, text:].any()
    assert (batch.layout.labels[:, :text] == -100).all()  # BOS and prefix positions carry no loss
    assert batch.layout.labels[0, text : text + len(short) + 1].tolist() == short + [tok.eos_token_id]
    assert (batch.layout.labels[0, text + len(short) + 1 :] == -100).all()  # padding carries no loss
    assert batch.layout.attention_mask[0].tolist() == [1] * (text + len(short) + 1) + [0] * (len(long) - len(short))
    assert batch.layout.labels[1, -1] == tok.eos_token_id


def test_without_start_ids_the_prefix_comes_first():
    tok = build_tiny_tokenizer()
    collate = CaptionCollator(tok, lambda im: torch.zeros(3, 8, 8), prefix_length=2, max_caption_tokens=8)
    batch = collate([{"image": None, "caption": "a red circle", "captions": [], "image_id": "a"}])
    assert batch.layout.image_mask[0].tolist()[:3] == [True, True, False]


def test_truncation_keeps_eos():
    tok = build_tiny_tokenizer()
    collate = CaptionCollator(tok, lambda im: torch.zeros(3, 8, 8), prefix_length=2, max_caption_tokens=3)
    batch = collate([{"image": None, "caption": "a red circle and a blue square", "captions": [], "image_id": "a"}])
    assert batch.layout.labels.shape[1] == 2 + 3 + 1 and batch.layout.labels[0, -1] == tok.eos_token_id


def test_training_view_picks_a_reference():
    examples = TrainExamples(ShapesDataset("train", size=4), "error")
    item = examples[(0, 7)]
    assert item["caption"] == item["captions"][7 % 5]


def test_shortest_sampling_always_picks_the_shortest_reference():
    examples = TrainExamples(ShapesDataset("train", size=4), "error", caption_sampling="shortest")
    for index in range(4):
        captions = {examples[(index, choice)]["caption"] for choice in range(5)}
        item = examples[(index, 0)]
        assert captions == {min(item["captions"], key=len)}
        assert examples.length_key((index, 3)) == len(min(item["captions"], key=len))
