"""Caption data: sources (shapes, jsonl, ...), skipping of bad records, sampling and collation."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any

from torch.utils.data import Subset

from ..config import SourceConfig
from ..errors import DataError
from .base import CaptionRecords, CaptionSource, Record, StreamSource, decode_record, pick_caption
from .collate import CaptionCollator, TrainCollator
from .conversations import ConversationRecords, read_conversations_jsonl
from .jsonl import read_jsonl
from .mixture import MixtureSource
from .sampler import EpochSampler
from .shapes import ShapesDataset
from .shapes_dialogue import ShapesDialogue
from .shapes_vqa import ShapesVQA
from .stream import EvalStream, TrainStream, handle_bad
from .vqa import VQARecords, read_vqa_jsonl, read_vqav2

log = logging.getLogger(__name__)

__all__ = [
    "CaptionCollator", "CaptionRecords", "CaptionSource", "ConversationRecords", "EpochSampler", "EvalExamples",
    "EvalStream", "MixtureSource", "Record", "ShapesDataset", "ShapesDialogue", "ShapesVQA", "StreamSource",
    "TrainCollator", "TrainExamples", "TrainStream", "VQARecords", "build_source", "build_train_source",
    "build_vqa_source", "eval_examples", "read_conversations_jsonl", "read_jsonl",
]


def _path(value: str | None, base_dir: str | Path | None) -> Path | None:
    """A config path, taken from base_dir when relative and not found as given."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if base_dir is not None and not path.is_absolute() and not path.exists():
        path = Path(base_dir) / path
    return path


def build_vqa_source(
    source: SourceConfig, base_dir: str | Path | None = None, size: int | None = None
) -> ShapesVQA | VQARecords:
    """The questions a config entry names: shapes (its questions for that split), a VQA .jsonl, or VQAv2 files."""
    size = source.size if size is None else size if source.size is None else min(size, source.size)
    if source.kind in ("shapes", "shapes_vqa"):
        return ShapesVQA(source.split, size, source.seed)
    if source.kind == "vqa":
        return read_vqa_jsonl(_path(source.path, base_dir), size)
    if source.kind == "vqav2":
        image_dir = _path(source.image_dir, base_dir)
        if image_dir is None:
            raise DataError("a vqav2 source needs image_dir (the COCO images folder); set it")
        return read_vqav2(_path(source.path, base_dir), _path(source.annotations, base_dir), image_dir, size)
    raise DataError(f"a {source.kind} source holds no questions; give shapes, vqa (.jsonl) or vqav2 data for VQA")


def build_train_source(
    train: SourceConfig | list[SourceConfig], base_dir: str | Path | None = None, mixture_size: int | None = None,
    seed: int = 0,
) -> Any:
    """Training data: captions, VQA questions or conversations from one source, or a weighted mixture of several."""
    sources = train if isinstance(train, list) else [train]
    built = [_any_source(s, base_dir) for s in sources]
    if len(built) == 1:
        return built[0]
    if any(isinstance(b, StreamSource) for b in built):
        raise DataError("a mixture reads map-style sources only; give streaming sources on their own")
    return MixtureSource(built, [s.weight for s in sources], mixture_size, seed)


def _any_source(source: SourceConfig, base_dir: str | Path | None) -> Any:
    """A source of any kind: captions, questions (shapes_vqa, vqa, vqav2) or conversations."""
    if source.kind in ("shapes_vqa", "vqa", "vqav2"):
        return build_vqa_source(source, base_dir)
    if source.kind == "shapes_dialogue":
        return ShapesDialogue(source.split, source.size, source.seed)
    if source.kind == "conversations":
        return read_conversations_jsonl(_path(source.path, base_dir), source.size, _path(source.image_dir, base_dir))
    return build_source(source, base_dir)


def build_source(source: SourceConfig, base_dir: str | Path | None = None) -> CaptionSource | StreamSource:
    """The caption source a config entry names; relative paths are taken from base_dir."""
    path = _path(source.path, base_dir)
    if source.kind in ("vqa", "vqav2", "shapes_vqa", "shapes_dialogue", "conversations"):
        raise DataError(
            f"a {source.kind} source holds questions or conversations, not captions; train on it, or evaluate it "
            "with eval.task=vqa / dialogue"
        )
    if source.kind == "shapes":
        return ShapesDataset(source.split, source.size, source.seed)
    if source.kind == "jsonl":
        return read_jsonl(path, source.size)
    from . import formats  # the heavier formats import optional libraries

    return formats.build(source, path)


