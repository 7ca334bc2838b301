"""Checkpoints of the trainable state: weights (safetensors), optimizer, scheduler, counters, RNG; atomic."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .errors import FrozenPrefixError
from .models.captioner import FrozenPrefixCaptioner

WEIGHTS = "trainable.safetensors"
STATE = "state.pt"
META = "meta.json"  # written last: its presence marks a complete checkpoint
_NAME = re.compile(r"^step_(\d+)$")


def rng_state() -> dict[str, Any]:
    """Every RNG the loop touches, in types that torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state() captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / META).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = checkpoint_dirs(run_dir)
    return found[-1] if found else None


def save_checkpoint(
    run_dir: str | Path,
    model: FrozenPrefixCaptioner,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict[str, Any],
    keep_last: int = 2,
) -> Path:
    """Write a checkpoint under a temporary name, then rename it into place; prune old ones after."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{trainer_state['step']:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(model.trainable_state_dict(), str(tmp / WEIGHTS))
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
         "trainer": trainer_state, "rng": rng_state()},
        tmp / STATE,
    )
    (tmp / META).write_text(json.dumps({"step": trainer_state["step"], "files": [WEIGHTS, STATE]}))
    for name in (WEIGHTS, STATE, META):
        _fsync(tmp / name)
    swap_in(tmp, final)
    for stale in checkpoint_dirs(run_dir)[:-keep_last]:
        shutil.rmtree(stale, ignore_errors=True)
    for leftover in root.glob(".tmp-*"):  # debris of writes killed earlier
        if leftover != tmp:
            shutil.rmtree(leftover, ignore_errors=True)
    return final


def swap_in(tmp: Path, final: Path) -> None:
    """Rename a finished folder into place (replacing one there), then fsync the parent so the rename is durable."""
    if final.exists():  # the same name saved again (e.g. after a resume): move the old one aside first
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync(final.parent)


def load_checkpoint(
    path: str | Path, model: FrozenPrefixCaptioner, optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None, restore_rng: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint into model (and optimizer/scheduler); return the trainer state."""
    path = Path(path)
    if not (path / META).is_file():
        raise FrozenPrefixError(f"{path} is not a complete checkpoint (no {META}); point train.resume at one")
    try:
        model.load_trainable_state_dict(load_file(str(path / WEIGHTS), device=str(model.device)))
    except RuntimeError as e:
        raise FrozenPrefixError(
            f"checkpoint {path} does not fit this model ({str(e).splitlines()[0][:120]}); "
            "resume with the config the run was started with"
        ) from None
    state = torch.load(path / STATE, map_location="cpu", weights_only=True)  # no arbitrary pickles
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        set_rng_state(state["rng"])
    return state["trainer"]
