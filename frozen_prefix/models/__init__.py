"""The model: the Frozen core (captioner.py), its parts, the folder format, and the built-in plug-ins."""

# The built-in variants register themselves on import, in the order their weights are made (the same seed gives
# the same weights): fusion, the visual loss, the deep prefix, the instruction-aware prefix. The core imports none.
from .variants import fusion, visual, deep, instruct  # noqa: F401, I001
