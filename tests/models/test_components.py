"""Every projection x feature norm, and ViT and CNN encoders: prefix shapes, gradients reach only the trainable part."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from frozen_prefix import FrozenPrefixCaptioner, FrozenPrefixError, load_config
from frozen_prefix.data import ShapesDataset
from frozen_prefix.models.encoder import encoder_features

from ..conftest import TINY

BATCH = 2
CAPTION = 3  # caption tokens per sequence, all labelled


def build(*overrides: str) -> FrozenPrefixCaptioner:
    """The tiny captioner with overrides, in train mode (BatchNorm uses batch statistics)."""
    return FrozenPrefixCaptioner(load_config(TINY, list(overrides))).train()


def pixels(model: FrozenPrefixCaptioner) -> torch.Tensor:
    """A batch of shapes images through the model's own transform."""
    images = ShapesDataset("test", size=BATCH)
    return model.pixel_values([images[i]["image"] for i in range(BATCH)])


def lm_loss(model: FrozenPrefixCaptioner, pixel_values: torch.Tensor) -> torch.Tensor:
    """The LM loss of [BOS][k image slots][3 caption tokens], labels on the caption only."""
    k, start = model.prefix_length, model.start_ids
    caption = model.tokenizer("a red circle", add_special_tokens=False).input_ids[:CAPTION]
    assert len(caption) == CAPTION
    input_ids = torch.tensor([start + [model.tokenizer.pad_token_id] * k + caption] * BATCH)
    image_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    image_mask[:, len(start) : len(start) + k] = True
    labels = torch.full_like(input_ids, -100)
    labels[:, -CAPTION:] = input_ids[:, -CAPTION:]
    out = model(
        pixel_values=pixel_values, input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
        image_mask=image_mask, labels=labels,
    )
    return out["loss"]


def assert_gradients_reach_only_the_trainable_part(model: FrozenPrefixCaptioner) -> None:
    """Backward through the frozen LM: every trainable parameter gets a non-zero gradient, no LM parameter any."""
    loss = lm_loss(model, pixels(model))
    assert torch.isfinite(loss)
    loss.backward()
    trainable = dict(model.trainable_modules().named_parameters())
    assert trainable
    missing = [name for name, p in trainable.items() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"no gradient for {missing}"
    assert not any(p.requires_grad or p.grad is not None for p in model.lm.parameters())


@pytest.mark.parametrize("feature_norm", ["batch", "layer", "none"])
@pytest.mark.parametrize("projection", ["linear", "mlp", "spatial"])
def test_projection_and_feature_norm(projection, feature_norm):
    model = build(
        f"model.projection={projection}", f"model.feature_norm={feature_norm}", "model.mlp_hidden=32",
        # timm zero-initialises each residual block's last BatchNorm scale, which makes every weight before it
        # get an exactly-zero gradient on the first step; off here so that "every parameter learns" can be checked.
        "model.encoder_kwargs={zero_init_last: false}",
    )
    prefix = model.embed_images(pixels(model))
    width = model.lm.get_input_embeddings().weight.shape[1]
    assert prefix.shape == (BATCH, model.prefix_length, width)
    assert_gradients_reach_only_the_trainable_part(model)


VIT = ["model.encoder=test_vit", "model.encoder_kwargs={img_size: 32, patch_size: 8}", "model.image_size=32"]


@pytest.mark.parametrize("k", [4, 16])
def test_vit_spatial_prefix(k):
    model = build(*VIT, "model.projection=spatial", f"model.prefix_length={k}")
    pixel_values = pixels(model)
    assert pixel_values.shape[-2:] == (32, 32)
    grid = encoder_features(model.encoder, pixel_values, spatial=True)
    assert grid.shape == (BATCH, model.encoder.num_features, 4, 4)  # 32 px / patch 8, the class token dropped
    assert model.embed_images(pixel_values).shape == (BATCH, k, model.lm.get_input_embeddings().weight.shape[1])
    assert_gradients_reach_only_the_trainable_part(model)


def test_vit_grid_is_its_patch_tokens_in_reading_order():
    vit = timm.create_model("test_vit", num_classes=0, img_size=(32, 48), patch_size=8).eval()
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        grid = encoder_features(vit, x, spatial=True)
        tokens = vit.forward_features(x)[:, vit.num_prefix_tokens :]  # (1, 4 * 6, C), normed like the grid
    assert grid.shape == (1, vit.num_features, 4, 6)  # not square: the grid comes from timm, not a square root
    torch.testing.assert_close(grid.flatten(2).transpose(1, 2), tokens)


def test_cnn_map_is_forward_features_bit_for_bit():
    cnn = timm.create_model("test_resnet", num_classes=0).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(encoder_features(cnn, x, spatial=True), cnn.forward_features(x))
        assert torch.equal(encoder_features(cnn, x, spatial=False), cnn(x))


class _PooledOnly(nn.Module):
    """An encoder whose features have no spatial layout."""

    num_features = 8
    pretrained_cfg = {"architecture": "pooled_only_net"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, : self.num_features]


def test_encoder_without_a_map_is_one_line_naming_the_encoder():
    with pytest.raises(FrozenPrefixError) as error:
        encoder_features(_PooledOnly(), torch.randn(2, 3, 4, 4), spatial=True)
    message = str(error.value)
    assert "\n" not in message
    assert "model.encoder=pooled_only_net" in message and "model.projection=linear" in message
