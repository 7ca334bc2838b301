"""VQA and multi-turn conversations as token sequences: what carries the loss, where each image goes.

A conversation is a list of turns `{"role": "system" | "user" | "assistant", "content": str}`; `<image>` in a
content marks where an image goes (images in order). Only assistant content (and the token that ends its turn)
is labelled: the model learns to answer and to stop, never to predict the user's words or the template.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

from ..errors import DataError, FrozenPrefixError
from ..images import load_image
from .jsonl import json_object
from .layout import IGNORE, SequenceBuilder, TokenSequence

IMAGE_TOKEN = "<image>"
VQA_TEMPLATE = "Question: {question} Answer:"  # the few-shot evaluation's template (config.eval.vqa.template)
ChatStyle = Literal["auto", "chat_template", "plain"]
CHAT_STYLES = ("auto", "chat_template", "plain")
# LLaVA's "from" values and our roles.
ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}
# Stand-ins for message contents while the chat template renders: private-use characters no template writes.
_MARK = "\ue000{}\ue001"
_MARKS = re.compile("\ue000(\\d+)\ue001")

Turn = dict[str, str]
# A piece of a rendering before tokenisation: ("text", str) unlabelled, ("answer", str) labelled,
# ("after", str) the template text after an answer (labelled up to its first special token), ("eos", "")
# the EOS token (labelled), ("image", "") one image's k slots.
Piece = tuple[str, str]


# ---------------------------------------------------------------------------- turns


def normalize_turns(turns: Any, where: str = "conversation") -> list[Turn]:
    """Turns as `{"role", "content"}` dicts, from our layout or LLaVA's `{"from": "human"|"gpt", "value"}`."""
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: a conversation must be a non-empty list of turns, got {_short(turns)}")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f'{where}: turn {i} must be an object with "role" and "content", got {_short(turn)}')
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role not in ROLES:
            raise DataError(f"{where}: turn {i} has role {role!r}; use user, assistant or system (or human/gpt)")
        if not isinstance(content, str):
            raise DataError(f"{where}: turn {i} content must be a string, got {_short(content)}")
        out.append({"role": ROLES[role], "content": content.strip()})
    return out


def place_images(turns: list[Turn], n_images: int, where: str = "conversation") -> list[Turn]:
    """Turns whose `<image>` placeholders match the images; with none, every image opens the first user turn."""
    found = sum(t["content"].count(IMAGE_TOKEN) for t in turns)
    if found == 0 and n_images:
        first = next((i for i, t in enumerate(turns) if t["role"] == "user"), None)
        if first is None:
            raise DataError(f"{where}: {n_images} image(s) but no user turn to show them in; add a user turn")
        turns = list(turns)
        turns[first] = {**turns[first], "content": IMAGE_TOKEN * n_images + "\n" + turns[first]["content"]}
        return turns
    if found != n_images:
        raise DataError(
            f"{where}: {found} {IMAGE_TOKEN} placeholder(s) but {n_images} image(s); give one placeholder per image "
            "(or none: the images then open the first user turn)"
        )
    return turns


def split_messages(messages: Sequence[dict[str, Any]]) -> tuple[list[Turn], list[Any]]:
    """Messages whose content is a str or a list of str and images -> turns with `<image>` placeholders, images."""
    turns, images = [], []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise FrozenPrefixError(f'message {i} must be a dict with "role" and "content"; got {_short(message)}')
        if message["role"] not in ROLES:
            raise FrozenPrefixError(f"message {i} has role {message['role']!r}; use user, assistant or system")
        content = message["content"]
        parts = content if isinstance(content, (list, tuple)) else [content]
        text = ""
        for part in parts:
            if isinstance(part, str):
                if IMAGE_TOKEN in part:
                    raise FrozenPrefixError(
                        f"message {i} writes {IMAGE_TOKEN} in its text; give the image itself in the content list"
                    )
                text += part
            else:  # an image: PIL, Path or pixel tensor (the decoder checks which)
                text += ("\n" if text and not text.endswith("\n") else "") + IMAGE_TOKEN + "\n"
                images.append(part)
        turns.append({"role": ROLES[message["role"]], "content": text.strip()})
    return turns, images


