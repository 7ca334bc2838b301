"""Decoding: generation with the KV cache, prompts, scoring and chat."""
