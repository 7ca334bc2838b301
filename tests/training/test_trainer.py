"""The training loop: gradient accumulation, the LR schedule, SIGINT, resuming with best/, the debug switch."""

from __future__ import annotations

import json
import logging
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import frozen_prefix.training.validation as train_module
from frozen_prefix import FrozenPrefixCaptioner, fit, load_config
from frozen_prefix.config import config_changes, save_config
from frozen_prefix.data import EpochSampler, TrainExamples
from frozen_prefix.errors import ConfigError
from frozen_prefix.train import main
from frozen_prefix.training.checkpoint import latest_checkpoint
from frozen_prefix.training.optim import build_optimizer, build_scheduler, seed_everything
from frozen_prefix.training.run_folder import RESUME_NEUTRAL

from ..conftest import ROOT, TINY, wait_for_file

# ---------------------------------------------------------------------------- gradient accumulation

# test_convnext has LayerNorms only (no BatchNorm), so the features of an example do not depend on its batch.
NO_BATCHNORM = ["model.encoder=test_convnext", "model.feature_norm=layer"]
QUICK = ["train.max_steps=3", "train.warmup_steps=0", "train.log_every=1", "train.val_every=0", "eval.splits=[]",
         "data.val=null"]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def _train_recording_keys(run: Path, monkeypatch, *overrides: str) -> tuple[dict[str, torch.Tensor], list]:
    """Train the tiny recipe; return its trainable parameters and the training keys read, in order."""
    keys: list = []
    real = TrainExamples.__getitem__

    def recording(self, key):
        keys.append(key)
        return real(self, key)

    monkeypatch.setattr(TrainExamples, "__getitem__", recording)
    model = fit(TINY, [f"train.output_dir={run}", *QUICK, *overrides])
    monkeypatch.undo()
    params = {k: p.detach().clone() for k, p in model.trainable_modules().named_parameters()}
    return params, keys


def test_sampler_order_does_not_depend_on_batch_size():
    """Two micro-batches of 4 read the first 8 keys of the epoch order, as one batch of 8 does."""
    big, small = EpochSampler(256, seed=0, batch_size=8), EpochSampler(256, seed=0, batch_size=4)
    assert big.keys() == small.keys()
    assert list(EpochSampler(256, seed=0, start=4, batch_size=4)) == small.keys()[4:]


@pytest.mark.slow
def test_grad_accum_equals_one_big_batch_without_batchnorm(tmp_path, monkeypatch):
    """batch 8 x 1 and batch 4 x 2 micro-batches train the same weights (token-weighted loss)."""
    one, keys_one = _train_recording_keys(tmp_path / "one", monkeypatch, *NO_BATCHNORM, "train.batch_size=8")
    two, keys_two = _train_recording_keys(
        tmp_path / "two", monkeypatch, *NO_BATCHNORM, "train.batch_size=4", "train.grad_accum=2"
    )
    # The same examples in the same order: the dry run's two, then the epoch order's first 3 x 8.
    order = EpochSampler(256, seed=0).keys()
    assert keys_one == keys_two == [(0, 0), (1, 0), *order[:24]]
    assert [r["tokens"] for r in _metrics(tmp_path / "one") if "tokens" in r] == [
        r["tokens"] for r in _metrics(tmp_path / "two") if "tokens" in r
    ]
    seed_everything(0)  # as fit does before building the model: the same initial weights
    initial = FrozenPrefixCaptioner(load_config(TINY, NO_BATCHNORM))
    init = {k: p.detach() for k, p in initial.trainable_modules().named_parameters()}
    assert any(not torch.allclose(one[k], init[k]) for k in one)  # training moved the weights
    different = [k for k in one if not torch.allclose(one[k], two[k], rtol=1e-4, atol=1e-5)]
    assert not different, different
    loss_one = [r["loss"] for r in _metrics(tmp_path / "one") if r.get("loss") is not None]
    loss_two = [r["loss"] for r in _metrics(tmp_path / "two") if r.get("loss") is not None]
    assert loss_one == pytest.approx(loss_two, rel=1e-5)


