"""Frozen's fast concept binding (open-ended miniImageNet style) on drawn shapes, and a reader for Frozen's files.

An episode gives `ways` classes fresh nonsense names, shows `shots` images of each as (image, "This is a dax."),
and asks for the name of a new image of one class. Prompts are interleaved lists of text and images.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from PIL import Image

from .shapes import COLOURS, COLS, ROWS, SHAPES, SIZES, SPLIT_OFFSETS, ShapeObject, _pairs, draw_objects

# Frozen named its classes with nonsense words ("dax", "blicket"); short lowercase words keep names to few tokens.
NONSENSE = (
    "dax", "blicket", "wug", "zorb", "toma", "fep", "slation", "gazzer", "tufa", "kiki",
    "bouba", "zav", "gorp", "lorp", "kepa", "tova", "modi", "pim", "rif", "yok",
)
CLASS_KINDS = ("shape", "colour", "pair")
DEFAULT_QUESTION = "Question: What is this? Answer: This is a"
_FILE = re.compile(r"^(?P<task>.+)_shots_(?P<shots>\d+)_ways_(?P<ways>\d+)_all_questions\.json$")
_NAMED = re.compile(r"\bthis is an? ([a-z][\w-]*)", re.IGNORECASE)


def class_pool(kind: str, split: str) -> list[str]:
    """The classes of a kind in a split: shapes, colours, or 'colour shape' pairs (held-out pairs: compositional)."""
    pairs = _pairs(split)
    if kind == "shape":
        return [s for s in SHAPES if any(p[1] == s for p in pairs)]
    if kind == "colour":
        return [c for c in COLOURS if any(p[0] == c for p in pairs)]
    if kind == "pair":
        return [f"{c} {s}" for c, s in pairs]
    raise ValueError(f"unknown binding classes {kind!r}; choose from {', '.join(CLASS_KINDS)}")


def class_pairs(kind: str, label: str, split: str) -> list[tuple[str, str]]:
    """The (colour, shape) pairs an image of a class may show."""
    pairs = _pairs(split)
    if kind == "shape":
        return [p for p in pairs if p[1] == label]
    if kind == "colour":
        return [p for p in pairs if p[0] == label]
    colour, shape = label.split(" ")
    return [(colour, shape)]


def draw_member(kind: str, label: str, split: str, seed: str) -> tuple[Image.Image, ShapeObject]:
    """One single-object image of a class, with random colour (if free), size, cell and background."""
    rng = random.Random(seed)
    colour, shape = rng.choice(class_pairs(kind, label, split))
    obj = ShapeObject(colour, shape, rng.choice(SIZES), rng.randrange(len(ROWS)), rng.randrange(len(COLS)))
    return draw_objects([obj], rng), obj


def task_induction_text(names: list[str]) -> str:
    """Frozen's task induction: 'Answer with dax or blicket.', 'Answer with dax, blicket or wug.'."""
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
    return f"Answer with {listed}."


def names_in_prompt_order(episode: dict[str, Any]) -> list[str]:
    """The episode's names in the order the support first shows them."""
    seen: list[str] = []
    for _, name in episode["support"]:
        if name not in seen:
            seen.append(name)
    return seen


def support_text(episode: dict[str, Any], position: int) -> str:
    """The text after support image `position`: the file's own caption, else 'This is a dax.'."""
    captions = episode.get("captions")
    return captions[position] if captions else f"This is a {episode['support'][position][1]}."


def episode_prompt(
    episode: dict[str, Any], task_induction: bool | None = None, question: str | None = None
) -> list[Any]:
    """The interleaved prompt: [induction], image, 'This is a dax.', ..., query image, question.

    task_induction None follows the episode's own setting; question None uses the episode's question (Frozen's
    fast-VQA files carry one), else Frozen's miniImageNet question.
    """
    if task_induction is None:
        task_induction = episode.get("task_induction", True)
    prompt: list[Any] = [task_induction_text(episode["names"])] if task_induction else []
    for position, (image, _) in enumerate(episode["support"]):
        prompt += [image, support_text(episode, position)]
    return prompt + [episode["query"], question or episode.get("question") or DEFAULT_QUESTION]


