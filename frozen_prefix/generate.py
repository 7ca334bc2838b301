"""All decoding: captions, interleaved image-text prompts, likelihood scoring and chat, with the KV cache.

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
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .config import Config, check_decoding
from .data.conversations import end_of_turn_ids, render_conversation, resolve_style, split_messages
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

log = logging.getLogger(__name__)


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
        self, input_ids: torch.Tensor, image_mask: torch.Tensor, prefix: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
    ) -> torch.Tensor: ...
    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...
    def lm_context(
        self, image_mask: torch.Tensor | None, prefix: torch.Tensor | None, start: int = 0
    ) -> contextlib.AbstractContextManager[None]: ...
    def check_task(self, task: str) -> None: ...
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
    embeds, layout, _ = encode_prefixed(model, prompts, side)
    return embeds, layout


def encode_prefixed(
    model: PrefixModel, prompts: Sequence[Prompt], side: str = "left"
) -> tuple[torch.Tensor, Layout, torch.Tensor | None]:
    """As encode, plus the prompts' prefix embeddings (what model.lm_context needs around the LM's calls)."""
    layout = pad([lay_out(model, p) for p in prompts], model.tokenizer.pad_token_id, side=side)
    device = model.device
    prefix = model.prefix_for(prompt_pixels(model, prompts))
    embeds = model.input_embeddings(
        layout.input_ids.to(device), layout.image_mask.to(device), prefix, layout.attention_mask.to(device)
    )
    return embeds, layout, prefix


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
    embeds, layout, prefix = encode_prefixed(model, prompts, side="left")
    kwargs = {"max_new_tokens": 24, "do_sample": False, "num_beams": 1, **hf_kwargs}
    mask = layout.image_mask.to(model.device)
    with _quiet_hf(), model.lm_context(mask, prefix):  # the variants' hooks: the prompt and every new token
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
        embeds, layout, prefix = encode_prefixed(model, [as_prompt(prompt)], side="left")
        mask = layout.image_mask.to(device)
        with model.lm_context(mask, prefix):
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
        with model.lm_context(mask, prefix, start=mask.shape[1]):  # the candidates' tokens, after the prompt
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


# ---------------------------------------------------------------------------- chat

Message = dict[str, Any]  # {"role": "user" | "assistant" | "system", "content": str or a list of str and images}
CHAT_KEYS = tuple(k for k in DECODING_KEYS if k != "prompt")  # the options of chat_replies
SESSION_KEYS = tuple(k for k in CHAT_KEYS if k != "batch_size")  # the options of ChatSession


def chat_style(model: PrefixModel, style: str | None = None) -> str:
    """The style to render chats in: the given one, else the config's data.chat_style where it has one, else auto."""
    if style is None:
        style = getattr(model.config.data, "chat_style", "auto")
    return resolve_style(model.tokenizer, style)


def chat_sequence(
    model: PrefixModel, messages: Sequence[Message], style: str, add_generation_prompt: bool = True
) -> tuple[TokenSequence, list[Segment]]:
    """A conversation's tokens (ending in the assistant's generation prompt) and its images in order."""
    model.check_task("chat")  # a variant that cannot serve a chat says why
    turns, images = split_messages(messages)
    bad = [type(im).__name__ for im in images if not is_image(im)]
    if bad:
        raise FrozenPrefixError(
            f"a message content holds a {bad[0]}; give text (str) or images (PIL image, pathlib.Path or pixel tensor)"
        )
    seq = render_conversation(
        model.tokenizer, turns, model.prefix_length, model.start_ids, style, add_generation_prompt
    )
    return seq, images


def _chat_options(model: PrefixModel, options: dict[str, Any], allowed: Sequence[str]) -> dict[str, Any]:
    """Decoding options for a chat: the config's, overridden; greedy unless beams are asked for explicitly."""
    opts = _options(model, options, allowed)
    if "num_beams" not in options:
        opts["num_beams"] = 1  # a captioning config's beam search is not the chat's business
    return opts


def _cut_reply(model: PrefixModel, ids: list[int], stop_ids: Sequence[int], stops: Sequence[str]) -> str:
    """The reply text: the new tokens up to the first end-of-turn token, cut at the stop strings."""
    end = next((j for j, t in enumerate(ids) if t in stop_ids), len(ids))
    return clean_caption(model.tokenizer.decode(ids[:end], skip_special_tokens=True), stops)


