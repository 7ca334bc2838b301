"""COCO captions: the official captions_*.json files and the Karpathy split file (dataset_coco.json)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..errors import DataError
from .base import CaptionRecords, Record


def read_json(path: Path) -> Any:
    """A JSON file's content; one-line DataError when missing or malformed."""
    if not path.is_file():
        raise DataError(f"data file not found: {path}; check the data source path")
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); download it again") from e


def find_image_dir(image_dir: str | Path | None, annotations: Path, guesses: list[Path]) -> Path:
    """The image folder: as given (from the working directory, then next to the annotations), else a guess."""
    if image_dir is not None:
        given = Path(image_dir).expanduser()
        tried = [given] if given.is_absolute() else [given, annotations.parent / given]
    else:
        tried = guesses
    for folder in tried:
        if folder.is_dir():
            return folder
    names = " or ".join(str(t) for t in tried)
    raise DataError(f"image folder not found (looked for {names}); set image_dir in the data source")


def _check_some_exist(records: list[Record], image_dir: Path, what: str) -> None:
    """Fail early when none of the first images exists: the image folder is almost surely wrong."""
    sample = records[:20]
    if sample and not any(Path(r.image).is_file() for r in sample):
        raise DataError(
            f"none of the first {len(sample)} {what} images exists (e.g. {sample[0].image}); "
            f"set image_dir to the folder that holds them (now {image_dir})"
        )


def read_coco(path: str | Path, image_dir: str | Path | None = None, limit: int | None = None) -> CaptionRecords:
    """An official COCO captions file (captions_train2017.json ...): one record per image with all its captions."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or "annotations" not in data:
        if isinstance(data, dict) and isinstance(data.get("images"), list) and data["images"] and (
            "sentences" in data["images"][0]
        ):
            raise DataError(f"{path} is a Karpathy split file; use kind: karpathy for it")
        raise DataError(f"{path} is not a COCO captions file (needs 'images' and 'annotations' lists)")
    captions: dict[Any, list[Any]] = defaultdict(list)
    for ann in data["annotations"]:
        if "caption" not in ann:
            raise DataError(f"{path}: annotations have no 'caption'; use a captions_*.json file, not instances_*")
        captions[ann["image_id"]].append(ann["caption"])
    # The official layout: annotations/captions_train2017.json next to train2017/
    folder = path.stem.removeprefix("captions_")
    root = find_image_dir(image_dir, path, [path.parent.parent / folder, path.parent / folder])
    records = []
    for image in data["images"]:
        if image["id"] not in captions:
            continue  # an image without captions can be neither trained on nor scored
        records.append(
            Record(
                image=str(root / image["file_name"]), captions=captions[image["id"]],
                image_id=str(image["id"]), where=f"{path.name} image {image['id']}",
            )
        )
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise DataError(f"{path} holds no captioned images")
    _check_some_exist(records, root, "COCO")
    return CaptionRecords(records)


def read_karpathy(
    path: str | Path, split: str = "train", image_dir: str | Path | None = None, limit: int | None = None
) -> CaptionRecords:
    """The Karpathy split file; split is one of train, restval, val, test or several joined by '+'."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path} is not a Karpathy split file (needs an 'images' list, as in dataset_coco.json)")
    wanted = set(split.split("+"))
    present = sorted({image.get("split") for image in data["images"]} - {None})
    unknown = wanted - set(present)
    if unknown:
        raise DataError(
            f"{path} has no split {'+'.join(sorted(unknown))!r}; its splits are {', '.join(present)} "
            "(join several with '+', e.g. train+restval)"
        )
    # COCO entries carry a filepath (train2014/val2014) under the COCO root; Flickr ones do not.
    root = find_image_dir(image_dir, path, [path.parent])
    records = []
    for image in data["images"]:
        if image.get("split") not in wanted:
            continue
        parts = [image["filepath"], image["filename"]] if image.get("filepath") else [image["filename"]]
        image_id = image.get("cocoid", image.get("imgid", image["filename"]))
        records.append(
            Record(
                image=str(root.joinpath(*parts)),
                captions=[s.get("raw") for s in image.get("sentences", [])],
                image_id=str(image_id), where=f"{path.name} image {image_id}",
            )
        )
        if limit is not None and len(records) >= limit:
            break
    _check_some_exist(records, root, f"Karpathy {split}")
    return CaptionRecords(records)
