"""The embedded synthetic "shapes" data set: drawn on demand from (seed, split, index), nothing on disk."""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 230),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (250, 140, 20),
    "white": (250, 250, 250),
}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = ("small", "large")
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
PAIRS = [(c, s) for c in COLOURS for s in SHAPES]  # every colour-shape pair, in a fixed order
# Colour-shape pairs never drawn in train/val/test; the "compositional" split is built from them.
HELD_OUT = (("red", "star"), ("green", "circle"), ("blue", "triangle"), ("yellow", "square"), ("white", "star"))
SPLIT_OFFSETS = {"train": 0, "val": 1, "test": 2, "compositional": 3}
DEFAULT_SIZES = {"train": 100_000, "val": 200, "test": 500, "compositional": 200}
CANVAS = 128


@dataclass(frozen=True)
class ShapeObject:
    """One drawn object."""

    colour: str
    shape: str
    size: str
    row: int
    col: int

    @property
    def phrase(self) -> str:
        """'red circle'."""
        return f"{self.colour} {self.shape}"

    @property
    def where(self) -> str:
        """A position phrase: 'on the left', 'at the top right', 'in the center'."""
        row, col = ROWS[self.row], COLS[self.col]
        if row == "middle" and col == "center":
            return "in the center"
        if row == "middle":
            return f"on the {col}"
        if col == "center":
            return f"at the {row}"
        return f"at the {row} {col}"


def _pairs(split: str) -> list[tuple[str, str]]:
    return list(HELD_OUT) if split == "compositional" else [p for p in PAIRS if p not in HELD_OUT]


def cell_labels(objects: list[ShapeObject]) -> list[int]:
    """What each of the 3 x 3 grid cells holds, in reading order: 0 when empty, 1 + i for the pair PAIRS[i]."""
    labels = [0] * 9
    for o in objects:
        labels[3 * o.row + o.col] = 1 + PAIRS.index((o.colour, o.shape))
    return labels


def sample_objects(rng: random.Random, split: str) -> list[ShapeObject]:
    """Choose 1-3 objects in distinct grid cells; a compositional image holds at least one held-out pair."""
    n = rng.choice((1, 2, 3))
    cells = rng.sample([(r, c) for r in range(3) for c in range(3)], n)
    seen = _pairs("train")
    novel = _pairs("compositional")
    objects = []
    for i, (row, col) in enumerate(cells):
        pool = novel if split == "compositional" and i == 0 else seen
        colour, shape = rng.choice(pool)
        objects.append(ShapeObject(colour, shape, rng.choice(SIZES), row, col))
    # Captions list objects in reading order (top to bottom, then left to right), the order in which a
    # spatial prefix lists its grid cells.
    return sorted(objects, key=lambda o: (o.row, o.col))


def _background(rng: random.Random) -> Image.Image:
    """A muted background: flat grey, a two-tone gradient, or noise, never close to an object colour."""
    style = rng.choice(("flat", "gradient", "noise"))
    base = rng.randint(60, 150)
    tint = [max(0, min(255, base + rng.randint(-15, 15))) for _ in range(3)]
    image = Image.new("RGB", (CANVAS, CANVAS), tuple(tint))
    if style == "gradient":
        other = [max(0, min(255, v + rng.randint(-40, 40))) for v in tint]
        horizontal = rng.random() < 0.5
        draw = ImageDraw.Draw(image)
        for i in range(CANVAS):
            t = i / (CANVAS - 1)
            colour = tuple(int(a + (b - a) * t) for a, b in zip(tint, other))
            draw.line([(i, 0), (i, CANVAS)] if horizontal else [(0, i), (CANVAS, i)], fill=colour)
    elif style == "noise":
        # numpy generator seeded from rng: PIL's effect_noise uses a global, unseeded generator
        noise = np.random.default_rng(rng.getrandbits(64)).normal(0, rng.uniform(10, 30), (CANVAS, CANVAS, 1))
        pixels = np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(1))
    return image


def _star(cx: float, cy: float, r: float, turn: float) -> list[tuple[float, float]]:
    points = []
    for i in range(10):
        radius = r if i % 2 == 0 else r * 0.45
        angle = turn + i * math.pi / 5 - math.pi / 2
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def draw_objects(objects: list[ShapeObject], rng: random.Random) -> Image.Image:
    """Render objects onto a random background."""
    image = _background(rng)
    draw = ImageDraw.Draw(image)
    cell = CANVAS / 3
    for obj in objects:
        r = cell * (0.40 if obj.size == "large" else 0.22)
        jitter = cell / 2 - r - 1
        cx = (obj.col + 0.5) * cell + rng.uniform(-jitter, jitter)
        cy = (obj.row + 0.5) * cell + rng.uniform(-jitter, jitter)
        fill = tuple(max(0, min(255, v + rng.randint(-20, 20))) for v in COLOURS[obj.colour])
        outline = (20, 20, 20)
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline)
        elif obj.shape == "square":
            s = r * 0.88
            draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill, outline=outline)
        elif obj.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill, outline=outline)
        else:
            draw.polygon(_star(cx, cy, r * 1.1, rng.uniform(-0.2, 0.2)), fill=fill, outline=outline)
    return image


