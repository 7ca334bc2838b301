"""Odd and corrupt image files: each odd one becomes a plain RGB image, each corrupt one one clear DataError."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from frozen_prefix.data import CaptionCollator, TrainExamples, read_jsonl
from frozen_prefix.errors import DataError
from frozen_prefix.images import load_image
from frozen_prefix.models.encoder import build_transform
from frozen_prefix.models.lm import build_tiny_tokenizer

from ..conftest import jpeg_bytes, write_corrupt_images


def write_odd_images(folder):
    """One file per odd case, all readable: name -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    paths["cmyk"] = folder / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(paths["cmyk"])  # red in CMYK
    paths["grey16"] = folder / "grey16.png"
    grey = np.full((8, 16), 4096, dtype=np.uint16)
    grey[:, 8:] = 65535
    Image.fromarray(grey).save(paths["grey16"])
    paths["rgba"] = folder / "rgba.png"
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 255, 0))  # fully transparent: must not come out blue or black
    rgba.save(paths["rgba"])
    paths["palette"] = folder / "palette.png"
    palette = Image.new("P", (16, 16), 1)
    palette.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.save(paths["palette"], transparency=0)
    paths["grey"] = folder / "grey.jpg"
    Image.new("L", (16, 16), 90).save(paths["grey"])
    paths["exif"] = folder / "rotated.jpg"
    landscape = Image.new("RGB", (40, 20), (0, 0, 255))
    landscape.paste((255, 0, 0), (0, 0, 20, 20))  # left half red as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    landscape.save(paths["exif"], exif=exif.tobytes(), quality=95)
    return paths


def test_odd_images_become_rgb(tmp_path):
    paths = write_odd_images(tmp_path)
    images = {name: load_image(path) for name, path in paths.items()}
    assert all(im.mode == "RGB" for im in images.values())
    r, g, b = images["cmyk"].getpixel((8, 8))
    assert r > 200 and g < 60 and b < 60  # CMYK red stays red
    # 16-bit greyscale: a fixed 65535 -> 255 scale, so the dark half stays dark instead of being stretched
    assert images["grey16"].getpixel((0, 0)) == (16, 16, 16)
    assert images["grey16"].getpixel((15, 0)) == (255, 255, 255)
    assert images["rgba"].getpixel((0, 0)) == (255, 255, 255)  # transparent: white background
    assert images["rgba"].getpixel((8, 8)) == (255, 0, 0)
    assert images["palette"].getpixel((0, 0)) == (255, 255, 255)
    assert images["palette"].getpixel((8, 8)) == (0, 200, 0)
    grey = images["grey"].getpixel((8, 8))
    assert grey[0] == grey[1] == grey[2]
    rotated = images["exif"]
    assert rotated.size == (20, 40)  # EXIF orientation applied: portrait now
    top, bottom = rotated.getpixel((10, 5)), rotated.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60  # the red half turned to the top


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("truncated", "cannot decode image"),
        ("text", "not an image file"),
        ("empty", "not an image file"),
        ("missing", "image file not found"),
    ],
)
def test_corrupt_images_raise_one_line_naming_the_file(tmp_path, case, message):
    path = write_corrupt_images(tmp_path)[case]
    with pytest.raises(DataError) as info:
        load_image(path)
    text = str(info.value)
    assert message in text and str(path) in text and "\n" not in text


def test_undecoded_dataset_values_name_their_file():
    good = load_image({"bytes": jpeg_bytes((8, 8)), "path": "shard-0.tar:000.jpg"})
    assert good.mode == "RGB" and good.size == (8, 8)
    with pytest.raises(DataError, match=r"shard-0\.tar:001\.jpg"):
        load_image({"bytes": b"garbage", "path": "shard-0.tar:001.jpg"})
    with pytest.raises(DataError, match="has no image"):
        load_image({"bytes": None, "path": None})


def test_odd_images_flow_into_a_training_batch(tmp_path):
    paths = write_odd_images(tmp_path)
    lines = [{"image": p.name, "caption": f"a {name} picture"} for name, p in paths.items()]
    (tmp_path / "odd.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    examples = TrainExamples(read_jsonl(tmp_path / "odd.jsonl"), "error")
    data = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 1.0,
            "interpolation": "bilinear"}
    collate = CaptionCollator(build_tiny_tokenizer(), build_transform(data), prefix_length=2, max_caption_tokens=8)
    batch = collate([examples[(i, 0)] for i in range(len(examples))])
    assert batch.pixel_values.shape == (len(paths), 3, 32, 32) and batch.skipped == 0
    assert torch.isfinite(batch.pixel_values).all()
