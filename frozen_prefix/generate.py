"""Decoding: batched captions through HF generate with inputs_embeds and the KV cache, and the shared CLI flags."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import (
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
)

from .config import Config, EvalConfig, check_decoding, validate
from .errors import FrozenPrefixError
from .images import ImageLike
from .models.captioner import FrozenPrefixCaptioner

# Names accepted by stop_at besides literal strings (EOS always stops).
STOP_ALIASES = {"newline": "\n", "period": "."}
# The EvalConfig keys that decide what generate_captions produces.
DECODING_KEYS = (
    "prompt", "batch_size", "max_new_tokens", "min_new_tokens", "num_beams", "length_penalty", "do_sample",
    "temperature", "top_k", "top_p", "repetition_penalty", "stop_at", "seed",
)


def resolve_stops(stop_at: str | Sequence[str]) -> list[str]:
    """Stop strings from names ('newline', 'period') or literal strings."""
    items = [stop_at] if isinstance(stop_at, str) else list(stop_at)
    return [STOP_ALIASES.get(s, s) for s in items if s]


class StopStrings(StoppingCriteria):
    """Stops a row once its decoded text contains a stop string.

    HF's own StopStringCriteria needs a regular subword vocabulary (it fails on word-level tokenizers);
    decoding the last few tokens works with any tokenizer and costs nothing next to a forward pass.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: Sequence[str], window: int = 8) -> None:
        self.tokenizer, self.stops, self.window = tokenizer, list(stops), window

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        """One flag per row: its newest tokens hold a stop string."""
        texts = self.tokenizer.batch_decode(input_ids[:, -self.window :].tolist(), skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], device=input_ids.device)


def generation_kwargs(
    max_new_tokens: int = 24,
    min_new_tokens: int = 0,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
) -> dict[str, Any]:
    """Keyword arguments for HF generate from our decoding options, every one explicit."""
    kwargs: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, num_beams=num_beams, do_sample=do_sample,
        repetition_penalty=repetition_penalty,
    )
    if num_beams > 1:
        kwargs["length_penalty"] = length_penalty
    if repetition_penalty != 1.0:
        # HF's processor skips as many leading input_ids as a row has left padding; with inputs_embeds, input_ids
        # hold only new tokens, so padded rows would escape the penalty for their first tokens. The same processor
        # without that offset takes the place of HF's (same position in the processor list).
        kwargs["logits_processor"] = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(repetition_penalty)])
    if do_sample:
        # Explicit values: a None would fall back to the LM's generation_config or HF's global top_k=50.
        kwargs.update(temperature=temperature, top_k=top_k, top_p=top_p)
    return kwargs


def decoding_options(eval_config: EvalConfig) -> dict[str, Any]:
    """The generate_captions options an EvalConfig holds."""
    return {key: getattr(eval_config, key) for key in DECODING_KEYS}


