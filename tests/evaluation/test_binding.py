"""Concept-binding episodes on shapes, their prompts, Frozen's file layout, and the binding scorer."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from frozen_prefix.data.binding import (
    DEFAULT_QUESTION,
    NONSENSE,
    BindingEpisodes,
    episode_prompt,
    names_in_prompt_order,
    read_frozen_episodes,
    task_induction_text,
)
from frozen_prefix.data.shapes import HELD_OUT, SHAPES, _pairs
from frozen_prefix.evaluation.metrics.binding import BindingScorer, first_word


def label_of(kind: str, obj: tuple[str, str]) -> str:
    """The class an object belongs to."""
    return {"shape": obj[1], "colour": obj[0], "pair": f"{obj[0]} {obj[1]}"}[kind]


@pytest.mark.parametrize("kind", ["shape", "colour", "pair"])
def test_episode_is_consistent(kind):
    episodes = BindingEpisodes(ways=3, shots=2, repeats=1, size=12, classes=kind)
    for i in range(4):
        ep = episodes[i]
        assert len(ep["support"]) == 6 and len(set(ep["names"])) == 3 and set(ep["names"]) <= set(NONSENSE)
        assert len(set(ep["classes"])) == 3
        named = dict(zip(ep["names"], ep["classes"]))
        for (image, name), obj in zip(ep["support"], ep["support_objects"]):
            assert isinstance(image, Image.Image) and label_of(kind, obj) == named[name]
            assert obj not in HELD_OUT  # the test split draws only seen pairs
        assert Counter(n for _, n in ep["support"]) == Counter({n: 2 for n in ep["names"]})
        assert label_of(kind, ep["query_object"]) == named[ep["answer"]]
        assert ep["episode_id"].endswith(f"-{i}")


def test_episodes_are_deterministic_and_nested_over_shots():
    one, three = BindingEpisodes(shots=1, size=5, seed=2)[3], BindingEpisodes(shots=3, size=5, seed=2)[3]
    again = BindingEpisodes(shots=1, size=5, seed=2)[3]
    assert [im.tobytes() for im, _ in one["support"]] == [im.tobytes() for im, _ in again["support"]]
    for key in ("names", "classes", "answer", "query_object"):
        assert one[key] == three[key]
    assert one["query"].tobytes() == three["query"].tobytes()
    # The one-shot support images are among the three-shot ones.
    assert {im.tobytes() for im, _ in one["support"]} <= {im.tobytes() for im, _ in three["support"]}
    assert BindingEpisodes(size=5, seed=3)[3]["query"].tobytes() != one["query"].tobytes()


def test_query_classes_are_balanced():
    episodes = BindingEpisodes(ways=2, size=200)
    asked = Counter(episodes.plan(i)[0][episodes.plan(i)[2]] for i in range(200))
    assert asked == Counter({s: 50 for s in SHAPES})
    positions = Counter(episodes.plan(i)[2] for i in range(200))
    assert min(positions.values()) > 70  # the query's class order is shuffled


def test_repeats_and_compositional_pairs():
    ep = BindingEpisodes(ways=2, shots=2, repeats=3, size=4, split="compositional", classes="pair")[1]
    assert len(ep["support"]) == 12 and ep["support"][:4] == ep["support"][4:8] == ep["support"][8:]
    assert {tuple(c.split()) for c in ep["classes"]} <= set(HELD_OUT)
    assert len(BindingEpisodes(classes="pair", split="val").pool) == len(_pairs("val"))
    with pytest.raises(ValueError, match="ways"):
        BindingEpisodes(ways=5, classes="shape")
    with pytest.raises(ValueError, match="unknown binding classes"):
        BindingEpisodes(classes="size")


def test_prompt_layout():
    episodes = BindingEpisodes(ways=2, shots=2, size=3)
    ep = episodes[0]
    prompt = episode_prompt(ep, task_induction=True)
    assert prompt[0] == f"Answer with {ep['names'][0]} or {ep['names'][1]}."
    body = prompt[1:-2]
    assert body[0::2] == [im for im, _ in ep["support"]]
    assert body[1::2] == [f"This is a {n}." for _, n in ep["support"]]
    assert prompt[-2] is ep["query"] and prompt[-1] == DEFAULT_QUESTION
    bare = episode_prompt(ep, task_induction=False, question="Q: what? A:")
    assert bare[0] is ep["support"][0][0] and bare[-1] == "Q: what? A:" and len(bare) == len(prompt) - 1
    assert len(episodes.prompt(0)) == len(prompt)
    assert task_induction_text(["dax", "blicket", "wug"]) == "Answer with dax, blicket or wug."
    assert names_in_prompt_order(ep) == list(dict.fromkeys(n for _, n in ep["support"]))


def write_frozen(folder: Path) -> None:
    """A tiny folder in the layout of Frozen's released files (two tasks, one record each)."""
    for name in ("image_1", "image_2", "question"):
        Image.new("RGB", (4, 4)).save(folder / f"open_ended_mi_shots_1_ways_2_id_1_{name}.jpg")
    records = [{
        "question_id": 1,
        "image_1": "open_ended_mi_shots_1_ways_2_id_1_image_1.jpg", "caption_1": "This is a blicket.",
        "image_2": "open_ended_mi_shots_1_ways_2_id_1_image_2.jpg", "caption_2": "This is a dax.",
        "question_image": "open_ended_mi_shots_1_ways_2_id_1_question.jpg", "answer": "dax",
    }]
    (folder / "open_ended_mi_shots_1_ways_2_all_questions.json").write_text(json.dumps(records))
    vqa = [{"question_id": 7, "caption_1": "This is a wug.", "caption_2": "This is a zorb.",
            "question": "Q: What colour is the wug? A:", "answer": "red"}]
    (folder / "fast_vqa_shots_1_ways_2_all_questions.json").write_text(json.dumps(vqa))