def with_images(turns: Sequence[Turn], images: Sequence[Any]) -> list[dict[str, Any]]:
    """Turns with `<image>` placeholders -> messages listing text and images (`<image>\nText` round-trips exactly)."""
    turns = place_images(list(turns), len(images))
    pending = list(images)
    messages = []
    for turn in turns:
        pieces = turn["content"].split(IMAGE_TOKEN)
        content: list[Any] = []
        for j, text in enumerate(pieces):
            if j:
                content.append(pending.pop(0))
            if text.strip():
                content.append(text.strip())
        messages.append({"role": turn["role"], "content": content})
    return messages


# ---------------------------------------------------------------------------- rendering


def resolve_style(tokenizer: PreTrainedTokenizerBase, style: str) -> str:
    """'auto' -> 'chat_template' when the tokenizer has one, else 'plain'; a template asked for must exist."""
    if style not in CHAT_STYLES:
        raise FrozenPrefixError(f"unknown chat style {style!r}; choose from {', '.join(CHAT_STYLES)}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if style == "auto":
        return "chat_template" if has_template else "plain"
    if style == "chat_template" and not has_template:
        raise FrozenPrefixError("the LM's tokenizer has no chat template; use chat style plain (or auto)")
    return style


def render_vqa(
    tokenizer: PreTrainedTokenizerBase,
    k: int,
    start_ids: Sequence[int],
    question: str,
    answer: str,
    template: str = VQA_TEMPLATE,
    max_answer_tokens: int | None = None,
) -> TokenSequence:
    """[start][image]["Question: q Answer:"] unlabelled, then " answer" + EOS labelled (as the few-shot prompt)."""
    builder = SequenceBuilder(k, start_ids, tokenizer.pad_token_id).image()
    builder.text(_ids(tokenizer, template.format(question=question.strip())))
    # The leading space: the answer is tokenized as it reads in running text after "Answer:".
    answer_ids = _ids(tokenizer, " " + answer.strip())[:max_answer_tokens]
    return builder.text(answer_ids + [tokenizer.eos_token_id], labelled=True).build()


def render_conversation(
    tokenizer: PreTrainedTokenizerBase,
    turns: Sequence[Turn],
    k: int,
    start_ids: Sequence[int],
    style: str = "auto",
    add_generation_prompt: bool = False,
) -> TokenSequence:
    """A conversation's tokens: assistant content and its end-of-turn token labelled, each `<image>` k slots."""
    style = resolve_style(tokenizer, style)
    turns = [{"role": ROLES.get(t["role"], t["role"]), "content": t["content"]} for t in turns]
    pieces = (chat_template_pieces if style == "chat_template" else plain_pieces)(
        tokenizer, turns, add_generation_prompt
    )
    return assemble(tokenizer, pieces, k, start_ids, dedupe_start=style == "chat_template")


def plain_pieces(tokenizer: PreTrainedTokenizerBase, turns: list[Turn], add_generation_prompt: bool) -> list[Piece]:
    """'User: ...' / 'Assistant: ...' lines; each answer is followed by EOS (labelled), so decoding can stop."""
    pieces: list[Piece] = []
    for i, turn in enumerate(turns):
        sep = "\n" if i else ""
        if turn["role"] == "assistant":
            pieces += [("text", f"{sep}Assistant:"), ("answer", " " + turn["content"]), ("eos", "")]
        else:
            name = "User" if turn["role"] == "user" else "System"
            pieces += _with_image_pieces(f"{sep}{name}: {turn['content']}", strip_before_image=True)
    if add_generation_prompt:
        pieces.append(("text", "\nAssistant:" if turns else "Assistant:"))
    return pieces


def chat_template_pieces(
    tokenizer: PreTrainedTokenizerBase, turns: list[Turn], add_generation_prompt: bool
) -> list[Piece]:
    """The tokenizer's chat template, cut at every message content (rendered once with stand-ins for them)."""
    marked = [{"role": t["role"], "content": _MARK.format(i)} for i, t in enumerate(turns)]
    rendered = _apply_template(tokenizer, marked, add_generation_prompt)
    parts = _MARKS.split(rendered)  # template text, index, template text, index, ...
    order = [int(i) for i in parts[1::2]]
    if order != list(range(len(turns))):
        raise FrozenPrefixError(
            "the LM's chat template drops, repeats or reorders messages (e.g. it has no system role); "
            "use chat style plain"
        )
    real = _apply_template(tokenizer, turns, add_generation_prompt)
    if real != parts[0] + "".join(t["content"] + parts[2 * i + 2] for i, t in enumerate(turns)):
        raise FrozenPrefixError("the LM's chat template changes message contents; use chat style plain")
    pieces: list[Piece] = [("text", parts[0])]
    for i, turn in enumerate(turns):
        after = parts[2 * i + 2]
        if turn["role"] == "assistant":
            pieces += [("answer", turn["content"]), ("after", after)]
        else:
            pieces += _with_image_pieces(turn["content"]) + [("text", after)]
    return pieces


def _apply_template(tokenizer: PreTrainedTokenizerBase, turns: list[Turn], add_generation_prompt: bool) -> str:
    """The template's text for these turns; a template error is one line."""
    try:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja raises whatever the template says (e.g. "roles must alternate")
        raise FrozenPrefixError(f"the LM's chat template rejects this conversation ({e}); use chat style plain") from e


def _with_image_pieces(text: str, strip_before_image: bool = False) -> list[Piece]:
    """Text with `<image>` placeholders as text and image pieces."""
    pieces: list[Piece] = []
    chunks = text.split(IMAGE_TOKEN)
    for j, chunk in enumerate(chunks):
        if j:
            pieces.append(("image", ""))
        if strip_before_image and j < len(chunks) - 1:
            chunk = chunk.rstrip(" ")  # "User: " + image: a lone space token is one the LM never saw before a word
        pieces.append(("text", chunk))
    return pieces


def special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Ids of the tokenizer's special tokens (EOS, BOS, and added ones such as <|im_end|> or <|eot_id|>)."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if token.special)
    return ids


def assemble(
    tokenizer: PreTrainedTokenizerBase, pieces: list[Piece], k: int, start_ids: Sequence[int], dedupe_start: bool
) -> TokenSequence:
    """Tokenize the pieces (adjacent unlabelled text as one string) and lay them out after the start ids."""
    special = special_ids(tokenizer)
    segments: list[tuple[list[int], list[int]] | None] = []  # (ids, labels) or None for an image
    text = ""
    for kind, value in pieces + [("end", "")]:
        if kind == "text":
            text += value
            continue
        if text:
            ids = _ids(tokenizer, text)
            segments.append((ids, [IGNORE] * len(ids)))
            text = ""
        if kind == "image":
            segments.append(None)
        elif kind == "answer":
            ids = _ids(tokenizer, value)
            segments.append((ids, ids))
        elif kind == "eos":
            segments.append(([tokenizer.eos_token_id], [tokenizer.eos_token_id]))
        elif kind == "after":  # the end-of-turn token (e.g. <|im_end|>) is learned too, so the model stops
            ids = _ids(tokenizer, value)
            stop = next((j + 1 for j, t in enumerate(ids) if t in special), 0)
            segments.append((ids, ids[:stop] + [IGNORE] * (len(ids) - stop)))
    start = list(start_ids)
    first = segments[0] if segments else None
    if dedupe_start and first is not None and first[0][: len(start)] == start:
        start = []  # the template writes the start token itself (e.g. <|im_start|> or <|begin_of_text|>)
    builder = SequenceBuilder(k, start, tokenizer.pad_token_id)
    for segment in segments:
        if segment is None:
            builder.image()
            continue
        ids, labels = segment
        seq = builder.seq
        seq.ids += ids
        seq.image_mask += [False] * len(ids)
        seq.labels += labels
    return builder.build()


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase, style: str = "auto") -> list[int]:
    """The tokens that end an assistant turn: EOS, and the chat template's end-of-turn token where it has one."""
    ids = [tokenizer.eos_token_id]
    if resolve_style(tokenizer, style) == "chat_template":
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        seq = render_conversation(tokenizer, probe, 1, [], "chat_template")
        labelled = [t for t in seq.labels if t != IGNORE]
        ids += [t for t in labelled[-1:] if t in special_ids(tokenizer) and t not in ids]
    return ids


