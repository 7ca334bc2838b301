"""All decoding: captions, interleaved image-text prompts and likelihood scoring, through HF with the KV cache.

A prompt is a list of segments in any order: a `str` is text; an image is a PIL image, a `pathlib.Path`, or a
transformed pixel tensor (3, H, W). Each image becomes its k prefix embeddings at its place, after the model's
start ids: `[img, "This is a dax.", img, "This is a blicket.", img, "Question: What is this? Answer: This is a"]`.
This module needs only what `PrefixModel` lists, so the model itself never has to import it back.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import (
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
)

from .config import Config, check_decoding
from .data.layout import Layout, SequenceBuilder, TokenSequence, pad
from .errors import FrozenPrefixError
from .images import ImageLike

Segment = str | Image.Image | Path | torch.Tensor
Prompt = list[Segment]

# Names accepted by stop_at besides literal strings (EOS always stops).
STOP_ALIASES = {"newline": "\n", "period": "."}
# The EvalConfig keys that decide what generate_captions produces (complete takes all but "prompt").
DECODING_KEYS = (
    "prompt", "batch_size", "max_new_tokens", "min_new_tokens", "num_beams", "length_penalty", "do_sample",
    "temperature", "top_k", "top_p", "repetition_penalty", "stop_at", "seed",
)
_NOT_HF = ("prompt", "batch_size", "stop_at", "seed")


class PrefixModel(Protocol):
    """What decoding needs of a model: FrozenPrefixCaptioner has all of it."""

    config: Config
    lm: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    training: bool

    @property
    def device(self) -> torch.device: ...
    @property
    def prefix_length(self) -> int: ...
    @property
    def start_ids(self) -> list[int]: ...
    def pixel_values(self, images: Sequence[ImageLike]) -> torch.Tensor: ...
    def prefix_for(self, pixel_values: torch.Tensor | None) -> torch.Tensor | None: ...
    def input_embeddings(
        self, input_ids: torch.Tensor, image_mask: torch.Tensor, prefix: torch.Tensor | None
    ) -> torch.Tensor: ...
    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...
    def train(self, mode: bool = True) -> Any: ...
    def eval(self) -> Any: ...


# ---------------------------------------------------------------------------- options


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


def decoding_options(eval_config: Any) -> dict[str, Any]:
    """The generate_captions options an EvalConfig holds."""
    return {key: getattr(eval_config, key) for key in DECODING_KEYS}


def clean_caption(text: str, stops: Sequence[str] = ()) -> str:
    """Cut the decoded text at the first stop string (a period is kept) and trim it."""
    for stop in stops:
        cut = text.find(stop)
        if cut >= 0:
            text = text[: cut + (len(stop) if stop == "." else 0)]
    return text.strip()


def _options(model: PrefixModel, options: dict[str, Any], allowed: Sequence[str]) -> dict[str, Any]:
    """The config's eval options overridden by the given ones, checked."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise FrozenPrefixError(f"unknown decoding option(s) {', '.join(unknown)}; known: {', '.join(allowed)}")
    opts = {**decoding_options(model.config.eval), **options}
    check_decoding(opts)
    return opts


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Sampling from a fixed seed without disturbing the caller's RNG stream (e.g. training)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _eval_mode(model: PrefixModel) -> Iterator[None]:
    """Decode in eval mode (normalisation statistics fixed), then restore the caller's mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------- prompts -> model inputs


def is_image(segment: Any) -> bool:
    """Images in a prompt: PIL images, Paths and pixel tensors; a plain str is always text."""
    return isinstance(segment, (Image.Image, Path, torch.Tensor))


def as_prompt(prompt: Prompt | Segment) -> Prompt:
    """A single segment (one image or one text) as a prompt of one segment."""
    if isinstance(prompt, (list, tuple)):
        return list(prompt)
    return [prompt]


def lay_out(model: PrefixModel, prompt: Prompt, strip_end: bool = True) -> TokenSequence:
    """One prompt's token sequence: start ids, then each segment in order (no labels)."""
    builder = SequenceBuilder(model.prefix_length, model.start_ids, model.tokenizer.pad_token_id)
    last = len(prompt) - 1
    for i, segment in enumerate(prompt):
        if is_image(segment):
            builder.image()
            continue
        if not isinstance(segment, str):
            raise FrozenPrefixError(
                f"a prompt segment is a {type(segment).__name__}; give text (str) or an image "
                "(PIL image, pathlib.Path or pixel tensor)"
            )
        # A trailing space would become a token of its own in BPE vocabularies, one the LM never saw before a word.
        text = segment.rstrip() if strip_end and i == last else segment
        if text:
            builder.text(model.tokenizer(text, add_special_tokens=False).input_ids)
    return builder.build()


