"""Deterministic, resumable, shardable order of training examples."""

from __future__ import annotations

import random
from collections.abc import Iterator

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
    ) -> None:
        self.counts = num_captions
        self.seed, self.epoch, self.start, self.shuffle, self.expand_all = seed, epoch, start, shuffle, expand_all
        self.rank, self.world = rank_and_world()

    def keys(self) -> list[tuple[int, int]]:
        """All keys of this epoch for this rank, in order."""
        n = self.counts if isinstance(self.counts, int) else len(self.counts)
        rng = random.Random(f"order/{self.seed}/{self.epoch}")
        if self.expand_all:
            keys = [(i, c) for i in range(n) for c in range(self._count(i))]
        else:
            keys = [(i, rng.getrandbits(31)) for i in range(n)]
        if self.shuffle:
            rng.shuffle(keys)
        usable = len(keys) - len(keys) % self.world  # equal shares keep ranks in step
        return keys[self.rank : usable : self.world]

    def _count(self, index: int) -> int:
        return self.counts[index] if isinstance(self.counts, list) else 1

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.keys()[self.start :])

    def __len__(self) -> int:
        return max(len(self.keys()) - self.start, 0)