@pytest.mark.slow
def test_grad_accum_with_batchnorm_differs_but_stays_close(tmp_path):
    """BatchNorm normalises each micro-batch by its own statistics: same data, slightly different losses."""
    fit(TINY, [f"train.output_dir={tmp_path / 'one'}", *QUICK, "train.batch_size=8"])
    fit(TINY, [f"train.output_dir={tmp_path / 'two'}", *QUICK, "train.batch_size=4", "train.grad_accum=2"])
    first_one, first_two = (_metrics(tmp_path / name)[0] for name in ("one", "two"))
    assert first_one["tokens"] == first_two["tokens"]  # the same examples
    # The first loss is computed before any update: only the batch statistics differ.
    assert first_one["loss"] != pytest.approx(first_two["loss"], rel=1e-4)
    assert first_one["loss"] == pytest.approx(first_two["loss"], rel=0.05)


# ---------------------------------------------------------------------------- optimizer and schedule


def _optimizer_config(*overrides: str):
    return load_config(
        TINY, ["train.lr=1e-2", "train.encoder_lr=1e-3", "train.warmup_steps=4", "train.max_steps=10",
               "train.min_lr_ratio=0.1", "train.weight_decay=0.05", *overrides],
    )


def test_optimizer_groups_split_learning_rate_and_weight_decay():
    """Encoder groups use encoder_lr, projection groups lr; ndim<2 parameters get no weight decay; no LM."""
    config = _optimizer_config()
    model = FrozenPrefixCaptioner(config)
    optimizer = build_optimizer(model, config)
    encoder = {id(p) for p in model.encoder.parameters()}
    projection = {id(p) for p in model.projection.parameters()}
    seen: list[int] = []
    for group in optimizer.param_groups:
        ids = {id(p) for p in group["params"]}
        seen += [id(p) for p in group["params"]]
        assert ids <= encoder or ids <= projection
        assert group["lr"] == (1e-3 if ids <= encoder else 1e-2)
        if group["weight_decay"] == 0.0:
            assert all(p.ndim < 2 for p in group["params"])
        else:
            assert group["weight_decay"] == 0.05 and all(p.ndim >= 2 for p in group["params"])
    assert len(seen) == len(set(seen))  # no parameter twice
    assert set(seen) == {id(p) for p in model.trainable_parameters()}
    assert not set(seen) & {id(p) for p in model.lm.parameters()}
    assert any(g["weight_decay"] == 0.0 for g in optimizer.param_groups)  # the biases and norms exist
    default = _optimizer_config("train.encoder_lr=null")
    assert {g["lr"] for g in build_optimizer(model, default).param_groups} == {1e-2}


def _schedule(config, model) -> list[list[float]]:
    """The learning rate of every group at each step 0..max_steps."""
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)
    lrs = []
    for _ in range(config.train.max_steps + 1):
        lrs.append(scheduler.get_last_lr())
        optimizer.step()  # no gradients: nothing changes, but the scheduler's order is respected
        scheduler.step()
    return lrs


def test_warmup_then_cosine_to_min_lr(tiny_model):
    """Step s < warmup: lr * (s+1) / warmup; then cosine down to min_lr_ratio * lr at max_steps."""
    config = _optimizer_config()
    lrs = _schedule(config, tiny_model)
    encoder_groups = [i for i, g in enumerate(build_optimizer(tiny_model, config).param_groups) if g["lr"] == 1e-3]
    projection = [lr[-1] for lr in lrs]  # the last group is the projection's
    assert projection[:4] == pytest.approx([1e-2 * (s + 1) / 4 for s in range(4)])
    assert projection[0] == pytest.approx(1e-2 / 4)
    assert projection[4] == pytest.approx(1e-2)  # warmup done: the peak
    assert projection[7] == pytest.approx(1e-2 * (0.1 + 0.9 * 0.5))  # halfway down the cosine
    assert projection[10] == pytest.approx(1e-2 * 0.1)
    assert all(a >= b for a, b in zip(projection[4:], projection[5:]))
    for lr in lrs:  # the encoder's groups follow the same factor from their own base rate
        assert all(lr[i] / 1e-3 == pytest.approx(lr[-1] / 1e-2) for i in encoder_groups)
    no_warmup = _schedule(_optimizer_config("train.warmup_steps=0"), tiny_model)
    assert no_warmup[0][-1] == pytest.approx(1e-2) and no_warmup[10][-1] == pytest.approx(1e-3)


