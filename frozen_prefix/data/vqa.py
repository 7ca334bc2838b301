"""VQA sources: JSON Lines questions and the official VQAv2 / OK-VQA files; images are decoded on access.

Item i is {"image": RGB PIL image, "question": str, "answers": [str, ...], "question_id", "image_id": str,
"question_type": str | None, "answer_type": str | None}. Answers feed `frozen_prefix.metrics.vqa`, whose
official formula expects the 10 annotator answers of VQAv2; questions without answers (test-dev) get [].
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..images import load_image
from .coco import find_image_dir, read_json
from .jsonl import json_object, local_image

# A single "answer" is repeated as if 10 annotators gave it: with one copy the official leave-one-out
# formula has nothing left to match and scores every prediction 0.
ANSWER_COPIES = 10


@dataclass
class VQARecord:
    """One question about one image, before the image is read."""

    image: str | None  # the image path; None when the record names none (reported when read)
    question: Any
    answers: Any
    question_id: Any
    image_id: str
    question_type: str | None = None
    answer_type: str | None = None
    where: str = ""  # file and line or question id, for error messages


class VQARecords:
    """A list of VQA records served as a map-style source; images are decoded on access."""

    def __init__(self, records: list[VQARecord]) -> None:
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return decode_vqa_record(self.records[index])

    def image_key(self, index: int) -> str | None:
        """The image path of item `index`, without reading the image (the same key for every question on it)."""
        return self.records[index].image

    def text_length(self, index: int) -> int:
        """Characters of record `index`'s question and answers, unchecked (for grouping by length)."""
        record = self.records[index]
        return len(str(record.question)) + len(str(record.answers))

    def without_image(self, index: int) -> dict[str, Any]:
        """Item `index` checked but without its image: question, answers, ids and types."""
        return check_fields(self.records[index])


def check_fields(record: VQARecord) -> dict[str, Any]:
    """A record's question and answers checked, with its ids and types; DataError naming the record if bad."""
    if not isinstance(record.question, str) or not record.question.strip():
        raise DataError(f'{record.where}: "question" must be a non-empty string, got {_short(record.question)}; '
                        "fix or remove the record")
    answers = record.answers
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise DataError(f'{record.where}: "answers" must be a list of strings, got {_short(answers)}; '
                        "fix or remove the record")
    return {
        "question": record.question.strip(), "answers": list(answers), "question_id": record.question_id,
        "image_id": record.image_id, "question_type": record.question_type, "answer_type": record.answer_type,
    }


def decode_vqa_record(record: VQARecord) -> dict[str, Any]:
    """A record's fields checked and its image decoded; one-line DataError naming the record and the image."""
    fields = check_fields(record)
    if record.image is None:
        raise DataError(f'{record.where}: no image; give "image" as a path to an image file')
    try:
        image = load_image(record.image)
    except DataError as e:
        raise DataError(f"{record.where}: {e}") from e
    return {"image": image, **fields}


def _short(value: Any) -> str:
    """A value for an error message, cut to one short line."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------- JSON Lines


def read_vqa_jsonl(path: str | Path, size: int | None = None) -> VQARecords:
    """One question per line: {"image", "question", "answers": [...] | "answer": str, optional ids and types}.

    Image paths are relative to the file's folder unless absolute. A single "answer" counts as 10 identical
    annotator answers. question_id defaults to the line number, image_id to the "image" value. Only the
    first `size` questions are read when size is given. Bad fields are reported when the item is read.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}; check the data source path")
    records = []
    try:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if size is not None and len(records) >= size:
                    break
                if line.strip():
                    records.append(_jsonl_record(line, path, lineno))
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason}); save it as UTF-8") from e
    if not records:
        raise DataError(f"data file {path} holds no questions; add JSON lines with image, question and answers")
    return VQARecords(records)


def _jsonl_record(line: str, path: Path, lineno: int) -> VQARecord:
    """One JSON line as a record; DataError naming file:line when the line is not a JSON object."""
    where = f"{path}:{lineno}"
    obj = json_object(line, where, '"image", "question" and "answers"')
    image = local_image(obj.get("image"), path.parent)  # None: reported when the item is read
    return VQARecord(
        image=image, question=obj.get("question"), answers=_jsonl_answers(obj),
        question_id=obj.get("question_id", lineno), image_id=str(obj.get("image_id", obj.get("image"))),
        question_type=obj.get("question_type"), answer_type=obj.get("answer_type"), where=where,
    )


def _jsonl_answers(obj: dict[str, Any]) -> Any:
    """The answers of a line: "answers" as given, a string "answer" repeated, or [] when there are none."""
    if "answers" in obj:
        return obj["answers"]
    answer = obj.get("answer")
    if answer is None:
        return []
    return [answer] * ANSWER_COPIES if isinstance(answer, str) else answer  # a bad value is reported when read


# ---------------------------------------------------------------- VQAv2 / OK-VQA


