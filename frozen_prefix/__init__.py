"""frozen_prefix: Frozen-style captioning with a trainable vision prefix and a frozen causal LM."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

from .config import Config, load_config
from .errors import FrozenPrefixError
from .models.captioner import FrozenPrefixCaptioner


def train(config: Config | str | Path | dict[str, Any], overrides: list[str] | None = None) -> FrozenPrefixCaptioner:
    """Train a captioner from a config (path, mapping or Config) plus dotted overrides; return it."""
    from .train import train as run_training  # imported on use: `python -m frozen_prefix.train` stays clean

    return run_training(config, overrides)


class _Package(types.ModuleType):
    """Keeps `frozen_prefix.train` the function above when the submodule of the same name is imported."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "train" and isinstance(value, types.ModuleType):
            return  # the import system binds submodules on their package; ours is reached via sys.modules
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = ["Config", "FrozenPrefixCaptioner", "FrozenPrefixError", "load_config", "train"]
