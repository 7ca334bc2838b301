"""The one shape every caption source takes: records of (image, captions, image_id), read lazily."""

from __future__ import annotations

import logging
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


def check_captions(captions: Any, where: str) -> list[str]:
    """A non-empty list of non-empty strings, or a DataError naming where it came from."""
    if not isinstance(captions, list) or not captions:
        raise DataError(f"{where}: captions must be a non-empty list of strings, got {captions!r}")
    for caption in captions:
        if not isinstance(caption, str) or not caption.strip():
            raise DataError(f"{where}: caption {caption!r} is empty or not a string; fix it or set data.bad_data=skip")
    return [c.strip() for c in captions]


class CaptionRecords:
    """A list of records served as a caption source; images are decoded on access."""

    def __init__(self, records: list[Record]) -> None:
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def num_captions(self, index: int) -> int:
        """How many references record `index` has, without reading its image."""
        captions = self.records[index].captions
        return len(captions) if isinstance(captions, list) else 1

    def captions(self, index: int) -> list[str]:
        """The references of record `index` as given (unchecked), without reading its image."""
        captions = self.records[index].captions
        return captions if isinstance(captions, list) else [str(captions)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        where = record.where or record.image_id
        captions = check_captions(record.captions, where)
        return {"image": load_image(record.image), "captions": captions, "image_id": record.image_id}
