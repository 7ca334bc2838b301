"""The Frozen core: a trainable encoder and projection write k prefix embeddings into the slots of a frozen LM.

Nothing else lives here. Variants (fusion, the deep prefix, ...) are plug-ins the core calls at fixed hooks
(models/variants/base.py); projections come from a registry (projections.py); the folder format is saving.py's.
The core reads its model configuration only and knows no variant, data set or decoding by name.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..config import Config, load_config
from ..errors import FrozenPrefixError
from ..images import ImageLike, load_image
from . import saving
from .encoder import build_encoder, build_transform, encoder_features, image_data_config
from .lm import TokenLoss, decoder_layers, load_lm, logits_head, requested_dtype
from .packing import plan_packing
from .projections import build_projection
from .variants.base import LMCall, LMInfo, PrefixInputs, build_variants, refused

log = logging.getLogger(__name__)


class FrozenCore(nn.Module):
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
            saving.load_encoder_weights(self.encoder, mc.encoder_weights)
        self.image_config = image_data_config(self.encoder, mc)
        self.image_transform = build_transform(self.image_config, train=False)
        embeddings = lm.get_input_embeddings().weight
        dim = embeddings.shape[1]
        self.projection = build_projection(mc, self.encoder.num_features, dim)
        embed_rms = embeddings.detach().float().pow(2).mean().sqrt().item()
        self.variants = build_variants(self.config, LMInfo(dim, _layer_count(lm), embed_rms, mc.prefix_length))
        self.token_loss = TokenLoss()  # a module: train.compile=layers compiles it in place
        self.lm = lm
        if mc.init_from:
            fresh = tuple(name for name, v in self.variants.items() if v.starts_at_zero)
            saving.load_initial_weights(self.trainable_modules(), mc.init_from, fresh)
        if mc.freeze_encoder:
            self.encoder.requires_grad_(False)
        self.freeze_lm()
        self._head = logits_head(lm)  # the LM's own logits, exactly, whatever its family does (probed in eval mode)
        self.train()  # the modes train() keeps from the start: the LM in eval mode, and a frozen encoder
        self.to(device)

    # ------------------------------------------------------------------ what learns

    def freeze_lm(self) -> None:
        """Freeze the LM for real: no gradients, eval mode (dropout off), logged; model.lm_trainable: fine-tune it."""
        trainable = self.config.model.lm_trainable
        self.lm.requires_grad_(trainable)
        self.lm.eval()  # dropout off even when fine-tuned: the baseline differs from Frozen only in what learns
        if trainable:
            log.warning(
                "model.lm_trainable=true: the LM is fine-tuned (lr train.lm_lr) and saved with the model; "
                "this is a BASELINE, not the Frozen recipe"
            )
        n_train = sum(p.numel() for p in self.trainable_parameters() if p.requires_grad)
        n_lm = sum(p.numel() for p in self.lm.parameters())
        log.info(
            "trainable: %s (%.2fM parameters); %s LM %s (%.1fM parameters)",
            ", ".join(self.trainable_modules().keys()), n_train / 1e6,
            "fine-tuned" if trainable else "frozen", type(self.lm).__name__, n_lm / 1e6,
        )

    def train(self, mode: bool = True) -> FrozenCore:
        """Set train/eval mode on the trainable modules; the LM always stays in eval mode."""
        super().train(mode)
        self.lm.eval()
        if self.config.model.freeze_encoder:  # fixed BatchNorm statistics: the same features in every epoch
            self.encoder.eval()
        return self

    def trainable_modules(self) -> nn.ModuleDict:
        """The one set of modules that learn, are optimised and are saved: encoder, projection, each variant."""
        modules = {"encoder": self.encoder, "projection": self.projection, **self.variants}
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

    # ------------------------------------------------------------------ the image's way into the LM

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

    @property
    def context_length(self) -> int | None:
        """The LM's longest sequence, when its config says."""
        config = self.lm.config
        return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)

    def pixel_values(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """Load and transform images (PIL images or paths) into a batch tensor."""
        return torch.stack([self.image_transform(load_image(im)) for im in images]).to(self.device)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """What the projection reads: the encoder's pooled vector or spatial map of pixel values."""
        return encoder_features(self.encoder, pixel_values.to(self.device), self.projection.spatial)

    def embed_images(self, images: torch.Tensor | Sequence[ImageLike]) -> torch.Tensor:
        """The prefix embeddings (B, k, D) of images given as pixel values, PIL images or paths."""
        pixel_values = images if isinstance(images, torch.Tensor) else self.pixel_values(images)
        return self.projection(self.image_features(pixel_values))

    def prefix_for(
        self, pixel_values: torch.Tensor | None, features: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """The prefix embeddings of a batch's images (or of their encoder features), or None when it has none."""
        if features is not None:  # data.feature_cache: the frozen encoder's output, computed before
            return self.projection(features.to(self.device))
        if pixel_values is None or pixel_values.shape[0] == 0:
            return None
        return self.embed_images(pixel_values)

    def input_embeddings(
        self, input_ids: torch.Tensor, image_mask: torch.Tensor, prefix: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with the prefix written wherever image_mask is set (k slots per image, in order).

        The variants may condition the prefix on the batch first (attention_mask and labels say where each
        sequence's text and reply are) and may write it in their own way.
        """
        embeds = self.lm.get_input_embeddings()(input_ids)
        if prefix is None or prefix.numel() == 0:  # a text-only sequence
            return embeds
        inputs = PrefixInputs(input_ids, embeds, image_mask, attention_mask, labels)
        for variant in self.variants.values():
            prefix = variant.condition_prefix(prefix, inputs)
        for variant in self.variants.values():
            written = variant.write_embeddings(embeds, image_mask, prefix)
            if written is not None:
                return written
        return embeds.masked_scatter(image_mask.unsqueeze(-1), prefix.to(embeds.dtype))

    @contextlib.contextmanager
    def lm_context(
        self, image_mask: torch.Tensor | None, prefix: torch.Tensor | None, start: int = 0, plan: Any = None
    ) -> Iterator[None]:
        """Open around every LM call over sequences laid out as image_mask: each variant's hooks into the LM.

        The call runs positions start: of image_mask (or the packed rows of plan); see variants.base.LMCall.
        """
        if not self.variants or prefix is None or prefix.numel() == 0 or image_mask is None:
            yield
            return
        call = LMCall(self.lm, image_mask, prefix, start, plan)
        with contextlib.ExitStack() as stack:
            for variant in self.variants.values():
                stack.enter_context(variant.lm_context(call))
            yield

    def check_task(self, task: str) -> None:
        """Refuse a task ("chat") that a variant in use cannot serve, in its own words."""
        refused(self.variants, task)

    # ------------------------------------------------------------------ the LM

    def forward(
        self,
        pixel_values: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
        packed: bool = False,
    ) -> dict[str, torch.Tensor]:
        """With labels: the loss on labelled tokens, the logits (N, V) that predict them, and the variants' losses.

        Without labels: the logits (B, T, V). features, when given, are the images' encoder outputs
        (image_features), used instead of pixel_values; packed: lay the batch out without padding (training).
        """
        prefix = self.prefix_for(pixel_values, features)
        embeds = self.input_embeddings(input_ids, image_mask, prefix, attention_mask, labels)
        if labels is None:
            with self.lm_context(image_mask, prefix):
                logits = self.lm(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).logits
            return {"logits": logits}
        hidden, targets = self.hidden_states(embeds, attention_mask, labels, image_mask, prefix, packed)
        # Only positions that predict a label need the vocabulary matmul. Gathering them into one (N, D) matrix
        # also keeps it a plain matrix product: on a strided slice of positions torch falls back to a batched
        # product at half the speed, and this product is a fifth of a training step on the CPU.
        targets = targets[:, 1:]
        keep = targets != -100
        logits = self.lm_logits(hidden[:, :-1][keep])
        out = {"logits": logits, "loss": self.token_loss(logits, targets[keep])}
        if prefix is not None:
            batch = {"input_ids": input_ids, "attention_mask": attention_mask, "image_mask": image_mask,
                     "labels": labels}
            for variant in self.variants.values():
                out.update(variant.extra_losses(self, batch, prefix))
        return out

    def hidden_states(
        self, embeds: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
        image_mask: torch.Tensor | None = None, prefix: torch.Tensor | None = None, packed: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The LM's last hidden states and the labels in the same layout (packed: without padding)."""
        plan = plan_packing(attention_mask) if packed else None
        if plan is None:
            with self.lm_context(image_mask, prefix):
                hidden = self.lm.base_model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False)[0]
            return hidden, labels
        # No attention mask: the LM builds the block-diagonal causal mask from position ids restarting at each
        # sequence (transformers' packed-sequence detection; packing_supported checks the LM does it)
        packed_embeds = plan.gather(embeds, 0.0)
        with self.lm_context(image_mask, prefix, plan=plan):
            hidden = self.lm.base_model(inputs_embeds=packed_embeds, position_ids=plan.position_ids, use_cache=False)[0]
        return hidden, plan.gather(labels, -100)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The frozen LM's logits for hidden states (N, D), as its own forward computes them."""
        return self._head(self.lm, hidden)


def _layer_count(lm: nn.Module) -> int:
    """How many decoder layers the LM has (0 when it names none: only the variants that hook them need it)."""
    try:
        return len(decoder_layers(lm))
    except FrozenPrefixError:
        return 0
