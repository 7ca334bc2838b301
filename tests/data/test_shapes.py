"""The synthetic shapes data set: determinism, caption content, splits and the exact scorer."""

from __future__ import annotations

import numpy as np

from frozen_prefix.data.shapes import (
    COLOURS,
    HELD_OUT,
    SHAPES,
    ShapesDataset,
    exact_match,
    exact_score,
    parse_objects,
)


def test_deterministic_from_seed_and_index():
    a, b = ShapesDataset("train", seed=0), ShapesDataset("train", seed=0)
    for i in (0, 7, 99):
        assert np.array_equal(np.asarray(a[i]["image"]), np.asarray(b[i]["image"]))
        assert a[i]["captions"] == b[i]["captions"]
    assert not np.array_equal(np.asarray(a[0]["image"]), np.asarray(a[1]["image"]))
    other_seed = ShapesDataset("train", seed=1)
    assert any(a[i]["captions"] != other_seed[i]["captions"] for i in range(5))


def test_splits_differ():
    train, test = ShapesDataset("train"), ShapesDataset("test")
    assert [train[i]["captions"] for i in range(10)] != [test[i]["captions"] for i in range(10)]


def test_every_reference_names_every_object():
    ds = ShapesDataset("train")
    for i in range(200):
        item = ds[i]
        assert 1 <= len(item["objects"]) <= 3
        assert len(item["captions"]) == 5 and len(set(item["captions"])) == 5
        for caption in item["captions"]:
            assert exact_match(caption, item["objects"]), caption


def test_variety():
    ds = ShapesDataset("train")
    objects = [o for i in range(500) for o in ds[i]["objects"]]
    assert {c for c, _ in objects} == set(COLOURS) and len(COLOURS) >= 6
    assert {s for _, s in objects} == set(SHAPES) and len(SHAPES) >= 4
    assert {len(ds[i]["objects"]) for i in range(100)} == {1, 2, 3}
    sizes = {w for i in range(100) for w in ds[i]["captions"][2].split() if w in ("small", "large")}
    assert sizes == {"small", "large"}


def test_held_out_compositions():
    train, comp = ShapesDataset("train"), ShapesDataset("compositional")
    for i in range(1000):
        assert not set(train[i]["objects"]) & set(HELD_OUT)
    for i in range(100):
        assert set(comp[i]["objects"]) & set(HELD_OUT)


def test_exact_scorer():
    truth = [("red", "circle"), ("blue", "square")]
    assert exact_match("A blue square and a red circle.", truth)  # order does not matter
    assert exact_match("a large red circle on the left and a small blue square", truth)
    assert not exact_match("a red circle.", truth)  # missing object
    assert not exact_match("a red circle, a blue square and a green star.", truth)  # extra object
    assert not exact_match("a red square and a blue circle.", truth)  # swapped binding
    assert not exact_match("a red circle and a square.", truth)  # colour missing
    assert parse_objects("two shapes: a red circle and a red circle")[("red", "circle")] == 2
    assert exact_score(["a red circle and a blue square", "nothing"], [truth, truth]) == 0.5


def test_objects_are_listed_in_reading_order():
    for index in range(50):
        objects, _ = ShapesDataset("train").scene(index)
        cells = [(o.row, o.col) for o in objects]
        assert cells == sorted(cells)