class BindingEpisodes:
    """Map-style episodes of nonsense-name binding over shapes; episode i is the same in every process.

    The classes, names and query of episode i do not depend on `shots` or `repeats`, and the k-shot support images
    are the first k of the (k+1)-shot ones: a sweep over shots changes nothing else. `repeats` is how many times
    the whole support is shown (1: once; Frozen's "repeats R" is repeats=R+1).
    """

    def __init__(
        self, ways: int = 2, shots: int = 1, repeats: int = 1, size: int = 200, seed: int = 0,
        split: str = "test", classes: str = "shape", task_induction: bool = True,
    ) -> None:
        if split not in SPLIT_OFFSETS:
            raise ValueError(f"unknown shapes split {split!r}")
        self.pool = class_pool(classes, split)
        if not 2 <= ways <= min(len(self.pool), len(NONSENSE)):
            raise ValueError(f"ways must be 2..{min(len(self.pool), len(NONSENSE))} for {classes} classes, not {ways}")
        if shots < 1 or repeats < 1:
            raise ValueError("shots and repeats must be at least 1")
        self.ways, self.shots, self.repeats, self.seed = ways, shots, repeats, seed
        self.split, self.classes, self.task_induction = split, classes, task_induction
        self.size = size

    def __len__(self) -> int:
        return self.size

    def _key(self, index: int) -> str:
        return f"shapes-binding/{self.seed}/{self.split}/{self.classes}/{self.ways}/{index}"

    def plan(self, index: int) -> tuple[list[str], list[str], int]:
        """The classes (in class order), their names, and which class the query shows."""
        rng = random.Random(self._key(index))
        # The query's class cycles through the pool: every class is asked about equally often.
        asked = self.pool[index % len(self.pool)]
        labels = [asked] + rng.sample([c for c in self.pool if c != asked], self.ways - 1)
        rng.shuffle(labels)
        return labels, rng.sample(NONSENSE, self.ways), labels.index(asked)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.size:
            raise IndexError(index)
        key = self._key(index)
        labels, names, asked = self.plan(index)
        shown = [(c, j) for c in range(self.ways) for j in range(self.shots)]
        random.Random(f"{key}/order/{self.shots}").shuffle(shown)  # interleave the classes
        drawn = {cj: draw_member(self.classes, labels[cj[0]], self.split, f"{key}/support/{cj[0]}/{cj[1]}")
                 for cj in shown}
        query, query_obj = draw_member(self.classes, labels[asked], self.split, f"{key}/query")
        support = [(drawn[cj][0], names[cj[0]]) for cj in shown] * self.repeats
        return {
            "support": support,
            "query": query,
            "answer": names[asked],
            "names": names,
            "classes": labels,
            "episode_id": f"shapes-binding-{self.split}-{self.classes}-{self.ways}way-{self.shots}shot-{index}",
            "task_induction": self.task_induction,
            "support_objects": [(drawn[cj][1].colour, drawn[cj][1].shape) for cj in shown] * self.repeats,
            "query_object": (query_obj.colour, query_obj.shape),
        }

    def prompt(self, index: int) -> list[Any]:
        """Episode `index` as an interleaved prompt, with this set's task-induction setting."""
        return episode_prompt(self[index], self.task_induction)


# ---------------------------------------------------------------- Frozen's released files


def caption_name(caption: str) -> str:
    """The name a support caption gives: 'This is a dax.' -> 'dax'; any other caption is kept whole."""
    found = _NAMED.search(caption)
    return found.group(1).lower() if found else caption.strip()


def _frozen_episode(record: dict[str, Any], folder: Path, task: str, shots: int, ways: int) -> dict[str, Any]:
    """One record of an all_questions.json as an episode; images are paths inside the folder."""
    stem = f"{task}_shots_{shots}_ways_{ways}_id_{record['question_id']}"
    count = sum(1 for k in record if re.fullmatch(r"image_\d+", k)) or shots * ways
    images = [folder / record.get(f"image_{i}", f"{stem}_image_{i}.jpg") for i in range(1, count + 1)]
    captions = [str(record[f"caption_{i}"]) for i in range(1, count + 1)]
    support = [(image, caption_name(c)) for image, c in zip(images, captions)]
    episode: dict[str, Any] = {
        "support": support,
        "captions": captions,
        "query": folder / record.get("question_image", f"{stem}_question.jpg"),
        "answer": str(record["answer"]).strip(),
        "episode_id": f"{task}-shots{shots}-ways{ways}-{record['question_id']}",
        "task": task, "shots": shots, "ways": ways,
    }
    episode["names"] = names_in_prompt_order(episode)
    if record.get("question"):
        episode["question"] = str(record["question"])
    return episode


def read_frozen_episodes(folder: str | Path, shots: int | None = None, ways: int | None = None) -> list[dict]:
    """Episodes from an extracted Frozen benchmark archive (open_ended_mi, real_name_mi, fast_vqa, guided_vqa).

    Layout (https://fh295.github.io/frozen.html): `TASK_shots_N_ways_M_all_questions.json` holds a list of
    questions; support images `TASK_shots_N_ways_M_id_X_image_I.jpg`, query `..._id_X_question.jpg`. The record
    keys (`image_I`, `caption_I` for I = 1..N*M, `question_image`, `question`, `answer`, `question_id`) are
    inferred from third-party loaders of these files, not from a published schema; a missing image key falls
    back to the documented file name. Images are returned as paths and are not opened here.
    """
    folder = Path(folder).expanduser()
    found = sorted(p for p in folder.glob("*_all_questions.json") if _FILE.match(p.name))
    if not found:
        raise FileNotFoundError(f"no *_shots_N_ways_M_all_questions.json in {folder}")
    episodes = []
    for path in found:
        m = _FILE.match(path.name)
        n, w = int(m["shots"]), int(m["ways"])
        if (shots is not None and n != shots) or (ways is not None and w != ways):
            continue
        records = json.loads(path.read_text())
        episodes += [_frozen_episode(r, folder, m["task"], n, w) for r in records]
    return episodes
