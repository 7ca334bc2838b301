"""timm checkpoint files (.safetensors, .pth, .bin) loaded into an encoder strictly, a mismatch named in one line."""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from timm.models import load_checkpoint
from torch import nn

from ..errors import FrozenPrefixError
from .weights import DamagedFileError, short_reason

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
REREAD = "give a complete timm checkpoint file"
SHOWN = 3  # keys named per kind of mismatch: enough to recognise the network, short enough for one line


def load_timm_checkpoint(model: nn.Module, path: str | Path, option: str = "model.encoder_weights") -> None:
    """timm.models.load_checkpoint(strict, weights_only), checked before a single weight is copied.

    The classifier a checkpoint holds and the model lacks (built with num_classes=0) is dropped, as
    timm.create_model(pretrained=True, num_classes=0) drops it; everything else must match, key for key and
    shape for shape. (create_model with pretrained_cfg_overlay=dict(file=...) and num_classes=0 loads non-strictly
    once the classifier differs, and only logs missing keys: so not that path.)
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FrozenPrefixError(f"{option}: {path} does not exist; give a timm checkpoint file or a run's model folder")
    if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise FrozenPrefixError(
            f"{option}: {path} is not a checkpoint file ({', '.join(CHECKPOINT_SUFFIXES)}) nor a run's model folder"
        )

    def fit(state: dict[str, Any], target: nn.Module) -> dict[str, Any]:
        return checked_state(state, target, path, option)

    try:
        # weights_only: a .pth/.bin is unpickled with torch's allow-list only, never running code from the file
        load_checkpoint(model, str(path), strict=True, filter_fn=fit, weights_only=True)
    except FrozenPrefixError:
        raise
    # Truncated or corrupt: SafetensorError (safetensors), RuntimeError / EOFError / OSError (torch's zip reader),
    # UnpicklingError (garbage); AttributeError / TypeError: the file holds something other than a mapping.
    except (SafetensorError, RuntimeError, EOFError, OSError, pickle.UnpicklingError, AttributeError, TypeError) as e:
        raise _unreadable(e, path, option) from e
    log.info("%s: %s loaded from %s", option, architecture(model), path)


def checked_state(state: dict[str, Any], model: nn.Module, path: Path, option: str) -> dict[str, torch.Tensor]:
    """The state dict to load: the unused classifier dropped; a FrozenPrefixError unless it fits model exactly."""
    own = model.state_dict()
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise DamagedFileError(path, f"{bad[0]!r} holds a {type(state[bad[0]]).__name__}, not a tensor",
                               "give a timm checkpoint (a state dict of tensors)")
    state = {k: v for k, v in state.items() if k in own or k not in _classifier_keys(model)}
    for key in own.keys() - state.keys():
        if key.endswith("num_batches_tracked"):  # older checkpoints lack this counter; BatchNorm does not use it
            state[key] = own[key]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and state[k].shape != own[k].shape]
    if not (missing or unexpected or shapes):
        return state
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing: {_some(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected: {_some(unexpected)}")
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} of another shape: {k} {tuple(state[k].shape)} in the file, "
                     f"{tuple(own[k].shape)} in the model")
    name, found = architecture(model), "; ".join(parts)
    if len(missing) > len(own) / 2:  # most of the model absent: the file is for some other network
        raise FrozenPrefixError(
            f"{option}: {path} holds the weights of another network, not model.encoder={name} ({found}); "
            f"set model.encoder to the network the file is for, or give a checkpoint of {name}"
        )
    raise FrozenPrefixError(
        f"{option}: {path} does not fit model.encoder={name} ({found}); give a checkpoint of that timm model "
        "(with its model.encoder_kwargs)"
    )


def _unreadable(e: BaseException, path: Path, option: str) -> FrozenPrefixError:
    """The one line for a file that cannot be read: pickled code refused, or a damaged file."""
    # timm turns torch's UnpicklingError into a RuntimeError naming the globals the file would have run, if any
    if isinstance(e.__cause__, pickle.UnpicklingError):
        found = re.search(r"Unsupported globals: (.+?)\. ", str(e))
        if found:
            return FrozenPrefixError(
                f"{option}: {path} holds pickled objects ({found[1]}) that torch.load(weights_only=True) refuses "
                "to run; save the state dict alone (torch.save(model.state_dict(), ...) or safetensors)"
            )
        return DamagedFileError(path, f"not a torch checkpoint: {short_reason(e.__cause__)}", REREAD)
    return DamagedFileError(path, short_reason(e), REREAD)


def architecture(model: nn.Module) -> str:
    """The timm model name a module was built as (its class name for modules timm did not build)."""
    return getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__


def _classifier_keys(model: nn.Module) -> set[str]:
    """The classifier's weight names timm's pretrained config lists (what num_classes=0 leaves out)."""
    names = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    names = (names,) if isinstance(names, str) else names
    return {f"{name}.{p}" for name in names for p in ("weight", "bias")}


def _some(keys: list[str]) -> str:
    """The first few keys (BatchNorm's step counters last: they say little), and how many more."""
    keys = sorted(keys, key=lambda k: k.endswith("num_batches_tracked"))  # stable: otherwise in the file's order
    more = f", ... {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more
