"""The few-shot and dialogue tasks on a data set: `evaluate --task vqa|binding|dialogue`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..captioner import FrozenPrefixCaptioner
from ..config import Config, SourceConfig
from ..data import ShapesDialogue, ShapesVQA, build_vqa_source, read_conversations_jsonl
from ..errors import FrozenPrefixError
from .dialogue import evaluate_dialogue
from .fewshot import evaluate_binding, evaluate_vqa
from .report import fewshot_table, write_task_results


def vqa_demo_pool(config: Config, source: SourceConfig, base_dir: str | Path | None = None) -> Any:
    """Where demonstrations come from: eval.vqa.demo_source, the shapes train questions, or VQA training data."""
    vc = config.eval.vqa
    demo = vc.demo_source
    if demo is None and source.kind in ("shapes", "shapes_vqa"):
        return ShapesVQA("train", vc.demo_pool, source.seed)
    trains = config.data.train if isinstance(config.data.train, list) else [config.data.train]
    if demo is None:  # the training data's questions, when it has some (the first VQA source of a mixture)
        demo = next((s for s in trains if s is not None and s.kind in ("vqa", "vqav2", "shapes_vqa")), None)
    if demo is None:
        if max(vc.shots) == 0:
            return ShapesVQA("train", 1)  # never read: no demonstrations at 0 shots
        raise FrozenPrefixError("few-shot VQA needs demonstrations; set eval.vqa.demo_source to a VQA training split")
    return build_vqa_source(demo, base_dir, size=vc.demo_pool)


def dialogue_source(source: SourceConfig, base_dir: str | Path | None = None) -> Any:
    """Conversations to evaluate: a shapes split's embedded dialogues, or a conversations .jsonl."""
    if source.kind.startswith("shapes"):
        return ShapesDialogue(source.split, source.size, source.seed)
    if source.kind == "conversations":
        return read_conversations_jsonl(source.path, source.size, source.image_dir)
    raise FrozenPrefixError(f"a {source.kind} source holds no conversations; give shapes or conversations data")


def evaluate_task(
    model: FrozenPrefixCaptioner, task: str, label: str, source: SourceConfig | None, config: Config, out: Path,
    base_dir: str | Path | None = None, progress: bool = False,
) -> dict[str, Any]:
    """Run vqa, binding or dialogue on one split; write LABEL_TASK_metrics.json and LABEL_TASK_examples.jsonl."""
    ec = config.eval
    if task == "vqa":
        queries = build_vqa_source(source, base_dir, size=ec.vqa.max_questions)
        pool = vqa_demo_pool(config, source, base_dir)
        results, rows = evaluate_vqa(model, queries, pool, ec.vqa, ec.batch_size, progress)
        table = fewshot_table(results, "vqa_accuracy", f"{label} vqa shots")
    elif task == "dialogue":
        conversations = dialogue_source(source, base_dir)
        dc = ec.dialogue
        results, rows = evaluate_dialogue(
            model, conversations, config.data.chat_style, dc.modes, dc.controls, ec.batch_size, dc.max_new_tokens,
            dc.max_conversations, progress,
        )
        table = "\n".join(
            f"| {label} dialogue, {mode} history | "
            + " | ".join(f"{c} {v['accuracy']:.3f}" for c, v in by.items() if isinstance(v, dict) and "accuracy" in v)
            + f" | real-blind {by.get('real_minus_blind', float('nan')):+.3f} |"
            for mode, by in results.items()
        )
    else:
        split = source.split if source is not None and source.kind.startswith("shapes") else "test"
        results, rows = evaluate_binding(model, ec.binding, split, ec.batch_size, progress)
        table = fewshot_table(results, "binding_accuracy", f"{label}")
    write_task_results(out, f"{label}_{task}", results, rows)
    print(table)
    return results
