"""Embedded VQA on the shapes scenes: questions and balanced answers drawn on demand from (seed, split, index).

Item i picks its question family round-robin and a target answer by cycling through the family's answers, then
searches scene draws (each from its own string seed) until one admits that question with that answer: the answers
are balanced within every family by construction, and nothing is stored.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from PIL import Image

from .shapes import (
    COLOURS,
    HELD_OUT,
    SHAPES,
    ShapeObject,
    _a,
    _pairs,
    draw_objects,
    sample_objects,
    split_size,
)

FAMILIES = ("exists", "colour", "shape", "count", "position", "relation")
ANSWER_TYPES = {"exists": "yes/no", "count": "number"}  # every other family answers "other"
RELATIONS = ("left", "right", "above", "below")
COUNTS = ("1", "2", "3")
NOTHING = "nothing"
MAX_ATTEMPTS = 20_000  # the rarest target (three objects of one colour) needs a few hundred draws on average

Pair = tuple[str, str]
Asked = tuple[str, str, list[Pair]]  # question, answer, the pairs the question is about ("focus")


# ---------------------------------------------------------------- question wording


def cell_phrase(row: int, col: int) -> str:
    """The captions' position phrase for a grid cell: 'at the top left', 'on the right', 'in the center'."""
    # ShapeObject.where is the wording the captioner was trained on; colour, shape and size play no part in it.
    return ShapeObject("", "", "small", row, col).where


def plural(shape: str) -> str:
    """'circles'."""
    return f"{shape}s"


def exists_question(colour: str, shape: str) -> str:
    """'Is there a red circle?'."""
    return f"Is there {_a(f'{colour} {shape}')}?"


def colour_question(shape: str) -> str:
    """'What colour is the circle?'."""
    return f"What colour is the {shape}?"


def shape_question(colour: str) -> str:
    """'What shape is the blue object?'."""
    return f"What shape is the {colour} object?"


def count_question(colour: str | None = None, shape: str | None = None) -> str:
    """'How many shapes are there?', 'How many red shapes are there?', 'How many circles are there?'."""
    if shape is not None:
        return f"How many {plural(shape)} are there?"
    return f"How many {colour} shapes are there?" if colour is not None else "How many shapes are there?"


def position_question(row: int, col: int) -> str:
    """'What is at the top left?'."""
    return f"What is {cell_phrase(row, col)}?"


def relation_question(relation: str, colour: str, shape: str) -> str:
    """'What is to the left of the blue square?', 'What is above the red star?'."""
    where = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}[relation]
    return f"What is {where} the {colour} {shape}?"


# ---------------------------------------------------------------- answers from a scene


def pair(obj: ShapeObject) -> Pair:
    """(colour, shape)."""
    return obj.colour, obj.shape


def related(objects: Sequence[ShapeObject], anchor: ShapeObject, relation: str) -> list[ShapeObject]:
    """The objects left of / right of / above / below the anchor, by grid cell (any row or column)."""
    test: dict[str, Callable[[ShapeObject], bool]] = {
        "left": lambda o: o.col < anchor.col,
        "right": lambda o: o.col > anchor.col,
        "above": lambda o: o.row < anchor.row,
        "below": lambda o: o.row > anchor.row,
    }
    return [o for o in objects if o is not anchor and test[relation](o)]


def _held(obj: ShapeObject) -> bool:
    return pair(obj) in HELD_OUT


def _unique(objects: Sequence[ShapeObject], key: Callable[[ShapeObject], object]) -> list[ShapeObject]:
    """The objects whose key no other object shares."""
    keys = [key(o) for o in objects]
    return [o for o, k in zip(objects, keys) if keys.count(k) == 1]


# ---------------------------------------------------------------- one generator per family
# Each takes the scene, the target answer, a generator for free choices and whether the question must involve a
# held-out pair; it returns (question, answer, focus) or None when the scene cannot ask it.


def _ask_exists(objects: list[ShapeObject], target: str, rng: random.Random, novel: bool) -> Asked | None:
    present = {pair(o) for o in objects}
    if target == "yes":
        pool = sorted(p for p in present if p in HELD_OUT) if novel else sorted(present)
    else:
        pool = [p for p in (HELD_OUT if novel else _pairs("train")) if p not in present]
    if not pool:
        return None
    colour, shape = rng.choice(pool)
    return exists_question(colour, shape), target, [(colour, shape)]


def _ask_colour(objects: list[ShapeObject], target: str, rng: random.Random, novel: bool) -> Asked | None:
    fits = [o for o in _unique(objects, lambda o: o.shape) if o.colour == target and (_held(o) or not novel)]
    return (colour_question(fits[0].shape), target, [pair(fits[0])]) if fits else None


def _ask_shape(objects: list[ShapeObject], target: str, rng: random.Random, novel: bool) -> Asked | None:
    fits = [o for o in _unique(objects, lambda o: o.colour) if o.shape == target and (_held(o) or not novel)]
    return (shape_question(fits[0].colour), target, [pair(fits[0])]) if fits else None


def _ask_count(objects: list[ShapeObject], target: str, rng: random.Random, novel: bool) -> Asked | None:
    options: list[tuple[str, list[ShapeObject]]] = []
    if not novel:  # the whole scene does not single out the held-out object
        options.append((count_question(), list(objects)))
    for colour in sorted({o.colour for o in objects}):
        options.append((count_question(colour=colour), [o for o in objects if o.colour == colour]))
    for shape in sorted({o.shape for o in objects}):
        options.append((count_question(shape=shape), [o for o in objects if o.shape == shape]))
    fits = [(q, group) for q, group in options if str(len(group)) == target and (any(map(_held, group)) or not novel)]
    if not fits:
        return None
    question, group = rng.choice(fits)
    return question, target, [pair(o) for o in group]


