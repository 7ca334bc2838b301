"""Caption metrics: the wrapper gives exactly pycocoevalcap's numbers; SPICE is optional; the shapes exact score."""

from __future__ import annotations

import logging
import shutil

import pytest

from frozen_prefix import FrozenPrefixError
from frozen_prefix.data.shapes import exact_match, match_parts
from frozen_prefix.evaluation.metrics import ShapesScorer, apply_scorers, coco
from frozen_prefix.evaluation.metrics.coco import coco_metrics, coco_scores, spice_unavailable

# Tests marked `java` skip with this reason where no Java runtime is installed (pytest -m "not java" skips them too).
needs_java = pytest.mark.skipif(
    shutil.which("java") is None, reason="needs Java for pycocoevalcap (PTB tokenizer, METEOR): install a JRE 8+"
)

# A small fixed set: punctuation and case for the PTB tokenizer, an empty and an exact prediction, ids of two types.
REFERENCES = {
    "img1": ["A red circle next to a blue square.", "a red ball and a blue box", "Two shapes: red circle, blue box."],
    "img2": ["A dog runs on the grass!", "The brown dog is running outside."],
    "img3": ["an orange star", "A small orange star at the top."],
    "img4": ["Three people sitting at a table, eating.", "People eat dinner together."],
    5: ["A white cat sleeps on a sofa.", "the cat is asleep on the couch"],
}
PREDICTIONS = {
    "img1": "a red circle and a blue square.",
    "img2": "A dog running on grass",
    "img3": "",
    "img4": "Three people sitting at a table, eating.",
    5: "a cat on a bed",
}
COCO_NAMES = {
    "bleu1": "Bleu_1", "bleu2": "Bleu_2", "bleu3": "Bleu_3", "bleu4": "Bleu_4",
    "meteor": "METEOR", "rouge_l": "ROUGE_L", "cider": "CIDEr",
}


class _Coco:
    """The two things COCOEvalCap reads from a pycocotools COCO object."""

    def __init__(self, captions: dict) -> None:
        self.imgToAnns = {i: [{"image_id": i, "caption": c} for c in caps] for i, caps in captions.items()}

    def getImgIds(self) -> list:  # noqa: N802 (pycocotools' name)
        return list(self.imgToAnns)


class _NoSpice:
    """Stands in for SPICE, which needs Stanford CoreNLP (a download) and is checked separately."""

    def compute_score(self, gts, res):
        return 0.0, [0.0] * len(gts)

    def method(self):
        return "SPICE"


@pytest.mark.slow
@pytest.mark.java
@needs_java
def test_wrapper_equals_pycocoevalcap_called_directly(monkeypatch):
    import pycocoevalcap.eval as coco_eval

    monkeypatch.setattr(coco_eval, "Spice", _NoSpice)
    official = coco_eval.COCOEvalCap(_Coco(REFERENCES), _Coco({i: [c] for i, c in PREDICTIONS.items()}))
    official.evaluate()  # pycocoevalcap's own pipeline: PTB tokenizer, then every scorer

    corpus, per_image = coco_scores(PREDICTIONS, REFERENCES, spice=False)
    assert set(corpus) == set(COCO_NAMES)
    for ours, theirs in COCO_NAMES.items():
        assert corpus[ours] == official.eval[theirs], ours  # exactly equal, on pycocoevalcap's own scale
        for image_id in PREDICTIONS:
            assert per_image[image_id][ours] == official.imgToEval[image_id][theirs], (ours, image_id)
    assert 0 < corpus["cider"] and corpus["bleu1"] < 1
    assert per_image["img4"]["bleu4"] > 0.99 and per_image["img3"]["cider"] == 0.0  # exact and empty predictions
    assert coco_metrics(PREDICTIONS, REFERENCES, spice=False) == corpus


@pytest.mark.slow
@pytest.mark.java
@needs_java
def test_spice_that_cannot_run_is_noted_in_one_line(monkeypatch, caplog):
    monkeypatch.setattr(coco, "spice_unavailable", lambda: "SPICE not computed: test reason")
    monkeypatch.setattr(coco, "_SPICE_NOTED", False)
    subset = {"img1": PREDICTIONS["img1"], "img2": PREDICTIONS["img2"]}
    with caplog.at_level(logging.WARNING, logger="frozen_prefix.evaluation.metrics.coco"):
        scores = coco_metrics(subset, REFERENCES)
        coco_metrics(subset, REFERENCES)  # said once per process, not at every evaluation
    notes = [r.getMessage() for r in caplog.records if "SPICE" in r.getMessage()]
    assert notes == ["SPICE not computed: test reason"]
    assert "spice" not in scores and "cider" in scores  # the rest is reported


