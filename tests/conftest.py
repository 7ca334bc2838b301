"""Shared fixtures: tiny configs and models (CPU, no network)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
