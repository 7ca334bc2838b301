"""Shared fixtures: tiny configs and models (CPU, no network)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# precision=auto and lm_dtype=auto stay fp32 on every CPU, so that results do not depend on the machine drawn
os.environ["FROZEN_PREFIX_CPU_BF16"] = "0"

from frozen_prefix import FrozenPrefixCaptioner, load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


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
