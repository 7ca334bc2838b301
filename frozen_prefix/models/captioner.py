"""FrozenPrefixCaptioner: trainable encoder + projection feeding prefix embeddings to a frozen causal LM."""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Sequence
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
from .encoder import build_encoder, build_transform, encoder_features, image_data_config
from .lm import SMOLLM2_ALIASES, TINY_ALIAS, load_lm
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
            lm, tokenizer = load_lm(mc.lm, mc.lm_dtype, device, mc.trust_remote_code)
        self.tokenizer = tokenizer
        self.encoder = build_encoder(mc, pretrained_encoder)
        self.image_config = image_data_config(self.encoder, mc)
        self.image_transform = build_transform(self.image_config, train=False)
        embeddings = lm.get_input_embeddings().weight
        embed_rms = embeddings.detach().float().pow(2).mean().sqrt().item()
        self.projection = PrefixProjection(mc, self.encoder.num_features, embeddings.shape[1], embed_rms)
        self.lm = lm
        self._check_context_length()
        self.freeze_lm()
        self.to(device)

    # ------------------------------------------------------------------ freezing

    def freeze_lm(self) -> None:
        """Freeze the LM for real: no gradients, eval mode (dropout off), logged."""
        self.lm.requires_grad_(False)
        self.lm.eval()
        n_train = sum(p.numel() for p in self.trainable_parameters())
        n_lm = sum(p.numel() for p in self.lm.parameters())
        log.info(
            "trainable: %s (%.2fM parameters); frozen LM %s (%.1fM parameters)",
            ", ".join(self.trainable_modules().keys()), n_train / 1e6, type(self.lm).__name__, n_lm / 1e6,
        )

    def train(self, mode: bool = True) -> FrozenPrefixCaptioner:
        """Set train/eval mode on the trainable modules; the LM always stays in eval mode."""
        super().train(mode)
        self.lm.eval()
        return self

    def trainable_modules(self) -> nn.ModuleDict:
        """The one set of modules that learn, are optimised and are saved."""
        return nn.ModuleDict({"encoder": self.encoder, "projection": self.projection})

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters of the trainable modules (never the LM's)."""
        return list(self.trainable_modules().parameters())

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights and buffers of the trainable modules only: what checkpoints hold."""
        return {k: v.detach().contiguous() for k, v in self.trainable_modules().state_dict().items()}

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
        features = encoder_features(self.encoder, pixel_values.to(self.device), self.projection.spatial)
        return self.projection(features)

    def input_embeddings(
        self, input_ids: torch.Tensor, image_mask: torch.Tensor, prefix: torch.Tensor | None
    ) -> torch.Tensor:
        """Token embeddings with the prefix written wherever image_mask is set (k slots per image, in order)."""
        embeds = self.lm.get_input_embeddings()(input_ids)
        if prefix is None or prefix.numel() == 0:  # a text-only sequence
            return embeds
        return embeds.masked_scatter(image_mask.unsqueeze(-1), prefix.to(embeds.dtype))

    def prefix_for(self, pixel_values: torch.Tensor | None) -> torch.Tensor | None:
        """The prefix embeddings of a batch's images, or None when it has none."""
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
    ) -> dict[str, torch.Tensor]:
        """With labels: the loss on labelled tokens and the logits (N, V) that predict them; else logits (B, T, V)."""
        embeds = self.input_embeddings(input_ids, image_mask, self.prefix_for(pixel_values))
        if labels is None:
            return {"logits": self.lm(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).logits}
        hidden = self.lm.base_model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False)[0]
        # Only positions that predict a label need the vocabulary matmul. Gathering them into one (N, D) matrix
        # also keeps it a plain matrix product: on a strided slice of positions torch falls back to a batched
        # product at half the speed, and this product is a fifth of a training step on the CPU.
        targets = labels[:, 1:]
        keep = targets != -100
        logits = self.lm_logits(hidden[:, :-1][keep])
        return {"logits": logits, "loss": F.cross_entropy(logits.float(), targets[keep])}

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
        """Write the config (YAML and JSON), the trainable weights (never the LM's) and a model card to a folder.

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
            json.dumps({"lm": self.config.model.lm, "weights": WEIGHTS_NAME, "lm_weights_included": False}, indent=2)
        )
        write_model_card(path, self.config, metrics, repo_id)
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
        # timm arguments that read files: a folder someone else wrote must not point the loader at local paths
        reads_files = sorted(set(config.model.encoder_kwargs) & FILE_READING_TIMM_ARGS)
        if reads_files:
            log.warning("%s: ignoring model.encoder_kwargs %s (they read files)", path, ", ".join(reads_files))
            config.model.encoder_kwargs = {k: v for k, v in config.model.encoder_kwargs.items() if k not in reads_files}
        weights = load_weights(path / WEIGHTS_NAME)  # read (and checked) before the minute the LM may take
        model = cls(config, device=device, pretrained_encoder=False, **kwargs)
        model.load_trainable_state_dict({k: v.to(model.device) for k, v in weights.items()})
        return model.eval()


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
