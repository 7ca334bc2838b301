"""How evaluation decodes a data set as one rank of a group: its share, FSDP's lockstep, the rows gathered back."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn
from torch.utils.data import Dataset, IterableDataset

from .distributed import current
from .sharding import gathered, is_fsdp


class _Share(Dataset):
    """This rank's items of a map-style set (indices rank, rank + N, ...), each with its index in the whole set."""

    def __init__(self, examples: Any, rank: int, world: int) -> None:
        self.examples, self.indices = examples, range(rank, len(examples), world)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        return self.indices[i], self.examples[self.indices[i]]


class _StreamShare(IterableDataset):
    """This rank's items of a stream (every N-th, from the rank's own), each with its index in the stream."""

    def __init__(self, stream: IterableDataset, rank: int, world: int) -> None:
        self.stream, self.rank, self.world = stream, rank, world

    def __iter__(self) -> Any:
        for index, item in enumerate(self.stream):
            if index % self.world == self.rank:
                yield index, item


class Decoding:
    """How evaluation decodes a data set under the strategy in use: one process, DDP-style shares, FSDP lockstep.

    Each rank decodes its share of the items; under FSDP every decoding call is a collective, so a rank that ran out
    keeps joining with a placeholder until all have; the rows come back whole, in the set's order, on every rank.
    In one process every method is the identity.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.ctx = current(model.device)
        self.lockstep = self.ctx.active and is_fsdp(model)

    @property
    def main(self) -> bool:
        """Whether this process reports and writes (rank 0)."""
        return self.ctx.main

    def share(self, examples: Any) -> Dataset | IterableDataset:
        """This rank's items, as (index in the whole set, item) pairs."""
        kind = _StreamShare if isinstance(examples, IterableDataset) else _Share
        return kind(examples, self.ctx.rank, self.ctx.world)

    def batches(self, loader: Any) -> Iterator[Any]:
        """The loader's batches; under FSDP, None for a rank that ran out while another still decodes."""
        if not self.lockstep:
            yield from loader
            return
        batches = iter(loader)
        while True:
            batch = next(batches, None)
            if not self.ctx.max([float(batch is not None)])[0]:
                return
            yield batch

    def join(self, decode: Any) -> None:
        """A rank without a batch: run `decode` on a placeholder under FSDP (its collectives); else nothing."""
        if self.lockstep:
            decode()

    def gathered(self) -> contextlib.AbstractContextManager[None]:
        """The FSDP root's own weights whole while decoding (code that does not go through its forward)."""
        return gathered(self.model)

    def collect(self, found: list[tuple], skipped: int) -> tuple[list[tuple], int]:
        """Every rank's (index, ...) rows in the set's order, and the skipped count over all ranks."""
        if not self.ctx.active:
            return found, skipped
        shares = self.ctx.gather((found, skipped))
        return sorted((row for part, _ in shares for row in part), key=lambda row: row[0]), sum(n for _, n in shares)

    def once(self, compute: Any) -> Any:
        """compute() on rank 0 (the COCO metrics' Java runs once), its result on every rank."""
        return self.ctx.broadcast(compute() if self.ctx.main else None)
