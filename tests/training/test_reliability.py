"""Exact resume, atomic checkpoints, signals, the non-finite guard and the bad-input table."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from frozen_prefix import FrozenPrefixCaptioner, load_config
from frozen_prefix import FrozenPrefixCaptioner as Captioner
from frozen_prefix.train import main
from frozen_prefix.training import checkpoint
from frozen_prefix.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from frozen_prefix.training.optim import build_optimizer, build_scheduler

from ..conftest import ROOT, TINY, wait_for_file

# augment=true so that resuming also has to reproduce random crops and colour jitter.
BASE = ["train.log_every=1", "data.augment=true", "train.keep_last=10"]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


def losses(run: Path) -> dict[int, float]:
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return {ln["step"]: ln["loss"] for ln in lines if "loss" in ln and ln["loss"] is not None}


def cli(run: Path, *overrides: str) -> int:
    return main(["--config", str(TINY), f"train.output_dir={run}", *BASE, *overrides])


@pytest.mark.slow
def test_resume_gives_bitwise_identical_weights(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert cli(full, "train.max_steps=8", "train.checkpoint_every=4") == 0
    # The same run, "interrupted" after step 4: only its first checkpoint and early log survive.
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_00000004", resumed / "checkpoints" / "step_00000004")
    (resumed / "metrics.jsonl").write_text((full / "metrics.jsonl").read_text())
    assert cli(resumed, "train.max_steps=8", "train.checkpoint_every=4", "train.resume=auto") == 0
    a, b = weights(full), weights(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(full) == losses(resumed)  # same loss curve, no duplicated lines


@pytest.mark.slow
def test_same_seed_same_loss_curve_and_versions(tmp_path):
    assert cli(tmp_path / "a", "train.max_steps=5") == 0
    assert cli(tmp_path / "b", "train.max_steps=5") == 0
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    versions = json.loads((tmp_path / "a" / "versions.json").read_text())
    assert versions["seed"] == 0 and {"torch", "transformers", "timm"} <= set(versions)


def _state(model):
    optimizer = build_optimizer(model, model.config)
    return optimizer, build_scheduler(optimizer, model.config)


def test_failed_rename_leaves_previous_checkpoint_loadable(tiny_config, tmp_path, monkeypatch):
    model = Captioner(tiny_config)
    optimizer, scheduler = _state(model)
    first = save_checkpoint(tmp_path, model, optimizer, scheduler, {"step": 1})
    before = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(1.0)

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.os, "replace", broken_replace)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, model, optimizer, scheduler, {"step": 2})
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) == first  # the half-written one is invisible
    fresh = Captioner(tiny_config)
    assert load_checkpoint(first, fresh, *_state(fresh))["step"] == 1
    assert all(torch.equal(fresh.trainable_state_dict()[k], v) for k, v in before.items())
    save_checkpoint(tmp_path, model, optimizer, scheduler, {"step": 3})  # debris is cleaned up next time
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_keep_last_prunes_only_after_a_complete_save(tiny_config, tmp_path):
    model = Captioner(tiny_config)
    optimizer, scheduler = _state(model)
    for step in range(1, 5):
        save_checkpoint(tmp_path, model, optimizer, scheduler, {"step": step}, keep_last=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000003", "step_00000004"]


def _spawn(run: Path, *overrides: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "frozen_prefix.train", "--config", str(TINY), f"train.output_dir={run}", *BASE]
    # Same environment (and so the same thread count) as this process: bitwise comparisons depend on it.
    return subprocess.Popen([*cmd, *overrides], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigkill_at_any_moment_then_resume_matches(tmp_path):
    steps = ["train.max_steps=30", "train.checkpoint_every=2"]
    assert cli(tmp_path / "full", *steps) == 0
    run = tmp_path / "killed"
    proc = _spawn(run, *steps)
    wait_for_file(run / "checkpoints" / "step_00000006", proc)
    time.sleep(0.13)  # somewhere in the middle of later steps and checkpoint writes
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for ckpt in checkpoint.checkpoint_dirs(run):  # every visible checkpoint is complete and loadable
        model = FrozenPrefixCaptioner(load_config(TINY))
        load_checkpoint(ckpt, model)
    assert cli(run, *steps, "train.resume=auto") == 0
    a, b = weights(tmp_path / "full"), weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits(tmp_path):
    run = tmp_path / "run"
    proc = _spawn(run, "train.max_steps=100000")
    wait_for_file(run / "metrics.jsonl", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in err and "train.resume=auto" in err
    ckpt = latest_checkpoint(run)
    assert ckpt is not None and json.loads((ckpt / "meta.json").read_text())["step"] >= 1


def _plant_nan(monkeypatch, bad_calls):
    """Make the training forward pass return a NaN loss on the given call numbers."""
    real = Captioner.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] in bad_calls:
                out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(Captioner, "forward", forward)


def test_nan_step_is_skipped_and_counted(tmp_path, monkeypatch):
    _plant_nan(monkeypatch, bad_calls={3})  # training forward passes are numbered from 1
    assert cli(tmp_path / "run", "train.max_steps=6", "data.augment=false") == 0
    lines = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    by_step = {ln["step"]: ln for ln in lines if "bad_steps" in ln}
    assert by_step[2]["bad_steps"] == 0 and by_step[3]["bad_steps"] == 1 and by_step[6]["bad_steps"] == 1
    assert all(torch.isfinite(v).all() for v in weights(tmp_path / "run").values())


def test_nan_streak_stops_with_last_checkpoint_intact(tmp_path, monkeypatch, capsys):
    _plant_nan(monkeypatch, bad_calls=set(range(4, 100)))  # steps 1-3 are good
    code = cli(tmp_path / "run", "train.max_steps=50", "train.checkpoint_every=2", "train.max_bad_steps=3")
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "non-finite steps in a row" in err and len(err.splitlines()) == 1
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt is not None and ckpt.name == "step_00000002"
    model = FrozenPrefixCaptioner(load_config(TINY))
    load_checkpoint(ckpt, model)
    assert all(torch.isfinite(p).all() for p in model.trainable_parameters())


def test_huge_learning_rate_is_caught(tmp_path, capsys):
    code = cli(tmp_path / "run", "train.max_steps=40", "train.lr=1e12", "train.warmup_steps=0", "train.max_bad_steps=2")
    err = capsys.readouterr().err
    assert code == 2 and "non-finite" in err, err


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


@pytest.fixture(scope="module")
def existing_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("existing") / "run"
    assert main(["--config", str(TINY), f"train.output_dir={run}", "train.max_steps=2"]) == 0
    return run


def _write_bad_files(tmp: Path) -> None:
    (tmp / "not_image.jpg").write_text("hello")
    (tmp / "broken.jsonl").write_text('{"image": "not_image.jpg", "caption": "a red circle"}\n')
    (tmp / "badline.jsonl").write_text("{not json}\n")
    (tmp / "nocaption.jsonl").write_text('{"image": "x.png"}\n')
    (tmp / "bad.yaml").write_text("model: {encoder: [\n")


# "@" stands for the test's temporary folder. Every row resumes the existing run, so all checks
# that guard a run folder are exercised against one that holds a finished run.
BAD_INPUTS = [
    (["model.encdoer=resnet18"], "unknown config key"),
    (["train.lr=fast"], "train.lr: expected float"),
    (["train.batch_size=-3"], "train.batch_size: must be > 0"),
    (["data.train=@missing.jsonl"], "data file not found"),
    (["data.train=@broken.jsonl", "data.bad_data=error"], "not an image file"),
    (["data.train=@badline.jsonl"], "not valid JSON"),
    (["data.train=@nocaption.jsonl"], 'needs "caption"'),
    (["model.lm=/no/such/folder"], "LM folder '/no/such/folder' not found"),
    (["model.lm=/no/such/model.gguf"], "LM file '/no/such/model.gguf' not found"),
    (["model.lm=nobody/no-such-model"], "cannot load the LM 'nobody/no-such-model'"),  # hub unreachable here
    (["model.encoder=nope_net"], "unknown timm model"),
    (["model.prefix_length=250"], "exceeds the LM's context"),
    (["train.resume=none", "model.image_size=2", "model.encoder=vit_tiny_patch16_224",
      "train.output_dir=@fresh"], "first forward pass failed"),
    (["train.resume=/no/such/checkpoint"], "checkpoint folder /no/such/checkpoint not found"),
    (["model.projection=linear"], "does not fit this model"),
    (["train.resume=none"], "already holds a run"),
    (["--config=@bad.yaml"], "not valid YAML"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_INPUTS)
def test_bad_input_table(existing_run, tmp_path, capsys, overrides, message):
    _write_bad_files(tmp_path)
    args = [o.replace("@", f"{tmp_path}/") for o in overrides]
    config = next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), str(TINY))
    args = [a for a in args if not a.startswith("--config=")]
    before = _snapshot(existing_run)
    code = main(["--config", config, f"train.output_dir={existing_run}", "train.resume=auto", *args])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert message in err and len(err.splitlines()) == 1, err
    assert _snapshot(existing_run) == before  # nothing already written is damaged
