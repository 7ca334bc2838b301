"""JSON Lines caption sources: one {"image": path, "caption" | "captions": ...} object per line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import DataError
from .base import CaptionRecords, Record, as_caption_list


def json_object(line: str, where: str, expected: str) -> dict[str, Any]:
    """One JSON Lines line as an object; a DataError naming file:line (and what a line must hold) otherwise."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg}); fix or remove the line") from e
    if not isinstance(obj, dict):
        raise DataError(f"{where}: each line must be a JSON object with {expected}")
    return obj


def local_image(value: Any, folder: Path) -> str | None:
    """An image path from a line, relative to `folder` unless absolute; None when missing (reported when read)."""
    if isinstance(value, str) and value:
        return str(Path(value) if Path(value).is_absolute() else folder / value)
    return None


def read_jsonl(path: str | Path, limit: int | None = None) -> CaptionRecords:
    """Parse a JSON Lines file; image paths are relative to the file's folder unless absolute.

    Lines naming the same image are merged into one record with all their captions, so that training
    draws one caption per image per epoch and evaluation scores against every reference of an image.
    A missing or malformed image or caption is kept as is and reported (or skipped) when read.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}; check the data source path")
    records: dict[str, Record] = {}
    lines: dict[str, list[int]] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            obj = json_object(line, where, '"image" and "caption" or "captions"')
            image = local_image(obj.get("image"), path.parent)  # None: skipped or an error when read
            captions = as_caption_list(obj["captions"] if "captions" in obj else obj.get("caption"))
            key = image if image is not None else where
            if key in records:
                merged = records[key]
                merged.captions = _list(merged.captions) + _list(captions)
                lines[key].append(lineno)
                merged.where = f"{path}:{','.join(map(str, lines[key][:5]))}{',...' if len(lines[key]) > 5 else ''}"
                continue
            if limit is not None and len(records) >= limit:
                continue  # later lines may still add captions to the images already taken
            image_id = obj.get("image_id", obj.get("id", obj.get("image")))
            records[key] = Record(image=image, captions=captions, image_id=str(image_id), where=where)
            lines[key] = [lineno]
    if not records:
        raise DataError(f"data file {path} holds no records; add JSON lines with image and caption")
    return CaptionRecords(list(records.values()))


def _list(captions: Any) -> list:
    """Captions as a list for merging; a malformed value stays in it, to be reported when read."""
    return captions if isinstance(captions, list) else [captions]
