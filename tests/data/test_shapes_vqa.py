"""The embedded shapes VQA: deterministic, answers right for the scene, balanced, compositional, images regenerable."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest

from frozen_prefix.data.shapes import COLOURS, COLS, HELD_OUT, ROWS, SHAPES, ShapeObject, draw_objects, sample_objects
from frozen_prefix.data.shapes_vqa import FAMILIES, ShapesVQA

HELD_PHRASES = {f"{c} {s}" for c, s in HELD_OUT}


def cell_words() -> dict[str, tuple[int, int]]:
    """Position phrase -> cell, from the captions' own wording."""
    return {ShapeObject("red", "circle", "small", r, c).where: (r, c) for r in range(3) for c in range(3)}


def scene(item: dict) -> list[tuple[str, str, int, int]]:
    """(colour, shape, row, col) per object."""
    return [(c, s, r, k) for (c, s), (r, k) in zip(item["objects"], item["cells"])]


def one(found: list) -> tuple:
    """The single match; the question must be unambiguous."""
    assert len(found) == 1, found
    return found[0]


def derive(question: str, objs: list[tuple[str, str, int, int]]) -> tuple[str, list[tuple[str, str]]]:
    """The answer a question has in a scene, and the pairs it is about, worked out independently of the library."""
    if m := re.fullmatch(r"Is there an? (\w+) (\w+)\?", question):
        return ("yes" if any(o[:2] == m.groups() for o in objs) else "no"), [m.groups()]
    if m := re.fullmatch(r"What colour is the (\w+)\?", question):
        obj = one([o for o in objs if o[1] == m[1]])
        return obj[0], [obj[:2]]
    if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        obj = one([o for o in objs if o[0] == m[1]])
        return obj[1], [obj[:2]]
    if question == "How many shapes are there?":
        return str(len(objs)), [o[:2] for o in objs]
    if m := re.fullmatch(r"How many (\w+) shapes are there\?", question):
        group = [o[:2] for o in objs if o[0] == m[1]]
        return str(len(group)), group
    if m := re.fullmatch(r"How many (\w+)s are there\?", question):
        group = [o[:2] for o in objs if o[1] == m[1]]
        return str(len(group)), group
    if m := re.fullmatch(r"What is (to the left of|to the right of|above|below) the (\w+) (\w+)\?", question):
        anchor = one([o for o in objs if o[:2] == (m[2], m[3])])
        test = {
            "to the left of": lambda o: o[3] < anchor[3], "to the right of": lambda o: o[3] > anchor[3],
            "above": lambda o: o[2] < anchor[2], "below": lambda o: o[2] > anchor[2],
        }[m[1]]
        obj = one([o for o in objs if o is not anchor and test(o)])
        return f"{obj[0]} {obj[1]}", [anchor[:2], obj[:2]]
    if m := re.fullmatch(r"What is (.+)\?", question):
        cell = cell_words()[m[1]]
        found = [o for o in objs if (o[2], o[3]) == cell]
        return (f"{found[0][0]} {found[0][1]}", [found[0][:2]]) if found else ("nothing", [])
    raise AssertionError(f"unparsed question {question!r}")


def questions(split: str, n: int) -> list[dict]:
    """The first n items without drawing, as items would carry them."""
    data = ShapesVQA(split)
    out = []
    for i in range(n):
        q = data.question(i)
        objs = q["scene"]
        out.append({**q, "objects": [(o.colour, o.shape) for o in objs], "cells": [(o.row, o.col) for o in objs]})
    return out


@pytest.fixture(scope="module")
def train_items() -> list[dict]:
    return questions("train", 600)


@pytest.fixture(scope="module")
def novel_items() -> list[dict]:
    return questions("compositional", 300)


