"""Deterministic, resumable, shardable order of training examples."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import Sampler


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size (0, 1 without torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class EpochSampler(Sampler):
    """Yields (image_index, caption_choice) keys: a seeded shuffle per epoch, resumable from any position.

    Everything random about the data (order and which reference is the target) is a function of
    (seed, epoch, position), so resuming needs only the epoch and the position, not RNG state.
    """

    def __init__(
        self,
        num_captions: list[int] | int,
        seed: int,
        epoch: int = 0,
        start: int = 0,
        shuffle: bool = True,
        expand_all: bool = False,
        length: Callable[[tuple[int, int]], int] | None = None,
        batch_size: int = 1,
    ) -> None:
        self.counts = num_captions
        self.seed, self.epoch, self.start, self.shuffle, self.expand_all = seed, epoch, start, shuffle, expand_all
        self.length, self.batch_size = length, batch_size
        self.rank, self.world = rank_and_world()
        self._keys: list[tuple[int, int]] | None = None

    def keys(self) -> list[tuple[int, int]]:
        """All keys of this epoch for this rank, in order (computed once)."""
        if self._keys is None:
            self._keys = self._make_keys()
        return self._keys

    def _make_keys(self) -> list[tuple[int, int]]:
        n = self.counts if isinstance(self.counts, int) else len(self.counts)
        rng = random.Random(f"order/{self.seed}/{self.epoch}")
        if self.expand_all:
            keys = [(i, c) for i in range(n) for c in range(self._count(i))]
        else:
            keys = [(i, rng.getrandbits(31)) for i in range(n)]
        if self.shuffle:
            rng.shuffle(keys)
        usable = len(keys) - len(keys) % self.world  # equal shares keep ranks in step
        keys = keys[self.rank : usable : self.world]
        if self.length is not None:
            keys = self._group_by_length(keys, rng)
        return keys

    def _group_by_length(self, keys: list[tuple[int, int]], rng: random.Random) -> list[tuple[int, int]]:
        """Batches of similar caption length (less padding), from sorted windows of 32 batches, in random order."""
        window = self.batch_size * 32
        batches = []
        for start in range(0, len(keys), window):
            chunk = sorted(keys[start : start + window], key=self.length)
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        full = [b for b in batches if len(b) == self.batch_size]
        rng.shuffle(full)
        return [key for batch in full for key in batch]

    def _count(self, index: int) -> int:
        return self.counts[index] if isinstance(self.counts, list) else 1

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.keys()[self.start :])

    def __len__(self) -> int:
        return max(len(self.keys()) - self.start, 0)