def _ask_position(objects: list[ShapeObject], target: str, rng: random.Random, novel: bool) -> Asked | None:
    taken = {(o.row, o.col): o for o in objects}
    if target == NOTHING:
        row, col = rng.randrange(3), rng.randrange(3)  # one draw per scene: the empty cells stay uniform
        return (position_question(row, col), NOTHING, []) if (row, col) not in taken else None
    fits = [o for o in objects if o.phrase == target]
    if not fits:
        return None
    obj = rng.choice(fits)
    return position_question(obj.row, obj.col), target, [pair(obj)]


def _ask_relation(objects: list[ShapeObject], target: str, rng: random.Random, novel: bool) -> Asked | None:
    anchors = _unique(objects, lambda o: o.phrase)  # "the blue square" must name one object
    fits = []
    for anchor in anchors:
        found = related(objects, anchor, target)
        if len(found) == 1 and (not novel or _held(anchor) or _held(found[0])):
            fits.append((anchor, found[0]))
    if not fits:
        return None
    anchor, answer = rng.choice(fits)
    return relation_question(target, anchor.colour, anchor.shape), answer.phrase, [pair(anchor), pair(answer)]


ASK: dict[str, Callable[[list[ShapeObject], str, random.Random, bool], Asked | None]] = {
    "exists": _ask_exists,
    "colour": _ask_colour,
    "shape": _ask_shape,
    "count": _ask_count,
    "position": _ask_position,
    "relation": _ask_relation,
}


def targets(family: str, split: str) -> list[str]:
    """The answers item targets cycle through, per family (relation cycles through directions instead)."""
    novel = split == "compositional"
    if family == "exists":
        return ["yes", "no"]
    if family == "colour":
        return sorted({c for c, _ in HELD_OUT}, key=list(COLOURS).index) if novel else list(COLOURS)
    if family == "shape":
        return list(SHAPES)
    if family == "count":
        return list(COUNTS)
    if family == "position":
        # Half the questions ask about an empty cell, half name each object pair equally often; a compositional
        # question always points at the held-out object.
        phrases = [f"{c} {s}" for c, s in _pairs(split)]
        return phrases if novel else [x for p in phrases for x in (p, NOTHING)]
    if family == "relation":
        return list(RELATIONS)
    raise ValueError(f"unknown shapes-vqa family {family!r}; choose from {', '.join(FAMILIES)}")


# ---------------------------------------------------------------- the data set


class ShapesVQA:
    """Map-style VQA over drawn shapes; item i is the same on every call and in every process."""

    def __init__(
        self, split: str = "train", size: int | None = None, seed: int = 0, families: Sequence[str] | None = None
    ) -> None:
        self.split, self.seed, self.size = split, seed, split_size(split, size)
        self.families = tuple(families) if families is not None else FAMILIES
        self._targets = {f: targets(f, split) for f in self.families}  # also rejects unknown family names

    def __len__(self) -> int:
        return self.size

    def plan(self, index: int) -> tuple[str, str]:
        """The family and target of item `index`: round-robin families, each cycling through its targets."""
        family = self.families[index % len(self.families)]
        options = self._targets[family]
        return family, options[(index // len(self.families)) % len(options)]

    def question(self, index: int) -> dict:
        """Everything about item `index` except the drawn image (cheap: no drawing)."""
        family, target = self.plan(index)
        choices = random.Random(f"shapes-vqa/{self.seed}/{self.split}/{index}")  # free choices, across attempts
        novel = self.split == "compositional"
        for attempt in range(MAX_ATTEMPTS):
            scene_seed = f"shapes-vqa/{self.seed}/{self.split}/{index}/{attempt}"
            objects = sample_objects(random.Random(scene_seed), self.split)
            asked = ASK[family](objects, target, choices, novel)
            if asked is not None:
                question, answer, focus = asked
                return {
                    "question": question, "answer": answer, "family": family, "focus": focus,
                    "scene_seed": scene_seed, "scene": objects,
                }
        raise RuntimeError(f"no scene admits {family}={target!r} for item {index} in {MAX_ATTEMPTS} draws")

    def text_length(self, index: int) -> int:
        """Characters of item `index`'s question and answer (for grouping by length; no drawing)."""
        q = self.question(index)
        return len(q["question"]) + len(q["answer"])

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(index)
        q = self.question(index)
        return {
            "image": scene_image(q["scene_seed"], self.split),
            "question": q["question"],
            "answers": [q["answer"]] * 10,  # the official VQA accuracy reads ten annotator answers
            "answer": q["answer"],
            "family": q["family"],
            "answer_type": ANSWER_TYPES.get(q["family"], "other"),
            "question_type": q["family"],
            "question_id": f"shapes-vqa-{self.split}-{index}",
            "image_id": f"shapes-vqa-{self.split}-{index}",
            "objects": [pair(o) for o in q["scene"]],
            "cells": [(o.row, o.col) for o in q["scene"]],
            "focus": q["focus"],
            "scene_seed": q["scene_seed"],
        }


def scene_image(scene_seed: str, split: str) -> Image.Image:
    """The image of a scene seed: its objects are sampled, then drawn, from the one generator."""
    rng = random.Random(scene_seed)
    return draw_objects(sample_objects(rng, split), rng)
