"""frozen_prefix: Frozen-style captioning with a trainable vision prefix and a frozen causal LM."""

from .config import Config, load_config
from .errors import FrozenPrefixError
from .models.captioner import FrozenPrefixCaptioner

# Imported last and by name: the function `train` must shadow the submodule of the same name.
from .train import train  # noqa: E402

__all__ = ["Config", "FrozenPrefixCaptioner", "FrozenPrefixError", "load_config", "train"]