def prompt_pixels(model: PrefixModel, prompts: Sequence[Prompt]) -> torch.Tensor | None:
    """Every image of the prompts, in reading order, as one pixel batch (None when there is none)."""
    images = [segment for prompt in prompts for segment in prompt if is_image(segment)]
    if not images:
        return None
    if all(isinstance(im, torch.Tensor) for im in images):
        return torch.stack(images).to(model.device)
    if any(isinstance(im, torch.Tensor) for im in images):
        raise FrozenPrefixError("a batch of prompts mixes pixel tensors with PIL images or paths; use one kind")
    return model.pixel_values(images)


def encode(model: PrefixModel, prompts: Sequence[Prompt], side: str = "left") -> tuple[torch.Tensor, Layout]:
    """Input embeddings and the padded layout of a batch of prompts (left padding: every row ends together)."""
    layout = pad([lay_out(model, p) for p in prompts], model.tokenizer.pad_token_id, side=side)
    device = model.device
    prefix = model.prefix_for(prompt_pixels(model, prompts))
    embeds = model.input_embeddings(layout.input_ids.to(device), layout.image_mask.to(device), prefix)
    return embeds, layout


# ---------------------------------------------------------------------------- generation


class _DropMessages(logging.Filter):
    """Drops log records that contain any of the given fragments."""

    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep the record unless it is one of the expected notes."""
        return not any(f in record.getMessage() for f in self.fragments)


# Notes HF logs that do not apply here: this module replaces HF's repetition-penalty processor on purpose (see
# generation_kwargs); and HF drops an all-ones attention mask, then sees the padding of rows finished after EOS.
_EXPECTED_HF_NOTES = _DropMessages("will take precedence", "strongly recommend passing in an `attention_mask`")


@contextlib.contextmanager
def _quiet_hf() -> Iterator[None]:
    """HF generate without the notes and warnings that do not apply to embeddings-only decoding."""
    hf_logs = [logging.getLogger(f"transformers.{name}") for name in ("generation.utils", "modeling_utils")]
    for hf_log in hf_logs:
        hf_log.addFilter(_EXPECTED_HF_NOTES)
    try:
        with warnings.catch_warnings():
            # Only embeddings go in, so a repetition penalty sees the new tokens alone: what we want.
            warnings.filterwarnings("ignore", message=".*with `inputs_embeds` and without `input_ids`")
            yield
    finally:
        for hf_log in hf_logs:
            hf_log.removeFilter(_EXPECTED_HF_NOTES)


@torch.no_grad()
def generate_ids(model: PrefixModel, prompts: Sequence[Prompt], **hf_kwargs: Any) -> torch.Tensor:
    """New token ids (B, T) continuing each prompt, via HF generate with inputs_embeds and the KV cache."""
    embeds, layout = encode(model, prompts, side="left")
    kwargs = {"max_new_tokens": 24, "do_sample": False, "num_beams": 1, **hf_kwargs}
    with _quiet_hf():
        return model.lm.generate(
            inputs_embeds=embeds, attention_mask=layout.attention_mask.to(model.device),
            eos_token_id=model.tokenizer.eos_token_id, pad_token_id=model.tokenizer.pad_token_id, **kwargs,
        )


def _decode_batches(
    model: PrefixModel, prompts: Sequence[Prompt], opts: dict[str, Any], progress: bool, desc: str
) -> list[str]:
    """Texts continuing each prompt, batch_size prompts per generate call, cut at EOS and the stop strings."""
    kwargs = generation_kwargs(**{k: v for k, v in opts.items() if k not in _NOT_HF})
    stops = resolve_stops(opts["stop_at"])
    if stops:  # stop inside generate (no wasted steps), then cut the text exactly at the stop string
        kwargs["stopping_criteria"] = StoppingCriteriaList([StopStrings(model.tokenizer, stops)])
    eos, batch_size = model.tokenizer.eos_token_id, opts["batch_size"]
    texts: list[str] = []
    with _eval_mode(model), _seeded(opts["seed"] if opts["do_sample"] else None, model.device):
        for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress, leave=False):
            new_tokens = generate_ids(model, prompts[start : start + batch_size], **kwargs)
            for ids in new_tokens.tolist():
                ids = ids[: ids.index(eos)] if eos in ids else ids  # whatever fills rows after EOS is not text
                texts.append(clean_caption(model.tokenizer.decode(ids, skip_special_tokens=True), stops))
    return texts


def generate_captions(
    model: PrefixModel, images: Sequence[ImageLike] | torch.Tensor, progress: bool = False, **options: Any
) -> list[str]:
    """Captions for images (PIL, paths or a pixel tensor); options default to model.config.eval (see DECODING_KEYS).

    `prompt` may be one string or one per image; its tokens are never part of the returned caption.
    """
    opts = _options(model, options, DECODING_KEYS)
    n = len(images)
    prompt = opts["prompt"] or ""
    texts = [prompt] * n if isinstance(prompt, str) else [p or "" for p in prompt]
    if len(texts) != n:
        raise FrozenPrefixError(f"got {len(texts)} prompts for {n} images; give one prompt or one per image")
    # Paths given as str are images here (a caption call has only images): as_image makes them Paths.
    prompts = [[_as_image(image), text] for image, text in zip(images, texts, strict=True)]
    return _decode_batches(model, prompts, opts, progress, "captioning")


def _as_image(image: Any) -> Segment:
    """An image argument as a prompt image segment (str paths become Paths; dicts and bytes are loaded)."""
    if isinstance(image, str):
        return Path(image)
    if isinstance(image, (dict, bytes)):
        from .images import load_image

        return load_image(image)
    return image


def complete(
    model: PrefixModel, prompts: Sequence[Prompt] | Prompt, progress: bool = False, **options: Any
) -> list[str]:
    """The continuation of each interleaved prompt (a batch of prompts, or one prompt), decoded in batches.

    Prompts in one batch may hold different numbers of images and lengths; the result equals decoding each
    prompt alone. Options as for generate_captions, except `prompt` (the text is part of each prompt).
    """
    if not prompts:
        return []
    single = not isinstance(prompts[0], (list, tuple))
    batch = [as_prompt(prompts)] if single else [as_prompt(p) for p in prompts]
    opts = _options(model, options, [k for k in DECODING_KEYS if k != "prompt"])
    return _decode_batches(model, batch, opts, progress, "decoding")


# ---------------------------------------------------------------------------- likelihood scoring


@torch.no_grad()
def score_continuations(
    model: PrefixModel, prompt: Prompt, candidates: Sequence[str]
) -> list[dict[str, float]]:
    """Log-probability of each candidate text after the prompt: {"sum", "mean", "tokens"} per candidate.

    The prompt runs once; its KV cache is copied to one row per candidate, and all candidates run as one
    batch on top of it. A candidate usually starts with a space (" dax"), as it would in running text.
    """
    if not candidates:
        return []
    tokenizer = model.tokenizer
    ids = [tokenizer(c, add_special_tokens=False).input_ids for c in candidates]
    if any(not i for i in ids):
        raise FrozenPrefixError("a candidate continuation is empty; give each candidate some text")
    device = model.device
    with _eval_mode(model):
        embeds, layout = encode(model, [as_prompt(prompt)], side="left")
        out = model.lm(inputs_embeds=embeds, attention_mask=layout.attention_mask.to(device), use_cache=True)
        first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)  # predicts every candidate's first token
        n, width = len(ids), max(map(len, ids))
        cache = copy.deepcopy(out.cache)
        cache.batch_repeat_interleave(n)
        cand = torch.full((n, width), tokenizer.pad_token_id, dtype=torch.long)
        cand_mask = torch.zeros((n, width), dtype=torch.long)
        for row, toks in enumerate(ids):
            cand[row, : len(toks)] = torch.tensor(toks)
            cand_mask[row, : len(toks)] = 1
        past = layout.attention_mask.to(device).expand(n, -1)
        hidden = model.lm.base_model(
            input_ids=cand.to(device), attention_mask=torch.cat([past, cand_mask.to(device)], dim=1),
            cache=cache, use_cache=True,
        )[0]
        logp = torch.log_softmax(model.lm_logits(hidden).float(), dim=-1)  # logp[:, j] predicts token j + 1
    results = []
    for row, toks in enumerate(ids):
        total = first[toks[0]].item() + sum(logp[row, j, toks[j + 1]].item() for j in range(len(toks) - 1))
        results.append({"sum": total, "mean": total / len(toks), "tokens": len(toks)})
    return results
