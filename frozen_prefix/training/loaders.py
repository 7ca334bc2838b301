"""The training batches (an epoch at a time, resumable mid-epoch, this rank's share) and the fixed validation ones."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from ..captioner import FrozenPrefixCaptioner
from ..config import Config
from ..data import CaptionCollator, EpochSampler, StreamSource, TrainExamples, TrainStream, build_train_source
from ..data.layout import Batch
from ..errors import DataError, FrozenPrefixError
from ..parallel import distributed


def train_loader(
    examples: TrainExamples, collate: CaptionCollator, config: Config, epoch: int, start: int
) -> DataLoader:
    """One epoch of batches, starting `start` examples in (for exact resume); under torchrun, this rank's share.

    `start` and train.batch_size are global (all ranks together); each rank reads 1/N of both.
    """
    tc, dc = config.train, config.data
    _, world = distributed.rank_and_world()
    batch_size, start = tc.batch_size // world, start // world
    if isinstance(examples.source, StreamSource):  # streamed: shuffled, sharded and batched by TrainStream itself
        stream = TrainStream(
            examples.source, dc.bad_data, seed=tc.seed, epoch=epoch, start=start, batch_size=batch_size,
            caption_sampling=dc.caption_sampling,
        )
        return DataLoader(
            stream, batch_size=None, collate_fn=collate, num_workers=dc.num_workers,
            pin_memory=torch.cuda.is_available(), persistent_workers=False,
        )
    sampler = EpochSampler(
        examples.num_captions() if dc.caption_sampling == "all" else len(examples),
        seed=tc.seed, epoch=epoch, start=start, expand_all=dc.caption_sampling == "all",
        length=examples.length_key if dc.group_by_length and examples.can_group_by_length() else None,
        batch_size=tc.batch_size,  # grouping by length makes global batches, before they are dealt out to ranks
    )
    return DataLoader(
        examples, batch_size=batch_size, sampler=sampler, collate_fn=collate, num_workers=dc.num_workers,
        pin_memory=torch.cuda.is_available(), drop_last=True, persistent_workers=False,
    )


def batch_stream(
    examples: TrainExamples, collate: CaptionCollator, config: Config, epoch: int, position: int
) -> Iterator[tuple[Batch, int, int]]:
    """Endless batches from (epoch, position) on, each with the (epoch, position) that follows it."""
    streaming = isinstance(examples.source, StreamSource)
    while True:
        loader = train_loader(examples, collate, config, epoch, position)
        if not streaming and len(loader) == 0 and position == 0:
            raise FrozenPrefixError(
                f"the training data has fewer examples ({len(examples)}) than "
                f"train.batch_size={config.train.batch_size}; lower it"
            )
        delivered = False
        for batch in loader:
            if batch.error is not None:  # a bad record met in a DataLoader worker (data.bad_data=error)
                raise DataError(batch.error)
            delivered = True
            position += config.train.batch_size
            yield batch, epoch, position
        if streaming and not delivered and position == 0:
            raise FrozenPrefixError(
                f"the streaming training data gave no full batch of train.batch_size={config.train.batch_size} "
                "(per data.num_workers worker); lower them or check the source"
            )
        epoch, position = epoch + 1, 0


def fixed_val_batches(model: FrozenPrefixCaptioner, config: Config, collate: CaptionCollator) -> list[dict]:
    """The same validation batches every time (epoch 0, no shuffle)."""
    if config.data.val is None:
        return []
    examples = TrainExamples(build_train_source(config.data.val), config.data.bad_data, config.data.caption_sampling)
    sampler = EpochSampler(len(examples), seed=config.train.seed, shuffle=False, shard=False)  # the same on every rank
    loader = DataLoader(examples, batch_size=config.train.batch_size, sampler=sampler, collate_fn=collate)
    batches = []
    for batch in loader:
        if batch.size:
            batches.append(batch)
        if len(batches) >= config.train.val_batches:
            break
    return batches
