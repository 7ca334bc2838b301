"""Checkpoints of the trainable state: weights (safetensors), optimizer, scheduler, counters, RNG; atomic."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from ..captioner import FrozenPrefixCaptioner
from ..errors import FrozenPrefixError
from ..models.weights import DamagedFileError, load_state, load_weights
from ..parallel.distributed import rank_and_world
from ..parallel.sharding import shard_like, shard_optimizer_state
from .ema import WeightAverage

log = logging.getLogger(__name__)

WEIGHTS = "trainable.safetensors"
EMA_WEIGHTS = "ema.safetensors"  # train.ema_decay > 0: the average of the trainable weights, fp32
STATE = "state.pt"
META = "meta.json"  # written last: its presence marks a complete checkpoint
STATE_KEYS = ("optimizer", "scheduler", "trainer", "rng")
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
    weights: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
    rank_rngs: list[dict[str, Any]] | None = None,
    ema: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint under a temporary name, then rename it into place; prune old ones after.

    Under FSDP the caller passes the gathered `weights` and `optimizer_state` (a collective every rank joins);
    under torchrun, `rank_rngs` holds every rank's RNG state, so a resume at the same world size is exact.
    `ema` (train.ema_decay > 0, whole tensors) is written beside the weights.
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{trainer_state['step']:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(model.trainable_state_dict() if weights is None else weights, str(tmp / WEIGHTS))
    state = {
        "optimizer": optimizer.state_dict() if optimizer_state is None else optimizer_state,
        "scheduler": scheduler.state_dict(), "trainer": trainer_state, "rng": rng_state(),
    }
    if rank_rngs is not None:
        state["rng_ranks"] = rank_rngs
    torch.save(state, tmp / STATE)
    files = [WEIGHTS, STATE]
    if ema is not None:
        save_file(ema, str(tmp / EMA_WEIGHTS))
        files.append(EMA_WEIGHTS)
    (tmp / META).write_text(json.dumps({"step": trainer_state["step"], "files": files}))
    for name in (*files, META):
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


def _read_checkpoint(
    path: Path, device: str, ema: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, torch.Tensor] | None]:
    """A checkpoint's files, fully read and checked; raises DamagedFileError before anything is changed.

    With `ema`, the third item is the saved average of the weights, or None where the checkpoint has none.
    """
    fix = f"delete {path} to resume from the checkpoint before it with train.resume=auto"
    weights = load_weights(path / WEIGHTS, device=device, fix=fix)
    state = load_state(path / STATE, fix=fix)
    missing = [key for key in STATE_KEYS if key not in state]
    if missing:
        raise DamagedFileError(path / STATE, f"no {', '.join(missing)}", fix)
    has_average = ema and (path / EMA_WEIGHTS).is_file()
    return weights, state, load_weights(path / EMA_WEIGHTS, device=device, fix=fix) if has_average else None


def _check_fits(path: Path, model: FrozenPrefixCaptioner, weights: dict[str, torch.Tensor]) -> None:
    """Raise unless the weights have exactly the model's keys and shapes (load_state_dict would half-load them)."""
    expected = model.trainable_state_dict()
    problem = next((f"no {key}" for key in expected if key not in weights), None)
    problem = problem or next((f"unexpected {key}" for key in weights if key not in expected), None)
    problem = problem or next(
        (f"{key}: {tuple(weights[key].shape)} vs {tuple(value.shape)}" for key, value in expected.items()
         if weights[key].shape != value.shape), None,
    )
    if problem:
        raise FrozenPrefixError(
            f"checkpoint {path} does not fit this model ({problem}); resume with the config the run was started with"
        )


def load_checkpoint(
    path: str | Path, model: FrozenPrefixCaptioner, optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None, restore_rng: bool = True, ema: WeightAverage | None = None,
) -> dict[str, Any]:
    """Load a checkpoint into model (and optimizer/scheduler, and the average `ema`); return the trainer state.

    All files are read and checked first, so a damaged or unfitting checkpoint leaves everything untouched.
    """
    path = Path(path)
    if not (path / META).is_file():
        raise FrozenPrefixError(f"{path} is not a complete checkpoint (no {META}); point train.resume at one")
    weights, state, average = _read_checkpoint(path, str(model.device), ema=ema is not None)
    _check_fits(path, model, weights)
    if average is not None:
        _check_fits(path, model, average)
    try:
        model.load_trainable_state_dict(shard_like(weights, model.trainable_state_dict()))  # FSDP: this rank's shard
    except RuntimeError as e:  # e.g. a dtype the parameters cannot take
        raise FrozenPrefixError(
            f"checkpoint {path} does not fit this model ({str(e).splitlines()[0][:120]}); "
            "resume with the config the run was started with"
        ) from e
    if optimizer is not None:
        optimizer.load_state_dict(shard_optimizer_state(optimizer, state["optimizer"]))
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if ema is not None and average is not None:
        ema.load_state_dict(shard_like(average, ema.state_dict()))
    elif ema is not None:  # saved with train.ema_decay=0: average from here on rather than refuse to go on
        log.warning(
            "checkpoint %s holds no average of the weights (train.ema_decay was 0 when it was saved); "
            "the average starts from its weights at step %s", path, state["trainer"].get("step"),
        )
        ema.reset(model)
    if restore_rng:
        rank, world = rank_and_world()
        ranks = state.get("rng_ranks")
        if rank == 0:
            set_rng_state(state["rng"])
        elif ranks is not None and len(ranks) == world:  # the same world size: each rank continues its own stream
            set_rng_state(ranks[rank])
        # else: another world size; this rank keeps the stream it was seeded with (see train.fit)
    return state["trainer"]


def resume_latest(
    run_dir: str | Path, model: FrozenPrefixCaptioner, optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None, ema: WeightAverage | None = None,
) -> tuple[Path, dict[str, Any]] | None:
    """Load the newest complete checkpoint that is not damaged; return (its path, the trainer state), or None.

    A damaged one is logged and the next older one tried; if every one is damaged, raise naming the newest.
    """
    found = checkpoint_dirs(run_dir)[::-1]
    damaged: list[DamagedFileError] = []
    for index, path in enumerate(found):
        try:
            return path, load_checkpoint(path, model, optimizer, scheduler, ema=ema)
        except DamagedFileError as e:
            damaged.append(e)
            older = found[index + 1] if index + 1 < len(found) else None
            log.warning(
                "checkpoint %s is damaged (%s: %s); %s", path, e.path.name, e.reason,
                f"falling back to {older}" if older else "no older checkpoint is left",
            )
    if not damaged:
        return None
    root, newest = Path(run_dir) / "checkpoints", damaged[0]
    raise FrozenPrefixError(
        f"every checkpoint in {root} is damaged, the newest at {newest.path} ({newest.reason}); "
        f"delete {root} and train again with train.resume=none, or choose a new train.output_dir"
    ) from newest
