"""The evaluate and caption commands end to end on the tiny recipe, and caption metrics during training."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from PIL import Image

from frozen_prefix import FrozenPrefixCaptioner, load_config
from frozen_prefix.caption import main as caption_main
from frozen_prefix.data import ShapesDataset
from frozen_prefix.evaluate import main as evaluate_main
from frozen_prefix.evaluation.metrics import coco
from frozen_prefix.evaluation.metrics.coco import coco_metrics, spice_unavailable
from frozen_prefix.train import main as train_main

from ..conftest import TINY

needs_java = pytest.mark.skipif(
    shutil.which("java") is None, reason="needs Java for pycocoevalcap (PTB tokenizer, METEOR): install a JRE 8+"
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A saved tiny model (untrained, seeded weights)."""
    torch.manual_seed(0)
    model = FrozenPrefixCaptioner(load_config(TINY))
    return model.save_pretrained(tmp_path_factory.mktemp("saved") / "model")


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """Three shapes images on disk, and a JSON Lines file naming them with captions."""
    folder = tmp_path_factory.mktemp("images")
    data = ShapesDataset("test", size=3)
    lines = []
    for i in range(3):
        item = data[i]
        item["image"].save(folder / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "captions": item["captions"]}))
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    return err


@pytest.mark.slow
@pytest.mark.java
@needs_java
def test_evaluate_end_to_end(model_dir, tmp_path, capsys, caplog, monkeypatch):
    monkeypatch.setattr(coco, "_SPICE_NOTED", False)
    out = tmp_path / "eval"
    argv = [
        "--model", str(model_dir), "--config", str(TINY), "--split", "val", "--out", str(out), "--no-progress",
        "--max-new-tokens", "8", "eval.max_images=6", "eval.metrics=true", "eval.grid=4",
    ]
    with caplog.at_level(logging.WARNING, logger="frozen_prefix.evaluation.metrics.coco"):
        assert evaluate_main(argv) == 0
    assert "val: images=6" in capsys.readouterr().out
    if spice_unavailable() is not None:  # offline: said in one line (the CLI logs it to stderr), the rest reported
        assert [r.getMessage() for r in caplog.records] == [spice_unavailable()]
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider", "shapes_exact"} <= set(metrics)
    assert metrics["images"] == 6
    predictions = json.loads((out / "predictions.json").read_text())
    assert len(predictions) == 6 and all(set(p) == {"image_id", "caption"} for p in predictions)
    rows = [json.loads(line) for line in (out / "per_image.jsonl").read_text().splitlines()]
    assert [r["image_id"] for r in rows] == [p["image_id"] for p in predictions]
    assert all({"cider", "bleu4", "meteor", "exact", "references"} <= set(r) for r in rows)
    assert all(len(p["caption"].split()) <= 8 for p in predictions)  # the decoding flag reached generation
    # the numbers are pycocoevalcap's for exactly these predictions and references
    references = {r["image_id"]: r["references"] for r in rows}
    recomputed = coco_metrics({p["image_id"]: p["caption"] for p in predictions}, references)
    assert {k: metrics[k] for k in recomputed} == recomputed
    with Image.open(out / "samples.png") as png:
        assert png.format == "PNG" and png.width > 400 and png.height > 300


def test_evaluate_data_given_directly_and_several_sets(model_dir, image_files, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = [
        "--model", str(model_dir), "--data", str(image_files / "data.jsonl"), "--data", "shapes:test",
        "--out", str(out), "--no-progress", "--prompt", "a picture of", "--num-beams", "2",
        "eval.metrics=false", "eval.max_images=4",
    ]
    assert evaluate_main(argv) == 0
    printed = capsys.readouterr().out
    assert "data: images=3" in printed and "shapes_test: images=4" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"] == {"images": 3, "skipped": 0}  # a jsonl source has no shapes objects to match
    assert metrics["shapes_test"]["images"] == 4 and 0 <= metrics["shapes_test"]["shapes_exact"] <= 1
    for label in ("data", "shapes_test"):
        for name in ("metrics.json", "predictions.json", "per_image.jsonl", "samples.png"):
            assert (out / f"{label}_{name}").is_file(), (label, name)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "no/such/model"], "no/such/model is not a saved model folder"),
        (["--top-p", "2"], "eval.top_p: must be in (0, 1]"),
        (["--split", "test"], "no data for split 'test'"),
        (["--data", "images.txt"], "cannot tell the kind of data source"),
        (["eval.best_metric=bleu9"], "eval.best_metric: unknown metric 'bleu9'"),
    ],
)
def test_evaluate_errors_are_one_line(model_dir, tmp_path, capsys, argv, message):
    if argv[0] != "--model":
        argv = ["--model", str(model_dir), "--out", str(tmp_path / "eval"), *argv]
    assert evaluate_main(argv) == 2
    assert message in one_line_error(capsys)


