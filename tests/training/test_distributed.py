"""Scale-out under torchrun: 2 CPU processes (gloo) against one process, resume across world sizes, FSDP2."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from frozen_prefix import FrozenPrefixCaptioner, fit, load_config
from frozen_prefix.data import EpochSampler
from frozen_prefix.errors import FrozenPrefixError
from frozen_prefix.evaluate import main as evaluate_main
from frozen_prefix.parallel.distributed import Dist
from frozen_prefix.training.checkpoint import latest_checkpoint
from frozen_prefix.training.preflight import check_world
from frozen_prefix.training.strategies import TrainableCore, prepare

from ..conftest import ROOT, TINY, write_shards

# No BatchNorm anywhere (test_convnext has LayerNorms, the features are layer-normed): a batch split over two
# processes then computes exactly what the whole batch computes in one, up to the order of sums.
NO_BATCHNORM = ["model.encoder=test_convnext", "model.feature_norm=layer"]
# SDPA, not the CPU's eager default: eager's matmuls round differently with each rank's own padded length, and
# AdamW turns those last-bit differences in near-zero gradients into a few weights 4e-5 apart after 5 steps.
RUN = [*NO_BATCHNORM, "train.max_steps=8", "train.checkpoint_every=4", "train.keep_last=10", "train.log_every=1",
       "train.val_every=4", "eval.max_images=8", "model.lm_attention=sdpa"]
CLOSE = {"rtol": 1e-4, "atol": 1e-5}


def torchrun(*args: str, module: str = "frozen_prefix.train", nproc: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node N -m MODULE ARGS`, one thread per process (as torchrun sets it)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", module]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*cmd, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def train_args(run: Path, *overrides: str) -> list[str]:
    return ["--config", str(TINY), f"train.output_dir={run}", *RUN, *overrides]


@pytest.fixture
def one_thread():
    """The single-process references run with one thread, as each torchrun process does: the same kernels."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def records(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run) if r.get("loss") is not None}


def weights(folder: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(folder / name))


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.allclose(a[k], b[k], **CLOSE)]
    assert not different, different


