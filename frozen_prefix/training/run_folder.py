"""The run folder: its checks, the resolved config and versions, metrics.jsonl, and RUN/best/."""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
from pathlib import Path
from typing import Any

import torch

from ..captioner import FrozenPrefixCaptioner
from ..config import Config, config_changes, save_config
from ..errors import FrozenPrefixError
from ..parallel import distributed
from . import strategies
from .checkpoint import swap_in
from .sinks import Sinks

log = logging.getLogger("frozen_prefix")


def check_run_dir(config: Config) -> None:
    """Refuse to start a fresh run on top of an existing one."""
    run = Path(config.train.output_dir)
    if config.train.resume == "none" and (run / "checkpoints").is_dir() and any((run / "checkpoints").iterdir()):
        raise FrozenPrefixError(
            f"{run} already holds a run; set train.resume=auto to continue it, or choose another train.output_dir"
        )


# What may differ between a run and its resumption without changing what it learns: where it is, how it reports.
RESUME_NEUTRAL = ("train.resume", "train.output_dir", "train.progress", "train.log_every", "train.val_every",
                  "train.val_batches", "train.checkpoint_every", "train.keep_last", "train.tensorboard", "train.wandb",
                  "train.wandb_project")


def warn_config_changes(run: Path, config: Config) -> None:
    """Say what a resumption changes: a run continued with other settings is neither the old recipe nor the new."""
    changes = config_changes(run / "config.yaml", config, ignore=RESUME_NEUTRAL)
    if changes:
        shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
        log.warning(
            "resuming %s with settings it did not last run with (%s); to train with them from the start, "
            "choose another train.output_dir", run, shown,
        )


def prepare_run_dir(config: Config) -> Path:
    """Create the run folder and write the resolved config and library versions into it."""
    run = Path(config.train.output_dir)
    run.mkdir(parents=True, exist_ok=True)
    tmp = run / "config.yaml.tmp"
    save_config(config, tmp)
    tmp.replace(run / "config.yaml")
    import timm
    import transformers

    versions = {
        "seed": config.train.seed, "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "timm": timm.__version__,
    }
    (run / "versions.json").write_text(json.dumps(versions, indent=2))
    return run


class NoMetricsLog:
    """What ranks other than 0 log to under torchrun: nothing (rank 0 writes metrics.jsonl and feeds the sinks)."""

    sinks = Sinks()

    def write(self, record: dict[str, Any]) -> None:
        """Drop the record."""


class MetricsLog:
    """metrics.jsonl: one JSON object per line, appended and flushed as it goes; each also goes to the sinks."""

    def __init__(self, path: Path, resume_step: int | None, sinks: Sinks | None = None) -> None:
        self.path = path
        self.sinks = sinks or Sinks()  # TensorBoard / W&B (sinks.py), when the config asks for them
        if resume_step is not None and path.is_file():
            # Drop lines logged after the checkpoint we resume from: they will be logged again.
            lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
            kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= resume_step]
            path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.sinks.log(record)


def save_best(model: FrozenPrefixCaptioner, run_dir: Path, info: dict[str, Any], precision: str | None = None) -> None:
    """Write RUN/best/ (a save_pretrained folder plus best.json) under a temporary name, then swap it in (rank 0)."""
    weights, _ = strategies.checkpoint_state(model)  # FSDP: every rank joins the gathering of the shards
    if not distributed.current(model.device).main:
        return
    tmp = run_dir / f".best-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, weights=weights, precision=precision)
    (tmp / "best.json").write_text(json.dumps(info, indent=2) + "\n")
    swap_in(tmp, run_dir / "best")