# ---------------------------------------------------------------------------- SIGINT


@pytest.mark.slow
def test_sigint_checkpoints_exits_130_and_resumes(tmp_path):
    """The first Ctrl-C finishes the step, writes a checkpoint, prints one 'stopped:' line and exits 130."""
    run = tmp_path / "run"
    args = [f"train.output_dir={run}", "train.checkpoint_every=2", "train.log_every=1", "eval.splits=[]"]
    cmd = [sys.executable, "-m", "frozen_prefix.train", "--config", str(TINY), "train.max_steps=200", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_file(run / "checkpoints" / "step_00000002", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    stopped = [ln for ln in err.splitlines() if ln.startswith("stopped:")]
    assert len(stopped) == 1 and "stopped by SIGINT" in stopped[0] and "train.resume=auto" in stopped[0], err
    assert "Traceback" not in err
    step = int(re.search(r"at step (\d+)", stopped[0]).group(1))
    ckpt = latest_checkpoint(run)
    assert ckpt is not None and ckpt.name == f"step_{step:08d}"
    assert json.loads((ckpt / "meta.json").read_text())["step"] == step
    assert not (run / "model").exists()  # stopped, not finished
    # Resume it to a near end (the full 200 steps would only cost time).
    assert main(["--config", str(TINY), f"train.max_steps={step + 2}", "train.resume=auto", *args]) == 0
    records = _metrics(run)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, step + 3))
    assert records[-1]["step"] == step + 2 and records[-1]["final"] is True
    assert (run / "model" / "model.safetensors").is_file()


# ---------------------------------------------------------------------------- resume with best/

EVERY = ["eval.every=2", "eval.best_metric=shapes_exact", "eval.metrics=false", "eval.every_images=4",
         "train.checkpoint_every=2", "train.keep_last=10", "eval.splits=[]", "train.log_every=1"]