def files(run: Path) -> set[str]:
    return {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def one(tmp_path_factory) -> Path:
    """The reference: one process, global batch 8, 8 steps, checkpoints at 4 and 8."""
    run = tmp_path_factory.mktemp("one") / "run"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fit(TINY, train_args(run)[2:])
    finally:
        torch.set_num_threads(before)
    return run


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> Path:
    """The same config in 2 processes: each takes 4 images of every global batch of 8."""
    run = tmp_path_factory.mktemp("two") / "run"
    result = torchrun(*train_args(run))
    assert result.returncode == 0, result.stderr[-3000:]
    return run


# ---------------------------------------------------------------------------- the data order


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("grouped", [False, True])
def test_rank_batches_make_the_global_batch(monkeypatch, world, grouped):
    """Rank r's i-th batch of B/N, over all ranks, is exactly the one-process order's i-th batch of B, resumed too."""
    batch, n = 8, 203
    length = (lambda key: key[0] % 7) if grouped else None
    whole = EpochSampler(n, seed=3, epoch=1, length=length, batch_size=batch).keys()
    for start in (0, 16):  # a fresh epoch, and one resumed at global position 16
        shares = []
        for rank in range(world):
            monkeypatch.setattr("frozen_prefix.data.sampler.rank_and_world", lambda rank=rank: (rank, world))
            sampler = EpochSampler(n, seed=3, epoch=1, start=start // world, length=length, batch_size=batch)
            keys, size = list(sampler), batch // world  # what a DataLoader with drop_last makes of it
            shares.append([keys[i : i + size] for i in range(0, len(keys) - size + 1, size)])
        assert len({len(s) for s in shares}) == 1  # every rank has as many batches: no rank waits for the others
        expected = [whole[i : i + batch] for i in range(start, len(whole) - batch + 1, batch)]
        assert len(shares[0]) == len(expected)  # the same epoch length (drop_last) as one process
        for i, global_batch in enumerate(expected):
            assert sorted(k for share in shares for k in share[i]) == sorted(global_batch)


def test_batch_size_is_global_and_must_split():
    config = load_config(TINY, ["train.batch_size=6"])
    check_world(config, Dist(world=2))  # 3 images per process
    with pytest.raises(FrozenPrefixError, match="does not split over 4 processes"):
        check_world(config, Dist(world=4))
    with pytest.raises(FrozenPrefixError, match="images_per_sequence=2"):
        check_world(load_config(TINY, ["train.batch_size=8", "data.images_per_sequence=2"]), Dist(world=8))


def test_sync_batchnorm_on_the_cpu_is_one_line(tiny_model):
    config = load_config(TINY, ["train.sync_batchnorm=true"])
    with pytest.raises(FrozenPrefixError, match="sync_batchnorm needs CUDA"):
        prepare(tiny_model, config, Dist(world=2, active=True))


def test_ddp_sees_only_the_trainable_modules(tiny_model):
    """The module DDP wraps holds the encoder and the projection; the LM is no submodule, parameter or buffer of it."""
    core = TrainableCore(tiny_model)
    assert {id(p) for p in core.parameters()} == {id(p) for p in tiny_model.trainable_parameters()}
    lm = {id(t) for t in [*tiny_model.lm.parameters(), *tiny_model.lm.buffers()]}
    assert not lm & {id(t) for t in [*core.parameters(), *core.buffers()]}
    assert not any(m is tiny_model.lm for m in core.modules())


def test_the_7b_recipe_loads_and_splits_over_8_or_4_gpus():
    config = load_config(ROOT / "configs" / "coco_karpathy_7b.yaml")
    assert config.train.fsdp == "lm" and config.model.feature_norm == "layer"
    for world in (8, 4):
        check_world(config, Dist(world=world))


# ---------------------------------------------------------------------------- DDP


@pytest.mark.slow
def test_two_processes_train_what_one_process_trains(one, two):
    """2 ranks x 4 images = 1 process x 8: the same weights, losses and token counts; only rank 0 wrote."""
    assert_close(weights(one / "model"), weights(two / "model"))
    for step in (4, 8):
        assert_close(
            weights(one / "checkpoints" / f"step_{step:08d}", "trainable.safetensors"),
            weights(two / "checkpoints" / f"step_{step:08d}", "trainable.safetensors"),
        )
    assert losses(one) == pytest.approx(losses(two), rel=1e-5)
    tokens = [[r["tokens"] for r in records(run) if "tokens" in r] for run in (one, two)]
    assert tokens[0] == tokens[1] and len(tokens[0]) == 8  # the global batches hold the same examples
    val = [[r["val_loss"] for r in records(run) if "val_loss" in r] for run in (one, two)]
    assert val[0] == pytest.approx(val[1], rel=1e-5) and len(val[0]) == 3  # steps 4, 8 and the final one
    # One line per step and one final line: nothing written twice; the same files as one process writes.
    assert [r["step"] for r in records(two)] == [1, 2, 3, 4, 5, 6, 7, 8, 8]
    assert files(two) == files(one)
    evaluated = [json.loads(ln) for ln in (two / "eval" / "val_per_image.jsonl").read_text().splitlines()]
    reference = [json.loads(ln) for ln in (one / "eval" / "val_per_image.jsonl").read_text().splitlines()]
    assert [r["image_id"] for r in evaluated] == [r["image_id"] for r in reference] and len(evaluated) == 8
    state = torch.load(latest_checkpoint(two) / "state.pt", weights_only=True)
    assert state["trainer"]["world_size"] == 2 and len(state["rng_ranks"]) == 2
    lm = FrozenPrefixCaptioner(load_config(TINY, NO_BATCHNORM)).lm.state_dict()
    assert not set(weights(two / "model")) & {f"lm.{k}" for k in lm}  # no LM weight was ever saved


def _interrupted(source: Path, target: Path) -> Path:
    """A copy of a run as if it had been stopped right after its step-4 checkpoint."""
    (target / "checkpoints").mkdir(parents=True)
    shutil.copytree(source / "checkpoints" / "step_00000004", target / "checkpoints" / "step_00000004")
    kept = [ln for ln in (source / "metrics.jsonl").read_text().splitlines() if json.loads(ln)["step"] <= 4]
    (target / "metrics.jsonl").write_text("".join(ln + "\n" for ln in kept))
    return target


@pytest.mark.slow
def test_resume_in_two_processes_and_in_one(one, two, tmp_path, one_thread):
    """A 2-process run stopped at step 4 resumes in 2 processes (bitwise) and in 1; both match the unbroken run."""
    in_two = _interrupted(two, tmp_path / "in_two")
    result = torchrun(*train_args(in_two, "train.resume=auto"))
    assert result.returncode == 0, result.stderr[-3000:]
    in_one = _interrupted(two, tmp_path / "in_one")
    fit(TINY, train_args(in_one, "train.resume=auto")[2:])
    resumed, unbroken = weights(in_two / "model"), weights(two / "model")
    assert all(torch.equal(resumed[k], unbroken[k]) for k in unbroken)  # the same world size: bitwise exact
    for run in (in_two, in_one):
        assert_close(weights(one / "model"), weights(run / "model"))
        assert losses(run) == pytest.approx(losses(one), rel=1e-5)
        assert [r["step"] for r in records(run)] == [1, 2, 3, 4, 5, 6, 7, 8, 8]


@pytest.mark.slow
def test_a_stream_trains_the_same_in_two_processes(tmp_path, one_thread):
    """Streamed webdataset shards: each rank decodes every other example; the steps see what one process sees."""
    write_shards(tmp_path / "wds", shards=2, per_shard=6)
    stream = ["data.train.kind=webdataset", f"data.train.path={tmp_path / 'wds' / '*.tar'}",
              "data.train.streaming=true", "data.train.size=null", "data.val.kind=webdataset",
              f"data.val.path={tmp_path / 'wds' / '*.tar'}", "data.val.streaming=true", "data.val.size=5",
              "train.batch_size=4", "train.max_steps=5", "train.checkpoint_every=0", "train.val_every=0"]
    result = torchrun(*train_args(tmp_path / "two", *stream))
    assert result.returncode == 0, result.stderr[-3000:]
    fit(TINY, train_args(tmp_path / "one", *stream)[2:])
    one, two = tmp_path / "one", tmp_path / "two"
    assert_close(weights(one / "model"), weights(two / "model"))
    assert [r["tokens"] for r in records(one) if "tokens" in r] == [r["tokens"] for r in records(two) if "tokens" in r]
    epochs = [[r["epoch"] for r in records(run) if "epoch" in r] for run in (one, two)]
    assert epochs[0] == epochs[1] == [0, 0, 0, 1, 1]  # 12 images, 3 steps of 4; the end is seen on the 4th
    assert (two / "eval" / "val_per_image.jsonl").read_text().count("\n") == 5  # the stream's 5, split and gathered


@pytest.mark.slow
def test_evaluate_under_torchrun_gives_one_process_captions(one, tmp_path, capsys):
    """Each rank captions every other image; rank 0 gathers and scores: the same files, byte for byte."""
    args = ["--model", str(one / "model"), "--split", "val", "--no-progress", "eval.max_images=7"]
    result = torchrun(*args, "--out", str(tmp_path / "two"), module="frozen_prefix.evaluate")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("results written to") == 1  # rank 0 reports
    assert evaluate_main([*args, "--out", str(tmp_path / "one")]) == 0
    for name in ("metrics.json", "predictions.json", "per_image.jsonl"):
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text(), name
    assert len((tmp_path / "one" / "per_image.jsonl").read_text().splitlines()) == 7


@pytest.mark.slow
def test_non_finite_guard_stops_every_rank(tmp_path):
    """A diverging run stops on all ranks at the same step: one 'stopped:' line (rank 0's), no hang."""
    run = tmp_path / "run"
    result = torchrun(*train_args(
        run, "train.max_steps=40", "train.lr=1e12", "train.warmup_steps=0", "train.max_bad_steps=2",
        "train.checkpoint_every=0",
    ))
    assert result.returncode != 0
    stopped = [ln for ln in result.stderr.splitlines() if ln.startswith("stopped:")]
    assert len(stopped) == 1 and "non-finite steps in a row" in stopped[0], result.stderr[-3000:]
    # torchrun's summary: rank 0 exits with the user-error code and speaks for the group (rank 1 exits 0)
    assert result.stderr.count("exitcode  : 2") == 1 and "rank      : 0" in result.stderr
    assert records(run)[-1]["loss"] is None and not (run / "model").exists()


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(p) for p in text]
    return found


def _rank_of(pid: int) -> int | None:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    ranks = [int(e.split(b"=", 1)[1]) for e in environ if e.startswith(b"RANK=")]
    return ranks[0] if ranks else None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the workers through /proc (Linux)")
def test_sigterm_to_one_rank_stops_both_with_a_checkpoint(tmp_path, one_thread):
    """SIGTERM reaches rank 1 only: the stop flag is all-reduced, both ranks stop at one step, rank 0 checkpoints."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "frozen_prefix.train", *train_args(run, "train.max_steps=100000", "train.checkpoint_every=2")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (run / "checkpoints" / "step_00000002").is_dir():
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.1)
        workers = {_rank_of(pid): pid for pid in _children(proc.pid)}
        os.kill(workers[1], signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    stopped = [ln for ln in err.splitlines() if ln.startswith("stopped:")]
    assert len(stopped) == 1 and "stopped by SIGTERM" in stopped[0], err[-3000:]
    step = int(stopped[0].split("at step ")[1].split(";")[0])
    assert latest_checkpoint(run).name == f"step_{step:08d}"
    assert max(r["step"] for r in records(run)) == step  # rank 0 stopped where the checkpoint is
    fit(TINY, train_args(run, f"train.max_steps={step + 1}", "train.resume=auto", "eval.splits=[]")[2:])
    assert max(r["step"] for r in records(run)) == step + 1


# ---------------------------------------------------------------------------- FSDP2


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["all", "lm"])
def test_fsdp_trains_what_one_process_trains_and_saves_a_loadable_model(one, tmp_path, mode, one_thread):
    """FSDP2 on 2 CPU processes: the same weights as one process; model/ and the checkpoints load in one process."""
    run = tmp_path / "run"
    result = torchrun(*train_args(run, f"train.fsdp={mode}"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_close(weights(one / "model"), weights(run / "model"))
    assert losses(run) == pytest.approx(losses(one), rel=1e-5)
    model = FrozenPrefixCaptioner.from_pretrained(run / "model")
    assert_close(weights(run / "model"), {k: v for k, v in model.trainable_state_dict().items()})
    # The gathered checkpoint is an ordinary one: one process resumes it (optimizer state included) and ends
    # where the unbroken one-process run ended.
    resumed = _interrupted(run, tmp_path / "resumed")
    fit(TINY, train_args(resumed, "train.resume=auto", "eval.splits=[]")[2:])
    assert_close(weights(one / "model"), weights(resumed / "model"))
