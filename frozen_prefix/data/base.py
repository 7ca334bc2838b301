"""The one shape every caption source takes: records of (image, captions, image_id), read lazily."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import DataError
from ..images import load_image

log = logging.getLogger(__name__)


class CaptionSource(Protocol):
    """A map-style source: item i is {"image": RGB PIL image, "captions": [str, ...], "image_id": str, ...}."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


@dataclass
class Record:
    """One image and its reference captions, before the image is read."""

    image: Any  # a path, bytes or a PIL image
    captions: Any
    image_id: str
    where: str = ""  # file and line, for error messages


def as_caption_list(value: Any) -> Any:
    """A caption column value as a list: a string becomes [string]; anything else is left for check_captions."""
    return [value] if isinstance(value, str) else value


def pick_caption(captions: list[str], choice: int, sampling: str = "random") -> str:
    """The training target among an image's references: the shortest, or the one `choice` selects."""
    if sampling == "shortest":
        return min(captions, key=len)  # the first of equally short ones: the same target every epoch
    return captions[choice % len(captions)]


def decode_record(record: Record) -> dict[str, Any]:
    """Check a record's captions and decode its image; raise DataError naming the record or file."""
    where = record.where or record.image_id
    captions = check_captions(record.captions, where)
    if record.image is None:
        raise DataError(f"{where}: no image; fix the record or set data.bad_data=skip")
    return {"image": load_image(record.image), "captions": captions, "image_id": record.image_id}


class StreamSource:
    """A source read front to back (a streaming data set): records in order, images not yet decoded."""

    label = "stream"  # names the source in error messages

    def records(self, seed: int | None = None, epoch: int = 0) -> Iterator[Record]:
        """Records in a fixed order; with a seed, shuffled (the same order for the same seed and epoch)."""
        raise NotImplementedError


def check_captions(captions: Any, where: str) -> list[str]:
    """A non-empty list of non-empty strings, or a DataError naming where it came from."""
    if captions is None:
        raise DataError(
            f'{where}: no caption; each record needs "caption" (a string) or "captions" (a list of strings); '
            "fix it or set data.bad_data=skip"
        )
    if not isinstance(captions, list) or not captions:
        raise DataError(
            f"{where}: captions must be a non-empty list of strings, got {_short(captions)}; "
            "fix it or set data.bad_data=skip"
        )
    for caption in captions:
        if not isinstance(caption, str) or not caption.strip():
            raise DataError(
                f"{where}: caption {_short(caption)} is empty or not a string; fix it or set data.bad_data=skip"
            )
    return [c.strip() for c in captions]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class CaptionRecords:
    """A list of records served as a caption source; images are decoded on access."""

    def __init__(self, records: list[Record]) -> None:
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def num_captions(self, index: int) -> int:
        """How many references record `index` has, without reading its image."""
        captions = self.records[index].captions
        # at least 1: a record without captions is still visited, so that it is skipped and counted
        return max(len(captions), 1) if isinstance(captions, list) else 1

    def captions(self, index: int) -> list[str]:
        """The references of record `index` as given (unchecked), without reading its image."""
        captions = self.records[index].captions
        return captions if isinstance(captions, list) else [str(captions)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return decode_record(self.records[index])