def _a(phrase: str) -> str:
    """Prefix the right indefinite article."""
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def _join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def make_captions(objects: list[ShapeObject]) -> list[str]:
    """Five references in varied wording; each names the colour and shape of every object."""
    n = len(objects)
    plain = _join([_a(o.phrase) for o in objects])
    sized = _join([_a(f"{o.size} {o.phrase}") for o in objects])
    placed = _join([f"{_a(o.phrase)} {o.where}" for o in objects])
    count = ("one shape", "two shapes", "three shapes")[n - 1]
    return [
        f"{plain}.",
        f"A picture of {plain}.",
        f"There is {sized}.",
        f"{placed[0].upper()}{placed[1:]}.",
        f"{count}: {plain}.",
    ]


def split_size(split: str, size: int | None) -> int:
    """The number of items of a shapes split (its default when size is None); ValueError for an unknown split."""
    if split not in SPLIT_OFFSETS:
        raise ValueError(f"unknown shapes split {split!r}")
    return size if size is not None else DEFAULT_SIZES[split]


class ShapesDataset:
    """Map-style data set of drawn shapes; item i is the same on every call and in every process."""

    def __init__(self, split: str = "train", size: int | None = None, seed: int = 0) -> None:
        self.split, self.seed, self.size = split, seed, split_size(split, size)

    def __len__(self) -> int:
        return self.size

    def num_captions(self, index: int) -> int:
        """Every image has five references."""
        return 5

    def captions(self, index: int) -> list[str]:
        """The references of image `index`, without drawing it."""
        return make_captions(self.scene(index)[0])

    def scene(self, index: int) -> tuple[list[ShapeObject], random.Random]:
        """The objects of image `index` and the generator that draws it."""
        # A string seed goes through SHA-512 in random.Random: stable across processes and platforms.
        rng = random.Random(f"shapes/{self.seed}/{self.split}/{index}")
        return sample_objects(rng, self.split), rng

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(index)
        objects, rng = self.scene(index)
        return {
            "image": draw_objects(objects, rng),
            "captions": make_captions(objects),
            "image_id": f"shapes-{self.split}-{index}",
            "objects": [(o.colour, o.shape) for o in objects],
        }


_WORD = re.compile(r"[a-z]+")


def parse_objects(caption: str) -> Counter:
    """The (colour, shape) pairs a caption names; a shape without a colour counts as (None, shape)."""
    words = _WORD.findall(caption.lower())
    found: Counter = Counter()
    for i, word in enumerate(words):
        if word.rstrip("s") in SHAPES and word not in ("shapes",):
            shape = word.rstrip("s")
            colour = next((w for w in reversed(words[max(0, i - 3) : i]) if w in COLOURS), None)
            found[(colour, shape)] += 1
    return found


def exact_match(caption: str, objects: list[tuple[str, str]]) -> bool:
    """True when the caption names exactly the objects' colours and shapes, no more, no fewer."""
    return parse_objects(caption) == Counter(map(tuple, objects))


def _part(pairs: Counter, which: int) -> Counter:
    """The multiset of colours (which=0) or shapes (which=1) in a multiset of pairs."""
    out: Counter = Counter()
    for pair, n in pairs.items():
        out[pair[which]] += n
    return out


def match_parts(caption: str, objects: list[tuple[str, str]]) -> dict[str, bool]:
    """What a caption gets right: everything (exact), the number of objects, the colours, the shapes (as multisets)."""
    found, truth = parse_objects(caption), Counter(map(tuple, objects))
    return {
        "exact": found == truth,
        "count": sum(found.values()) == sum(truth.values()),
        "colours": _part(found, 0) == _part(truth, 0),
        "shapes": _part(found, 1) == _part(truth, 1),
    }


def exact_score(captions: list[str], objects: list[list[tuple[str, str]]]) -> float:
    """Fraction of images whose caption is an exact match."""
    if not captions:
        return 0.0
    return sum(exact_match(c, o) for c, o in zip(captions, objects, strict=True)) / len(captions)
