"""Truncated or missing weight and state files: one line naming the file, nothing half-loaded, resume falls back."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from frozen_prefix import FrozenPrefixCaptioner, FrozenPrefixError, load_config
from frozen_prefix.caption import main as caption_main
from frozen_prefix.data import ShapesDataset
from frozen_prefix.evaluate import main as evaluate_main
from frozen_prefix.models.weights import DamagedFileError, load_state, load_weights
from frozen_prefix.train import main as train_main
from frozen_prefix.training.checkpoint import STATE, WEIGHTS, checkpoint_dirs, load_checkpoint, resume_latest
from frozen_prefix.training.optim import build_optimizer, build_scheduler

from ..conftest import TINY

OLDER, NEWER = "step_00000003", "step_00000006"


def truncate(path: Path, keep: float = 0.5) -> None:
    """Cut a file to a fraction of its size, as a full disk or a killed copy leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def one_line(message: str) -> str:
    """The message, checked to be a single line."""
    assert "\n" not in message.strip(), message
    return message


# ------------------------------------------------------------------ the loaders


@pytest.mark.parametrize("keep", [0.0, 0.001, 0.5, 0.999])
def test_truncated_safetensors_is_one_line_naming_the_file(tmp_path, keep):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(64, 64), "b": torch.zeros(64)}, str(path))
    truncate(path, keep)
    with pytest.raises(DamagedFileError) as error:
        load_weights(path)
    assert isinstance(error.value, FrozenPrefixError)
    assert one_line(str(error.value)).startswith(f"{path} is damaged (")
    assert isinstance(error.value.__cause__, SafetensorError)


def test_missing_weights_file_is_one_line(tmp_path):
    with pytest.raises(DamagedFileError, match="file not found") as error:
        load_weights(tmp_path / "nothing.safetensors")
    assert str(tmp_path / "nothing.safetensors") in one_line(str(error.value))


@pytest.mark.parametrize("keep", [0.0, 0.001, 0.05, 0.5, 0.999])
def test_truncated_state_file_is_one_line_naming_the_file(tmp_path, keep):
    path = tmp_path / "state.pt"
    torch.save({"optimizer": {"w": torch.randn(64, 64)}, "trainer": {"step": 3}}, path)
    truncate(path, keep)
    with pytest.raises(DamagedFileError) as error:
        load_state(path)
    assert one_line(str(error.value)).startswith(f"{path} is damaged (")
    assert error.value.__cause__ is not None  # the original error is kept for debugging


def test_intact_files_load(tmp_path):
    save_file({"w": torch.ones(2)}, str(tmp_path / "w.safetensors"))
    torch.save({"step": 1}, tmp_path / "s.pt")
    assert torch.equal(load_weights(tmp_path / "w.safetensors")["w"], torch.ones(2))
    assert load_state(tmp_path / "s.pt") == {"step": 1}


# ------------------------------------------------------------------ a saved model folder, through the CLIs


@pytest.fixture
def damaged_model(tiny_config, tmp_path) -> Path:
    """A saved model folder whose model.safetensors was cut in half."""
    folder = FrozenPrefixCaptioner(tiny_config).save_pretrained(tmp_path / "model")
    truncate(folder / "model.safetensors")
    return folder


def assert_one_error_line_naming_weights(capsys, code: int) -> None:
    """Exit code 2 and a single stderr line that names model.safetensors."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert "model.safetensors is damaged" in lines[0]


# These two pass once FrozenPrefixCaptioner.from_pretrained reads its weights through weights.load_weights.
def test_evaluate_cli_on_damaged_weights(damaged_model, capsys):
    code = evaluate_main(["--model", str(damaged_model), "--no-progress", "--out", str(damaged_model / "eval")])
    assert_one_error_line_naming_weights(capsys, code)


def test_caption_cli_on_damaged_weights(damaged_model, tmp_path, capsys):
    image = tmp_path / "shape.png"
    ShapesDataset("test", size=1)[0]["image"].save(image)
    code = caption_main(["--model", str(damaged_model), str(image)])
    assert_one_error_line_naming_weights(capsys, code)


# ------------------------------------------------------------------ checkpoints


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A tiny run of 6 steps with checkpoints at steps 3 and 6 (shared: tests work on copies)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    args = ["--config", str(TINY), f"train.output_dir={run}", "train.max_steps=6", "train.checkpoint_every=3"]
    assert train_main(args) == 0
    assert [p.name for p in checkpoint_dirs(run)] == [OLDER, NEWER]
    return run


@pytest.fixture
def run(trained_run, tmp_path) -> Path:
    """A private copy of the trained run."""
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


def fresh(run: Path) -> tuple[FrozenPrefixCaptioner, torch.optim.Optimizer, object]:
    """An untrained model of the run's config, with its optimizer and scheduler."""
    model = FrozenPrefixCaptioner(load_config(run / "config.yaml"))
    optimizer = build_optimizer(model, model.config)
    return model, optimizer, build_scheduler(optimizer, model.config)


