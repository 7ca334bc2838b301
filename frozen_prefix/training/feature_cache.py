"""data.feature_cache: a frozen encoder's output per training image, computed once, reused in later epochs.

Each training image's features (what the projection reads: the pooled vector or the spatial map) are kept in
memory or in one safetensors file per image, under a folder named by a digest of everything they depend on:
the training source (its config and, for files, their size and time), the encoder's name, arguments and weights
(every tensor of its state, BatchNorm statistics included), the image transform and the precision. Change any of
them and the digest, so the folder, changes: stale features are never read. On a hit the data loader reads only
the captions (no image drawn or decoded, no transform) and the step skips the encoder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..captioner import FrozenPrefixCaptioner
from ..config import Config, SourceConfig
from ..data import MixtureSource, StreamSource, TrainExamples
from ..data.base import check_captions, pick_caption
from ..data.layout import Batch
from ..errors import FrozenPrefixError
from ..models.precision import resolve_precision

log = logging.getLogger(__name__)

FORMAT = 1  # bump when what is stored changes


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of named tensors: names, dtypes, shapes and values."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _source_identity(source: SourceConfig) -> dict[str, Any]:
    """A source's config, plus the size and time of the files it names (a rewritten file is another source)."""
    identity = dataclasses.asdict(source)
    for key in ("path", "annotations", "image_dir"):
        path = Path(identity[key]).expanduser() if identity[key] else None
        if path is not None and path.exists():
            stat = path.stat()
            identity[f"{key}_stamp"] = [stat.st_size, stat.st_mtime_ns]
    return identity


def cache_identity(model: FrozenPrefixCaptioner, config: Config, transform: Callable) -> dict[str, Any]:
    """Everything the cached features depend on; its digest names the cache folder."""
    dc, mc = config.data, config.model
    sources = dc.train if isinstance(dc.train, list) else [dc.train]
    return {
        "format": FORMAT,
        "sources": [_source_identity(s) for s in sources],
        "mixture": [dc.mixture_size, config.train.seed] if len(sources) > 1 else None,  # mixture draws are seeded
        "encoder": mc.encoder,
        "encoder_kwargs": mc.encoder_kwargs,
        "encoder_weights": tensor_digest(model.encoder.state_dict()),
        "spatial": model.projection.spatial,
        "transform": repr(transform),
        "image_config": {k: repr(v) for k, v in sorted(model.image_config.items())},
        "blank_images": dc.blank_images,
        "precision": resolve_precision(model.device, config.train.precision),  # what auto chose here
        "device": model.device.type,
    }


class FeatureCache:
    """Example index -> its image's encoder features, in memory or one safetensors file per image (atomic writes)."""

    def __init__(self, kind: str, identity: dict[str, Any], folder: str | Path | None = None) -> None:
        self.kind, self.identity = kind, identity
        self.digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:20]
        self.memory: dict[int, torch.Tensor] = {}
        self.folder = Path(folder) / self.digest if kind == "disk" and folder is not None else None
        if kind == "disk":
            if self.folder is None:
                raise FrozenPrefixError("data.feature_cache=disk needs a folder; set data.feature_cache_dir")
            self.folder.mkdir(parents=True, exist_ok=True)
            _write_atomic(self.folder / "key.json", json.dumps(identity, indent=2, default=str).encode())

    def path(self, key: int) -> Path:
        """The file of one image's features (a thousand files per subfolder, not 100,000 in one)."""
        assert self.folder is not None
        return self.folder / f"{key // 1000:05d}" / f"{key}.safetensors"

    def get(self, key: int) -> torch.Tensor | None:
        """The cached features of an image, or None."""
        if self.kind == "memory":
            return self.memory.get(key)
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            return load_file(str(path))["features"]
        except (SafetensorError, OSError, KeyError):  # a damaged file is a miss: recomputed and rewritten
            return None

    def put(self, key: int, features: torch.Tensor) -> None:
        """Keep an image's features (a CPU copy, detached)."""
        features = features.detach().to("cpu").contiguous().clone()
        if self.kind == "memory":
            self.memory[key] = features
            return
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({"features": features}, str(tmp))
        os.replace(tmp, path)

    def model_inputs(
        self, model: FrozenPrefixCaptioner, batch: Batch, device: torch.device, amp: Any
    ) -> dict[str, torch.Tensor | None]:
        """The forward's inputs with `features` for every image: cached ones, and the misses computed and kept."""
        inputs = batch.model_inputs(device)
        cached = batch.cached
        if cached is None:  # a batch the cache never saw (the dry run's)
            return inputs
        computed = iter(())
        if not all(cached.hits):
            with torch.no_grad(), amp:  # the encoder is frozen: nothing to differentiate
                fresh = model.image_features(inputs["pixel_values"])
            misses = [key for key, hit in zip(cached.keys, cached.hits, strict=True) if not hit]
            for key, features in zip(misses, fresh, strict=True):
                self.put(key, features)
            computed = iter(fresh)
        held = iter(cached.features.to(device) if cached.features is not None else ())
        features = [next(held) if hit else next(computed) for hit in cached.hits]
        return {**inputs, "pixel_values": None, "features": torch.stack(features)}