def test_read_frozen_episodes(tmp_path):
    write_frozen(tmp_path)
    vqa, mi = read_frozen_episodes(tmp_path, shots=1, ways=2)  # files are read in name order
    assert (vqa["task"], mi["task"], mi["shots"], mi["ways"]) == ("fast_vqa", "open_ended_mi", 1, 2)
    assert mi["support"] == [(tmp_path / "open_ended_mi_shots_1_ways_2_id_1_image_1.jpg", "blicket"),
                             (tmp_path / "open_ended_mi_shots_1_ways_2_id_1_image_2.jpg", "dax")]
    assert mi["query"].is_file() and mi["answer"] == "dax" and mi["names"] == ["blicket", "dax"]
    prompt = episode_prompt(mi, task_induction=True)
    assert prompt[0] == "Answer with blicket or dax." and prompt[2] == "This is a blicket."
    assert prompt[-1] == DEFAULT_QUESTION
    # Without image keys the documented file names are used; the file's question replaces the default.
    assert vqa["support"][1][0] == tmp_path / "fast_vqa_shots_1_ways_2_id_7_image_2.jpg"
    assert vqa["query"] == tmp_path / "fast_vqa_shots_1_ways_2_id_7_question.jpg"
    assert episode_prompt(vqa, task_induction=False)[-1] == "Q: What colour is the wug? A:"
    assert read_frozen_episodes(tmp_path, shots=5) == []
    with pytest.raises(FileNotFoundError):
        read_frozen_episodes(tmp_path / "nowhere")


def test_binding_scorer():
    rows = [
        {"answer": "dax", "prediction": " Dax. It is", "names": ["dax", "blicket"]},
        {"answer": "dax", "prediction": "daxes", "names": ["dax", "blicket"]},
        {"answer": "wug", "prediction": "", "names": ["dax", "wug", "fep", "tufa", "zav"]},
        {"answer": "fep", "candidate_scores": {"dax": -3.0, "fep": -1.5}, "names": ["dax", "fep"]},
        {"answer": "fep", "candidate_scores": {"dax": -1.0, "fep": -1.5}, "names": ["dax", "fep"]},
    ]
    metrics, scored = BindingScorer().score(rows)
    assert [r["correct"] for r in scored] == [True, False, False, True, False]
    assert [r["score"] for r in scored] == [1, 0, 0, 1, 0]
    assert metrics["binding_accuracy"] == pytest.approx(0.4) and metrics["episodes"] == 5
    assert metrics["chance"] == pytest.approx((0.5 * 4 + 0.2) / 5)
    assert "correct" not in rows[0]  # the input rows are left alone
    assert "chance" not in BindingScorer().score([{"answer": "dax", "prediction": "dax"}])[0]
    assert BindingScorer().score([]) == ({}, [])
    assert BindingScorer.name == "binding" and first_word('"Blicket," she said') == "blicket"
    with pytest.raises(KeyError, match="prediction"):
        BindingScorer().score([{"answer": "dax"}])