@pytest.mark.slow
def test_resume_keeps_best_across_the_restart(tmp_path, monkeypatch, caplog):
    """best/ and the trainer's best survive a resume: a later tie does not replace the earlier best."""
    run = tmp_path / "run"
    real = train_module.evaluate_source
    scripted = [0.25, 0.5, 0.5, 0.25]  # the shapes_exact values of the evaluations at steps 2, 4, 6, 8

    def evaluate(*args, **kwargs):
        scores, rows = real(*args, **kwargs)
        assert "shapes_exact" in scores and scores["images"] == 4  # the real evaluation ran
        return {**scores, "shapes_exact": scripted.pop(0)}, rows

    monkeypatch.setattr(train_module, "evaluate_source", evaluate)
    fit(TINY, [f"train.output_dir={run}", "train.max_steps=4", *EVERY])
    assert json.loads((run / "best" / "best.json").read_text())["step"] == 4
    with caplog.at_level(logging.WARNING, logger="frozen_prefix"):
        fit(TINY, [f"train.output_dir={run}", "train.max_steps=8", "train.resume=auto", *EVERY])
    assert not scripted  # exactly four evaluations: 2 and 4, then 6 and 8 after the resume
    warned = [r.getMessage() for r in caplog.records if "did not last run with" in r.getMessage()]
    assert len(warned) == 1 and "(train.max_steps: 4 -> 8)" in warned[0], warned  # the extension is named

    evals = [r for r in _metrics(run) if "val/shapes_exact" in r]
    assert [r["step"] for r in evals] == [2, 4, 6, 8]
    values = [r["val/shapes_exact"] for r in evals]
    best_value = max(values)
    best_step = next(r["step"] for r in evals if r["val/shapes_exact"] == best_value)
    assert (best_value, best_step) == (0.5, 4)
    assert [r["is_best"] for r in evals] == [True, True, False, False]
    assert all((r["best_value"], r["best_step"]) == (best_value, best_step) for r in evals[1:])
    best = json.loads((run / "best" / "best.json").read_text())
    assert best == {"metric": "shapes_exact", "value": best_value, "step": best_step}
    state = torch.load(latest_checkpoint(run) / "state.pt", weights_only=True)
    assert state["trainer"]["step"] == 8 and state["trainer"]["best"] == best
    # best/ holds the weights of step 4, as its checkpoint does.
    saved = load_file(str(run / "best" / "model.safetensors"))
    at_4 = load_file(str(run / "checkpoints" / "step_00000004" / "trainable.safetensors"))
    at_8 = load_file(str(run / "checkpoints" / "step_00000008" / "trainable.safetensors"))
    assert all(torch.equal(saved[k], at_4[k]) for k in at_4)
    assert any(not torch.equal(saved[k], at_8[k]) for k in at_8)
    assert FrozenPrefixCaptioner.from_pretrained(run / "best").config.model.encoder == "test_resnet"


# ---------------------------------------------------------------------------- FROZEN_PREFIX_DEBUG


def test_user_error_is_one_line_unless_debugging(monkeypatch, capsys):
    """A config error: one stderr line and exit 2; with FROZEN_PREFIX_DEBUG=1 the ConfigError itself."""
    monkeypatch.delenv("FROZEN_PREFIX_DEBUG", raising=False)
    assert main(["--config", str(TINY), "model.encdoer=x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown config key 'model.encdoer'") and len(err.splitlines()) == 1, err
    monkeypatch.setenv("FROZEN_PREFIX_DEBUG", "1")
    with pytest.raises(ConfigError, match="model.encdoer"):
        main(["--config", str(TINY), "model.encdoer=x"])
    monkeypatch.setenv("FROZEN_PREFIX_DEBUG", "0")  # "0" means off
    assert main(["--config", str(TINY), "model.encdoer=x"]) == 2


def changes_since(run: Path, config) -> list[str]:
    """What a resumption of the run folder with config would warn about."""
    return config_changes(run / "config.yaml", config, ignore=RESUME_NEUTRAL)


def test_a_resumption_names_the_settings_it_changes(tmp_path):
    for recipe in (TINY, ROOT / "configs" / "shapes_chat.yaml"):  # mixtures, lists and nested sections round-trip
        config = load_config(recipe, [f"train.output_dir={tmp_path}"])
        save_config(config, tmp_path / "config.yaml")
        assert changes_since(tmp_path, load_config(recipe, ["train.resume=auto", "train.progress=false"])) == []
    changed = load_config(ROOT / "configs" / "shapes_chat.yaml", ["train.max_steps=500", "data.train=shapes:train"])
    changes = changes_since(tmp_path, changed)
    assert changes == ["data.train: (a list) -> (a mapping)", "train.max_steps: 800 -> 500"]
    assert changes_since(tmp_path / "elsewhere", changed) == []  # no record of the first config: nothing to say
    older = config.to_dict()
    del older["model"]["deep_prefix"]  # written before the key existed: its default is what that run had
    older["model"]["retired_option"] = 1  # a key this version no longer knows: the raw files are compared
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(older))
    expected = ["model.deep_prefix: unset -> False", "model.retired_option: 1 -> unset"]
    assert changes_since(tmp_path, config) == expected
    del older["model"]["retired_option"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(older))
    assert changes_since(tmp_path, config) == []