@torch.no_grad()
def chat_replies(
    model: PrefixModel, conversations: Sequence[Sequence[Message]], style: str | None = None, progress: bool = False,
    **options: Any,
) -> list[str]:
    """The assistant's next reply to each conversation, from scratch, batch_size conversations per generate call."""
    opts = _chat_options(model, options, CHAT_KEYS)
    style = chat_style(model, style)
    stop_ids = end_of_turn_ids(model.tokenizer, style)
    kwargs = generation_kwargs(**{k: v for k, v in opts.items() if k not in _NOT_HF})
    stops = resolve_stops(opts["stop_at"])
    if stops:
        kwargs["stopping_criteria"] = StoppingCriteriaList([StopStrings(model.tokenizer, stops)])
    device, batch_size, texts = model.device, opts["batch_size"], []
    with _eval_mode(model), _seeded(opts["seed"] if opts["do_sample"] else None, device):
        for start in tqdm(range(0, len(conversations), batch_size), desc="chat", disable=not progress, leave=False):
            batch = [chat_sequence(model, c, style) for c in conversations[start : start + batch_size]]
            layout = pad([seq for seq, _ in batch], model.tokenizer.pad_token_id, side="left")
            prefix = model.prefix_for(prompt_pixels(model, [images for _, images in batch]))
            mask = layout.image_mask.to(device)
            # the labels mark earlier replies: an image's instruction ends where its turn's reply starts
            embeds = model.input_embeddings(
                layout.input_ids.to(device), mask, prefix, layout.attention_mask.to(device), layout.labels.to(device)
            )
            with _quiet_hf(), model.lm_context(mask, prefix):
                new = model.lm.generate(
                    inputs_embeds=embeds, attention_mask=layout.attention_mask.to(device), eos_token_id=stop_ids,
                    pad_token_id=model.tokenizer.pad_token_id, **kwargs,
                )
            texts += [_cut_reply(model, ids, stop_ids, stops) for ids in new.tolist()]
    return texts


def chat(model: PrefixModel, messages: Sequence[Message], style: str | None = None, **options: Any) -> str:
    """The assistant's next reply to one conversation (content: a str or a list of str and images)."""
    return chat_replies(model, [messages], style, **options)[0]


def _same_image(a: Any, b: Any) -> bool:
    """The same image object (or the same path): its prefix embeddings can be reused."""
    return a is b or (isinstance(a, Path) and isinstance(b, Path) and a == b)


