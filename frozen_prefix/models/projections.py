"""Projections from encoder features to k prefix embeddings of the LM's width: a registry, one small class each.

`model.projection` names one. A projection of your own: subclass `Projection`, decorate it with
`@register_projection("name")`, and say with `spatial` whether it reads the feature map (B, C, H, W) or the pooled
vector (B, C).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config, ModelConfig, register_validator
from ..errors import ConfigError


class _ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def feature_norm(kind: str, dim: int, spatial: bool) -> nn.Module:
    """batch: centre and scale each channel over the batch (running statistics at eval); layer: per example."""
    if kind == "batch":
        return nn.BatchNorm2d(dim) if spatial else nn.BatchNorm1d(dim)
    if kind == "layer":
        return _ChannelLayerNorm(dim) if spatial else nn.LayerNorm(dim)
    return nn.Identity()


class Projection(nn.Module):
    """Encoder features -> (B, k, D) prefix embeddings; `feature_norm` standardises the features first."""

    name: ClassVar[str] = ""  # set by register_projection
    spatial: ClassVar[bool] = False  # reads the feature map (B, C, H, W) rather than the pooled vector (B, C)

    def __init__(self, config: ModelConfig, feature_dim: int, lm_dim: int) -> None:
        super().__init__()
        self.k, self.lm_dim = config.prefix_length, lm_dim

    def add_feature_norm(self, config: ModelConfig, feature_dim: int) -> None:
        """model.feature_norm over the features this projection reads (after its own layers: the weights' order)."""
        self.feature_norm = feature_norm(config.feature_norm, feature_dim, self.spatial)

    @classmethod
    def check(cls, config: ModelConfig) -> None:
        """Raise a one-line ConfigError for settings this projection cannot work with."""


PROJECTIONS: dict[str, type[Projection]] = {}


def register_projection(name: str) -> Callable[[type[Projection]], type[Projection]]:
    """Class decorator: make a Projection subclass available as model.projection=name."""

    def add(cls: type[Projection]) -> type[Projection]:
        if not (isinstance(cls, type) and issubclass(cls, Projection)):
            raise TypeError(f"register_projection({name!r}) decorates a subclass of frozen_prefix.Projection")
        old = PROJECTIONS.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"a projection named {name!r} is registered already ({old.__module__}.{old.__qualname__})")
        cls.name = name
        PROJECTIONS[name] = cls
        return cls

    return add


def build_projection(config: ModelConfig, feature_dim: int, lm_dim: int) -> Projection:
    """The projection model.projection names."""
    return PROJECTIONS[config.projection](config, feature_dim, lm_dim)


