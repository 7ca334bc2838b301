"""FSDP2's sharded tensors: telling them apart, gathering them whole and cutting whole tensors back into shards."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


def _dtensor() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return None
    return DTensor


def is_sharded(tensor: Any) -> bool:
    """Whether a tensor is an FSDP2 shard (a DTensor)."""
    cls = _dtensor()
    return cls is not None and isinstance(tensor, cls)


def is_fsdp(model: nn.Module) -> bool:
    """Whether fully_shard was applied to this module."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """The FSDP root's own parameters whole for code that does not go through its forward (decoding).

    The sharded layers gather themselves whenever they are called; only the root group needs this.
    """
    if not is_fsdp(model):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def full_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Shards gathered into whole tensors; a collective when anything is sharded, so every rank calls it."""
    return {k: (v.full_tensor() if is_sharded(v) else v).detach().contiguous() for k, v in state.items()}


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """optimizer.state_dict() with sharded moments gathered whole: the format one process saves and loads."""
    saved = optimizer.state_dict()
    state = {i: {k: (v.full_tensor() if is_sharded(v) else v) for k, v in s.items()} for i, s in saved["state"].items()}
    return {"state": state, "param_groups": saved["param_groups"]}


def shard_like(state: dict[str, torch.Tensor], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole tensors cut into this rank's shards wherever `like` (the model's own state) is sharded."""
    return {k: _shard_as(v, like.get(k)) for k, v in state.items()}


def shard_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> dict[str, Any]:
    """A whole optimizer state cut into this rank's shards where the optimizer's parameters are sharded."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not any(is_sharded(p) for p in params):
        return saved
    state = {
        i: {k: (_shard_as(v, params[int(i)]) if torch.is_tensor(v) and v.ndim else v) for k, v in s.items()}
        for i, s in saved["state"].items()
    }
    return {"state": state, "param_groups": saved["param_groups"]}


def _shard_as(value: torch.Tensor, like: torch.Tensor | None) -> torch.Tensor:
    if like is None or not is_sharded(like) or is_sharded(value) or value.shape != like.shape:
        return value
    from torch.distributed.tensor import distribute_tensor

    # Every rank holds the whole tensor (read from the same file): each takes its own chunk, no communication.
    return distribute_tensor(value.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
