"""frozen_prefix: Frozen-style captioning with a trainable vision prefix and a frozen causal LM."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .captioner import FrozenPrefixCaptioner
from .config import Config, load_config
from .errors import FrozenPrefixError
from .models.projections import Projection, register_projection
from .models.variants import Variant, register_variant


def fit(config: Config | str | Path | dict[str, Any], overrides: list[str] | None = None) -> FrozenPrefixCaptioner:
    """Train a captioner from a config (path, mapping or Config) plus dotted overrides; return it."""
    from .train import fit as run_training  # imported on use: `python -m frozen_prefix.train` stays clean

    return run_training(config, overrides)


__all__ = [
    "Config", "FrozenPrefixCaptioner", "FrozenPrefixError", "Projection", "Variant", "fit", "load_config",
    "register_projection", "register_variant",
]