def clean_caption(text: str, stops: Sequence[str] = ()) -> str:
    """Cut the decoded text at the first stop string (a period is kept) and trim it."""
    for stop in stops:
        cut = text.find(stop)
        if cut >= 0:
            text = text[: cut + (len(stop) if stop == "." else 0)]
    return text.strip()


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Sampling from a fixed seed without disturbing the caller's RNG stream (e.g. training)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def generate_captions(
    model: FrozenPrefixCaptioner,
    images: Sequence[ImageLike] | torch.Tensor,
    progress: bool = False,
    **options: Any,
) -> list[str]:
    """Captions for images (PIL, paths or a pixel tensor); options default to model.config.eval (see DECODING_KEYS).

    `prompt` may be one string or one per image; its tokens are never part of the returned caption.
    """
    unknown = sorted(set(options) - set(DECODING_KEYS))
    if unknown:
        raise FrozenPrefixError(f"unknown decoding option(s) {', '.join(unknown)}; known: {', '.join(DECODING_KEYS)}")
    opts = {**decoding_options(model.config.eval), **options}
    check_decoding(opts)
    n = len(images)
    prompt = opts["prompt"] or ""
    prompts = [prompt] * n if isinstance(prompt, str) else [p or "" for p in prompt]
    if len(prompts) != n:
        raise FrozenPrefixError(f"got {len(prompts)} prompts for {n} images; give one prompt or one per image")
    not_hf = ("prompt", "batch_size", "stop_at", "seed")
    kwargs = generation_kwargs(**{k: v for k, v in opts.items() if k not in not_hf})
    stops = resolve_stops(opts["stop_at"])
    if stops:  # stop inside generate (no wasted steps), then cut the text exactly at the stop string
        kwargs["stopping_criteria"] = StoppingCriteriaList([StopStrings(model.tokenizer, stops)])
    was_training = model.training
    model.eval()
    eos, batch_size = model.tokenizer.eos_token_id, opts["batch_size"]
    captions: list[str] = []
    try:
        with _seeded(opts["seed"] if opts["do_sample"] else None, model.device):
            for start in tqdm(range(0, n, batch_size), desc="captioning", disable=not progress, leave=False):
                chunk = images[start : start + batch_size]
                pixel_values = chunk if isinstance(chunk, torch.Tensor) else model.pixel_values(chunk)
                new_tokens = model.generate(pixel_values, prompts[start : start + batch_size], **kwargs)
                for ids in new_tokens.tolist():
                    ids = ids[: ids.index(eos)] if eos in ids else ids  # whatever fills rows after EOS is not caption
                    captions.append(clean_caption(model.tokenizer.decode(ids, skip_special_tokens=True), stops))
    finally:
        model.train(was_training)
    return captions


# ---------------------------------------------------------------------------- command-line flags


def add_generation_args(parser: argparse.ArgumentParser) -> None:
    """The decoding flags shared by the caption and evaluate commands; unset flags keep the config's eval values."""
    g = parser.add_argument_group("decoding (defaults: the config's eval section)")
    g.add_argument("--prompt", help='text after the image prefix, e.g. "A picture of" (not part of the caption)')
    g.add_argument("--batch-size", type=int, help="images per generate call")
    g.add_argument("--max-new-tokens", type=int)
    g.add_argument("--min-new-tokens", type=int)
    g.add_argument("--num-beams", type=int, help="> 1: beam search")
    g.add_argument("--length-penalty", type=float, help="beam search: > 0 favours longer captions")
    g.add_argument("--sample", dest="do_sample", action="store_true", default=None, help="sample instead of greedy")
    g.add_argument("--greedy", dest="do_sample", action="store_false", help="greedy or beam search (no sampling)")
    g.add_argument("--temperature", type=float, help="sampling temperature")
    g.add_argument("--top-k", type=int, help="sampling: keep the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, help="sampling: nucleus probability mass (1 = off)")
    g.add_argument("--repetition-penalty", type=float, help="> 1 discourages repeated tokens")
    g.add_argument(
        "--stop-at", action="append", metavar="STOP",
        help="also stop at 'newline', 'period' or a literal string (repeatable; EOS always stops)",
    )
    g.add_argument("--seed", type=int, help="sampling seed")


def apply_generation_args(config: Config, args: argparse.Namespace) -> Config:
    """The config with the decoding flags that were given written into its eval section, validated."""
    changes = {key: getattr(args, key) for key in DECODING_KEYS if getattr(args, key, None) is not None}
    config = dataclasses.replace(config, eval=dataclasses.replace(config.eval, **changes))
    validate(config)
    return config


def resolve_device(name: str = "auto", flag: str = "--device") -> torch.device:
    """'auto' -> CUDA when present, else the CPU; a device that is not there is a one-line error naming `flag`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise FrozenPrefixError(f"{flag} cuda but no CUDA device is visible; use {flag} auto or cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise FrozenPrefixError(f"{flag} mps but MPS is not available; use {flag} auto or cpu")
    return torch.device(name)
