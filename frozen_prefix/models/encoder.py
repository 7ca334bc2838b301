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


def build_encoder(config: ModelConfig, pretrained: bool | None = None) -> nn.Module:
    """timm.create_model(name, num_classes=0): a backbone that returns pooled features."""
    pretrained = config.pretrained if pretrained is None else pretrained
    if not timm.is_model(config.encoder):
        raise ConfigError(f"model.encoder: unknown timm model {config.encoder!r}; see timm.list_models()")
    try:
        return timm.create_model(config.encoder, pretrained=pretrained, num_classes=0, **config.encoder_kwargs)
    except TypeError as e:
        raise ConfigError(f"model.encoder_kwargs: {e}; remove the argument {config.encoder} does not take") from None
    except (OSError, RuntimeError) as e:
        if not pretrained:
            raise
        raise FrozenPrefixError(
            f"cannot get pretrained weights for {config.encoder!r} ({str(e).splitlines()[0]}); "
            "put them in the Hugging Face cache or set model.pretrained=false"
        ) from None


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
    features = encoder.forward_features(pixel_values)
    if features.ndim == 3:  # ViT-like tokens (B, N, C): drop class/register tokens, restore the grid
        features = features[:, getattr(encoder, "num_prefix_tokens", 0) :]
        side = int(features.shape[1] ** 0.5)
        features = features.transpose(1, 2).reshape(features.shape[0], -1, side, side)
    elif features.ndim == 4 and getattr(encoder, "output_fmt", "NCHW") == "NHWC":
        features = features.permute(0, 3, 1, 2)
    return features
