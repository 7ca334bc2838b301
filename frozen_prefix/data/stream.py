"""Streaming sources as PyTorch iterable data sets: training batches (sharded, resumable) and evaluation images."""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterator
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from ..errors import DataError
from ..parallel.distributed import rank_and_world
from .base import Record, StreamSource, decode_record, pick_caption

log = logging.getLogger(__name__)


def handle_bad(error: DataError, bad_data: str, what: str) -> DataError | None:
    """Skip a bad record (None, with a warning naming it) or raise its error.

    Inside a DataLoader worker the error is returned instead of raised: the loader would re-raise it in the
    main process wrapped in the worker's traceback; the training loop raises it there as one clear line.
    """
    if bad_data == "error":
        if get_worker_info() is not None:
            return error
        raise error
    log.warning("skipping bad %s: %s", what, error)
    return None


class TrainStream(IterableDataset):
    """Batches of (image, one caption) from a stream: shuffled per epoch, split by rank and worker, resumable.

    Example i of the epoch's stream belongs to one (rank, worker) slot: i % slots. Every worker reads
    the stream's rows but decodes only its own images; in exchange every slot gets an even share and
    a resume knows exactly which examples each worker had already delivered. Under torchrun `batch_size` is
    the per-rank share of the global batch and `start` the per-rank position (the global one / world size).
    """

    def __init__(
        self, source: StreamSource, bad_data: str, seed: int, epoch: int, start: int, batch_size: int,
        caption_sampling: str = "random",
    ) -> None:
        self.source, self.bad_data, self.seed, self.epoch = source, bad_data, seed, epoch
        self.start, self.batch_size = start, batch_size
        self.expand_all, self.caption_sampling = caption_sampling == "all", caption_sampling
        self.rank, self.world = rank_and_world()  # read here: worker processes have no process group

    def _choices(self, record: Record, index: int) -> list[int]:
        if self.expand_all:
            captions = record.captions
            return list(range(max(len(captions), 1) if isinstance(captions, list) else 1))
        # one caption per image per epoch, a function of (seed, epoch, index) as in EpochSampler
        return [zlib.crc32(f"caption/{self.seed}/{self.epoch}/{index}".encode()) & 0x7FFFFFFF]

    def __iter__(self) -> Iterator[list[Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # The DataLoader takes batches from its workers in turn, always starting with worker 0: after `done`
        # batches, worker 0 continues the part of the epoch that worker (done % workers) was making, and so on;
        # that part had made ceil((done - part) / workers) of the first `done` batches.
        done = self.start // self.batch_size
        part = (worker + done) % workers
        slot, slots = self.rank * workers + part, self.world * workers
        skip = max(0, -(-(done - part) // workers)) * self.batch_size
        batch: list[Any] = []
        try:
            for index, record in enumerate(self.source.records(self.seed, self.epoch)):
                if index % slots != slot:
                    continue
                choices = self._choices(record, index)
                if skip >= len(choices):  # already trained on before the resume: not even decoded
                    skip -= len(choices)
                    continue
                choices, skip = choices[skip:], 0
                try:
                    item: Any = decode_record(record)
                except DataError as e:
                    item = handle_bad(e, self.bad_data, f"record {index} ({record.where})")
                for choice in choices:
                    if isinstance(item, dict):
                        caption = pick_caption(item["captions"], choice, self.caption_sampling)
                        batch.append({**item, "caption": caption, "seed": (index * 1_000_003 + choice) % 2**31})
                    else:
                        batch.append(item)  # None (skipped, counted by the collate) or an error for the main process
                    if isinstance(item, DataError):
                        yield batch
                        return
                    if len(batch) == self.batch_size:
                        yield batch
                        batch = []
        except DataError as e:  # the stream itself cannot be read on: no skipping past it
            if info is None:
                raise
            yield [e]
        # a last partial batch is dropped, as drop_last does for map-style data: positions stay multiples


class EvalStream(IterableDataset):
    """Images of a stream with all their references, in stream order, for caption evaluation."""

    def __init__(self, source: StreamSource, bad_data: str, limit: int | None = None) -> None:
        self.source, self.bad_data, self.limit = source, bad_data, limit

    def __iter__(self) -> Iterator[dict[str, Any] | DataError | None]:
        for index, record in enumerate(self.source.records()):
            if self.limit is not None and index >= self.limit:
                return
            try:
                yield decode_record(record)
            except DataError as e:
                yield handle_bad(e, self.bad_data, f"record {index} ({record.where})")
