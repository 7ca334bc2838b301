"""Variants of the Frozen core, as plug-ins: the interface and registry (base.py) and one file per built-in.

The built-ins register themselves when `frozen_prefix.models` is imported (see its __init__); a variant of your
own registers itself the same way, from any file, with `@register_variant("name")`.
"""

from .base import LMCall, LMInfo, PrefixInputs, Variant, register_variant

__all__ = ["LMCall", "LMInfo", "PrefixInputs", "Variant", "register_variant"]
