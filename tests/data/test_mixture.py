"""Training on a weighted mixture of captions, VQA and dialogue: deterministic, resumable, all three losses."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest
from safetensors.torch import load_file

from frozen_prefix import fit, load_config
from frozen_prefix.data import (
    EpochSampler,
    MixtureSource,
    ShapesDataset,
    ShapesDialogue,
    ShapesVQA,
    TrainExamples,
    build_train_source,
)
from frozen_prefix.errors import ConfigError
from frozen_prefix.evaluate import main as evaluate_main

from ..conftest import TINY

MIX = (
    "data.train=[{kind: shapes, split: train, size: 64}, {kind: shapes_vqa, split: train, size: 64, weight: 2},"
    " {kind: shapes_dialogue, split: train, size: 64}]"
)


def test_mixture_draws_by_weight_and_is_the_same_every_time():
    mix = MixtureSource([ShapesDataset("train", 50), ShapesVQA("train", 50)], [1.0, 3.0], size=2000)
    counts = Counter(mix.pick(i)[0] for i in range(len(mix)))
    assert 0.70 < counts[1] / len(mix) < 0.80  # weight 3 of 4
    again = MixtureSource([ShapesDataset("train", 50), ShapesVQA("train", 50)], [1.0, 3.0], size=2000)
    assert [again.pick(i) for i in range(100)] == [mix.pick(i) for i in range(100)]
    item = mix[next(i for i in range(100) if mix.pick(i)[0] == 1)]
    assert "question" in item and "answers" in item


def test_config_mixtures_and_their_errors():
    config = load_config(TINY, [MIX])
    assert [s.kind for s in config.data.train] == ["shapes", "shapes_vqa", "shapes_dialogue"]
    assert config.data.train[1].weight == 2.0
    source = build_train_source(config.data.train, seed=0)
    assert isinstance(source, MixtureSource) and len(source) == 192
    with pytest.raises(ConfigError, match=r"data.train\[1\].weight"):
        load_config(TINY, ["data.train=[shapes:train, {kind: shapes_vqa, weight: -1}]"])
    with pytest.raises(ConfigError, match="empty list"):
        load_config(TINY, ["data.train=[]"])
    assert load_config(TINY, ["data.train=shapes_dialogue:val"]).data.train.kind == "shapes_dialogue"


@pytest.mark.slow
def test_joint_training_runs_and_resumes_exactly(tmp_path):
    common = [MIX, "train.max_steps=4", "eval.splits=[]", "train.val_every=0", "train.log_every=1",
              "train.checkpoint_every=2", "train.keep_last=5"]
    fit(TINY, [f"train.output_dir={tmp_path / 'once'}", *common])
    shutil.copytree(tmp_path / "once", tmp_path / "twice")
    shutil.rmtree(tmp_path / "twice" / "checkpoints" / "step_00000004")  # as if stopped after step 2
    shutil.rmtree(tmp_path / "twice" / "model")
    fit(TINY, [f"train.output_dir={tmp_path / 'twice'}", *common, "train.resume=auto"])
    once = load_file(str(tmp_path / "once" / "model" / "model.safetensors"))
    twice = load_file(str(tmp_path / "twice" / "model" / "model.safetensors"))
    assert all((once[k] == twice[k]).all() for k in once)  # bitwise: the mixture's draws are functions of the index
    lines = [json.loads(ln) for ln in (tmp_path / "once" / "metrics.jsonl").read_text().splitlines()]
    assert all(ln["tokens"] > 0 for ln in lines if "tokens" in ln)


def test_dialogue_evaluation_command(tmp_path, capsys):
    model = fit(TINY, [f"train.output_dir={tmp_path / 'run'}", "train.max_steps=1", "eval.splits=[]"])
    out = tmp_path / "eval"
    argv = ["--model", str(tmp_path / "run" / "model"), "--task", "dialogue", "--split", "test", "--out", str(out),
            "--no-progress", "data.test=shapes:test", "eval.dialogue.max_conversations=3",
            "eval.dialogue.max_new_tokens=4"]
    assert evaluate_main(argv) == 0
    metrics = json.loads((out / "test_dialogue_metrics.json").read_text())
    assert set(metrics) >= {"gold", "own"} and "real_minus_blind" in metrics["gold"]
    rows = (out / "test_dialogue_examples.jsonl").read_text().splitlines()
    assert len(rows) >= 3 and "dialogue" in capsys.readouterr().out
    assert len(ShapesDialogue("test", 3)) == 3 and model is not None


def test_grouping_a_mixture_by_length_makes_one_task_batches():
    mix = MixtureSource(
        [ShapesDataset("train", 200), ShapesVQA("train", 200), ShapesDialogue("train", 200)], [1, 1, 1], size=960
    )
    examples = TrainExamples(mix, "error", "shortest")
    assert examples.can_group_by_length()
    which, length = examples.length_key((5, 0))
    assert which == mix.pick(5)[0] and length > 0
    keys = EpochSampler(len(examples), seed=0, length=examples.length_key, batch_size=16).keys()
    batches = [keys[i : i + 16] for i in range(0, len(keys), 16)]
    tasks = [{mix.pick(index)[0] for index, _ in batch} for batch in batches]
    # only a batch at a task boundary of a sorted window mixes tasks; at most 3 windows of 32 batches here
    assert sum(len(t) > 1 for t in tasks) <= 2 * 3
    one_task = [batch for batch, task in zip(batches, tasks, strict=True) if len(task) == 1]
    lengths = [[examples.length_key(key)[1] for key in batch] for batch in one_task]
    assert all(max(b) - min(b) < 40 for b in lengths)  # similar lengths within a one-task batch
    ungrouped = EpochSampler(len(examples), seed=0, batch_size=16).keys()
    mixed = sum(len({mix.pick(i)[0] for i, _ in ungrouped[b : b + 16]}) > 1 for b in range(0, len(ungrouped), 16))
    assert mixed > len(batches) * 0.9  # without grouping nearly every batch mixes the three tasks
