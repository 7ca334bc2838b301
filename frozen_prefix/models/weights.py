"""Loading saved tensors (safetensors weights, torch state files) with one-line errors for missing or damaged files."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import FrozenPrefixError

DEFAULT_FIX = "restore it from a good copy or write it again"


class DamagedFileError(FrozenPrefixError):
    """A saved file is missing, truncated or corrupt; `path` and `reason` say which and how."""

    def __init__(self, path: str | Path, reason: str, fix: str = DEFAULT_FIX) -> None:
        self.path, self.reason, self.fix = Path(path), reason, fix
        super().__init__(f"{self.path} is damaged ({reason}); {fix}")


def short_reason(e: BaseException) -> str:
    """The exception as 'Type: first sentence', short enough for one line."""
    if isinstance(e, FileNotFoundError):
        return "file not found"
    lines = str(e).strip().splitlines()
    # torch's zip reader appends a paragraph of advice after the first sentence: keep only what went wrong.
    first = lines[0].split(". ")[0].rstrip(".") if lines else ""
    return f"{type(e).__name__}: {first[:120]}" if first else f"{type(e).__name__}: the file ends early"


def load_weights(path: str | Path, device: str = "cpu", *, fix: str = DEFAULT_FIX) -> dict[str, torch.Tensor]:
    """safetensors.torch.load_file, with a missing, truncated or corrupt file as one DamagedFileError line."""
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:  # OSError covers a missing file or a folder in its place
        raise DamagedFileError(path, short_reason(e), fix) from e


def load_state(path: str | Path, *, fix: str = DEFAULT_FIX) -> dict[str, Any]:
    """torch.load(weights_only=True) onto the CPU, with a missing, truncated or corrupt file as one line."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # no arbitrary pickles
    # Observed on truncated files: EOFError (empty), RuntimeError (zip reader), OSError (cut near the end);
    # UnpicklingError on garbage or on objects weights_only refuses.
    except (EOFError, RuntimeError, OSError, pickle.UnpicklingError) as e:
        raise DamagedFileError(path, short_reason(e), fix) from e
    if not isinstance(state, dict):
        raise DamagedFileError(path, f"holds a {type(state).__name__}, not a dict", fix)
    return state
