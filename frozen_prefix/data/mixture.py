"""A weighted mixture of map-style sources (captions + VQA + dialogue), deterministic and resumable."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any


class MixtureSource:
    """Item j draws a source by weight and an item of it, both from a seed of j: the same in every process.

    An epoch is `size` draws (default: the sources' lengths added up); the sampler shuffles them as it does any
    source, so order, resume and sharding work exactly as for a single source.
    """

    def __init__(self, sources: Sequence[Any], weights: Sequence[float], size: int | None = None, seed: int = 0):
        if len(sources) != len(weights) or not sources:
            raise ValueError("a mixture needs one weight per source, and at least one source")
        self.sources, self.weights, self.seed = list(sources), list(weights), seed
        self.size = size if size is not None else sum(len(s) for s in self.sources)

    def __len__(self) -> int:
        return self.size

    def pick(self, index: int) -> tuple[int, int]:
        """(source number, item of that source) of draw `index`."""
        rng = random.Random(f"mixture/{self.seed}/{index}")
        which = rng.choices(range(len(self.sources)), weights=self.weights)[0]
        return which, rng.randrange(len(self.sources[which]))

    def captions(self, index: int) -> list[str]:
        """The references of a caption draw without reading its image ([] for questions and conversations)."""
        which, item = self.pick(index)
        source = self.sources[which]
        return source.captions(item) if hasattr(source, "captions") else []

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.size:
            raise IndexError(index)
        which, item = self.pick(index)
        return self.sources[which][item]
