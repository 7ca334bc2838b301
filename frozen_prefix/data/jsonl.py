"""JSON Lines caption sources: one {"image": path, "caption" | "captions": ...} object per line."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import DataError
from .base import CaptionRecords, Record


def read_jsonl(path: str | Path, limit: int | None = None) -> CaptionRecords:
    """Parse a JSON Lines file; image paths are relative to the file's folder unless absolute."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}; check the data source path")
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg}); fix or remove the line") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("image"), str):
                raise DataError(f'{where}: each line needs an "image" path string')
            captions = obj.get("captions", obj.get("caption"))
            if isinstance(captions, str):
                captions = [captions]
            if captions is None:
                raise DataError(f'{where}: each line needs "caption" (a string) or "captions" (a list of strings)')
            image = Path(obj["image"])
            records.append(
                Record(
                    image=str(image if image.is_absolute() else path.parent / image),
                    captions=captions,
                    image_id=str(obj.get("image_id", obj.get("id", obj["image"]))),
                    where=where,
                )
            )
            if limit is not None and len(records) >= limit:
                break
    if not records:
        raise DataError(f"data file {path} holds no records; add JSON lines with image and caption")
    return CaptionRecords(records)
