"""frozen_prefix: Frozen-style captioning with a trainable vision prefix and a frozen causal LM."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import Config, load_config
from .errors import FrozenPrefixError
from .models.captioner import FrozenPrefixCaptioner


def fit(config: Config | str | Path | dict[str, Any], overrides: list[str] | None = None) -> FrozenPrefixCaptioner:
    """Train a captioner from a config (path, mapping or Config) plus dotted overrides; return it."""
    from .train import fit as run_training  # imported on use: `python -m frozen_prefix.train` stays clean

    return run_training(config, overrides)


__all__ = ["Config", "FrozenPrefixCaptioner", "FrozenPrefixError", "fit", "load_config"]