def truncate(seq: TokenSequence, max_tokens: int, k: int) -> TokenSequence:
    """The first max_tokens positions, never part of an image: a cut inside an image's k slots moves before it."""
    if len(seq) <= max_tokens:
        return seq
    slots = sum(seq.image_mask[:max_tokens])
    cut = max_tokens - slots % k
    return TokenSequence(seq.ids[:cut], seq.image_mask[:cut], seq.labels[:cut], slots // k)


def vqa_target(item: dict[str, Any]) -> str:
    """The answer a VQA item trains on: the most common of its answers (the first among ties), else "answer"."""
    answers = [a for a in item.get("answers") or [] if isinstance(a, str) and a.strip()]
    if answers:
        return Counter(answers).most_common(1)[0][0]
    answer = item.get("answer")
    if not isinstance(answer, str) or not answer.strip():
        raise DataError(f"VQA item {item.get('question_id', item.get('image_id', '?'))} has no answer to train on")
    return answer


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids if text else []


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------------------- JSON Lines conversations


class ConversationRecords:
    """Conversations read from JSON Lines, served as map-style items; images are decoded on access."""

    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def text_length(self, index: int) -> int:
        """Characters of record `index`'s turns as written, unchecked (for grouping by length)."""
        return len(str(self.records[index]["turns"]))

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        where = record["where"]
        turns = normalize_turns(record["turns"], where)
        paths = record["images"]
        if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
            raise DataError(f'{where}: "image"/"images" must be a path or a list of paths, got {_short(paths)}')
        turns = place_images(turns, len(paths), where)
        images = []
        for path in paths:
            try:
                images.append(load_image(Path(path)))
            except DataError as e:
                raise DataError(f"{where}: {e}") from e
        return {
            "kind": "dialogue", "images": images, "turns": turns, "image_id": record["id"],
            "answers": [t["content"] for t in turns if t["role"] == "assistant"],
        }


def read_conversations_jsonl(
    path: str | Path, size: int | None = None, image_dir: str | Path | None = None
) -> ConversationRecords:
    """LLaVA-layout (`{"image", "conversations": [{"from", "value"}]}`) or `{"images", "messages"}` lines.

    Image paths are taken from image_dir (LLaVA's image folder) or else the file's folder, unless absolute. A
    malformed turn or image is reported when its record is read (so data.bad_data=skip can skip it).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"conversations file not found: {path}; check the data source path")
    base = Path(image_dir) if image_dir is not None else path.parent
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if size is not None and len(records) >= size:
                break
            where = f"{path}:{lineno}"
            obj = json_object(line, where, '"conversations" (LLaVA) or "messages"')
            if "conversations" not in obj and "messages" not in obj:
                raise DataError(f'{where}: each line must be an object with "conversations" (LLaVA) or "messages"')
            images = obj.get("images", obj.get("image", []))
            images = [images] if isinstance(images, str) else images
            if isinstance(images, list):
                images = [str(p if Path(p).is_absolute() else base / p) if isinstance(p, str) else p for p in images]
            turns = obj.get("conversations", obj.get("messages"))
            records.append({"turns": turns, "images": images, "id": str(obj.get("id", where)), "where": where})
    if not records:
        raise DataError(f"{path} holds no conversations; add lines with \"conversations\" or \"messages\"")
    return ConversationRecords(records)
