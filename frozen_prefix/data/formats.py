"""The data source kinds beyond shapes and jsonl: coco, karpathy, hf and webdataset."""

from __future__ import annotations

from pathlib import Path

from ..config import SourceConfig
from ..errors import DataError
from .base import CaptionRecords, StreamSource
from .coco import read_coco, read_karpathy
from .hf import HFRows, build_hf


def build(source: SourceConfig, path: Path | None) -> CaptionRecords | HFRows | StreamSource:
    """The caption source of a coco, karpathy, hf or webdataset entry (path already resolved)."""
    if source.kind in ("coco", "karpathy"):
        if source.streaming:
            raise DataError(f"{source.kind} sources are read from local files; remove streaming: true")
        if source.kind == "coco":
            return read_coco(path, source.image_dir, source.size)
        return read_karpathy(path, source.split, source.image_dir, source.size)
    if source.kind in ("hf", "webdataset"):
        return build_hf(source, path)
    raise DataError(f"unknown data source kind {source.kind!r}; use shapes, jsonl, coco, karpathy, hf or webdataset")
