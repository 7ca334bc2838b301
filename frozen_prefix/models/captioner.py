"""FrozenPrefixCaptioner: trainable encoder + projection feeding prefix embeddings to a frozen causal LM."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .. import generate, hub
from ..config import Config, load_config, save_config
from ..errors import FrozenPrefixError
from ..images import ImageLike, load_image
from ..model_card import CARD_NAME, write_model_card
from ..weights import load_weights
from .deep import DeepPrefix, decoder_layers, slot_index, writing_into
from .encoder import build_encoder, build_transform, encoder_features, image_data_config
from .fusion import TextFusion, VisualHead, image_rows, pooled
from .instruct import InstructionMixer, instruction_vectors
from .lm import SMOLLM2_ALIASES, TINY_ALIAS, load_lm, requested_dtype
from .packing import PackPlan, plan_packing
from .projection import PrefixProjection

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
FILE_READING_TIMM_ARGS = {"checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay"}
CONFIG_NAME = "config.yaml"
CONFIG_JSON = "config.json"  # the same resolved config, for tools that expect a Hugging Face style folder
INFO_NAME = "frozen_prefix.json"
HUB_FILES = (CONFIG_NAME, CONFIG_JSON, WEIGHTS_NAME, INFO_NAME, CARD_NAME)  # all a Hub download fetches: no code


class FrozenPrefixCaptioner(nn.Module):
    """Image -> k prefix embeddings -> frozen LM. Only `trainable_modules()` ever learn."""

    def __init__(
        self,
        config: Config | dict | str | Path | None = None,
        lm: PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        device: torch.device | str = "cpu",
        pretrained_encoder: bool | None = None,
    ) -> None:
        super().__init__()
        self.config = config if isinstance(config, Config) else load_config(config)
        mc = self.config.model
        if lm is None or tokenizer is None:
            dtype = requested_dtype(mc.lm_dtype, mc.lm_trainable)
            lm, tokenizer = load_lm(mc.lm, dtype, device, mc.trust_remote_code, mc.lm_attention)
        self.tokenizer = tokenizer
        self.encoder = build_encoder(mc, pretrained_encoder)
        if mc.encoder_weights:
            load_encoder_weights(self.encoder, mc.encoder_weights)
        self.channels_last = False  # train.channels_last: images go to the encoder in channels-last order
        self.compiled_loss = False  # train.compile=layers: the token loss runs compiled (one fused kernel)
        self.trained_precision: str | None = None  # what train.precision=auto chose in training, for model cards
        self.image_config = image_data_config(self.encoder, mc)
        self.image_transform = build_transform(self.image_config, train=False)
        embeddings = lm.get_input_embeddings().weight
        embed_rms = embeddings.detach().float().pow(2).mean().sqrt().item()
        self.projection = PrefixProjection(mc, self.encoder.num_features, embeddings.shape[1], embed_rms)
        dim, tc = embeddings.shape[1], self.config.train
        # model.fusion=sum|product and the visual loss: trainable modules of their own, only when asked for
        self.fusion = TextFusion(mc.fusion, dim, mc.prefix_length, embed_rms) if mc.fusion != "prefix" else None
        self.visual_head = VisualHead(dim, dim, tc.visual_temperature) if tc.visual_loss_weight > 0 else None
        self.deep = DeepPrefix(dim, len(decoder_layers(lm)) - 1) if mc.deep_prefix else None
        self.instruct = InstructionMixer(dim, mc.prefix_length) if mc.instruction_aware else None
        self.lm = lm
        self._check_context_length()
        if mc.init_from:
            load_initial_weights(self.trainable_modules(), mc.init_from)
        if mc.freeze_encoder:
            self.encoder.requires_grad_(False)
        self.freeze_lm()
        self.to(device)

    # ------------------------------------------------------------------ freezing

    def freeze_lm(self) -> None:
        """Freeze the LM for real: no gradients, eval mode (dropout off), logged; model.lm_trainable: fine-tune it."""
        self.lm.requires_grad_(self.config.model.lm_trainable)
        self.lm.eval()  # dropout off even when fine-tuned: the baseline differs from Frozen only in what learns
        if self.config.model.lm_trainable:
            log.warning(
                "model.lm_trainable=true: the LM is fine-tuned (lr train.lm_lr) and saved with the model; "
                "this is a BASELINE, not the Frozen recipe"
            )
        n_train = sum(p.numel() for p in self.trainable_parameters() if p.requires_grad)
        n_lm = sum(p.numel() for p in self.lm.parameters())
        log.info(
            "trainable: %s (%.2fM parameters); %s LM %s (%.1fM parameters)",
            ", ".join(self.trainable_modules().keys()), n_train / 1e6,
            "fine-tuned" if self.config.model.lm_trainable else "frozen", type(self.lm).__name__, n_lm / 1e6,
        )

    def train(self, mode: bool = True) -> FrozenPrefixCaptioner:
        """Set train/eval mode on the trainable modules; the LM always stays in eval mode."""
        super().train(mode)
        self.lm.eval()
        if self.config.model.freeze_encoder:  # fixed BatchNorm statistics: the same features in every epoch
            self.encoder.eval()
        return self

    def trainable_modules(self) -> nn.ModuleDict:
        """The one set of modules that learn, are optimised and are saved."""
        modules = {"encoder": self.encoder, "projection": self.projection}
        extra = {"fusion": self.fusion, "visual_head": self.visual_head, "deep": self.deep, "instruct": self.instruct}
        modules.update({name: module for name, module in extra.items() if module is not None})
        if self.config.model.lm_trainable:  # the fine-tuned-LM baseline: optimised and saved like the rest
            modules["lm"] = self.lm
        return nn.ModuleDict(modules)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters of the trainable modules (the LM's only with model.lm_trainable)."""
        return list(self.trainable_modules().parameters())

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights and buffers of the trainable modules only: what checkpoints hold."""
        state, seen = {}, set()
        for key, value in self.trainable_modules().state_dict().items():
            value = value.detach().contiguous()
            # A fine-tuned LM's tied embeddings and head share storage, which safetensors refuses: copy the second.
            state[key] = value.clone() if value.data_ptr() in seen and value.numel() else value
            seen.add(value.data_ptr())
        return state

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load weights saved by trainable_state_dict, strictly."""
        self.trainable_modules().load_state_dict(state, strict=True)

    # ------------------------------------------------------------------ forward

    @property
    def device(self) -> torch.device:
        """Where the trainable modules live."""
        return next(self.projection.parameters()).device

    @property
    def prefix_length(self) -> int:
        """k: prefix embeddings per image."""
        return self.config.model.prefix_length

    @property
    def start_ids(self) -> list[int]:
        """Token ids every sequence starts with, before the first image: [BOS] (or [EOS] without a BOS), or []."""
        if not self.config.model.bos_token:
            return []
        bos = self.tokenizer.bos_token_id
        return [bos if bos is not None else self.tokenizer.eos_token_id]

    def pixel_values(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """Load and transform images (PIL images or paths) into a batch tensor."""
        return torch.stack([self.image_transform(load_image(im)) for im in images]).to(self.device)

    def embed_images(self, images: torch.Tensor | Sequence[ImageLike]) -> torch.Tensor:
        """The prefix embeddings (B, k, D) of images given as pixel values, PIL images or paths."""
        pixel_values = images if isinstance(images, torch.Tensor) else self.pixel_values(images)
        return self.projection(self.image_features(pixel_values))

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """What the projection reads: the encoder's pooled vector or spatial map of pixel values."""
        pixel_values = pixel_values.to(self.device)
        if self.channels_last:
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        return encoder_features(self.encoder, pixel_values, self.projection.spatial)

    def input_embeddings(
        self, input_ids: torch.Tensor, image_mask: torch.Tensor, prefix: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with the prefix written wherever image_mask is set (k slots per image, in order).

        With model.instruction_aware the prefix is first conditioned on each image's instruction: the text after
        it up to a labelled token (labels; a chat's earlier replies), the next image or padding (attention_mask).
        """
        embeds = self.lm.get_input_embeddings()(input_ids)
        if prefix is None or prefix.numel() == 0:  # a text-only sequence
            return embeds
        if self.instruct is not None:
            text = instruction_vectors(embeds, image_mask, self.prefix_length, attention_mask, labels)
            prefix = self.instruct(prefix, text.to(prefix.dtype))
        if self.fusion is None:
            return embeds.masked_scatter(image_mask.unsqueeze(-1), prefix.to(embeds.dtype))
        # sum / product: the slots hold the learned marker; the image enters through the text that follows it
        has_image, after = image_rows(image_mask, self.prefix_length, f"model.fusion={self.fusion.kind}")
        marker = self.fusion.marker.expand(prefix.shape[0], -1, -1).to(embeds.dtype)
        embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), marker)
        return self.fusion.fuse(embeds, self._row_conditions(prefix, has_image), after)

    def _row_conditions(self, prefix: torch.Tensor, has_image: torch.Tensor) -> torch.Tensor:
        """The fusion's condition (B, D) of each row's image (zeros for rows without one: they fuse nothing)."""
        vectors = prefix.new_zeros(has_image.shape[0], prefix.shape[-1])
        vectors[has_image] = pooled(prefix).to(vectors.dtype)
        return self.fusion.condition(vectors)

    @contextlib.contextmanager
    def fused_new_tokens(self, image_mask: torch.Tensor, prefix: torch.Tensor | None) -> Iterator[None]:
        """While decoding with the KV cache: every token the LM embeds itself (each new one) gets its row's image.

        HF generate feeds the prompt as embeddings (input_embeddings fused it) and then each new token by id,
        through the LM's embedding layer: a forward hook on that layer fuses those too. Rows repeated for beams
        or candidates (each prompt's n copies next to each other) get their prompt's image. A no-op for prefix.
        """
        if self.fusion is None or prefix is None or prefix.numel() == 0:
            yield
            return
        has_image, _ = image_rows(image_mask, self.prefix_length, f"model.fusion={self.fusion.kind}")
        condition = self._row_conditions(prefix, has_image)

        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
            n = output.shape[0] // condition.shape[0]
            where = has_image.repeat_interleave(n)[:, None].expand(output.shape[:2])
            return self.fusion.fuse(output, condition.repeat_interleave(n, dim=0), where)

        handle = self.lm.get_input_embeddings().register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def prefix_for(
        self, pixel_values: torch.Tensor | None, features: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """The prefix embeddings of a batch's images (or of their encoder features), or None when it has none."""
        if features is not None:  # data.feature_cache: the frozen encoder's output, computed before
            return self.projection(features.to(self.device))
        if pixel_values is None or pixel_values.shape[0] == 0:
            return None
        return self.embed_images(pixel_values)

    def forward(
        self,
        pixel_values: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """With labels: the loss on labelled tokens and the logits (N, V) that predict them; else logits (B, T, V).

        features, when given, are the images' encoder outputs (image_features), used instead of pixel_values.
        """
        prefix = self.prefix_for(pixel_values, features)
        embeds = self.input_embeddings(input_ids, image_mask, prefix, attention_mask, labels)
        if labels is None:
            with self.deep_layers(image_mask, prefix):
                logits = self.lm(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).logits
            return {"logits": logits}
        hidden, labels = self.hidden_states(embeds, attention_mask, labels, image_mask, prefix)
        # Only positions that predict a label need the vocabulary matmul. Gathering them into one (N, D) matrix
        # also keeps it a plain matrix product: on a strided slice of positions torch falls back to a batched
        # product at half the speed, and this product is a fifth of a training step on the CPU.
        targets = labels[:, 1:]
        keep = targets != -100
        logits = self.lm_logits(hidden[:, :-1][keep])
        loss = (compiled_token_loss() if self.compiled_loss else token_loss)(logits, targets[keep])
        out = {"logits": logits, "loss": loss}
        if self.visual_head is not None and prefix is not None:  # train.visual_loss_weight > 0
            target = self.text_representation(input_ids, attention_mask, image_mask, labels, prefix.shape[0])
            out["loss_visual"] = self.visual_head.loss(prefix, target, self.config.train.visual_loss)
        return out

    def hidden_states(
        self, embeds: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
        image_mask: torch.Tensor | None = None, prefix: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The LM's last hidden states and the labels in the same layout (packed with train.padding_free)."""
        plan = plan_packing(attention_mask) if self.config.train.padding_free else None
        if plan is None:
            with self.deep_layers(image_mask, prefix):
                hidden = self.lm.base_model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False)[0]
            return hidden, labels
        # No attention mask: the LM builds the block-diagonal causal mask from position ids restarting at each
        # sequence (transformers' packed-sequence detection; packing_supported checks the LM does it)
        packed = plan.gather(embeds, 0.0)
        with self.deep_layers(image_mask, prefix, plan=plan):
            hidden = self.lm.base_model(inputs_embeds=packed, position_ids=plan.position_ids, use_cache=False)[0]
        return hidden, plan.gather(labels, -100)

    @contextlib.contextmanager
    def deep_layers(
        self, image_mask: torch.Tensor | None, prefix: torch.Tensor | None, start: int = 0,
        plan: PackPlan | None = None,
    ) -> Iterator[None]:
        """model.deep_prefix: while open, LM calls over image_mask[:, start:] get the image at every layer.

        With a packing plan the slots are found in the packed rows the LM runs (padding-free training); else in
        image_mask from position `start` on (a chat that runs only what its cache lacks). A no-op without
        model.deep_prefix or without images.
        """
        if self.deep is None or prefix is None or prefix.numel() == 0 or image_mask is None:
            yield
            return
        where = plan.gather(slot_index(image_mask), -1) if plan is not None else slot_index(image_mask)[:, start:]
        with writing_into(decoder_layers(self.lm), where, self.deep(prefix)):
            yield

    @torch.no_grad()
    def text_representation(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_mask: torch.Tensor, labels: torch.Tensor,
        images: int,
    ) -> torch.Tensor:
        """What the visual loss pulls each image towards (B, D): the LM's pooled view of its labelled text.

        train.visual_target=hidden: the mean of the LM's last hidden states over the labelled tokens (the caption
        and its EOS) of a text-only pass (the image slots left out); embeddings: the mean of their input
        embeddings. No gradient: a target, never a path into the LM.
        """
        k = self.prefix_length
        if images != input_ids.shape[0] or bool((image_mask.sum(dim=1) != k).any()):
            raise FrozenPrefixError(
                f"train.visual_loss_weight>0 pairs each image with the text of its sequence, but this batch has "
                f"{images} images in {input_ids.shape[0]} sequences (packed, interleaved or text-only rows); "
                "train on one image per sequence or set train.visual_loss_weight=0"
            )
        rows = input_ids.shape[0]
        ids, mask, labels = (t[~image_mask].view(rows, -1) for t in (input_ids, attention_mask, labels))
        if self.config.train.visual_target == "embeddings":
            states = self.lm.get_input_embeddings()(ids)
        else:
            states = self.lm.base_model(input_ids=ids, attention_mask=mask, use_cache=False)[0]
        keep = (labels != -100).unsqueeze(-1).to(states.dtype)
        return (states * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on hidden states, with Gemma-2-style logit softcapping where the LM has it."""
        logits = self.lm.get_output_embeddings()(hidden)
        cap = getattr(self.lm.config, "final_logit_softcapping", None)
        if cap:  # these LMs squash their logits; do what their own forward does
            logits = torch.tanh(logits / cap) * cap
        return logits

    # ------------------------------------------------------------------ conveniences (decoding lives in generate.py)

    def caption(self, images: Sequence[ImageLike] | ImageLike | torch.Tensor, **options: Any) -> list[str]:
        """Captions for PIL images, image paths or pixel values; options as in generate.generate_captions."""
        if not isinstance(images, (list, tuple, torch.Tensor)):
            images = [images]
        return generate.generate_captions(self, images, **options)

    def complete(self, prompts: Sequence[generate.Prompt] | generate.Prompt, **options: Any) -> list[str]:
        """Continue interleaved prompts (lists of images and text); options as in generate.complete."""
        return generate.complete(self, prompts, **options)

    def chat(self, messages: Sequence[dict[str, Any]], **options: Any) -> str:
        """The reply to {"role", "content"} messages (content: text, or text and images); see generate.chat."""
        return generate.chat(self, messages, **options)

    # ------------------------------------------------------------------ saving

    @property
    def context_length(self) -> int | None:
        """The LM's longest sequence, when its config says."""
        config = self.lm.config
        return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)

    def _check_context_length(self) -> None:
        limit = self.context_length
        # every packed (image, caption) pair of a training sequence: k slots, the caption, its EOS
        pair = self.config.model.prefix_length + self.config.data.max_caption_tokens + 1
        needed = len(self.start_ids) + self.config.data.images_per_sequence * pair
        if limit is not None and needed > limit:
            raise FrozenPrefixError(
                f"BOS + data.images_per_sequence x (model.prefix_length + data.max_caption_tokens + EOS) = {needed} "
                f"exceeds the LM's context of {limit} positions; lower one of them"
            )

    def save_pretrained(
        self, path: str | Path, metrics: dict[str, Any] | None = None, repo_id: str | None = None,
        weights: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        """Write the config (YAML and JSON), the trainable weights (the LM's only if fine-tuned) and a model card.

        metrics (flat or {split: {name: value}}) are listed in the card; repo_id is the name its usage lines show;
        weights, when given, are written instead of trainable_state_dict() (FSDP: the shards gathered whole).
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_config(self.config, path / CONFIG_NAME)
        (path / CONFIG_JSON).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        tmp = path / (WEIGHTS_NAME + ".tmp")
        weights = self.trainable_state_dict() if weights is None else weights
        save_file(weights, str(tmp), metadata={"format": "pt", "lm": self.config.model.lm})
        tmp.replace(path / WEIGHTS_NAME)
        (path / INFO_NAME).write_text(
            json.dumps(
                {"lm": self.config.model.lm, "weights": WEIGHTS_NAME,
                 "lm_weights_included": self.config.model.lm_trainable}, indent=2,
            )
        )
        write_model_card(path, self.config, metrics, repo_id, precision=self.trained_precision)
        return path

    def push_to_hub(
        self, repo_id: str, private: bool = False, token: str | None = None, metrics: dict[str, Any] | None = None
    ) -> str:
        """Upload the saved folder (config, trainable weights, model card) to a Hub model repo; return its URL."""
        if not hub.looks_like_repo_id(repo_id):
            raise FrozenPrefixError(f"{repo_id!r} is not a Hub repo id; use the form 'user/name'")
        lm = self.config.model.lm
        if not hub.looks_like_repo_id(lm) and lm.lower() not in (*SMOLLM2_ALIASES, TINY_ALIAS):
            log.warning("the LM reference %r is a local path: whoever loads this model needs their own copy", lm)
        with tempfile.TemporaryDirectory(prefix="frozen-prefix-push-") as folder:
            self.save_pretrained(folder, metrics=metrics, repo_id=repo_id)
            return hub.upload_folder(folder, repo_id, private=private, token=token)

    @classmethod
    def from_config(cls, config: Config | dict | str | Path, **kwargs: Any) -> FrozenPrefixCaptioner:
        """An untrained captioner built from a config."""
        return cls(config, **kwargs)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: torch.device | str = "cpu", trust_remote_code: bool = False, **kwargs: Any
    ) -> FrozenPrefixCaptioner:
        """Rebuild a saved captioner: the config, the LM it references, and the trained weights.

        Code shipped with the referenced LM runs only when the caller passes trust_remote_code=True: a model
        folder's own config cannot ask for it (it names the LM, so it could name one with any code in it).
        """
        name = str(path)
        path = Path(path).expanduser()
        if not path.exists() and hub.looks_like_repo_id(name):  # 'user/repo': its data files from the Hub
            path = hub.download_model(name, HUB_FILES)
            if not _is_model_folder(path):
                raise FrozenPrefixError(
                    f"Hub repo {name!r} holds no frozen_prefix model (needs {CONFIG_NAME} or {CONFIG_JSON}, and "
                    f"{WEIGHTS_NAME}); check the repo id"
                )
        if not _is_model_folder(path):
            raise FrozenPrefixError(
                f"{path} is not a saved model folder (needs {CONFIG_NAME} and {WEIGHTS_NAME}); "
                "give the model/ folder of a run"
            )
        config = _load_saved_config(path)
        if config.model.trust_remote_code and not trust_remote_code:
            log.warning(
                "%s asks to run the LM's own code (model.trust_remote_code: true); not done: pass "
                "trust_remote_code=True (or --trust-remote-code) if you trust %s", path, config.model.lm,
            )
        config.model.trust_remote_code = trust_remote_code
        # the folder's own weights hold the encoder and the rest; never read a path it names
        config.model.encoder_weights = config.model.init_from = None
        # timm arguments that read files: a folder someone else wrote must not point the loader at local paths
        reads_files = sorted(set(config.model.encoder_kwargs) & FILE_READING_TIMM_ARGS)
        if reads_files:
            log.warning("%s: ignoring model.encoder_kwargs %s (they read files)", path, ", ".join(reads_files))
            config.model.encoder_kwargs = {k: v for k, v in config.model.encoder_kwargs.items() if k not in reads_files}
        weights = load_weights(path / WEIGHTS_NAME)  # read (and checked) before the minute the LM may take
        model = cls(config, device=device, pretrained_encoder=False, **kwargs)
        model.load_trainable_state_dict({k: v.to(model.device) for k, v in weights.items()})
        return model.eval()


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the labelled tokens, in fp32 whatever precision the logits come in."""
    return F.cross_entropy(logits.float(), targets)


@functools.cache
def compiled_token_loss() -> Any:
    """token_loss compiled once per process (train.compile=layers)."""
    # fused, the cast, log-softmax and their backward make one pass over the (N, vocabulary) logits instead of
    # several over an fp32 copy: 0.06 s of a 0.8 s bf16 step on two cores. dynamic: N changes with every batch
    return torch.compile(token_loss, dynamic=True)


def load_encoder_weights(encoder: nn.Module, path: str | Path) -> None:
    """The encoder's weights from a run's model folder or a .safetensors file (its encoder.* keys, or all keys)."""
    weights, file = _weights_file(path, "model.encoder_weights")
    own = {k.removeprefix("encoder."): v for k, v in weights.items() if k.startswith("encoder.")}
    _load_strict(encoder, own or weights, file, "model.encoder_weights", "give weights of the same encoder")


def load_initial_weights(modules: nn.Module, path: str | Path) -> None:
    """Every trainable weight from a run's model folder or .safetensors file: a second stage starts where one ended."""
    weights, file = _weights_file(path, "model.init_from")
    # A part that starts as a no-op (the deep prefix, the instruction mixer, zero cell embeddings) may be new
    new = ("deep.", "instruct.", "projection.cells", "projection.positions")
    fresh = {k: v for k, v in modules.state_dict().items() if k.startswith(new) and k not in weights}
    for name in sorted({next(n for n in new if k.startswith(n)).rstrip(".") for k in fresh}):
        log.info("model.init_from: %s has no %s; it starts as a no-op", file, name)
    _load_strict(modules, {**weights, **fresh}, file, "model.init_from",
                 "train the second stage with the first's model settings")


def _weights_file(path: str | Path, option: str) -> tuple[dict[str, torch.Tensor], Path]:
    """The tensors of a model folder's weights or of a .safetensors file, and that file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FrozenPrefixError(f"{option}: {path} does not exist; train that run first or give another model folder")
    file = path / WEIGHTS_NAME if path.is_dir() else path
    if file.suffix != ".safetensors":
        raise FrozenPrefixError(f"{option}: {path} is neither a model folder nor a .safetensors file; give one of them")
    return load_weights(file), file


def _load_strict(module: nn.Module, weights: dict[str, torch.Tensor], file: Path, option: str, fix: str) -> None:
    """load_state_dict(strict=True), a mismatch reported in one line."""
    try:
        module.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        why = str(e).splitlines()[1].strip()[:120]
        raise FrozenPrefixError(f"{option}: {file} does not fit this model ({why}); {fix}") from e
    log.info("%s: weights loaded from %s", option, file)


def _is_model_folder(path: Path) -> bool:
    """A save_pretrained folder: a config (YAML, or JSON alone) and the trainable weights."""
    has_config = (path / CONFIG_NAME).is_file() or (path / CONFIG_JSON).is_file()
    return path.is_dir() and has_config and (path / WEIGHTS_NAME).is_file()


def _load_saved_config(path: Path) -> Config:
    """config.yaml, or config.json where only that exists (both are data: nothing in them runs)."""
    if (path / CONFIG_NAME).is_file():
        return load_config(path / CONFIG_NAME)
    try:
        values = json.loads((path / CONFIG_JSON).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FrozenPrefixError(f"{path / CONFIG_JSON} is not valid JSON ({e}); save the model again") from e
    if not isinstance(values, dict):
        raise FrozenPrefixError(f"{path / CONFIG_JSON} must hold a mapping of config sections; save the model again")
    return load_config(values)
