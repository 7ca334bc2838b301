"""The train command end to end on the tiny recipe, and its one-line errors."""

from __future__ import annotations

import json

import pytest

from frozen_prefix import FrozenPrefixCaptioner, fit
from frozen_prefix.train import main

from ..conftest import TINY


def run_cli(tmp_path, *overrides):
    return main(["--config", str(TINY), f"train.output_dir={tmp_path / 'run'}", "train.max_steps=6", *overrides])


def test_cli_writes_a_complete_run(tmp_path):
    assert run_cli(tmp_path, "train.log_every=2", "train.checkpoint_every=3") == 0
    run = tmp_path / "run"
    assert (run / "config.yaml").is_file() and (run / "versions.json").is_file()
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines if "loss" in ln] == [2, 4, 6]
    assert all(isinstance(ln["loss"], float) for ln in lines if "loss" in ln)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000003", "step_00000006"]
    model = FrozenPrefixCaptioner.from_pretrained(run / "model")
    assert model.config.train.max_steps == 6
    assert len(model.caption([_image()])) == 1


def _image():
    from frozen_prefix.data import ShapesDataset

    return ShapesDataset("test", size=1)[0]["image"]


@pytest.mark.slow
def test_python_api_returns_trained_model(tmp_path):
    model = fit(TINY, [f"train.output_dir={tmp_path / 'run'}", "train.max_steps=3"])
    assert isinstance(model, FrozenPrefixCaptioner)
    assert isinstance(model.caption(_image())[0], str)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.encdoer=x"], "unknown config key 'model.encdoer'"),
        (["train.batch_size=many"], "train.batch_size: expected int"),
        (["data.train=does/not/exist.jsonl"], "data file not found: does/not/exist.jsonl"),
        (["model.lm=./no/such/lm"], "LM folder './no/such/lm' not found"),
        (["model.encoder=resnet_nope"], "model.encoder: unknown timm model"),
        (["model.prefix_length=300"], "exceeds the LM's context"),
    ],
)
def test_bad_input_gives_one_line(tmp_path, capsys, overrides, message):
    assert run_cli(tmp_path, *overrides) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


@pytest.mark.slow
def test_existing_run_is_not_overwritten(tmp_path, capsys):
    assert run_cli(tmp_path) == 0
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert run_cli(tmp_path) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


def test_a_run_whose_final_evaluation_fails_keeps_its_model(tmp_path):
    """RUN/model/ is written before the final evaluation: one that fails (here: no data.test) loses nothing."""
    run = tmp_path / "run"
    code = main(["--config", str(TINY), f"train.output_dir={run}", "train.max_steps=2", "train.val_every=0",
                 "train.checkpoint_every=0", "eval.splits=[test]"])
    assert code == 2  # the evaluation's one-line error
    assert (run / "model" / "model.safetensors").is_file() and (run / "model" / "README.md").is_file()
    assert FrozenPrefixCaptioner.from_pretrained(run / "model").prefix_length == 4
