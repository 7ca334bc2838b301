"""Training: the loop (loop.py) and its parts, one module each."""
