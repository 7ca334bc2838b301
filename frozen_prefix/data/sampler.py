"""Deterministic, resumable, shardable order of training examples."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

from torch.utils.data import Sampler

from ..parallel.distributed import rank_and_world


class EpochSampler(Sampler):
    """Yields (image_index, caption_choice) keys: a seeded shuffle per epoch, resumable from any position.

    Everything random about the data (order and which reference is the target) is a function of
    (seed, epoch, position), so resuming needs only the epoch and the position, not RNG state.

    Under torchrun the one global order is dealt out to the ranks (rank r takes keys r, r + N, ...): with a
    per-rank batch of batch_size / N, the ranks' i-th batches together are exactly the global order's i-th batch
    of batch_size, at any N. `batch_size` (for grouping by length) is that global batch; `start` counts this
    rank's keys (the global position / N).
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
        shard: bool = True,
    ) -> None:
        self.counts = num_captions
        self.seed, self.epoch, self.start, self.shuffle, self.expand_all = seed, epoch, start, shuffle, expand_all
        self.length, self.batch_size = length, batch_size
        # shard=False: every rank reads the whole order (e.g. the fixed validation batches, split up by batch)
        self.rank, self.world = rank_and_world() if shard else (0, 1)
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
        if self.length is not None:  # global batches first, then dealt out: the same batches at any world size
            keys = self._group_by_length(keys, rng)
        usable = len(keys) - len(keys) % self.world  # equal shares keep ranks in step
        return keys[self.rank : usable : self.world]

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