def test_spice_availability_is_one_line(monkeypatch, tmp_path):
    reason = spice_unavailable()
    assert reason is None or (reason.startswith("SPICE not computed") and "\n" not in reason)
    # each of the three answers, whatever this machine has: no Java, Java without CoreNLP, both
    import pycocoevalcap.spice as spice_pkg

    monkeypatch.setattr(spice_pkg, "__file__", str(tmp_path / "__init__.py"))  # its lib/ folder: tmp_path/lib
    monkeypatch.setattr(coco, "java_available", lambda: False)
    no_java = spice_unavailable()
    assert no_java.startswith("SPICE not computed") and "Java" in no_java and "\n" not in no_java
    monkeypatch.setattr(coco, "java_available", lambda: True)
    no_corenlp = spice_unavailable()
    assert no_corenlp.startswith("SPICE not computed") and "CoreNLP" in no_corenlp and "\n" not in no_corenlp
    (tmp_path / "lib").mkdir()
    for suffix in ("", "-models"):
        (tmp_path / "lib" / f"stanford-corenlp-3.6.0{suffix}.jar").touch()
    assert spice_unavailable() is None


def test_missing_java_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(coco, "java_available", lambda: False)
    with pytest.raises(FrozenPrefixError, match="caption metrics need Java.*eval.metrics=false"):
        coco_metrics(PREDICTIONS, REFERENCES)


@pytest.mark.parametrize(
    ("caption", "objects", "expected"),
    [
        ("a red circle and a blue square.", [("red", "circle"), ("blue", "square")], True),
        ("A picture of a blue square and a red circle.", [("red", "circle"), ("blue", "square")], True),
        ("There is a small red circle.", [("red", "circle")], True),
        ("two shapes: a red circle and a red circle.", [("red", "circle"), ("red", "circle")], True),
        ("a red circle.", [("red", "circle"), ("blue", "square")], False),  # one missing
        ("a red circle and a green star.", [("red", "circle")], False),  # one too many
        ("a blue circle.", [("red", "circle")], False),  # wrong colour
        ("a red square.", [("red", "circle")], False),  # wrong shape
        ("a circle.", [("red", "circle")], False),  # no colour
    ],
)
def test_shapes_exact_match(caption, objects, expected):
    assert exact_match(caption, objects) is expected


def test_shapes_exact_score_is_a_fraction_and_needs_no_java():
    rows = [
        {"image_id": i, "caption": c, "references": ["x"], "objects": [("red", "circle")]}
        for i, c in enumerate(["a red circle.", "a red circle.", "a blue circle.", "nothing"])
    ]
    metrics, scored = apply_scorers([ShapesScorer()], rows)
    assert metrics["shapes_exact"] == 0.5
    assert [r["exact"] for r in scored] == [True, True, False, False]
    assert rows[0].keys() == {"image_id", "caption", "references", "objects"}  # the input rows are not changed


def test_shapes_partial_scores_say_what_is_right():
    objects = [("red", "circle"), ("blue", "square")]
    assert match_parts("a red square and a blue circle.", objects) == {
        "exact": False, "count": True, "colours": True, "shapes": True,  # right parts, wrong binding
    }
    assert match_parts("a red circle and a red square.", objects) == {
        "exact": False, "count": True, "colours": False, "shapes": True,
    }
    assert match_parts("a red circle.", objects)["count"] is False
    rows = [
        {"image_id": i, "caption": c, "objects": objects}
        for i, c in enumerate(["a red circle and a red square.", "a red circle."])
    ]
    metrics, scored = ShapesScorer().score(rows)
    assert [r["right"] for r in scored] == [["count", "shapes"], []]
    assert metrics["shapes_count"] == 0.5 and metrics["shapes_colours"] == 0.0 and metrics["shapes_shapes"] == 0.5
