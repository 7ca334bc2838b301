"""frozen_prefix: Frozen-style captioning with a trainable vision prefix and a frozen causal LM."""

from .config import Config, load_config
from .errors import FrozenPrefixError
from .models.captioner import FrozenPrefixCaptioner


def train(config, overrides=None):  # noqa: ANN001, ANN201 - thin lazy wrapper, see frozen_prefix.train.train
    """Train a captioner from a config (path, mapping or Config); return it."""
    from .train import train as _train

    return _train(config, overrides)


__all__ = ["Config", "FrozenPrefixCaptioner", "FrozenPrefixError", "load_config", "train"]
