"""train.ema_decay: the average's arithmetic, its checkpoints, exact resume, and what is saved and evaluated."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from frozen_prefix import FrozenPrefixCaptioner, load_config
from frozen_prefix.errors import ConfigError
from frozen_prefix.train import fit
from frozen_prefix.training.checkpoint import EMA_WEIGHTS, WEIGHTS, load_checkpoint, save_checkpoint
from frozen_prefix.training.ema import WeightAverage
from frozen_prefix.training.optim import build_optimizer, build_scheduler

from ..conftest import TINY

DECAY = 0.9  # high enough that the average visibly lags the live weights after a few steps
STEPS = ["train.max_steps=6", "train.checkpoint_every=3", "train.keep_last=10", "train.log_every=1", "eval.splits=[]"]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors."""
    return load_file(str(path))


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Same keys and bitwise equal tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _run(run: Path, *overrides: str) -> FrozenPrefixCaptioner:
    """Six tiny steps with checkpoints at 3 and 6, into run."""
    return fit(TINY, [f"train.output_dir={run}", *STEPS, *overrides])


@torch.no_grad()
def _shift(model: FrozenPrefixCaptioner, amount: float) -> None:
    """Move every trainable float tensor (buffers too) and count one more BatchNorm batch."""
    for value in model.trainable_modules().state_dict().values():
        value.add_(1 if not value.is_floating_point() else amount)


def test_update_follows_the_formula_and_swaps_back(tiny_model):
    ema = WeightAverage(tiny_model, DECAY)
    start = {k: v.clone() for k, v in tiny_model.trainable_state_dict().items()}
    counters = [k for k, v in start.items() if not v.is_floating_point()]
    assert counters  # the test encoder has BatchNorm: its num_batches_tracked must be copied, not averaged
    expected = {k: v.float() for k, v in start.items()}
    for step, amount in ((1, 0.5), (100, -0.25)):
        _shift(tiny_model, amount)
        ema.update(tiny_model, step)
        d = min(DECAY, (1 + step) / (10 + step))
        live = tiny_model.trainable_state_dict()
        for key, value in live.items():
            expected[key] = value.clone() if key in counters else d * expected[key] + (1 - d) * value.float()
    assert ema.decay_at(1) == pytest.approx(2 / 11) and ema.decay_at(100) == DECAY  # warmup, then the cap
    for key, value in ema.state_dict().items():
        assert torch.allclose(value, expected[key], atol=1e-6, rtol=1e-6), key
        assert value.dtype == (torch.float32 if key not in counters else start[key].dtype)
    live = {k: v.clone() for k, v in tiny_model.trainable_state_dict().items()}
    with ema.swapped_in(tiny_model):
        assert _equal(tiny_model.trainable_state_dict(), ema.state_dict())
        assert not _equal(tiny_model.trainable_state_dict(), live)
    assert _equal(tiny_model.trainable_state_dict(), live)  # bit for bit: training goes on where it was


def test_lm_is_not_averaged_and_stays_as_it_was(tiny_model):
    lm = {k: v.clone() for k, v in tiny_model.lm.state_dict().items()}
    ema = WeightAverage(tiny_model, DECAY)
    assert ema.state_dict() and not any(key.startswith("lm.") for key in ema.state_dict())
    _shift(tiny_model, 1.0)
    ema.update(tiny_model, 5)
    with ema.swapped_in(tiny_model):
        pass
    ema.copy_to(tiny_model)
    assert _equal(tiny_model.lm.state_dict(), lm)


def test_checkpoint_without_an_average_starts_one_with_a_warning(tiny_config, tmp_path, caplog):
    model = FrozenPrefixCaptioner(tiny_config)
    optimizer = build_optimizer(model, tiny_config)
    path = save_checkpoint(tmp_path, model, optimizer, build_scheduler(optimizer, tiny_config), {"step": 7})
    assert not (path / EMA_WEIGHTS).exists()
    fresh = FrozenPrefixCaptioner(tiny_config)
    _shift(fresh, 3.0)
    ema = WeightAverage(fresh, DECAY)
    with caplog.at_level(logging.WARNING):
        load_checkpoint(path, fresh, ema=ema)
    assert "holds no average" in caplog.text
    assert _equal(ema.state_dict(), {k: v.float() if v.is_floating_point() else v
                                     for k, v in model.trainable_state_dict().items()})


def test_ema_decay_is_validated():
    with pytest.raises(ConfigError, match="train.ema_decay"):
        load_config(TINY, ["train.ema_decay=1.0"])
    with pytest.raises(ConfigError, match="train.ema_decay"):
        load_config(TINY, ["train.ema_decay=-0.1"])


def test_ema_off_saves_the_live_weights_and_no_average(tmp_path):
    run = tmp_path / "off"
    _run(run)
    last = run / "checkpoints" / "step_00000006"
    assert not (last / EMA_WEIGHTS).exists()
    assert json.loads((last / "meta.json").read_text())["files"] == [WEIGHTS, "state.pt"]
    assert _equal(_tensors(run / "model" / "model.safetensors"), _tensors(last / WEIGHTS))


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    """A 6-step run with the average on, checkpoints at 3 and 6; and the fitted model it returned."""
    run = tmp_path_factory.mktemp("ema") / "full"
    return run, _run(run, f"train.ema_decay={DECAY}")


def test_saved_model_is_the_average_not_the_live_weights(ema_run):
    run, model = ema_run
    last = run / "checkpoints" / "step_00000006"
    saved, average, live = (_tensors(p) for p in (run / "model" / "model.safetensors", last / EMA_WEIGHTS,
                                                   last / WEIGHTS))
    assert _equal(saved, average)
    assert not _equal(saved, live)
    assert _equal({k: v.cpu() for k, v in model.trainable_state_dict().items()}, average)  # fit returns it too
    assert not any(key.startswith("lm.") for key in average)
    fresh_lm = FrozenPrefixCaptioner(load_config(TINY)).lm.state_dict()  # the tiny LM is built from a fixed seed
    assert _equal(model.lm.state_dict(), fresh_lm)


@pytest.mark.slow
def test_resume_with_the_average_is_bitwise_exact(ema_run, tmp_path):
    full, _ = ema_run
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_00000003", resumed / "checkpoints" / "step_00000003")
    _run(resumed, f"train.ema_decay={DECAY}", "train.resume=auto")
    for name in ("model/model.safetensors", f"checkpoints/step_00000006/{EMA_WEIGHTS}",
                 f"checkpoints/step_00000006/{WEIGHTS}"):
        assert _equal(_tensors(full / name), _tensors(resumed / name)), name


def test_skipped_non_finite_step_does_not_move_the_average(tmp_path, monkeypatch):
    real_forward, calls, updated = FrozenPrefixCaptioner.forward, {"n": 0}, []

    def forward(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 2:  # the second training step's loss is NaN: the trainer skips its update
                out["loss"] = out["loss"] * float("nan")
        return out

    real_update = WeightAverage.update
    monkeypatch.setattr(FrozenPrefixCaptioner, "forward", forward)
    monkeypatch.setattr(WeightAverage, "update", lambda self, model, step: (updated.append(step),
                                                                           real_update(self, model, step)))
    fit(TINY, [f"train.output_dir={tmp_path / 'run'}", "train.max_steps=3", f"train.ema_decay={DECAY}"])
    assert updated == [1, 3]
