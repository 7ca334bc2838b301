"""Bad records through the train CLI: data.bad_data=error stops with one line naming the file (exit 2),
data.bad_data=skip trains on and counts them in metrics.jsonl; both with and without DataLoader workers."""

from __future__ import annotations

import json
import logging

import pytest

from frozen_prefix.data import TrainExamples, read_jsonl
from frozen_prefix.errors import DataError
from frozen_prefix.train import main

from ..conftest import TINY, write_corrupt_images, write_image, write_jsonl

BAD = 5  # missing, truncated, text named .jpg, empty caption, non-string caption
# workers=2 starts DataLoader worker processes: slow, like the other tests that start processes
WORKERS = [0, pytest.param(2, marks=pytest.mark.slow)]


@pytest.fixture
def mixed_jsonl(tmp_path):
    """16 records (two batches of the tiny recipe): 11 good, then the bad ones among them (not first:
    the run's first-batch check reads records 0 and 1 in the main process, the workers meet the rest)."""
    folder = tmp_path / "data"
    corrupt = write_corrupt_images(folder / "bad")
    good = [{"image": str(write_image(folder / "good" / f"{i}.jpg", i, (40, 40))), "caption": "a red circle"}
            for i in range(11)]
    bad = [
        {"image": str(corrupt["missing"]), "caption": "a blue square"},
        {"image": str(corrupt["truncated"]), "caption": "a blue square"},
        {"image": str(corrupt["text"]), "caption": "a blue square"},
        {"image": good[0]["image"].replace("0.jpg", "extra.jpg"), "caption": ""},
        {"image": good[1]["image"].replace("1.jpg", "extra2.jpg"), "caption": 42},
    ]
    write_image(folder / "good" / "extra.jpg", 3, (40, 40))
    write_image(folder / "good" / "extra2.jpg", 4, (40, 40))
    lines = good[:2] + [x for pair in zip(bad, good[2:]) for x in pair] + good[2 + len(bad):]
    return write_jsonl(folder / "train.jsonl", lines), corrupt


def run(tmp_path, data, *overrides):
    return main([
        "--config", str(TINY), f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2", f"data.train={data}",
        "data.val=null", "eval.splits=[]", *overrides,
    ])


def _names(corrupt, data):
    return [str(corrupt[k]) for k in ("missing", "truncated", "text")] + [f"{data}:"]


@pytest.mark.parametrize("workers", WORKERS)
def test_error_mode_stops_with_one_line_naming_the_file(tmp_path, capsys, mixed_jsonl, workers):
    data, corrupt = mixed_jsonl
    assert run(tmp_path, data, "data.bad_data=error", f"data.num_workers={workers}") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert any(name in err for name in _names(corrupt, data)), err
    assert "Traceback" not in err and "worker" not in err


@pytest.mark.parametrize("workers", WORKERS)
def test_skip_mode_trains_and_counts(tmp_path, caplog, mixed_jsonl, workers):
    data, corrupt = mixed_jsonl
    caplog.set_level(logging.WARNING)
    assert run(tmp_path, data, "data.bad_data=skip", f"data.num_workers={workers}") == 0
    lines = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [ln for ln in lines if "skipped_examples" in ln]
    assert logged[-1]["step"] == 2 and logged[-1]["skipped_examples"] == BAD  # one epoch: each bad record once
    if workers == 0:  # warnings from worker processes do not reach pytest's log capture
        warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
        assert all(name in warned for name in _names(corrupt, data)), warned


def test_skip_mode_counts_bad_images_in_evaluation(tmp_path, mixed_jsonl):
    data, _ = mixed_jsonl
    assert main([
        "--config", str(TINY), f"train.output_dir={tmp_path / 'run'}", "train.max_steps=1", "data.bad_data=skip",
        f"data.val={data}", "eval.splits=[val]",
    ]) == 0
    (path,) = (tmp_path / "run" / "eval").glob("*metrics.json")
    scores = json.loads(path.read_text())
    assert scores["images"] == 16 - BAD and scores["skipped"] == BAD


def test_bad_caption_is_an_error_or_a_skip(tmp_path):
    image = write_image(tmp_path / "a.jpg", 0)
    data = write_jsonl(tmp_path / "d.jsonl", [{"image": str(image), "caption": "  "}, {"image": "b.jpg"}])
    with pytest.raises(DataError, match=r"d\.jsonl:1: caption '  ' is empty or not a string"):
        TrainExamples(read_jsonl(data), "error")[(0, 0)]
    with pytest.raises(DataError, match=r"d\.jsonl:2: no caption; each record needs \"caption\""):
        TrainExamples(read_jsonl(data), "error")[(1, 0)]
    skipping = TrainExamples(read_jsonl(data), "skip")
    assert skipping[(0, 0)] is None and skipping[(1, 0)] is None
