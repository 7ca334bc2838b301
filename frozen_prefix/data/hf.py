"""Hugging Face datasets as caption sources: hub names, local folders (imagefolder), saved data sets, tar shards."""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from braceexpand import braceexpand
from torch.utils.data import get_worker_info

from ..config import SourceConfig
from ..errors import DataError
from .base import Record, StreamSource, as_caption_list, decode_record

log = logging.getLogger(__name__)


def datasets_errors() -> tuple[type[BaseException], ...]:
    """What reading a data set can raise: I/O and value errors, datasets' and pyarrow's own error types."""
    import pyarrow.lib
    from datasets.exceptions import DatasetsError

    return (OSError, ValueError, KeyError, TypeError, RuntimeError, DatasetsError, pyarrow.lib.ArrowException)

SHUFFLE_BUFFER = 1000  # rows held to shuffle a stream: enough to mix neighbouring shards, small in memory
IMAGE_NAMES = ("image", "img", "jpg", "jpeg", "png", "webp")
CAPTION_NAMES = ("caption", "captions", "txt", "text", "sentences")
ID_NAMES = ("image_id", "cocoid", "imgid", "__key__")
FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json", ".arrow": "arrow"}


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def load_hf(source: SourceConfig, path: Path | None) -> Any:
    """A datasets.Dataset (IterableDataset when streaming) from a hub name, local folder or file, or saved set."""
    import datasets

    target = str(path) if path is not None and path.exists() else source.path
    try:
        if path is not None and path.is_dir() and _is_saved(path):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if source.split not in loaded:
                    raise DataError(
                        f"{path} has no split {source.split!r}; its splits are {', '.join(loaded)}; set split"
                    )
                loaded = loaded[source.split]
            return loaded.to_iterable_dataset() if source.streaming else loaded
        kwargs: dict[str, Any] = {"split": source.split, "streaming": source.streaming}
        if source.name is not None:
            kwargs["name"] = source.name
        if source.num_proc and not source.streaming:
            kwargs["num_proc"] = source.num_proc  # parallel preparation of the on-disk cache
        if path is not None and path.is_file():
            builder = FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise DataError(f"{path}: cannot read a {path.suffix} file as a data set; give a folder or a hub name")
            return datasets.load_dataset(builder, data_files={source.split: [str(path)]}, **kwargs)
        # A folder of images with metadata.jsonl/csv is read by the "imagefolder" builder, a hub name from the hub.
        return datasets.load_dataset(target, **kwargs)
    except DataError:
        raise
    except datasets_errors() as e:  # the user needs one line
        raise DataError(
            f"cannot load the Hugging Face data set {target!r} (split {source.split!r}): {_one_line(e)}; "
            "check path, name and split of the data source"
        ) from e


def _is_saved(folder: Path) -> bool:
    """A folder written by save_to_disk (a Dataset or a DatasetDict)."""
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def expand_shards(pattern: str) -> list[str]:
    """Tar shards from a folder, a glob, or a brace range as in webdataset ('data/{00000..00099}.tar')."""
    if "://" in pattern:
        return [pattern]  # remote (hf://, https://): datasets resolves it
    path = Path(pattern).expanduser()
    if path.is_dir():
        return sorted(str(p) for p in path.glob("*.tar"))
    files: list[str] = []
    # escape=False: a backslash in a path is a character, as it was before braceexpand
    for expanded in braceexpand(str(path), escape=False):
        if glob.has_magic(expanded):
            files += sorted(glob.glob(expanded))
        elif Path(expanded).is_file():
            files.append(expanded)
    return files


def load_webdataset(source: SourceConfig, path: Path | None) -> Any:
    """Tar shards through datasets' own "webdataset" builder (streaming reads them without a cache copy)."""
    import datasets

    files = expand_shards(str(path if path is not None and path.exists() else source.path))
    if not files:
        raise DataError(f"no tar shards match {source.path!r}; give a folder, a glob or a {{000..099}} range")
    kwargs: dict[str, Any] = {"streaming": source.streaming}
    if source.num_proc and not source.streaming:
        kwargs["num_proc"] = source.num_proc
    try:
        return datasets.load_dataset("webdataset", data_files={"train": files}, split="train", **kwargs)
    except datasets_errors() as e:  # the user needs one line
        raise DataError(
            f"cannot read the tar shards {source.path!r}: {_one_line(e)}; check that they are tar files"
        ) from e


def resolve_columns(dataset: Any, source: SourceConfig, label: str) -> tuple[str, str]:
    """The image and caption columns; a column left at its default name falls back to a usual one."""
    import datasets

    features = dataset.features
    if features is None:
        return source.image_column, source.caption_column  # unknown until read: trust the config
    columns = list(features)

    def pick(wanted: str, default: str, names: tuple[str, ...], what: str) -> str:
        if wanted in columns:
            return wanted
        if wanted == default:
            images = [c for c, f in features.items() if isinstance(f, datasets.Image)] if what == "image" else []
            found = images if len(images) == 1 else [n for n in names if n in columns]
            if found:
                log.info("%s: reading %ss from column %r", label, what, found[0])
                return found[0]
        raise DataError(
            f"{label}: no {what} column {wanted!r}; its columns are {', '.join(columns)}; "
            f"set {what}_column in the data source"
        )

    return pick(source.image_column, "image", IMAGE_NAMES, "image"), pick(
        source.caption_column, "caption", CAPTION_NAMES, "caption"
    )


