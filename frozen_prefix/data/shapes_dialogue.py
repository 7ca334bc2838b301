"""Embedded multi-turn dialogues about a shapes scene, drawn on demand from (seed, split, index); nothing stored.

Every dialogue opens with "Describe the picture." (answered by the scene's plain caption, objects in reading
order), then asks 2-4 short questions: colours, shapes, counts and positions, and follow-ups that refer back to
the object the previous turn singled out ("What colour is it?", "What is to its right?"). A follow-up is only
asked when its referent is unambiguous, and a relation only when at most one object answers it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from .shapes import COLS, ROWS, ShapeObject, make_captions, sample_objects, split_size
from .shapes_vqa import (
    NOTHING,
    RELATIONS,
    _unique,
    colour_question,
    count_question,
    position_question,
    related,
    scene_image,
    shape_question,
)

DESCRIBE = "Describe the picture."
FRESH = ("colour", "shape", "count", "position")
FOLLOW_UPS = ("followup_colour", "followup_shape", "followup_size", "followup_where", "followup_relation")
FAMILIES = ("describe", *FRESH, *FOLLOW_UPS)
FOLLOW_UP_RATE = 0.6  # how often a question refers back when the previous turn singled out one object
RELATION_QUESTIONS = {
    "left": "And the one on its left?",
    "right": "What is to its right?",
    "above": "What is above it?",
    "below": "What is below it?",
}


@dataclass
class Asked:
    """One question: its family and words, the short answer, and the object it leaves in focus (or None)."""

    family: str
    question: str
    answer: str
    referent: ShapeObject | None
    known: frozenset[str] = frozenset()  # what the conversation has said about the referent


def short_where(obj: ShapeObject) -> str:
    """A cell as a short answer: 'top left', 'left', 'top', 'center'."""
    row, col = ROWS[obj.row], COLS[obj.col]
    if row == "middle":
        return col
    return row if col == "center" else f"{row} {col}"


# ---------------------------------------------------------------- questions that need no history


def _fresh(objects: list[ShapeObject], rng: random.Random) -> dict[str, list[Asked]]:
    """Every fresh question the scene admits, by family."""
    out: dict[str, list[Asked]] = {f: [] for f in FRESH}
    for o in _unique(objects, lambda o: o.shape):  # "the circle" must name one object
        out["colour"].append(Asked("colour", colour_question(o.shape), o.colour, o, frozenset({"colour", "shape"})))
    for o in _unique(objects, lambda o: o.colour):
        out["shape"].append(Asked("shape", shape_question(o.colour), o.shape, o, frozenset({"colour", "shape"})))
    groups: list[tuple[str, list[ShapeObject], frozenset[str]]] = [(count_question(), list(objects), frozenset())]
    for colour in sorted({o.colour for o in objects}):
        same = [o for o in objects if o.colour == colour]
        groups.append((count_question(colour=colour), same, frozenset({"colour"})))
    for shape in sorted({o.shape for o in objects}):
        groups.append((count_question(shape=shape), [o for o in objects if o.shape == shape], frozenset({"shape"})))
    for question, group, known in groups:
        single = group[0] if len(group) == 1 else None  # "How many circles?" "1" singles the circle out
        out["count"].append(Asked("count", question, str(len(group)), single, known))
    # The whole-scene count as often as all the others together: most colour and shape groups hold one object.
    out["count"] += out["count"][:1] * (len(groups) - 2)
    # An object's cell half the time, an empty cell otherwise (most cells are empty: "nothing" would dominate).
    taken = {(o.row, o.col): o for o in objects}
    empty = [(r, c) for r in range(3) for c in range(3) if (r, c) not in taken]
    row, col = rng.choice(sorted(taken) if rng.random() < 0.5 or not empty else empty)
    obj = taken.get((row, col))
    known = frozenset({"colour", "shape", "where"})
    out["position"].append(Asked("position", position_question(row, col), obj.phrase if obj else NOTHING, obj, known))
    return out


# ---------------------------------------------------------------- follow-ups about the object in focus


def _follow_ups(objects: list[ShapeObject], referent: ShapeObject, known: frozenset[str]) -> dict[str, list[Asked]]:
    """Every follow-up about the referent that tells something new, by family."""
    out: dict[str, list[Asked]] = {f: [] for f in FOLLOW_UPS}
    asks: list[tuple[str, str, str, Callable[[ShapeObject], str]]] = [
        ("followup_colour", "colour", "What colour is it?", lambda o: o.colour),
        ("followup_shape", "shape", "What shape is it?", lambda o: o.shape),
        ("followup_size", "size", "Is it large or small?", lambda o: o.size),
        ("followup_where", "where", "Where is it?", short_where),
    ]
    for family, attribute, question, answer in asks:
        if attribute not in known:
            out[family].append(Asked(family, question, answer(referent), referent, known | {attribute}))
    named, nothing = [], []
    for relation in RELATIONS:
        found = related(objects, referent, relation)
        if len(found) == 1:  # "the one on its left" must be one object (or none at all)
            named.append(Asked("followup_relation", RELATION_QUESTIONS[relation], found[0].phrase, found[0],
                               frozenset({"colour", "shape"})))
        elif not found:
            nothing.append(Asked("followup_relation", RELATION_QUESTIONS[relation], NOTHING, None))
    out["followup_relation"] = named + nothing[:1]  # at most one "nothing" option, so that it does not dominate
    return out


# ---------------------------------------------------------------- the data set


def describe(objects: list[ShapeObject]) -> Asked:
    """The opening turn: the plain caption; a lone object stays in focus."""
    single = objects[0] if len(objects) == 1 else None
    return Asked("describe", DESCRIBE, make_captions(objects)[0], single, frozenset({"colour", "shape"}))


def plan_dialogue(objects: list[ShapeObject], rng: random.Random) -> list[Asked]:
    """The description, then 2-4 questions; a follow-up when something is in focus, FOLLOW_UP_RATE of the time."""
    turns = [describe(objects)]
    asked = {DESCRIBE}
    for _ in range(rng.choice((2, 3, 4))):
        last = turns[-1]
        options: dict[str, list[Asked]] = {}
        if last.referent is not None and rng.random() < FOLLOW_UP_RATE:
            options = _follow_ups(objects, last.referent, last.known)
        if not any(options.values()):
            options = _fresh(objects, rng)
            for family in options:  # the same fresh question twice says nothing new
                options[family] = [a for a in options[family] if a.question not in asked]
        families = [f for f in options if options[f]]
        choice = rng.choice(options[rng.choice(families)])
        asked.add(choice.question)
        turns.append(choice)
    return turns


class ShapesDialogue:
    """Map-style multi-turn dialogues over drawn shapes; item i is the same on every call and in every process."""

    def __init__(self, split: str = "train", size: int | None = None, seed: int = 0) -> None:
        self.split, self.seed, self.size = split, seed, split_size(split, size)

    def __len__(self) -> int:
        return self.size

    def scene_seed(self, index: int) -> str:
        """The string seed the scene of item `index` is sampled and drawn from."""
        return f"shapes-dialogue/{self.seed}/{self.split}/{index}"

    def dialogue(self, index: int) -> dict:
        """Everything about item `index` except the drawn image (cheap: no drawing)."""
        scene_seed = self.scene_seed(index)
        objects = sample_objects(random.Random(scene_seed), self.split)
        plan = plan_dialogue(objects, random.Random(f"{scene_seed}/talk"))  # its own stream: the scene is fixed
        turns = []
        for i, asked in enumerate(plan):
            question = f"<image>\n{asked.question}" if i == 0 else asked.question
            turns += [{"role": "user", "content": question}, {"role": "assistant", "content": asked.answer}]
        cell = [None if a.referent is None else (a.referent.row, a.referent.col) for a in plan]
        return {
            "turns": turns, "answers": [a.answer for a in plan], "families": [a.family for a in plan],
            "questions": [a.question for a in plan], "referents": cell, "scene": objects, "scene_seed": scene_seed,
        }

    def text_length(self, index: int) -> int:
        """Characters of item `index`'s turns (for grouping by length; no drawing)."""
        return sum(len(turn["content"]) for turn in self.dialogue(index)["turns"])

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(index)
        d = self.dialogue(index)
        objects = d.pop("scene")
        return {
            "kind": "dialogue",
            "images": [scene_image(d["scene_seed"], self.split)],
            **d,
            "image_id": f"shapes-dialogue-{self.split}-{index}",
            "objects": [(o.colour, o.shape) for o in objects],
            "cells": [(o.row, o.col) for o in objects],
            "sizes": [o.size for o in objects],
        }