def test_item_keys_and_determinism():
    data = ShapesVQA("val")
    first, again, fresh = data[7], data[7], ShapesVQA("val")[7]
    for other in (again, fresh):
        assert {k: v for k, v in first.items() if k != "image"} == {k: v for k, v in other.items() if k != "image"}
        assert first["image"].tobytes() == other["image"].tobytes()
    assert first["answers"] == [first["answer"]] * 10
    assert first["question_id"] == "shapes-vqa-val-7" and isinstance(first["image_id"], str)
    assert first["question_type"] == first["family"]
    assert first["answer_type"] == {"exists": "yes/no", "count": "number"}.get(first["family"], "other")
    assert len(data) == 200 and len(ShapesVQA("train")) == 100_000 and len(ShapesVQA("test", size=5)) == 5
    with pytest.raises(IndexError):
        data[200]


def test_image_is_the_scene():
    data = ShapesVQA("test", seed=3)
    for i in (0, 5, 11):
        item = data[i]
        rng = random.Random(item["scene_seed"])
        objects = sample_objects(rng, "test")
        assert [(o.colour, o.shape) for o in objects] == item["objects"]
        assert [(o.row, o.col) for o in objects] == item["cells"]
        assert draw_objects(objects, rng).tobytes() == item["image"].tobytes()
    other = ShapesVQA("test", seed=4)
    assert [data.question(i)["scene"] for i in range(6)] != [other.question(i)["scene"] for i in range(6)]


@pytest.mark.parametrize("fixture", ["train_items", "novel_items"])
def test_answers_follow_from_the_scene(fixture, request):
    for item in request.getfixturevalue(fixture):
        answer, about = derive(item["question"], scene(item))
        assert answer == item["answer"], item["question"]
        assert sorted(about) == sorted(item["focus"]), item["question"]


def test_answers_are_balanced_within_each_family(train_items):
    by_family: dict[str, Counter] = {f: Counter() for f in FAMILIES}
    for item in train_items:
        by_family[item["family"]][item["answer"]] += 1
    assert all(sum(c.values()) == 100 for c in by_family.values())  # families round-robin
    assert by_family["exists"] == Counter(yes=50, no=50)
    assert set(by_family["count"]) == {"1", "2", "3"} and max(by_family["count"].values()) <= 34
    assert set(by_family["colour"]) == set(COLOURS) and max(by_family["colour"].values()) <= 15
    assert set(by_family["shape"]) == set(SHAPES) and set(by_family["shape"].values()) == {25}
    assert by_family["position"]["nothing"] == 50 and len(by_family["position"]) > 20
    directions = Counter(re.match(r"What is (to the left|to the right|above|below)", i["question"])[1]
                         for i in train_items if i["family"] == "relation")
    assert set(directions.values()) == {25}


def test_position_words_match_the_grid(train_items):
    words = set(ROWS) | set(COLS)
    for item in train_items:
        if item["family"] == "position":
            phrase = re.fullmatch(r"What is (?:at|on|in) the (.+)\?", item["question"])[1]
            assert set(phrase.split()) <= words


def test_train_never_mentions_held_out_pairs(train_items):
    for item in train_items:
        assert not any(p in item["question"] or p == item["answer"] for p in HELD_PHRASES)
        assert not set(item["objects"]) & set(HELD_OUT)


def test_compositional_questions_involve_held_out_pairs(novel_items):
    assert Counter(i["family"] for i in novel_items) == Counter({f: 50 for f in FAMILIES})
    for item in novel_items:
        assert set(item["objects"]) & set(HELD_OUT)
        _, about = derive(item["question"], scene(item))
        assert set(about) & set(HELD_OUT), item["question"]
    exists = Counter(i["answer"] for i in novel_items if i["family"] == "exists")
    assert exists == Counter(yes=25, no=25)


def test_families_subset():
    data = ShapesVQA("val", size=8, families=["count", "exists"])
    assert [data.question(i)["family"] for i in range(4)] == ["count", "exists", "count", "exists"]
    with pytest.raises(ValueError, match="unknown shapes-vqa family"):
        ShapesVQA("val", families=["colours"])
    with pytest.raises(ValueError, match="unknown shapes split"):
        ShapesVQA("dev")
