"""Multi-turn dialogue evaluation: per-turn answer accuracy, with the gold history or the model's own, and blind.

Each assistant turn of a held-out conversation (e.g. ShapesDialogue) is answered by the model given the
conversation so far: in "gold" mode the earlier assistant turns are the reference answers (teacher forcing), in
"own" mode they are the model's own earlier replies, so that early mistakes carry forward. An answer is right when
it equals the reference after the VQA normalisation (lower case, no articles or punctuation, number words as
digits). The blind control shows black images: what the text of the conversation alone gives away.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from ..captioner import FrozenPrefixCaptioner
from ..data.conversations import with_images
from ..errors import FrozenPrefixError
from ..generate import Message, chat_replies
from .fewshot import blank_image
from .metrics.vqa import normalize_answer

MODES = ("gold", "own")
CONTROLS = ("blind",)


def conversation_items(source: Any, max_conversations: int | None = None) -> list[dict[str, Any]]:
    """The first max_conversations items of a dialogue source (ShapesDialogue, ConversationRecords or a list)."""
    n = len(source) if max_conversations is None else min(len(source), max_conversations)
    return [source[i] for i in range(n)]


def _prepared(item: dict[str, Any], blind: bool) -> tuple[list[Message], list[int]]:
    """An item's messages (images in place, black ones for the blind control) and where its assistant turns are."""
    images = [blank_image(im) for im in item["images"]] if blind else list(item["images"])
    messages = with_images(item["turns"], images)
    return messages, [j for j, m in enumerate(messages) if m["role"] == "assistant"]


def _text(message: Message) -> str:
    """A message's text parts."""
    content = message["content"]
    return content if isinstance(content, str) else " ".join(p for p in content if isinstance(p, str))


def answer_rows(
    model: FrozenPrefixCaptioner, items: Sequence[dict[str, Any]], mode: str, control: str, style: str | None,
    batch_size: int, max_new_tokens: int, progress: bool = False,
) -> list[dict[str, Any]]:
    """One row per assistant turn: the model's answer given the history (gold or own), scored."""
    prepared = [_prepared(item, blind=control == "blind") for item in items]
    context: list[list[Message]] = [[] for _ in items]
    done = [0 for _ in items]  # messages of each conversation already in its context
    rows: list[dict[str, Any]] = []
    for turn in range(max((len(where) for _, where in prepared), default=0)):
        active = [i for i, (_, where) in enumerate(prepared) if turn < len(where)]
        for i in active:  # the user (and system) messages up to this assistant turn
            messages, where = prepared[i]
            context[i] += messages[done[i] : where[turn]]
        replies = chat_replies(
            model, [context[i] for i in active], style, progress=progress, batch_size=batch_size,
            max_new_tokens=max_new_tokens, min_new_tokens=0, num_beams=1, do_sample=False, stop_at=["newline"],
        )
        for i, reply in zip(active, replies, strict=True):
            messages, where = prepared[i]
            gold = _text(messages[where[turn]])
            item = items[i]
            families = item.get("families")
            rows.append({
                "conversation_id": item.get("image_id", i), "turn": turn,
                "family": families[turn] if families else None, "question": _text(context[i][-1]),
                "prediction": reply, "answer": gold, "correct": normalize_answer(reply) == normalize_answer(gold),
                "mode": mode, "control": control,
            })
            context[i].append({"role": "assistant", "content": gold if mode == "gold" else reply})
            done[i] = where[turn] + 1
    return rows


def turn_metrics(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy overall, per turn index (accuracy/turn_N), per family (accuracy/FAMILY), whole conversations right."""
    groups: dict[str, list[bool]] = defaultdict(list)
    whole: dict[Any, bool] = {}
    for row in rows:
        groups["accuracy"].append(row["correct"])
        groups[f"accuracy/turn_{row['turn']}"].append(row["correct"])
        if row["family"] is not None:
            groups[f"accuracy/{row['family']}"].append(row["correct"])
        whole[row["conversation_id"]] = whole.get(row["conversation_id"], True) and row["correct"]
    metrics: dict[str, Any] = {key: sum(v) / len(v) for key, v in sorted(groups.items())}
    metrics["conversations_all_right"] = sum(whole.values()) / len(whole) if whole else 0.0
    metrics["answers"] = len(rows)
    metrics["conversations"] = len(whole)
    return metrics


def evaluate_dialogue(
    model: FrozenPrefixCaptioner,
    source: Any,
    style: str | None = None,
    modes: Sequence[str] = MODES,
    controls: Sequence[str] = CONTROLS,
    batch_size: int = 16,
    max_new_tokens: int = 24,
    max_conversations: int | None = 200,
    progress: bool = False,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Per-turn accuracy per history mode (gold, own) and control (real, blind): (metrics, scored rows).

    metrics[mode][control] holds turn_metrics; metrics[mode]["real_minus_blind"] the difference in accuracy.
    """
    unknown = sorted(set(modes) - set(MODES)) + sorted(set(controls) - set(CONTROLS))
    if unknown:
        raise FrozenPrefixError(
            f"unknown dialogue mode/control {', '.join(unknown)}; modes: {MODES}, controls: {CONTROLS}"
        )
    items = conversation_items(source, max_conversations)
    results: dict[str, Any] = {}
    all_rows: list[dict[str, Any]] = []
    for mode in modes:
        by_control: dict[str, Any] = {}
        for control in ["real", *controls]:
            rows = answer_rows(model, items, mode, control, style, batch_size, max_new_tokens, progress)
            by_control[control] = turn_metrics(rows)
            all_rows += rows
        for control in controls:
            by_control[f"real_minus_{control}"] = by_control["real"]["accuracy"] - by_control[control]["accuracy"]
        results[mode] = by_control
    return results, all_rows