def read_vqav2(
    questions_json: str | Path, annotations_json: str | Path | None, image_dir: str | Path, size: int | None = None
) -> VQARecords:
    """The official VQAv2 (or OK-VQA) questions file, with its annotations file if given (test-dev has none).

    Images are image_dir/COCO_<data_subtype>_<image_id:012d>.jpg, or <image_id:012d>.jpg where only that
    exists (COCO 2017 folders). Only the first `size` questions are read when size is given.
    """
    questions_path = Path(questions_json)
    data = read_json(questions_path)
    questions = _list_field(data, "questions", questions_path, "a VQA questions file (*_questions.json)")
    annotations = None
    if annotations_json is not None:
        annotations = _annotations_by_question(Path(annotations_json))
    root = find_image_dir(image_dir, questions_path, [])
    subtype = _image_subtype(data, questions_path)
    paths: dict[Any, str] = {}  # image id -> path: one lookup per image, not per question
    records = []
    for number, question in enumerate(questions[:size] if size is not None else questions):
        record = _vqav2_record(question, number, questions_path, annotations, annotations_json)
        if record.image_id not in paths:
            paths[record.image_id] = _image_path(root, subtype, record.image_id, record.where)
        record.image = paths[record.image_id]
        records.append(record)
    if not records:
        raise DataError(f"{questions_path} holds no questions; check that it is the right file")
    _check_some_exist(records, root)
    return VQARecords(records)


def _list_field(data: Any, key: str, path: Path, what: str) -> list[Any]:
    """data[key] as a list, or a DataError saying the file is not `what`."""
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise DataError(f"{path} has no {key!r} list; give {what}")
    return data[key]


def _annotations_by_question(path: Path) -> dict[Any, dict[str, Any]]:
    """The annotations file indexed by question id, each entry checked."""
    annotations = _list_field(read_json(path), "annotations", path, "a VQA annotations file (*_annotations.json)")
    by_question = {}
    for number, ann in enumerate(annotations):
        _check_annotation(ann, number, path)
        by_question[ann["question_id"]] = ann
    return by_question


def _check_annotation(ann: Any, number: int, path: Path) -> None:
    """An annotation has a question id and answers as [{"answer": str}, ...], or a DataError names it."""
    answers = ann.get("answers") if isinstance(ann, dict) else None
    good = isinstance(answers, list) and all(isinstance(a, dict) and isinstance(a.get("answer"), str) for a in answers)
    if not good or "question_id" not in ann:
        raise DataError(
            f'{path}: annotation #{number} needs "question_id" and "answers" as [{{"answer": str}}, ...]; '
            "use the official annotations file"
        )


def _vqav2_record(
    question: Any, number: int, path: Path, annotations: dict[Any, dict[str, Any]] | None, annotations_path: Any
) -> VQARecord:
    """One entry of the questions file with its annotation (image path still to be set)."""
    if not isinstance(question, dict) or not all(k in question for k in ("image_id", "question", "question_id")):
        raise DataError(
            f'{path}: question #{number} needs "image_id", "question" and "question_id"; '
            "use the official questions file"
        )
    question_id = question["question_id"]
    ann: dict[str, Any] = {}
    if annotations is not None:
        if question_id not in annotations:
            raise DataError(
                f"{annotations_path} has no annotation for question {question_id} of {path.name}; "
                "give the annotations file of the same split"
            )
        ann = annotations[question_id]
    return VQARecord(
        image=None, question=question["question"], answers=[a["answer"] for a in ann.get("answers", [])],
        question_id=question_id, image_id=str(question["image_id"]), question_type=ann.get("question_type"),
        answer_type=ann.get("answer_type"), where=f"{path.name} question {question_id}",
    )


def _image_subtype(data: dict[str, Any], path: Path) -> str | None:
    """The COCO folder name in image file names (val2014): data_subtype, else guessed from the file name."""
    subtype = data.get("data_subtype")
    if not isinstance(subtype, str):
        found = re.search(r"(train|val|test-dev|test)20\d\d", path.name)
        subtype = found.group(0) if found else None
    # test-dev questions are about test images: COCO_test2015_*.jpg
    return subtype.replace("test-dev", "test") if subtype else None


def _image_path(root: Path, subtype: str | None, image_id: str, where: str) -> str:
    """The image file of an image id: the COCO 2014 name, or the bare 12-digit name when only that exists."""
    try:
        number = int(image_id)
    except ValueError as e:
        raise DataError(f"{where}: image_id {image_id!r} is not a number; use the official questions file") from e
    bare = root / f"{number:012d}.jpg"
    if subtype is None:
        return str(bare)
    coco = root / f"COCO_{subtype}_{number:012d}.jpg"
    return str(bare if not coco.is_file() and bare.is_file() else coco)


def _check_some_exist(records: list[VQARecord], root: Path) -> None:
    """Fail early when none of the first images exists: the image folder is almost surely wrong."""
    sample = list(dict.fromkeys(r.image for r in records[:100]))[:20]
    if not any(Path(image).is_file() for image in sample if image):
        raise DataError(
            f"none of the first {len(sample)} VQA images exists (e.g. {sample[0]}); "
            f"set image_dir to the folder that holds them (now {root})"
        )