def weights_of(model: FrozenPrefixCaptioner) -> dict[str, torch.Tensor]:
    """A copy of the trainable weights."""
    return {k: v.clone() for k, v in model.trainable_state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Identical keys and tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_latest_falls_back_to_the_older_checkpoint(run, caplog):
    truncate(run / "checkpoints" / NEWER / WEIGHTS)
    model, optimizer, scheduler = fresh(run)
    with caplog.at_level(logging.WARNING, logger="frozen_prefix.training.checkpoint"):
        path, trainer_state = resume_latest(run, model, optimizer, scheduler)
    assert path.name == OLDER
    assert trainer_state["step"] == 3
    assert same(weights_of(model), load_file(str(run / "checkpoints" / OLDER / WEIGHTS)))
    assert scheduler.last_epoch == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = one_line(warnings[0])
    assert f"{NEWER} is damaged ({WEIGHTS}:" in message and f"falling back to {run / 'checkpoints' / OLDER}" in message


def test_resume_latest_takes_the_newest_when_intact(run, caplog):
    model, optimizer, scheduler = fresh(run)
    with caplog.at_level(logging.WARNING, logger="frozen_prefix.training.checkpoint"):
        path, trainer_state = resume_latest(run, model, optimizer, scheduler)
    assert (path.name, trainer_state["step"]) == (NEWER, 6)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_resume_latest_without_checkpoints_is_none(tmp_path, tiny_model):
    assert resume_latest(tmp_path, tiny_model, None, None) is None


def test_resume_latest_when_every_checkpoint_is_damaged(run):
    truncate(run / "checkpoints" / NEWER / WEIGHTS)
    truncate(run / "checkpoints" / OLDER / STATE)
    model, optimizer, scheduler = fresh(run)
    before = weights_of(model)
    with pytest.raises(FrozenPrefixError) as error:
        resume_latest(run, model, optimizer, scheduler)
    message = one_line(str(error.value))
    assert str(run / "checkpoints" / NEWER / WEIGHTS) in message
    assert "train.resume=none" in message and "train.output_dir" in message
    assert isinstance(error.value.__cause__, DamagedFileError)
    assert same(weights_of(model), before)


@pytest.mark.parametrize("damaged", [WEIGHTS, STATE])
def test_explicit_load_of_a_damaged_checkpoint_changes_nothing(run, damaged):
    ckpt = run / "checkpoints" / NEWER
    truncate(ckpt / damaged)
    model, optimizer, scheduler = fresh(run)
    before, rng = weights_of(model), torch.get_rng_state()
    with pytest.raises(FrozenPrefixError) as error:
        load_checkpoint(ckpt, model, optimizer, scheduler)
    assert str(ckpt / damaged) in one_line(str(error.value))
    # Both files are read before anything is loaded: a damaged state.pt must not leave new weights behind.
    assert same(weights_of(model), before)
    assert not optimizer.state and scheduler.last_epoch == 0
    assert torch.equal(torch.get_rng_state(), rng)


# Passes once the trainer calls resume_latest for train.resume=auto.
@pytest.mark.slow
def test_train_cli_resumes_past_a_damaged_checkpoint(run):
    truncate(run / "checkpoints" / NEWER / WEIGHTS)
    args = ["--config", str(TINY), f"train.output_dir={run}", "train.max_steps=9", "train.checkpoint_every=3"]
    assert train_main([*args, "train.resume=auto"]) == 0
    assert "step_00000009" in [p.name for p in checkpoint_dirs(run)]
    load_weights(run / "checkpoints" / NEWER / WEIGHTS)  # step 6 was trained again and rewritten whole
