"""The process group of a `torchrun` launch: setup, teardown and the few collectives the loops need.

Without torchrun (no WORLD_SIZE in the environment) nothing here starts a process group: `Dist` says rank 0 of 1
and every collective returns its input, so one process runs exactly the code it ran before scale-out existed.
"""

from __future__ import annotations

import datetime
import gc
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..errors import FrozenPrefixError

log = logging.getLogger(__name__)


def launched() -> bool:
    """Whether a launcher (torchrun) started this process as one rank of a group: it sets WORLD_SIZE."""
    return "WORLD_SIZE" in os.environ


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size (0, 1 without an initialised process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclass(frozen=True)
class Dist:
    """Where this process stands in the group, and the device it owns (cuda:LOCAL_RANK under NCCL)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    active: bool = False  # a process group is up (torchrun launched this process, even as a group of one)
    owner: bool = False  # this object started the process group, so it also ends it

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files and prints."""
        return self.rank == 0

    def comm_device(self) -> torch.device:
        """Where collective tensors live: the GPU under NCCL, the CPU under gloo."""
        return self.device if self.active and dist.get_backend() == "nccl" else torch.device("cpu")

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64, so token counts stay exact)."""
        return self._reduce(values, dist.ReduceOp.SUM)

    def max(self, values: list[float]) -> list[float]:
        """Element-wise maximum over ranks."""
        return self._reduce(values, dist.ReduceOp.MAX)

    def _reduce(self, values: list[float], op: Any) -> list[float]:
        if not self.active:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.comm_device())
        dist.all_reduce(tensor, op=op)
        return tensor.tolist()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's object, in rank order, on every rank (picklable objects only)."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's object on every rank: one decision, taken once."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.comm_device())
        return box[0]

    @property
    def signal_relay_grace(self) -> float:
        """Seconds in which the same signal again is torchrun relaying the terminal's Ctrl-C, not a second request."""
        return 5.0 if self.active else 0.0

    def agreed_signal(self, received: str | None) -> str | None:
        """The stop signal any rank received (SIGTERM over SIGINT), the same on every rank; one process: its own."""
        if not self.active:
            return received
        interrupted, terminated = self.sum([float(received == "SIGINT"), float(received == "SIGTERM")])
        return "SIGTERM" if terminated else "SIGINT" if interrupted else None

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.active:
            dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)


def setup(device: torch.device) -> Dist:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on the CPU); one process without torchrun.

    `device` is the resolved train.device; on CUDA each process takes cuda:LOCAL_RANK. The group is started only
    under a launcher, so a plain `python -m frozen_prefix.train` needs no MASTER_ADDR and runs as it always did.
    """
    if not launched():
        return Dist(device=device)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise FrozenPrefixError(
                f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA devices are visible; "
                "give torchrun --nproc_per_node at most the number of GPUs"
            )
        device = torch.device("cuda", local)
    elif device.type != "cpu":
        raise FrozenPrefixError(f"train.device {device.type}: torchrun runs on CUDA (NCCL) or the CPU (gloo); use one")
    if dist.is_initialized():  # a caller (a notebook, a test harness) set the group up itself: use it as it is
        rank, world = rank_and_world()
        return Dist(rank, world, local, device, active=True)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"])
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(
            backend, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=30),
            device_id=device if device.type == "cuda" else None,
        )
    except (RuntimeError, ValueError) as e:
        raise FrozenPrefixError(
            f"cannot join the torchrun process group ({str(e).splitlines()[0][:160]}); check the rendezvous flags"
        ) from e
    if rank != 0:  # the same progress lines from every rank say nothing more than rank 0's
        logging.getLogger("frozen_prefix").setLevel(logging.WARNING)
    log.info("process group: %d processes, %s, this is rank %d on %s", world, backend, rank, device)
    return Dist(rank, world, local, device, active=True, owner=True)


def teardown(ctx: Dist, clean: bool = True) -> None:
    """End the process group this process started, after the caller has dropped its DDP/FSDP wrappers.

    A DistributedDataParallel model still alive when the group goes down sometimes aborts a gloo rank at exit
    (ENVIRONMENT.md): so the dropped wrappers are collected before the last barrier. After an error on one rank
    the others may never reach a barrier, so `clean=False` skips it.
    """
    gc.collect()
    if not ctx.owner or not dist.is_initialized():
        return
    if clean:
        ctx.barrier()
    dist.destroy_process_group()


def current(device: torch.device) -> Dist:
    """The running process group as seen from code that was handed a model on `device` (evaluation, decoding)."""
    if not (dist.is_available() and dist.is_initialized()):
        return Dist(device=device)
    rank, world = rank_and_world()
    return Dist(rank, world, device.index or 0, device, active=True)
