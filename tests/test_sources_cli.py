"""Every short source form the README documents ('x.jsonl', 'shapes:SPLIT', 'vqa:FILE.jsonl', ...), through the
train and evaluate commands, on tiny files written here."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from frozen_prefix.config import SOURCE_KINDS, SourceConfig, load_config, parse_source
from frozen_prefix.data import ShapesDataset, ShapesDialogue, ShapesVQA
from frozen_prefix.evaluate import main as evaluate_main
from frozen_prefix.train import main as train_main

from .conftest import ROOT, TINY, perturbed_tiny_model, write_jsonl

# the kinds of short form the command-line tests below run; a new one in the README needs a test here
RUN_HERE = {"jsonl", "shapes", "shapes_vqa", "shapes_dialogue", "vqa", "conversations"}


def documented_short_forms() -> list[tuple[str, str]]:
    """(kind, form) for every `KIND:VALUE` written in backticks in the README and docs/."""
    kinds = "|".join(sorted(SOURCE_KINDS, key=len, reverse=True))
    pattern = re.compile(rf"(?<![\w./{{])({kinds}):([^\s`,\]\)}}]+)")
    found = set()
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]:
        for quoted in re.findall(r"`([^`\n]+)`", page.read_text(encoding="utf-8")):
            found.update((m.group(1), m.group(0)) for m in pattern.finditer(quoted))
    return sorted(found)


def test_every_documented_short_form_names_its_kind():
    forms = documented_short_forms()
    assert {"vqa", "conversations", "shapes"} <= {kind for kind, _ in forms}, forms
    for kind, form in forms:
        assert parse_source(form, "data.train").kind == kind, form
    untested = {kind for kind, _ in forms} - RUN_HERE
    assert not untested, f"the docs show short forms of {untested}: run them through a command in this file"


def test_an_explicit_kind_wins_over_the_jsonl_ending():
    assert parse_source("vqa:q.jsonl", "k") == SourceConfig(kind="vqa", path="q.jsonl")
    assert parse_source("conversations:dir/c.jsonl", "k") == SourceConfig(kind="conversations", path="dir/c.jsonl")
    assert parse_source("jsonl:captions.jsonl", "k") == SourceConfig(kind="jsonl", path="captions.jsonl")
    assert parse_source("hf:user/name", "k") == SourceConfig(kind="hf", path="user/name")
    assert parse_source("captions.jsonl", "k") == SourceConfig(kind="jsonl", path="captions.jsonl")
    assert parse_source("shapes_vqa:test", "k") == SourceConfig(kind="shapes_vqa", split="test")
    assert parse_source("data/vqa:x.jsonl", "k").kind == "jsonl"  # a colon inside a path names no kind
    # the dotted form extends a short one, whatever its kind
    config = load_config(TINY, ["data.train=vqa:q.jsonl", "data.train.size=2", "eval.vqa.demo_source=vqa:d.jsonl"])
    assert config.data.train == SourceConfig(kind="vqa", path="q.jsonl", size=2)
    assert config.eval.vqa.demo_source == SourceConfig(kind="vqa", path="d.jsonl")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """captions.jsonl, questions.jsonl (VQA) and chat.jsonl (LLaVA conversations) over three shapes images."""
    folder = tmp_path_factory.mktemp("sources")
    captions, questions, chats = [], [], []
    shapes, vqas, dialogues = ShapesDataset("test", 3), ShapesVQA("test", 3), ShapesDialogue("test", 3)
    for i in range(3):
        item, vqa, dialogue = shapes[i], vqas[i], dialogues[i]
        item["image"].save(folder / f"{i}.png")
        vqa["image"].save(folder / f"q{i}.png")
        dialogue["images"][0].save(folder / f"d{i}.png")
        captions.append({"image": f"{i}.png", "captions": item["captions"]})
        questions.append({"image": f"q{i}.png", "question": vqa["question"], "answers": vqa["answers"]})
        turns = [{"from": "human" if t["role"] == "user" else "gpt", "value": t["content"]} for t in dialogue["turns"]]
        chats.append({"image": f"d{i}.png", "conversations": turns[:4]})
    for name, rows in (("captions", captions), ("questions", questions), ("chat", chats)):
        write_jsonl(folder / f"{name}.jsonl", rows)
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return perturbed_tiny_model().save_pretrained(tmp_path_factory.mktemp("saved") / "model")


def test_train_reads_every_short_form_in_one_mixture(files, tmp_path):
    forms = [str(files / "captions.jsonl"), f"vqa:{files / 'questions.jsonl'}", f"conversations:{files / 'chat.jsonl'}",
             "shapes:train", "shapes_vqa:train", "shapes_dialogue:train"]
    run = tmp_path / "run"
    argv = ["--config", str(TINY), f"train.output_dir={run}", "train.max_steps=2", "train.batch_size=4",
            "train.val_every=0", "train.checkpoint_every=0", "eval.splits=[]", "data.mixture_size=12",
            f"data.train=[{', '.join(forms)}]", f"data.val={files / 'captions.jsonl'}"]
    assert train_main(argv) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())["data"]
    assert [s["kind"] for s in saved["train"]] == ["jsonl", "vqa", "conversations", "shapes", "shapes_vqa",
                                                    "shapes_dialogue"]
    assert [s["path"] for s in saved["train"][:3]] == [str(files / n) for n in ("captions.jsonl", "questions.jsonl",
                                                                                 "chat.jsonl")]
    losses = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("step") == 2 and "loss" in r for r in losses)


@pytest.mark.parametrize("form", ["vqa:FILES/questions.jsonl", "shapes_vqa:test"])
def test_evaluate_vqa_on_a_short_form(model_dir, files, tmp_path, form, capsys):
    form = form.replace("FILES", str(files))
    out = tmp_path / "eval"
    argv = ["--model", str(model_dir), "--task", "vqa", "--data", form, "--out", str(out), "--no-progress",
            "--shots", "0,1", f"eval.vqa.demo_source=vqa:{files / 'questions.jsonl'}", "eval.vqa.trials=1",
            "eval.vqa.controls=[blind]", "eval.vqa.max_questions=3"]
    assert evaluate_main(argv) == 0, capsys.readouterr().err
    label = "questions" if form.startswith("vqa:") else "shapes_vqa_test"
    metrics = json.loads((out / f"{label}_vqa_metrics.json").read_text())
    assert "real_minus_blind" in json.dumps(metrics)
    rows = [json.loads(ln) for ln in (out / f"{label}_vqa_examples.jsonl").read_text().splitlines()]
    questions = {r["question"] for r in rows}
    shapes = ShapesVQA("test", 3)
    expected = [shapes[i] for i in range(3)] if form.startswith("shapes") else [
        json.loads(ln) for ln in (files / "questions.jsonl").read_text().splitlines()]
    assert questions == {q["question"] for q in expected}  # these questions, not another source's


@pytest.mark.parametrize("form", ["conversations:FILES/chat.jsonl", "shapes_dialogue:test"])
def test_evaluate_dialogue_on_a_short_form(model_dir, files, tmp_path, form, capsys):
    form = form.replace("FILES", str(files))
    out = tmp_path / "eval"
    argv = ["--model", str(model_dir), "--task", "dialogue", "--data", form, "--out", str(out), "--no-progress",
            "eval.dialogue.max_conversations=3", "eval.dialogue.max_new_tokens=4"]
    assert evaluate_main(argv) == 0, capsys.readouterr().err
    label = "chat" if form.startswith("conversations:") else "shapes_dialogue_test"
    metrics = json.loads((out / f"{label}_dialogue_metrics.json").read_text())
    assert set(metrics) >= {"gold", "own"} and "real_minus_blind" in metrics["gold"]
    assert (out / f"{label}_dialogue_examples.jsonl").read_text().strip()


@pytest.mark.parametrize("form", ["FILES/captions.jsonl", "jsonl:FILES/captions.jsonl", "shapes:test"])
def test_evaluate_captions_on_a_short_form(model_dir, files, tmp_path, form, capsys):
    form = form.replace("FILES", str(files))
    out = tmp_path / "eval"
    argv = ["--model", str(model_dir), "--data", form, "--out", str(out), "--no-progress", "eval.max_images=3",
            "eval.metrics=false", "--max-new-tokens", "4"]
    assert evaluate_main(argv) == 0, capsys.readouterr().err
    label = "shapes_test" if form.startswith("shapes") else "captions"
    assert f"{label}: images=3" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["images"] == 3
