"""Few-shot evaluation with interleaved prompts: VQA and concept binding, each beside its blind controls.

Frozen's protocol: demonstrations `[img] Question: q Answer: a` (VQA) or `[img] This is a dax.` (binding) come
before the query, each image expanded to its k prefix embeddings in place, and the frozen LM answers greedily.
Every score is reported next to controls that remove what the score should depend on:
  blind      every image replaced by a black one (test-blind; train-blind is `data.blank_images` in training)
  shuffled   the query image swapped for another query's image (the demonstrations stay)
  text_only  the demonstrations' images removed (the query keeps its image)
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..captioner import FrozenPrefixCaptioner
from ..config import BindingEvalConfig, VQAEvalConfig
from ..data.binding import BindingEpisodes, episode_prompt, read_frozen_episodes
from ..errors import FrozenPrefixError
from ..generate import Prompt, _eval_mode, complete, is_image, score_continuations
from .metrics.binding import BindingScorer
from .metrics.vqa import VQAScorer

BLACK = (0, 0, 0)


def blank_image(like: Any = None) -> Image.Image:
    """A black image (the size of `like` when it is a PIL image): what a blind control shows."""
    size = like.size if isinstance(like, Image.Image) else (128, 128)
    return Image.new("RGB", size, BLACK)


def render(prompt: Prompt) -> str:
    """A prompt as readable text, each image as <image>."""
    return "".join("<image>" if is_image(s) else s for s in prompt)


def blind(prompt: Prompt) -> Prompt:
    """Every image replaced by a black one."""
    return [blank_image(s) if is_image(s) else s for s in prompt]


def without_support_images(prompt: Prompt) -> Prompt:
    """Every image but the last (the query's) removed."""
    last = max(i for i, s in enumerate(prompt) if is_image(s))
    return [s for i, s in enumerate(prompt) if i == last or not is_image(s)]


def with_query_image(prompt: Prompt, image: Any) -> Prompt:
    """The last image (the query's) replaced."""
    last = max(i for i, s in enumerate(prompt) if is_image(s))
    return [image if i == last else s for i, s in enumerate(prompt)]


def apply_control(prompts: list[Prompt], control: str) -> list[Prompt]:
    """The prompts as a control sees them ('real' leaves them as they are)."""
    if control == "real":
        return prompts
    if control == "blind":
        return [blind(p) for p in prompts]
    if control == "text_only":
        return [without_support_images(p) for p in prompts]
    if control == "shuffled":  # each query gets the next query's image: a different scene, same question
        queries = [[s for s in p if is_image(s)][-1] for p in prompts]
        return [with_query_image(p, queries[(i + 1) % len(prompts)]) for i, p in enumerate(prompts)]
    raise ValueError(f"unknown control {control!r}")


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Mean, spread (sample standard deviation; 0 for one trial) and the values themselves."""
    values = list(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": spread, "trials": values}


# ---------------------------------------------------------------------------- VQA


@dataclass
class VQAItem:
    """One question without its image decoded: enough to write a demonstration or score an answer."""

    index: int
    question: str
    answers: list[str]
    extra: dict[str, Any]


def question_items(source: Any) -> list[VQAItem]:
    """The questions of a VQA source (ShapesVQA or VQARecords), images left undecoded."""
    items = []
    for i in range(len(source)):
        info = source.question(i) if hasattr(source, "question") else source.without_image(i)
        answers = info.get("answers") or [info["answer"]] * 10
        keep = ("family", "question_type", "answer_type", "question_id")
        extra = {k: info[k] for k in keep if info.get(k) is not None}
        if "family" in info and "question_type" not in extra:
            extra["question_type"] = info["family"]
        items.append(VQAItem(i, info["question"], list(answers), extra))
    return items


def _image(source: Any, index: int) -> Image.Image:
    return source[index]["image"]


def random_demos(n_queries: int, pool: int, shots: int, trial: int) -> list[list[int]]:
    """For each query, `shots` distinct pool indices drawn from a seed of (trial, query)."""
    return [random.Random(f"demos/{trial}/{q}").sample(range(pool), shots) for q in range(n_queries)]


@torch.no_grad()
def pooled_features(model: FrozenPrefixCaptioner, images: list[Image.Image], batch_size: int = 64) -> torch.Tensor:
    """The model's own image representation for retrieval: its prefix, averaged over the k slots, unit length."""
    with _eval_mode(model):
        chunks = [model.embed_images(images[i : i + batch_size]).mean(1) for i in range(0, len(images), batch_size)]
    return torch.nn.functional.normalize(torch.cat(chunks).float(), dim=-1)


def similar_demos(query_features: torch.Tensor, pool_features: torch.Tensor, shots: int) -> list[list[int]]:
    """For each query, the `shots` most similar pool images, the most similar last (next to the query)."""
    if shots == 0:
        return [[] for _ in range(len(query_features))]
    top = (query_features @ pool_features.T).topk(shots, dim=1).indices
    return [list(reversed(row.tolist())) for row in top]


def vqa_prompt(
    template: str, query: VQAItem, query_image: Any, demos: list[tuple[VQAItem, Any]]
) -> Prompt:
    """`[img] Question: q Answer: a` per demonstration (one per line), then the query's image and question."""
    prompt: Prompt = []
    for item, image in demos:
        prompt += [image, f"{template.format(question=item.question)} {vqa_demo_answer(item)}\n"]
    return prompt + [query_image, template.format(question=query.question)]


def vqa_demo_answer(item: VQAItem) -> str:
    """The answer a demonstration shows: the most common of its human answers."""
    return max(set(item.answers), key=item.answers.count)


def evaluate_vqa(
    model: FrozenPrefixCaptioner, queries: Any, pool: Any, config: VQAEvalConfig, batch_size: int = 32,
    progress: bool = False,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """VQA accuracy at each shot count over config.trials demonstration draws, with each control beside it."""
    query_items, pool_items = question_items(queries), question_items(pool)
    query_images = [_image(queries, i) for i in range(len(query_items))]
    pool_cache: dict[int, Image.Image] = {}

    def pool_image(index: int) -> Image.Image:
        if index not in pool_cache:
            pool_cache[index] = _image(pool, index)
        return pool_cache[index]

    similar = None
    if config.demos == "similar" and max(config.shots) > 0:
        pool_features = pooled_features(model, [pool_image(i) for i in range(len(pool_items))])
        similar = (pooled_features(model, query_images), pool_features)
    rows: list[dict[str, Any]] = []
    for shots in config.shots:
        # 0 shots and retrieved demonstrations do not depend on the trial: one trial is the whole result
        trials = 1 if shots == 0 or similar is not None else config.trials
        for trial in range(trials):
            if similar is not None:
                chosen = similar_demos(similar[0], similar[1], shots)
            else:
                chosen = random_demos(len(query_items), len(pool_items), shots, trial)
            prompts = [
                vqa_prompt(config.template, q, query_images[j], [(pool_items[d], pool_image(d)) for d in chosen[j]])
                for j, q in enumerate(query_items)
            ]
            for control in ["real", *config.controls]:
                if control == "text_only" and shots == 0:
                    continue  # no demonstrations: the same as real
                shown = apply_control(prompts, control)
                answers = complete(
                    model, shown, batch_size=batch_size, max_new_tokens=config.max_new_tokens, min_new_tokens=0,
                    num_beams=1, do_sample=False, stop_at=["newline", "Question"], progress=progress,
                )
                rows += [
                    {"question": q.question, "raw": a, "answers": q.answers, "prompt": render(p), "shots": shots,
                     "trial": trial, "control": control, **q.extra}
                    for q, a, p in zip(query_items, answers, shown, strict=True)
                ]
    return score_vqa_rows(rows)


def score_vqa_rows(rows: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Extract each raw output's answer, score it, and average per shots x control over the trials.

    Kept apart from decoding so that saved `*_vqa_examples.jsonl` rows can be scored again (docs/scripts/rescore_vqa).
    """
    scorer = VQAScorer()
    groups: dict[tuple[int, str, int], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["shots"], row["control"], row["trial"]), []).append(
            {**row, "prediction": answer_text(row["raw"])}
        )
    results: dict[str, Any] = {}
    scored_rows: list[dict[str, Any]] = []
    per_cell: dict[tuple[int, str], list[dict[str, float]]] = {}
    for (shots, control, _trial), group in groups.items():  # insertion order: shots, then trial, then control
        metrics, scored = scorer.score(group)
        per_cell.setdefault((shots, control), []).append(metrics)
        scored_rows += scored
    for (shots, control), trial_metrics in per_cell.items():
        results.setdefault(str(shots), {})[control] = _merge(trial_metrics)
    for by_control in results.values():
        _add_differences(by_control, "vqa_accuracy")
    return results, scored_rows


def answer_text(raw: str) -> str:
    """The answer in a generated text: cut at a newline or a following 'Question', without sentence punctuation.

    The official evaluator strips punctuation only when the ten human answers disagree, so "red." would score 0
    against ten "red": the full stop ends the model's sentence, it is not part of the answer.
    """
    for stop in ("\n", "Question"):
        raw = raw.split(stop)[0]
    return raw.strip().rstrip(".!?,;:").strip()


def _merge(trial_metrics: list[dict[str, float]]) -> dict[str, Any]:
    """Per metric: mean, spread and per-trial values over the trials."""
    keys = [k for k in trial_metrics[0] if isinstance(trial_metrics[0][k], float)]
    merged = {k: summarize([m[k] for m in trial_metrics]) for k in keys}
    merged["questions"] = trial_metrics[0].get("questions", trial_metrics[0].get("episodes"))
    return merged


def _add_differences(by_control: dict[str, Any], metric: str) -> None:
    """'real - control' of the metric's mean, for every control measured."""
    if metric not in by_control.get("real", {}):  # nothing was scored (e.g. no episodes of this size)
        return
    real = by_control["real"][metric]["mean"]
    for control in list(by_control):
        if control != "real" and metric in by_control[control]:
            by_control[f"real_minus_{control}"] = real - by_control[control][metric]["mean"]


# ---------------------------------------------------------------------------- concept binding


def binding_episodes(config: BindingEvalConfig, ways: int, shots: int, split: str) -> list[dict[str, Any]]:
    """The episodes of one (ways, shots) cell: embedded shapes ones, or Frozen's released files."""
    if config.path:
        if not Path(config.path).is_dir():
            raise FrozenPrefixError(f"eval.binding.path: folder {config.path} not found; give Frozen's episode folder")
        found = read_frozen_episodes(config.path, shots=shots, ways=ways)[: config.episodes]
        if not found:
            raise FrozenPrefixError(
                f"{config.path} has no {ways}-way {shots}-shot episodes; set eval.binding.ways and shots"
            )
        return found
    try:
        episodes = BindingEpisodes(
            ways=ways, shots=shots, repeats=config.repeats, size=config.episodes, split=split,
            classes=config.classes, task_induction=config.task_induction,
        )
    except ValueError as e:  # e.g. 5-way over the 4 shapes
        raise FrozenPrefixError(f"eval.binding: {e}; lower eval.binding.ways or set eval.binding.classes=pair") from e
    return [episodes[i] for i in range(len(episodes))]


def _loaded(prompt: Prompt) -> Prompt:
    """Released episodes name image files: open them once, so every control sees the same pixels."""
    from ..images import load_image

    return [load_image(s) if isinstance(s, Path) else s for s in prompt]


def evaluate_binding(
    model: FrozenPrefixCaptioner, config: BindingEvalConfig, split: str = "test", batch_size: int = 16,
    progress: bool = False,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Binding accuracy per ways x shots x mode (open: generate the name; closed: rank the names), with controls."""
    results: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    scorer = BindingScorer()
    for ways in config.ways:
        for shots in config.shots:
            episodes = binding_episodes(config, ways, shots, split)
            prompts = [_loaded(episode_prompt(e, config.task_induction, config.question)) for e in episodes]
            cell: dict[str, Any] = {}
            for mode in config.modes:
                by_control: dict[str, Any] = {}
                for control in ["real", *config.controls]:
                    shown = apply_control(prompts, control)
                    scored_in = _binding_rows(model, episodes, shown, mode, config, batch_size, progress)
                    for row in scored_in:
                        row.update(ways=ways, shots=shots, control=control)
                    metrics, scored = scorer.score(scored_in)
                    by_control[control] = _merge([metrics])
                    by_control[control]["chance"] = metrics.get("chance")
                    rows.extend(scored)
                _add_differences(by_control, "binding_accuracy")
                cell[mode] = by_control
            results[f"{ways}way_{shots}shot"] = cell
    return results, rows


def _binding_rows(
    model: FrozenPrefixCaptioner, episodes: list[dict[str, Any]], prompts: list[Prompt], mode: str,
    config: BindingEvalConfig, batch_size: int, progress: bool,
) -> list[dict[str, Any]]:
    """One row per episode: the generated text (open) or every name's length-normalised log-likelihood (closed)."""
    rows = [
        {"episode_id": e.get("episode_id"), "answer": e["answer"], "names": e["names"], "prompt": render(p),
         "mode": mode}
        for e, p in zip(episodes, prompts, strict=True)
    ]
    if mode == "open":
        texts = complete(
            model, prompts, batch_size=batch_size, max_new_tokens=config.max_new_tokens, min_new_tokens=0,
            num_beams=1, do_sample=False, stop_at=["newline", "period"], progress=progress,
        )
        for row, text in zip(rows, texts, strict=True):
            row["prediction"] = text
        return rows
    for row, prompt in zip(rows, prompts, strict=True):
        scores = score_continuations(model, prompt, [f" {name}" for name in row["names"]])
        row["candidate_scores"] = {name: s["mean"] for name, s in zip(row["names"], scores, strict=True)}
    return rows