def test_caption_command(model_dir, image_files, capsys):
    files = [str(image_files / f"{i}.png") for i in range(3)]
    assert caption_main(["--model", str(model_dir), *files[:2], "--max-new-tokens", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split("\t")[0] for ln in lines] == files[:2]
    assert all(len(ln.split("\t")[1].split()) <= 5 for ln in lines)
    # a folder and a JSON Lines file give the same images, in order; batching does not change a caption
    assert caption_main(["--model", str(model_dir), "--plain", str(image_files), "--batch-size", "2"]) == 0
    from_folder = capsys.readouterr().out.splitlines()
    assert caption_main(["--model", str(model_dir), "--jsonl", str(image_files / "data.jsonl")]) == 0
    from_jsonl = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert [r["caption"] for r in from_jsonl] == from_folder and len(from_folder) == 3
    # greedy: the 5-token captions are the first 5 tokens of the longer ones
    assert all(full.split()[:5] == ln.split("\t")[1].split() for full, ln in zip(from_folder, lines))


def test_caption_errors_are_one_line(model_dir, tmp_path, capsys):
    assert caption_main(["--model", str(model_dir), str(tmp_path / "missing.png")]) == 2
    assert "image file not found" in one_line_error(capsys)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    assert caption_main(["--model", str(model_dir), str(tmp_path / "broken.png")]) == 2
    assert "broken.png" in one_line_error(capsys)
    assert caption_main(["--model", str(model_dir), str(tmp_path / "broken.png"), "--num-beams", "0"]) == 2
    assert "eval.num_beams: must be > 0" in one_line_error(capsys)


@pytest.mark.slow
@pytest.mark.java
@needs_java
def test_training_evaluates_captions_and_keeps_the_best(tmp_path):
    run = tmp_path / "run"
    argv = [
        "--config", str(TINY), f"train.output_dir={run}", "train.max_steps=6", "train.checkpoint_every=3",
        "eval.every=3", "eval.every_images=4", "eval.metrics=true", "eval.best_metric=cider", "eval.max_new_tokens=6",
    ]
    assert train_main(argv) == 0
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [ln for ln in lines if "best_metric" in ln]  # the periodic evaluations (the final record is apart)
    assert [ln["step"] for ln in evals] == [3, 6]
    assert all(ln["val/images"] == 4 and ln["best_metric"] == "cider" for ln in evals)
    assert evals[0]["is_best"] and evals[0]["best_step"] == 3
    best = max(evals, key=lambda ln: (ln["val/cider"], -ln["step"]))  # the first of the highest
    assert evals[-1]["best_step"] == best["step"] and evals[-1]["best_value"] == best["val/cider"]
    info = json.loads((run / "best" / "best.json").read_text())
    assert info == {"metric": "cider", "value": best["val/cider"], "step": best["step"]}
    assert isinstance(FrozenPrefixCaptioner.from_pretrained(run / "best"), FrozenPrefixCaptioner)
    state = torch.load(run / "checkpoints" / "step_00000006" / "state.pt", weights_only=True)
    assert state["trainer"]["best"] == info  # travels with the checkpoint, so a resume keeps it


def test_periodic_evaluation_needs_a_computable_metric(tmp_path, capsys):
    argv = ["--config", str(TINY), f"train.output_dir={tmp_path / 'run'}", "eval.every=2", "eval.metrics=false"]
    assert train_main(argv) == 2
    assert "eval.best_metric=cider needs eval.metrics=true" in capsys.readouterr().err
