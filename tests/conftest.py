"""Shared fixtures: tiny configs and models (CPU, no network)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# precision=auto and lm_dtype=auto stay fp32 on every CPU, so that results do not depend on the machine drawn
os.environ["FROZEN_PREFIX_CPU_BF16"] = "0"

from frozen_prefix import FrozenPrefixCaptioner, load_config  # noqa: E402
from frozen_prefix.data import CaptionCollator, ShapesDataset, TrainExamples  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
COLOURS = [(200, 30, 30), (30, 160, 40), (40, 60, 220), (230, 210, 40), (140, 40, 170), (240, 130, 20)]


@pytest.fixture
def tiny_config(tmp_path):
    """The tiny recipe, writing into a temporary run folder."""
    return load_config(TINY, [f"train.output_dir={tmp_path / 'run'}"])


@pytest.fixture
def tiny_model(tiny_config):
    """An untrained tiny captioner."""
    return FrozenPrefixCaptioner(tiny_config)


def perturbed_tiny_model() -> FrozenPrefixCaptioner:
    """A tiny captioner with seeded, perturbed projection weights, so that images change what the LM says."""
    torch.manual_seed(0)
    model = FrozenPrefixCaptioner(load_config(TINY))
    with torch.no_grad():
        for p in model.projection.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return model.eval()


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until a subprocess has written `path`; fail if it exits first or the time runs out."""
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


# ---------------------------------------------------------------------------- small data files


def write_image(path, index, size=(32, 32)):
    """A real small JPEG/PNG in one of the colours."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, COLOURS[index % len(COLOURS)]).save(path)
    return path


def write_jsonl(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def write_shards(folder, shards=2, per_shard=4):
    """webdataset tar shards: KEY.jpg + KEY.txt per sample."""
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with tarfile.open(folder / f"shard-{s:03d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"s{s}_{i:03d}"
                image = io.BytesIO()
                Image.new("RGB", (24, 24), COLOURS[(s * per_shard + i) % len(COLOURS)]).save(image, "JPEG")
                for name, payload in ((f"{key}.jpg", image.getvalue()), (f"{key}.txt", f"picture {s} {i}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return folder


def jpeg_bytes(size: tuple[int, int] = (64, 64)) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


def write_corrupt_images(folder):
    """One file per unreadable case: name -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"truncated": folder / "truncated.jpg", "text": folder / "notes.jpg", "empty": folder / "empty.jpg"}
    data = jpeg_bytes()
    paths["truncated"].write_bytes(data[: len(data) // 2])
    paths["text"].write_text("this is not a picture\n")
    paths["empty"].write_bytes(b"")
    paths["missing"] = folder / "missing.jpg"
    return paths


def build(*overrides: str) -> FrozenPrefixCaptioner:
    """A tiny captioner with overrides on configs/tiny.yaml."""
    torch.manual_seed(0)
    return FrozenPrefixCaptioner(load_config(TINY, list(overrides)))


def batch_for(model: FrozenPrefixCaptioner, n: int = 4) -> dict[str, torch.Tensor]:
    """n shapes (image, caption) training rows as model inputs."""
    examples = TrainExamples(ShapesDataset("train", size=16), "error")
    collate = CaptionCollator(model.tokenizer, model.image_transform, model.prefix_length, 24, model.start_ids)
    return collate([examples[(i, i)] for i in range(n)]).model_inputs(torch.device("cpu"))