def _check_projection(config: Config) -> None:
    """model.projection names a registered projection, which checks its own options."""
    name = config.model.projection
    if name not in PROJECTIONS:
        near = difflib.get_close_matches(name, list(PROJECTIONS), n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise ConfigError(f"model.projection: {name!r} is not one of: {', '.join(PROJECTIONS)}; {hint}".rstrip("; "))
    PROJECTIONS[name].check(config.model)


register_validator(_check_projection)


@register_projection("linear")
class LinearProjection(Projection):
    """Frozen / LiMBeR: the pooled vector -> k * D, reshaped."""

    def __init__(self, config: ModelConfig, feature_dim: int, lm_dim: int) -> None:
        super().__init__(config, feature_dim, lm_dim)
        self.net = nn.Linear(feature_dim, self.k * lm_dim)
        self.add_feature_norm(config, feature_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C) -> (B, k, D)."""
        return self.net(self.feature_norm(features)).view(features.shape[0], self.k, self.lm_dim)


@register_projection("mlp")
class MLPProjection(LinearProjection):
    """ClipCap / LLaVA-1.5: two layers with a GELU, the pooled vector -> k * D."""

    def __init__(self, config: ModelConfig, feature_dim: int, lm_dim: int) -> None:
        Projection.__init__(self, config, feature_dim, lm_dim)
        hidden = config.mlp_hidden or lm_dim
        self.net = nn.Sequential(nn.Linear(feature_dim, hidden), nn.GELU(), nn.Linear(hidden, self.k * lm_dim))
        self.add_feature_norm(config, feature_dim)


def grid_shape(k: int) -> tuple[int, int]:
    """The most square (rows, cols) grid with rows * cols == k."""
    rows = max(r for r in range(1, int(math.isqrt(k)) + 1) if k % r == 0)
    return rows, k // rows


@register_projection("spatial")
class SpatialProjection(Projection):
    """LiMBeR / LLaVA: the feature map pooled to k cells, each projected to one embedding (an MLP with mlp_hidden)."""

    spatial = True

    def __init__(self, config: ModelConfig, feature_dim: int, lm_dim: int) -> None:
        super().__init__(config, feature_dim, lm_dim)
        layers = [nn.Linear(feature_dim, lm_dim)]
        if config.mlp_hidden:
            layers = [nn.Linear(feature_dim, config.mlp_hidden), nn.GELU(), nn.Linear(config.mlp_hidden, lm_dim)]
        self.net = nn.Sequential(*layers)
        self.add_feature_norm(config, feature_dim)

    def pooled_cells(self, features: torch.Tensor) -> torch.Tensor:
        """The projection's input: the feature map pooled to the k cells and normalised, (B, k, C)."""
        cells = self.feature_norm(F.adaptive_avg_pool2d(features, grid_shape(self.k)))  # (B, C, rows, cols)
        return cells.flatten(2).transpose(1, 2)  # row-major reading order

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, k, D), cell by cell in reading order."""
        return self.net(self.pooled_cells(features))


def sincos_2d(rows: int, cols: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """Fixed 2-D sine-cosine position codes (rows * cols, dim), row-major; any grid size, no learned table."""
    quarter = dim // 4
    freq = 1.0 / (10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / max(quarter, 1)))
    y, x = torch.meshgrid(
        torch.arange(rows, device=device, dtype=torch.float32), torch.arange(cols, device=device, dtype=torch.float32),
        indexing="ij",
    )
    angles = [y.flatten()[:, None] * freq, x.flatten()[:, None] * freq]
    codes = torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1)
    return F.pad(codes, (0, dim - codes.shape[1]))  # widths not divisible by 4: the last channels get no code


class QueryMapper(nn.Module):
    """k learned queries cross-attend to the feature map's cells (ClipCap's transformer mapper, a small Q-Former)."""

    def __init__(self, feature_dim: int, width: int, k: int, layers: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ConfigError(
                f"model.query_heads={heads} does not divide the query width {width} (model.mlp_hidden, else the "
                "LM width); change one of them"
            )
        self.inp = nn.Linear(feature_dim, width)
        self.queries = nn.Parameter(torch.randn(k, width) * 0.02)
        # Pre-norm decoder layers: self-attention among the queries, cross-attention to the cells, an MLP.
        layer = nn.TransformerDecoderLayer(
            width, heads, dim_feedforward=4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.decoder = nn.TransformerDecoder(layer, layers, norm=nn.LayerNorm(width))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, k, width)."""
        rows, cols = features.shape[-2:]
        cells = self.inp(features.flatten(2).transpose(1, 2))  # (B, H*W, width)
        # Attention ignores order: the position codes tell the queries where each cell is (left, top, ...).
        cells = cells + sincos_2d(rows, cols, cells.shape[-1], cells.device).to(cells.dtype)
        return self.decoder(self.queries.expand(features.shape[0], -1, -1), cells)


@register_projection("queries")
class QueryProjection(Projection):
    """ClipCap's transformer mapper / a Q-Former: k queries attend to every cell of the map, then one Linear."""

    spatial = True

    def __init__(self, config: ModelConfig, feature_dim: int, lm_dim: int) -> None:
        super().__init__(config, feature_dim, lm_dim)
        hidden = config.mlp_hidden or lm_dim
        mapper = QueryMapper(feature_dim, hidden, self.k, config.query_layers, config.query_heads)
        self.net = nn.Sequential(mapper, nn.Linear(hidden, lm_dim))
        self.add_feature_norm(config, feature_dim)

    @classmethod
    def check(cls, config: ModelConfig) -> None:
        """Positive layer and head counts; the heads divide the query width."""
        for key in ("query_layers", "query_heads"):
            if getattr(config, key) <= 0:
                raise ConfigError(f"model.{key}: must be > 0, got {getattr(config, key)}")

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, k, D): the queries read the whole map."""
        return self.net(self.feature_norm(features))
