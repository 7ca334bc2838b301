"""FrozenPrefixCaptioner: trainable encoder + projection feeding prefix embeddings to a frozen causal LM."""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..config import Config, load_config, save_config
from ..errors import FrozenPrefixError
from ..images import ImageLike, load_image
from .encoder import build_encoder, build_transform, encoder_features, image_data_config
from .lm import load_lm
from .projection import PrefixProjection

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.yaml"


class _DropMessages(logging.Filter):
    """Drops log records that contain any of the given fragments."""

    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep the record unless it is one of the expected notes."""
        return not any(f in record.getMessage() for f in self.fragments)


# Notes HF logs that do not apply here: generate.py replaces HF's repetition-penalty processor on purpose (see
# generation_kwargs); and HF drops an all-ones attention mask, then sees the padding of rows finished after EOS.
_EXPECTED_HF_NOTES = _DropMessages("will take precedence", "strongly recommend passing in an `attention_mask`")


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
        self, input_ids: torch.Tensor, image_mask: torch.Tensor, prefix: torch.Tensor
    ) -> torch.Tensor:
        """Token embeddings with the prefix written wherever image_mask is set (k slots per image, in order)."""
        embeds = self.lm.get_input_embeddings()(input_ids)
        return embeds.masked_scatter(image_mask.unsqueeze(-1), prefix.to(embeds.dtype))

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """With labels: the loss on labelled tokens and the logits (N, V) that predict them; else logits (B, T, V)."""
        embeds = self.input_embeddings(input_ids, image_mask, self.embed_images(pixel_values))
        if labels is None:
            return {"logits": self.lm(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).logits}
        hidden = self.lm.base_model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False)[0]
        # Only positions that predict a label need the vocabulary matmul. Gathering them into one (N, D) matrix
        # also keeps it a plain matrix product: on a strided slice of positions torch falls back to a batched
        # product at half the speed, and this product is a fifth of a training step on the CPU.
        targets = labels[:, 1:]
        keep = targets != -100
        logits = self.lm.get_output_embeddings()(hidden[:, :-1][keep])
        cap = getattr(self.lm.config, "final_logit_softcapping", None)
        if cap:  # Gemma-2-style LMs squash their logits; do what their own forward does
            logits = torch.tanh(logits / cap) * cap
        return {"logits": logits, "loss": F.cross_entropy(logits.float(), targets[keep])}

    # ------------------------------------------------------------------ decoding

    @torch.no_grad()
    def generate(
        self, pixel_values: torch.Tensor, prompts: Sequence[str] | None = None, **generation_kwargs: Any
    ) -> torch.Tensor:
        """New token ids (B, T) after [start ids; image prefix; prompt], via HF generate with the KV cache."""
        batch = pixel_values.shape[0]
        prompts = list(prompts) if prompts is not None else [""] * batch
        # A trailing space would become a token of its own in BPE vocabularies, one the LM never saw before a word.
        prompts = [p.rstrip() if p else "" for p in prompts]
        prompt_ids = [self.tokenizer(p, add_special_tokens=False).input_ids if p else [] for p in prompts]
        k, pad, start_ids = self.prefix_length, self.tokenizer.pad_token_id, self.start_ids
        s = len(start_ids)
        length = s + k + max(map(len, prompt_ids))
        # Left padding, so that every row's last position is where generation continues.
        input_ids = torch.full((batch, length), pad, dtype=torch.long)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)
        image_mask = torch.zeros((batch, length), dtype=torch.bool)
        for row, ids in enumerate(prompt_ids):
            start = length - s - k - len(ids)
            input_ids[row, start : start + s] = torch.tensor(start_ids, dtype=torch.long)
            input_ids[row, start + s + k :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, start:] = 1
            image_mask[row, start + s : start + s + k] = True
        device = self.device
        embeds = self.input_embeddings(input_ids.to(device), image_mask.to(device), self.embed_images(pixel_values))
        kwargs = {"max_new_tokens": 24, "do_sample": False, "num_beams": 1, **generation_kwargs}
        hf_logs = [logging.getLogger(f"transformers.{name}") for name in ("generation.utils", "modeling_utils")]
        for hf_log in hf_logs:
            hf_log.addFilter(_EXPECTED_HF_NOTES)
        try:
            with warnings.catch_warnings():
                # Only embeddings go in, so a repetition penalty sees the caption tokens alone: what we want.
                warnings.filterwarnings("ignore", message=".*with `inputs_embeds` and without `input_ids`")
                return self.lm.generate(
                    inputs_embeds=embeds, attention_mask=attention_mask.to(device),
                    eos_token_id=self.tokenizer.eos_token_id, pad_token_id=pad, **kwargs,
                )
        finally:
            for hf_log in hf_logs:
                hf_log.removeFilter(_EXPECTED_HF_NOTES)

    def caption(self, images: Sequence[ImageLike] | ImageLike | torch.Tensor, **generation_kwargs: Any) -> list[str]:
        """Captions for PIL images, image paths or pixel values; options as in generate.generate_captions."""
        from ..generate import generate_captions  # decoding options live in generate.py

        if not isinstance(images, (list, tuple, torch.Tensor)):
            images = [images]
        return generate_captions(self, images, **generation_kwargs)

    # ------------------------------------------------------------------ saving

    def _check_context_length(self) -> None:
        limit = getattr(self.lm.config, "max_position_embeddings", None) or getattr(self.lm.config, "n_positions", None)
        needed = len(self.start_ids) + self.config.model.prefix_length + self.config.data.max_caption_tokens + 1
        if limit is not None and needed > limit:
            raise FrozenPrefixError(
                f"BOS + model.prefix_length + data.max_caption_tokens + EOS = {needed} exceeds the LM's context of "
                f"{limit} positions; lower one of them"
            )

    def save_pretrained(self, path: str | Path) -> Path:
        """Write config.yaml and the trainable weights (never the LM's) to a folder."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_config(self.config, path / CONFIG_NAME)
        tmp = path / (WEIGHTS_NAME + ".tmp")
        save_file(self.trainable_state_dict(), str(tmp), metadata={"format": "pt", "lm": self.config.model.lm})
        tmp.replace(path / WEIGHTS_NAME)
        (path / "frozen_prefix.json").write_text(
            json.dumps({"lm": self.config.model.lm, "weights": WEIGHTS_NAME, "lm_weights_included": False}, indent=2)
        )
        return path

    @classmethod
    def from_config(cls, config: Config | dict | str | Path, **kwargs: Any) -> FrozenPrefixCaptioner:
        """An untrained captioner built from a config."""
        return cls(config, **kwargs)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: torch.device | str = "cpu", **kwargs: Any
    ) -> FrozenPrefixCaptioner:
        """Rebuild a saved captioner: the config, the LM it references, and the trained weights."""
        path = Path(path)
        if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
            raise FrozenPrefixError(
                f"{path} is not a saved model folder (needs {CONFIG_NAME} and {WEIGHTS_NAME}); "
                "give the model/ folder of a run"
            )
        model = cls(load_config(path / CONFIG_NAME), device=device, pretrained_encoder=False, **kwargs)
        model.load_trainable_state_dict(load_file(str(path / WEIGHTS_NAME), device=str(model.device)))
        return model.eval()
