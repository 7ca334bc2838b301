"""Where training metrics go besides metrics.jsonl: TensorBoard and Weights & Biases, each when the config asks."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import yaml

from ..config import Config
from ..errors import FrozenPrefixError

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # config key train.X -> the package it needs


class Sink(Protocol):
    """A logging backend: metrics records as they come, sample captions and pictures at the end."""

    def log(self, record: dict[str, Any]) -> None: ...

    def samples(self, split: str, rows: list[dict[str, Any]], picture: Path | None, step: int) -> None: ...

    def close(self) -> None: ...


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numeric, finite values of a metrics record (flags such as is_best and text such as best_metric dropped)."""
    return {
        k: float(v) for k, v in record.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def check_sinks(config: Config) -> None:
    """One line for a sink the config asks for whose package is missing (checked before the run folder is touched)."""
    for key, package in PACKAGES.items():
        if getattr(config.train, key) and not _installed(package):
            raise FrozenPrefixError(f"train.{key}=true needs the {package} package: pip install {package}")


class TensorBoardSink:
    """Scalars, sample captions (text) and samples pictures under RUN/tensorboard."""

    def __init__(self, log_dir: Path, config: Config, resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events logged after the checkpoint we resume from: they are logged again.
        self.writer = SummaryWriter(str(log_dir), purge_step=None if resume_step is None else resume_step + 1)
        if resume_step is None:
            config_text = yaml.safe_dump(config.to_dict(), sort_keys=False)
            self.writer.add_text("config", "    " + config_text.replace("\n", "\n    "), 0)  # indented: as code

    def log(self, record: dict[str, Any]) -> None:
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, record["step"])
        self.writer.flush()  # records are rare (log_every); a run that is killed keeps what it logged

    def samples(self, split: str, rows: list[dict[str, Any]], picture: Path | None, step: int) -> None:
        if rows:
            table = ["| image | caption | reference |", "|---|---|---|"]
            table += [f"| {r['image_id']} | {r['caption']} | {r['references'][0]} |" for r in rows]
            self.writer.add_text(f"{split}/samples", "\n".join(table), step)
        if picture is not None:
            import numpy as np
            from PIL import Image

            with Image.open(picture) as image:
                self.writer.add_image(f"{split}/samples", np.asarray(image.convert("RGB")), step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A Weights & Biases run: offline unless WANDB_MODE says otherwise, resumed with the training run."""

    def __init__(self, run_dir: Path, config: Config, resume_step: int | None) -> None:
        import wandb

        self.wandb = wandb
        id_file = run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if resume_step is not None and id_file.is_file() else None
        self.run = wandb.init(
            project=config.train.wandb_project, name=run_dir.name, dir=str(run_dir), config=config.to_dict(),
            mode=os.environ.get("WANDB_MODE", "offline"), id=run_id, resume="allow" if run_id else None,
        )
        id_file.write_text(str(self.run.id) + "\n")

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(scalars(record), step=record["step"])

    def samples(self, split: str, rows: list[dict[str, Any]], picture: Path | None, step: int) -> None:
        payload: dict[str, Any] = {}
        if rows:
            data = [[str(r["image_id"]), r["caption"], r["references"][0]] for r in rows]
            payload[f"{split}/captions"] = self.wandb.Table(columns=["image", "caption", "reference"], data=data)
        if picture is not None:
            payload[f"{split}/samples"] = self.wandb.Image(str(picture))
        if payload:
            self.run.log(payload, step=step)

    def close(self) -> None:
        self.run.finish()


class Sinks:
    """The sinks of one run, fed together."""

    def __init__(self, sinks: Sequence[Sink] = ()) -> None:
        self.sinks = list(sinks)

    def log(self, record: dict[str, Any]) -> None:
        """Forward one metrics.jsonl record."""
        for sink in self.sinks:
            sink.log(record)

    def finish(self, eval_dir: Path, splits: Sequence[str], samples: int, step: int) -> None:
        """Send the final evaluation's sample captions and samples pictures (from RUN/eval), then close."""
        for split in splits:
            rows = _first_rows(eval_dir / f"{split}_per_image.jsonl", samples)
            picture = eval_dir / f"{split}_samples.png"
            if rows or picture.is_file():
                for sink in self.sinks:
                    sink.samples(split, rows, picture if picture.is_file() else None, step)
        self.close()

    def close(self) -> None:
        """Close every sink (flushing what it holds)."""
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def _first_rows(path: Path, count: int) -> list[dict[str, Any]]:
    """The first count rows of a per_image.jsonl file ([] when it is missing)."""
    if not path.is_file() or count <= 0:
        return []
    rows = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
            if len(rows) >= count:
                break
    return rows


def open_sinks(config: Config, run_dir: Path, resume_step: int | None) -> Sinks:
    """The sinks the config asks for (train.tensorboard, train.wandb), writing under the run folder."""
    check_sinks(config)
    sinks: list[Sink] = []
    if config.train.tensorboard:
        sinks.append(TensorBoardSink(run_dir / "tensorboard", config, resume_step))
    if config.train.wandb:
        sinks.append(WandbSink(run_dir, config, resume_step))
    return Sinks(sinks)
