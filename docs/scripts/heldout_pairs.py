"""What a model's captions name in place of the colour-shape pairs it never saw in training.

Every image of the shapes "compositional" split holds at least one held-out pair (a red star, a green circle, ...).
For each held-out object this reads the run's saved captions (RUN/eval/compositional_per_image.jsonl, written by
training or by `evaluate`) and sorts it: the pair named right; its colour named with a shape that is not in the
image; its shape named with a colour that is not in the image; anything else.

    python docs/scripts/heldout_pairs.py runs/scratch_s0 runs/pre_b_s0
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from frozen_prefix.data.shapes import HELD_OUT, parse_objects

KINDS = ("the pair named right", "its colour, another shape", "its shape, another colour", "other")


def sort_held_out(rows: list[dict]) -> Counter:
    """How often each kind of answer stands where a held-out pair is drawn."""
    kinds: Counter = Counter()
    for row in rows:
        drawn = {tuple(o) for o in row["objects"]}
        named = set(parse_objects(row["caption"]))
        invented = named - drawn  # pairs the caption names that are not in the image
        for pair in drawn & set(HELD_OUT):
            if pair in named:
                kinds[KINDS[0]] += 1
            elif any(colour == pair[0] for colour, _ in invented):
                kinds[KINDS[1]] += 1
            elif any(shape == pair[1] for _, shape in invented):
                kinds[KINDS[2]] += 1
            else:
                kinds[KINDS[3]] += 1
    return kinds


def main() -> None:
    """Print one row a run folder: the share of each kind among its held-out objects."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (or evaluate --out folders) with eval/ results")
    args = parser.parse_args()
    print("| run | " + " | ".join(KINDS) + " | objects |")
    for run in args.runs:
        path = run / "eval" / "compositional_per_image.jsonl"
        if not path.exists():
            path = run / "compositional_per_image.jsonl"
        kinds = sort_held_out([json.loads(line) for line in path.read_text().splitlines() if line.strip()])
        total = sum(kinds.values())
        print(f"| {run} | " + " | ".join(f"{100 * kinds[k] / total:.1f}%" for k in KINDS) + f" | {total} |")


if __name__ == "__main__":
    main()