class ChatSession:
    """A conversation that keeps its history and the LM's KV cache across turns: each turn runs only new tokens.

    Every turn renders the whole history (so the result equals chat() from scratch), compares it with what the
    cache holds, keeps the common prefix (cropping the cache where the new rendering departs from it, e.g. when
    a reply's generated tokens are not how its text tokenizes) and runs the rest. Greedy or sampling, no beams.
    """

    def __init__(self, model: PrefixModel, style: str | None = None, **options: Any) -> None:
        self.model = model
        self.style = chat_style(model, style)
        self.options = _chat_options(model, options, SESSION_KEYS)
        if self.options["num_beams"] != 1:
            raise FrozenPrefixError("a chat session decodes greedily or by sampling; set num_beams to 1")
        self.stop_ids = end_of_turn_ids(model.tokenizer, self.style)
        self.stops = resolve_stops(self.options["stop_at"])
        self.reset()

    def reset(self) -> None:
        """Forget the history and the cache."""
        self.messages: list[Message] = []
        self._cache: Any = None
        self._keys: list[Any] = []  # what the cache holds, position by position: a token id or (image serial, slot)
        self._images: list[tuple[Segment, int, torch.Tensor]] = []  # (image, serial, prefix (k, D)) in order
        self._serial = 0

    def send(self, content: Prompt | Segment) -> str:
        """Add a user turn (text, an image, or a list of both), reply to it, and keep the reply in the history."""
        parts = list(content) if isinstance(content, (list, tuple)) else [content]
        self.messages.append({"role": "user", "content": parts})
        try:
            reply = self.respond(self.messages)
        except BaseException:
            self.messages.pop()  # a failed turn leaves the history as it was
            raise
        self.messages.append({"role": "assistant", "content": reply})
        return reply

    @torch.no_grad()
    def respond(self, messages: Sequence[Message]) -> str:
        """The assistant's reply to these messages, reusing whatever prefix of them the cache already holds."""
        model = self.model
        seq, images = chat_sequence(model, messages, self.style)
        embedded = self._embed(images)
        keys, slot, image = [], 0, -1
        for token, in_image in zip(seq.ids, seq.image_mask, strict=True):
            if in_image:
                image, slot = (image + 1, 0) if slot == 0 else (image, slot)
                keys.append(("image", embedded[image][1], slot))
                slot = (slot + 1) % model.prefix_length
            else:
                keys.append(token)
        # Keep the cache's common prefix with the new rendering, less at least one position to run for logits.
        common = 0
        for old, new in zip(self._keys, keys):
            if old != new:
                break
            common += 1
        common = min(common, len(keys) - 1)
        if common < len(self._keys):
            if common < len(keys) - 1:  # not just the last position again: the rendering departs from the cache
                log.debug("chat: the new rendering departs from the cache at %d of %d positions", common, len(keys))
            if common > 0 and self._cache is not None and self._cache.is_croppable:
                self._cache.crop(common - len(self._keys))  # a negative count: drop that many positions
            else:
                self._cache, common = None, 0
            self._keys = self._keys[:common]
        device = model.device
        ids = torch.tensor([seq.ids], device=device)
        mask = torch.tensor([seq.image_mask], device=device)
        labels = torch.tensor([seq.labels], device=device)  # earlier replies: where each image's instruction ends
        prefix = torch.stack([p for _, _, p in embedded]) if embedded else None
        with _eval_mode(model), _seeded(self.options["seed"] if self.options["do_sample"] else None, device):
            embeds = model.input_embeddings(ids, mask, prefix, labels=labels)[:, common:]
            with model.lm_context(mask, prefix, start=common):  # the positions run now
                logits = self._run(embeds, keys[common:])
            with model.lm_context(mask, prefix, start=len(keys)):  # each new token, after them
                new = self._decode(logits)
        return _cut_reply(model, new, self.stop_ids, self.stops)

    def _embed(self, images: list[Segment]) -> list[tuple[Segment, int, torch.Tensor]]:
        """Prefix embeddings of the images: those already embedded (same objects, same order) are reused."""
        keep = 0
        while keep < min(len(images), len(self._images)) and _same_image(images[keep], self._images[keep][0]):
            keep += 1
        fresh = images[keep:]
        embedded = self._images[:keep]
        if fresh:
            with _eval_mode(self.model):
                prefix = self.model.prefix_for(prompt_pixels(self.model, [fresh]))
            for image, p in zip(fresh, prefix, strict=True):
                self._serial += 1
                embedded.append((image, self._serial, p))
        self._images = embedded
        return embedded

    def _run(self, embeds: torch.Tensor, keys: list[Any]) -> torch.Tensor:
        """Run new positions on top of the cache; the logits (V,) after the last one."""
        model = self.model
        total = len(self._keys) + embeds.shape[1]
        attention = torch.ones((1, total), dtype=torch.long, device=embeds.device)
        out = model.lm.base_model(inputs_embeds=embeds, attention_mask=attention, cache=self._cache, use_cache=True)
        self._cache = out.cache
        self._keys += keys
        return model.lm_logits(out.last_hidden_state[:, -1]).float()[0]

    def _decode(self, logits: torch.Tensor) -> list[int]:
        """New tokens until an end-of-turn token, a stop string or max_new_tokens; each is kept in the cache."""
        opts, tokenizer = self.options, self.model.tokenizer
        processors = _session_processors(opts)
        embed = self.model.lm.get_input_embeddings()
        new: list[int] = []
        for step in range(opts["max_new_tokens"]):
            scores = logits[None].clone()
            if step < opts["min_new_tokens"]:
                scores[:, self.stop_ids] = -float("inf")
            scores = processors(torch.tensor([new], dtype=torch.long, device=scores.device), scores)
            if opts["do_sample"]:
                token = int(torch.multinomial(torch.softmax(scores, dim=-1), 1))
            else:
                token = int(scores.argmax())
            if token in self.stop_ids:
                break
            new.append(token)
            text = tokenizer.decode(new[-8:], skip_special_tokens=True)
            if any(stop in text for stop in self.stops) or step + 1 == opts["max_new_tokens"]:
                break
            logits = self._run(embed(torch.tensor([[token]], device=logits.device)), [token])
        return new


def _session_processors(opts: dict[str, Any]) -> LogitsProcessorList:
    """HF's logits processors for the session's options, in HF generate's order."""
    processors = LogitsProcessorList()
    if opts["repetition_penalty"] != 1.0:  # over the reply's tokens only, as generate_ids does with embeddings
        processors.append(RepetitionPenaltyLogitsProcessor(opts["repetition_penalty"]))
    if opts["do_sample"]:
        if opts["temperature"] != 1.0:
            processors.append(TemperatureLogitsWarper(opts["temperature"]))
        if opts["top_k"]:
            processors.append(TopKLogitsWarper(opts["top_k"]))
        if opts["top_p"] < 1.0:
            processors.append(TopPLogitsWarper(opts["top_p"]))
    return processors