class CachedExamples:
    """TrainExamples whose items, for images the cache holds, carry the features instead of the image.

    On a hit only the captions are read (no image drawn or decoded, no transform); on a miss the item is the
    usual one with its cache key, and the step stores the features it computes. With DataLoader workers a
    memory cache is what the workers were forked with (the previous epochs'); a disk cache is shared.
    """

    def __init__(self, examples: TrainExamples, cache: FeatureCache) -> None:
        self.examples, self.cache = examples, cache

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("examples", "cache"):  # unpickling: not yet set
            raise AttributeError(name)
        return getattr(self.examples, name)  # source, num_captions, length_key, first_examples, ...

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any] | Exception | None:
        index, choice = key
        features = self.cache.get(index)
        if features is None:
            item = self.examples[key]
            return {**item, "cache_key": index} if isinstance(item, dict) else item
        captions = check_captions(self.examples.source.captions(index), f"record {index}")  # stripped, as decoded
        caption = pick_caption(captions, choice, self.examples.caption_sampling)
        return {"captions": captions, "caption": caption, "image_id": f"cached-{index}", "features": features,
                "cache_key": index}


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _cacheable(source: Any) -> bool:
    """Map-style caption sources whose captions can be read without the image."""
    if isinstance(source, MixtureSource):
        return all(_cacheable(s) for s in source.sources)
    return not isinstance(source, StreamSource) and hasattr(source, "captions")


def build_feature_cache(
    model: FrozenPrefixCaptioner, config: Config, transform: Callable, source: Any
) -> FeatureCache | None:
    """The cache data.feature_cache asks for (None for none), refused in one line where it cannot be right."""
    dc = config.data
    if dc.feature_cache == "none":
        return None
    if not config.model.freeze_encoder:
        raise FrozenPrefixError(
            f"data.feature_cache={dc.feature_cache} needs a frozen encoder; set model.freeze_encoder=true"
        )
    if dc.augment:
        raise FrozenPrefixError(
            f"data.feature_cache={dc.feature_cache}: data.augment=true gives other features every epoch; "
            "set data.augment=false or data.feature_cache=none"
        )
    if not _cacheable(source):
        raise FrozenPrefixError(
            f"data.feature_cache={dc.feature_cache} works with map-style caption sources (shapes, jsonl, coco, hf "
            "without streaming), not streams, questions or conversations; set data.feature_cache=none"
        )
    folder = dc.feature_cache_dir or str(Path(config.train.output_dir) / "feature_cache")
    cache = FeatureCache(dc.feature_cache, cache_identity(model, config, transform), folder)
    where = f" in {cache.folder}" if cache.folder is not None else " in memory"
    log.info("feature cache %s%s", cache.digest, where)
    return cache
