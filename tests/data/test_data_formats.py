"""Every data source format on a small fixture built here: JSON Lines, COCO, Karpathy, imagefolder, a saved
data set, webdataset tar shards (map-style and streamed), plus streaming's sharding and exact resume."""

from __future__ import annotations

import json

import pytest
import yaml
from torch.utils.data import DataLoader

from frozen_prefix.config import SourceConfig, parse_source
from frozen_prefix.data import StreamSource, TrainExamples, TrainStream, build_source, eval_examples
from frozen_prefix.errors import DataError
from frozen_prefix.evaluate import main as evaluate_main
from frozen_prefix.train import main as train_main

from ..conftest import COLOURS, TINY, write_image, write_jsonl, write_shards


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """Keep datasets' cache of prepared fixtures inside the test's folder."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def test_jsonl_merges_lines_of_one_image(tmp_path):
    write_image(tmp_path / "imgs" / "a.jpg", 0)
    b = write_image(tmp_path / "elsewhere" / "b.png", 1)
    path = write_jsonl(tmp_path / "data" / "train.jsonl", [
        {"image": "../imgs/a.jpg", "caption": "a red square"},
        {"image": str(b), "captions": ["a green square", "green"]},  # absolute path
        {"image": "../imgs/a.jpg", "caption": "red"},
    ])
    source = build_source(parse_source(str(path), "data.train"))
    assert len(source) == 2
    assert source.captions(0) == ["a red square", "red"] and source.num_captions(1) == 2
    item = source[0]
    assert item["image"].getpixel((5, 5))[0] > 150 and item["captions"] == ["a red square", "red"]
    assert TrainExamples(source, "error").num_captions() == [2, 2]


def _coco(tmp_path):
    root = tmp_path / "coco"
    for i in (1, 2, 3):
        write_image(root / "val2017" / f"{i:012d}.jpg", i)
    annotations = {
        "images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in (1, 2, 3)],
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "a green square."},
            {"id": 11, "image_id": 1, "caption": "A green picture"},
            {"id": 12, "image_id": 2, "caption": "a blue square."},
            {"id": 13, "image_id": 1, "caption": "green."},
        ],  # image 3 has no captions
    }
    path = root / "annotations" / "captions_val2017.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(annotations))
    return root, path


def test_coco_captions_file(tmp_path):
    root, path = _coco(tmp_path)
    source = build_source(SourceConfig(kind="coco", path=str(path)))  # image folder found from the layout
    assert len(source) == 2 and source.num_captions(0) == 3
    items = list(eval_examples(source, "error"))
    assert [it["image_id"] for it in items] == ["1", "2"]
    assert items[0]["captions"] == ["a green square.", "A green picture", "green."]  # all references of an image
    assert items[0]["image"].size == (32, 32)
    explicit = build_source(SourceConfig(kind="coco", path=str(path), image_dir=str(root / "val2017"), size=1))
    assert len(explicit) == 1
    with pytest.raises(DataError, match="image folder not found"):
        build_source(SourceConfig(kind="coco", path=str(path), image_dir=str(tmp_path / "nope")))
    with pytest.raises(DataError, match="none of the first 2 COCO images exists"):
        build_source(SourceConfig(kind="coco", path=str(path), image_dir=str(tmp_path)))


def _karpathy(tmp_path):
    root = tmp_path / "coco"
    entries = []
    for i, (split, folder) in enumerate([("train", "train2014"), ("restval", "val2014"), ("val", "val2014"),
                                         ("test", "val2014"), ("train", "train2014")]):
        name = f"COCO_{folder}_{i:012d}.jpg"
        write_image(root / folder / name, i)
        entries.append({
            "filepath": folder, "filename": name, "imgid": i, "cocoid": 100 + i, "split": split,
            "sentences": [{"raw": f"picture {i} one.", "tokens": []}, {"raw": f"picture {i} two. ", "tokens": []}],
        })
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return root, path


def test_karpathy_split_file(tmp_path):
    root, path = _karpathy(tmp_path)
    train = build_source(SourceConfig(kind="karpathy", path=str(path), split="train+restval"))
    assert len(train) == 3 and TrainExamples(train, "error").num_captions() == [2, 2, 2]
    test = build_source(SourceConfig(kind="karpathy", path=str(path), split="test", image_dir=str(root)))
    (item,) = list(eval_examples(test, "error"))
    assert item["image_id"] == "103" and item["captions"] == ["picture 3 one.", "picture 3 two."]
    with pytest.raises(DataError, match="has no split 'dev'; its splits are restval, test, train, val"):
        build_source(SourceConfig(kind="karpathy", path=str(path), split="dev"))
    with pytest.raises(DataError, match="Karpathy split file; use kind: karpathy"):
        build_source(SourceConfig(kind="coco", path=str(path)))


def test_imagefolder_with_metadata(tmp_path):
    folder = tmp_path / "folder"
    for i in range(3):
        write_image(folder / f"{i}.png", i)
    write_jsonl(folder / "metadata.jsonl", [{"file_name": f"{i}.png", "captions": [f"colour {i}", f"c{i}"]}
                                            for i in range(3)])
    source = build_source(SourceConfig(kind="hf", path=str(folder)))  # default caption column falls back
    assert len(source) == 3 and source.captions(2) == ["colour 2", "c2"]
    assert source[1]["image"].getpixel((3, 3)) == COLOURS[1] and source[1]["image_id"] == "1.png"
    (folder / "2.png").unlink()
    assert source.num_captions(2) == 2  # captions come without reading images
    with pytest.raises(DataError, match=r"image file not found: .*2\.png"):
        source[2]


def test_saved_dataset_with_own_column_names(tmp_path):
    import datasets

    paths = [str(write_image(tmp_path / "img" / f"{i}.jpg", i)) for i in range(4)]
    table = datasets.Dataset.from_dict(
        {"picture": paths, "text": [["one"], ["two", "deux"], ["three"], ["four"]], "image_id": ["a", "b", "c", "d"]}
    ).cast_column("picture", datasets.Image())
    datasets.DatasetDict({"validation": table}).save_to_disk(str(tmp_path / "saved"))
    spec = {"kind": "hf", "path": str(tmp_path / "saved"), "split": "validation", "image_column": "picture",
            "caption_column": "text"}
    source = build_source(SourceConfig(**spec))
    assert len(source) == 4 and source.captions(1) == ["two", "deux"]
    assert source[0]["image"].mode == "RGB" and source[3]["image_id"] == "d"
    stream = build_source(SourceConfig(**spec, streaming=True))
    assert isinstance(stream, StreamSource)
    assert [it["image_id"] for it in eval_examples(stream, "error", max_images=3)] == ["a", "b", "c"]
    with pytest.raises(DataError, match="no caption column 'words'; its columns are picture, text, image_id"):
        build_source(SourceConfig(**{**spec, "caption_column": "words"}))
    with pytest.raises(DataError, match="has no split 'test'; its splits are validation"):
        build_source(SourceConfig(**{**spec, "split": "test"}))


def test_webdataset_shards_map_style_and_streamed(tmp_path):
    write_shards(tmp_path / "wds")
    pattern = str(tmp_path / "wds" / "shard-{000..001}.tar")
    rows = build_source(SourceConfig(kind="webdataset", path=pattern))  # jpg/txt columns found by themselves
    assert len(rows) == 8 and rows.captions(5) == ["picture 1 1"]
    assert rows[5]["image_id"] == "s1_001" and rows[5]["image"].size == (24, 24)
    stream = build_source(SourceConfig(kind="webdataset", path=str(tmp_path / "wds"), streaming=True))
    items = list(eval_examples(stream, "error", max_images=5))
    assert [it["image_id"] for it in items] == ["s0_000", "s0_001", "s0_002", "s0_003", "s1_000"]
    assert items[4]["captions"] == ["picture 1 0"]


def test_offline_hub_name_is_one_clear_error():
    with pytest.raises(DataError, match="cannot load the Hugging Face data set 'nobody/no-such-set'") as info:
        build_source(SourceConfig(kind="hf", path="nobody/no-such-set"))
    assert "\n" not in str(info.value)


def keys(batch):
    """Collate for the sharding test: what each example was."""
    return [(item["image_id"], item["caption"]) for item in batch]


def _epoch(stream_source, workers, start=0, epoch=0, sampling="random"):
    stream = TrainStream(
        stream_source, "error", seed=3, epoch=epoch, start=start, batch_size=2, caption_sampling=sampling
    )
    return list(DataLoader(stream, batch_size=None, collate_fn=keys, num_workers=workers))


def test_stream_shards_by_worker_and_resumes_exactly(tmp_path):
    write_shards(tmp_path / "wds")
    source = build_source(SourceConfig(kind="webdataset", path=str(tmp_path / "wds"), streaming=True))
    alone = _epoch(source, 0)
    assert len(alone) == 4 and sorted(k for b in alone for k, _ in b) == sorted(r.image_id for r in source.records())
    with_workers = _epoch(source, 2)  # every example exactly once, spread over both workers
    assert sorted(sum(with_workers, [])) == sorted(sum(alone, []))
    for workers, full in ((0, alone), (2, with_workers)):
        for done in (1, 3):  # resume after `done` batches: exactly the batches that were still to come
            assert _epoch(source, workers, start=2 * done) == full[done:]
    assert _epoch(source, 0, epoch=1) != alone  # a new order each epoch
    assert len(sum(_epoch(source, 0, sampling="all"), [])) == 8  # one caption each: all pairs = all images


def _tiny_model_section():
    return yaml.safe_load(TINY.read_text())["model"]


def test_user_jsonl_trains_and_evaluates_through_the_cli(tmp_path, capsys):
    """The check of the issue: a JSON Lines set of real images, a config file, nothing else."""
    data = tmp_path / "my_data"
    for i in range(12):
        write_image(data / "images" / f"{i:03d}.jpg", i, size=(48, 40))
    write_jsonl(data / "train.jsonl", [{"image": f"images/{i:03d}.jpg", "caption": f"a picture {i % 6}"}
                                       for i in range(8)])
    write_jsonl(data / "val.jsonl", [{"image": f"images/{i:03d}.jpg", "caption": c}
                                     for i in range(8, 12) for c in ("a picture", "a small picture")])
    config = {
        "model": _tiny_model_section(),
        "data": {"train": str(data / "train.jsonl"), "val": str(data / "val.jsonl"), "max_caption_tokens": 12},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 3, "batch_size": 4, "warmup_steps": 1,
                  "progress": False},
        "eval": {"batch_size": 4, "max_new_tokens": 5, "metrics": False, "splits": ["val"]},
    }
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(config))
    assert train_main(["--config", str(tmp_path / "mine.yaml")]) == 0
    assert evaluate_main(["--model", str(tmp_path / "run" / "model"), "--out", str(tmp_path / "eval")]) == 0
    (per_image,) = (tmp_path / "eval").glob("*per_image.jsonl")
    rows = [json.loads(ln) for ln in per_image.read_text().splitlines()]
    assert len(rows) == 4 and all(r["references"] == ["a picture", "a small picture"] for r in rows)


def test_streamed_webdataset_trains_and_evaluates_through_the_cli(tmp_path):
    write_shards(tmp_path / "wds", shards=2, per_shard=6)
    shards = str(tmp_path / "wds" / "*.tar")
    run = tmp_path / "run"
    code = train_main([
        "--config", str(TINY), f"train.output_dir={run}", "train.max_steps=4", "train.batch_size=4",
        "train.checkpoint_every=2", "data.train.kind=webdataset", f"data.train.path={shards}",
        "data.train.streaming=true", "data.train.size=null", "data.val.kind=webdataset", f"data.val.path={shards}",
        "data.val.streaming=true", "data.val.size=5", "eval.splits=[val]",
    ])
    assert code == 0
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[-2]["step"] == 4 and lines[-2]["epoch"] == 1  # 12 images = 3 batches of 4 per epoch
    assert json.loads((run / "eval" / "val_metrics.json").read_text())["images"] == 5


def test_prepare_coco_checks_the_download_and_writes_a_config(tmp_path, capsys):
    import importlib.util

    from frozen_prefix import load_config

    from ..conftest import ROOT

    spec = importlib.util.spec_from_file_location("prepare_coco", ROOT / "scripts" / "prepare_coco.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    root, _ = _karpathy(tmp_path)
    (root / "val2014" / f"COCO_val2014_{1:012d}.jpg").unlink()  # the restval image, lost in the download
    out = tmp_path / "coco.yaml"
    assert script.main(["--root", str(root), "--out", str(out), "--verify", "2"]) == 0
    printed = capsys.readouterr().out
    assert "train (train+restval): images 3, captions 6, missing 1" in printed and "missing: " in printed
    config = load_config(out)
    assert config.data.bad_data == "skip" and config.data.test.split == "test"
    assert len(build_source(config.data.train)) == 3 and config.model.encoder == "resnet50.a1_in1k"
    assert script.main(["--root", str(tmp_path / "nothing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