class _Guarded:
    """Reads items from a source, turning bad records into None (skip) or one clear error."""

    def __init__(self, source: CaptionSource, bad_data: str) -> None:
        self.source, self.bad_data = source, bad_data

    def __len__(self) -> int:
        if isinstance(self.source, StreamSource):
            # A stream's length is unknown: it is read by TrainStream/EvalStream (and first_examples);
            # map-style readers of these examples (the validation-loss batches) see nothing.
            if not getattr(self, "_told", False):
                log.info("a streaming source has no length: the validation loss skips it")
                self._told = True
            return 0
        return len(self.source)

    def read(self, index: int) -> dict[str, Any] | DataError | None:
        """The item, None for a skipped bad record, or (in a DataLoader worker, bad_data=error) the error."""
        try:
            return self.source[index]
        except DataError as e:
            return handle_bad(e, self.bad_data, f"record {index}")


class TrainExamples(_Guarded):
    """Keys (image_index, caption_choice) -> one (image, caption) example."""

    def __init__(self, source: CaptionSource, bad_data: str, caption_sampling: str = "random") -> None:
        super().__init__(source, bad_data)
        self.caption_sampling = caption_sampling

    def num_captions(self) -> list[int] | int:
        """Per-image reference counts (for expanding all pairs), or the number of images."""
        if hasattr(self.source, "num_captions"):
            return [self.source.num_captions(i) for i in range(len(self.source))]
        return len(self.source)

    def length_key(self, key: tuple[int, int]) -> int | tuple[int, int]:
        """What grouping by length sorts on: the text's characters; in a mixture (source number, characters).

        Sorting a mixture by source first makes each batch one task: a batch of captions is not padded to the
        length of a conversation, which is ~4x longer.
        """
        if isinstance(self.source, MixtureSource):
            which, item = self.source.pick(key[0])
            return which, self._text_length(self.source.sources[which], item, key[1])
        return self._text_length(self.source, key[0], key[1])

    def _text_length(self, source: Any, index: int, choice: int) -> int:
        """Characters of the text item `index` trains on (its chosen caption, or question and answer, or turns)."""
        if hasattr(source, "text_length"):
            return source.text_length(index)
        captions = source.captions(index)
        caption = pick_caption(captions, choice, self.caption_sampling) if captions else ""
        return len(caption) if isinstance(caption, str) else 0  # a bad caption is reported when read

    def first_examples(self, n: int = 2) -> list[dict[str, Any] | None]:
        """The first n images with their first caption (bad ones as None, or raised), streams included."""
        if not isinstance(self.source, StreamSource):
            return [self[(i, 0)] for i in range(min(n, len(self.source)))]
        items: list[dict[str, Any] | None] = []
        for index, record in enumerate(itertools.islice(self.source.records(), n)):
            try:
                item = decode_record(record)
                items.append({**item, "caption": pick_caption(item["captions"], 0, self.caption_sampling)})
            except DataError as e:
                items.append(handle_bad(e, self.bad_data, f"record {index}"))
        return items

    def can_group_by_length(self) -> bool:
        """Whether the source can tell its texts' lengths without reading images."""
        return hasattr(self.source, "captions") or hasattr(self.source, "text_length")

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any] | DataError | None:
        index, choice = key
        item = self.read(index)
        if isinstance(item, dict):
            # The seed makes random augmentation a function of the key: identical after a resume, any workers.
            seed = (index * 1_000_003 + choice) % 2**31
            item = {**item, "seed": seed}
            if "captions" in item:  # questions and conversations carry their own targets
                item["caption"] = pick_caption(item["captions"], choice, self.caption_sampling)
        return item


class EvalExamples(_Guarded):
    """Index -> one image with all its references (no target caption)."""

    def __getitem__(self, index: int) -> dict[str, Any] | DataError | None:
        return self.read(index)


def eval_examples(
    source: CaptionSource | StreamSource, bad_data: str, max_images: int | None = None
) -> EvalExamples | EvalStream | Subset:
    """The images of a source with all their references, at most max_images: map-style or streamed."""
    if isinstance(source, StreamSource):
        return EvalStream(source, bad_data, max_images)
    examples = EvalExamples(source, bad_data)
    if max_images is not None and len(examples) > max_images:
        return Subset(examples, range(max_images))
    return examples