def undecoded(dataset: Any, column: str) -> Any:
    """Keep images as {"bytes", "path"} so that load_image decodes them (EXIF, modes, one-line errors)."""
    import datasets

    feature = (dataset.features or {}).get(column)
    if isinstance(feature, datasets.Image) and feature.decode:
        return dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


class _Rows:
    """Turns rows of a Hugging Face data set into records: one row is one image with its captions."""

    def __init__(self, dataset: Any, source: SourceConfig, label: str, folder: Path | None) -> None:
        self.image_column, self.caption_column = resolve_columns(dataset, source, label)
        self.dataset = undecoded(dataset, self.image_column)
        self.label, self.folder = label, folder
        columns = list(self.dataset.features or [])
        self.id_column = next((c for c in ID_NAMES if c in columns), None)

    def record(self, row: dict[str, Any], index: int) -> Record:
        """The record of one row; image ids from an id column, else the image file, else the row number."""
        where = f"{row['__url__']}:{row.get('__key__')}" if "__url__" in row else f"{self.label} row {index}"
        image = row.get(self.image_column)
        file = None  # the image's own file, when it is one (not bytes held in the data set)
        if isinstance(image, dict) and "__url__" in row and image.get("bytes") is not None:
            image = {**image, "path": f"{row['__url__']}:{image.get('path')}"}  # name the shard in errors
        elif isinstance(image, dict) and image.get("bytes") is None:
            file = image.get("path")
        elif isinstance(image, str):
            if self.folder is not None and not Path(image).is_absolute():
                image = str(self.folder / image)  # relative paths in a local data set: from its folder
            file = image
        if self.id_column:
            image_id = str(row[self.id_column])
        elif file:  # e.g. imagefolder: the file's path inside the folder, as JSON Lines ids are
            image_id = os.path.relpath(file, self.folder) if self.folder and _inside(file, self.folder) else file
        else:
            image_id = f"{self.label}#{index}"
        captions = as_caption_list(row.get(self.caption_column))
        return Record(image=image, captions=captions, image_id=image_id, where=where)


def _inside(file: str, folder: Path) -> bool:
    return Path(file).resolve().is_relative_to(folder.resolve())


class HFRows(_Rows):
    """A map-style caption source over a datasets.Dataset; images are decoded on access."""

    def __init__(self, dataset: Any, source: SourceConfig, label: str, folder: Path | None = None) -> None:
        if source.size is not None and source.size < len(dataset):
            dataset = dataset.select(range(source.size))
        super().__init__(dataset, source, label, folder)
        self._captions: list[Any] | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def _caption_column(self) -> list[Any]:
        if self._captions is None:  # one columnar read, never the images
            self._captions = [as_caption_list(c) for c in self.dataset.select_columns([self.caption_column])[
                self.caption_column
            ]]
        return self._captions

    def captions(self, index: int) -> list[str]:
        """The references of row `index` as given (unchecked), without reading its image."""
        captions = self._caption_column()[index]
        return captions if isinstance(captions, list) else [str(captions)]

    def num_captions(self, index: int) -> int:
        """How many references row `index` has (at least 1, so that a bad row is visited and counted)."""
        return max(len(self.captions(index)), 1)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return decode_record(self.record(self.dataset[index], index))


class HFStream(_Rows, StreamSource):
    """A streaming caption source over a datasets.IterableDataset (data sets that do not fit on disk)."""

    def __init__(self, dataset: Any, source: SourceConfig, label: str, folder: Path | None = None) -> None:
        super().__init__(dataset, source, label, folder)
        self.size = source.size

    def records(self, seed: int | None = None, epoch: int = 0) -> Iterator[Record]:
        """Rows in stream order, or shuffled by (seed, epoch): shard order plus a buffer of SHUFFLE_BUFFER rows."""
        dataset = self.dataset
        if seed is not None:
            dataset = dataset.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER)
            dataset.set_epoch(epoch)
        if self.size is not None:
            dataset = dataset.take(self.size)
        if get_worker_info() is not None:
            import fsspec.asyn

            fsspec.asyn.reset_lock()  # as datasets does in workers: a lock inherited from the parent can hang
        # .iter() rather than iter(): inside a DataLoader worker, iter() would hand each worker only some
        # shards; the caller shards by example instead (even shares, exact resume).
        rows = dataset.iter(batch_size=64)
        index = 0
        while True:
            try:
                batch = next(rows)
            except StopIteration:
                return
            except datasets_errors() as e:  # a broken shard: say which data set, in one line
                raise DataError(f"cannot read {self.label} after {index} rows: {_one_line(e)}") from e
            for row in (dict(zip(batch, values)) for values in zip(*batch.values())):
                yield self.record(row, index)
                index += 1


def build_hf(source: SourceConfig, path: Path | None) -> HFRows | HFStream:
    """A caption source of kind hf or webdataset."""
    loaded = load_webdataset(source, path) if source.kind == "webdataset" else load_hf(source, path)
    label = f"{source.kind}:{source.path}"
    folder = path if path is not None and path.is_dir() else path.parent if path is not None and path.exists() else None
    if source.streaming:
        return HFStream(loaded, source, label, folder)
    return HFRows(loaded, source, label, folder)
