"""Projections from encoder features to k prefix embeddings of the LM's width."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError


def grid_shape(k: int) -> tuple[int, int]:
    """The most square (rows, cols) grid with rows * cols == k."""
    rows = max(r for r in range(1, int(math.isqrt(k)) + 1) if k % r == 0)
    return rows, k // rows


class _ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _feature_norm(kind: str, dim: int, spatial: bool) -> nn.Module:
    """batch: centre and scale each channel over the batch (running statistics at eval); layer: per example."""
    if kind == "batch":
        return nn.BatchNorm2d(dim) if spatial else nn.BatchNorm1d(dim)
    if kind == "layer":
        return _ChannelLayerNorm(dim) if spatial else nn.LayerNorm(dim)
    return nn.Identity()


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


class PrefixProjection(nn.Module):
    """Encoder features -> (B, k, D) prefix embeddings."""

    def __init__(self, config: ModelConfig, feature_dim: int, lm_dim: int, embed_rms: float) -> None:
        super().__init__()
        self.kind, self.k, self.lm_dim = config.projection, config.prefix_length, lm_dim
        hidden = config.mlp_hidden or lm_dim
        if self.kind == "linear":  # Frozen / LiMBeR: pooled vector -> k*D, reshaped
            self.net = nn.Linear(feature_dim, self.k * lm_dim)
        elif self.kind == "mlp":  # ClipCap / LLaVA-1.5: two layers with a GELU
            self.net = nn.Sequential(nn.Linear(feature_dim, hidden), nn.GELU(), nn.Linear(hidden, self.k * lm_dim))
        elif self.kind == "spatial":  # LiMBeR / LLaVA: one embedding per cell of the pooled feature map
            layers = [nn.Linear(feature_dim, lm_dim)]
            if config.mlp_hidden:
                layers = [nn.Linear(feature_dim, hidden), nn.GELU(), nn.Linear(hidden, lm_dim)]
            self.net = nn.Sequential(*layers)
        elif self.kind == "queries":  # ClipCap transformer / Q-Former: k queries attend to every cell of the map
            mapper = QueryMapper(feature_dim, hidden, self.k, config.query_layers, config.query_heads)
            self.net = nn.Sequential(mapper, nn.Linear(hidden, lm_dim))
        else:
            raise ValueError(f"unknown projection {self.kind!r}")
        self.feature_norm = _feature_norm(config.feature_norm, feature_dim, self.spatial)
        # model.cell_embeddings: zero at the start, so it begins as the plain spatial prefix
        self.cells = nn.Parameter(torch.zeros(self.k, lm_dim)) if config.cell_embeddings else None
        # model.cell_positions: the same at the input, as a ViT adds position embeddings to its patch embeddings
        self.positions = nn.Parameter(torch.zeros(self.k, feature_dim)) if config.cell_positions else None
        # The frozen LM expects inputs the size of its token embeddings: normalise, then scale to that size.
        self.norm = nn.LayerNorm(lm_dim) if config.prefix_norm else nn.Identity()
        if config.prefix_norm:
            nn.init.constant_(self.norm.weight, embed_rms)

    @property
    def spatial(self) -> bool:
        """Whether this projection wants the feature map rather than the pooled vector."""
        return self.kind in ("spatial", "queries")

    def pooled_cells(self, features: torch.Tensor) -> torch.Tensor:
        """The spatial projection's input: the feature map pooled to the k cells and normalised, (B, k, C)."""
        cells = self.feature_norm(F.adaptive_avg_pool2d(features, grid_shape(self.k)))  # (B, C, rows, cols)
        return cells.flatten(2).transpose(1, 2)  # row-major reading order

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.kind == "queries":
            prefix = self.net(self.feature_norm(features))  # (B, k, D): the queries read the whole map
        elif self.spatial:
            cells = self.pooled_cells(features)
            prefix = self.net(cells if self.positions is None else cells + self.positions)  # (B, k, D)
            if self.cells is not None:
                prefix = prefix + self.cells
        else:
            prefix = self.net(self.feature_norm(features)).view(features.shape[0], self.k, self.lm_dim)
        return self.norm(prefix)
