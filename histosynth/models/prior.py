"""The embedding prior: a small diffusion model over k×k grids of SSL embeddings, conditioned on a class label or a
text embedding (Graikos et al. 2024 describe a text/class -> embedding prior but never released it).

A grid (B, D, k, k) becomes k² tokens; a transformer encoder denoises them with the timestep and the condition as an
extra token. Embeddings are standardised per dimension with the training set's mean and std (stored with the
weights), so one noise schedule suits every encoder. The denoiser has the histosynth signature
``(x, timestep, conditions) -> model output``, so the plain sampler and the guidance wrapper drive it unchanged.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps

from histosynth.errors import HistosynthError

PRIOR_PRESETS: dict[str, dict] = {
    "tiny": dict(width=64, depth=2, heads=4),
    "demo": dict(width=256, depth=4, heads=8),
    "base": dict(width=512, depth=8, heads=8),
}


def prior_preset(name: str) -> dict:
    if name not in PRIOR_PRESETS:
        raise HistosynthError(f"unknown preset '{name}' for the prior; choose one of {', '.join(PRIOR_PRESETS)}")
    return dict(PRIOR_PRESETS[name])


class EmbeddingPrior(ModelMixin, ConfigMixin):
    """Transformer denoiser over a k×k grid of ``dim``-wide embeddings; ``conditions`` maps a condition name
    ("text", "class") to its vector width. A missing or zero condition vector is its null."""

    @register_to_config
    def __init__(self, dim: int, grid: int, width: int = 128, depth: int = 3, heads: int = 4,
                 conditions: dict | None = None):
        super().__init__()
        self.inp = nn.Linear(dim, width)
        self.position = nn.Parameter(torch.randn(1, grid * grid + 1, width) * 0.02)
        self.time_proj = Timesteps(width, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(width, width)
        self.condition_layers = nn.ModuleDict({
            name: nn.Sequential(nn.Linear(size, width), nn.SiLU(), nn.Linear(width, width))
            for name, size in sorted((conditions or {}).items())})
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        # Standardisation of raw embeddings, measured on the training grids (saved with the weights).
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def standardize(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw grids (B, D, k, k) -> standardised."""
        return (raw - self.mean[None, :, None, None]) / self.std[None, :, None, None]

    def unstandardize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std[None, :, None, None] + self.mean[None, :, None, None]

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, conditions: dict | None = None) -> torch.Tensor:
        """Noisy standardised grids (B, D, k, k) -> model output of the same shape."""
        conditions = conditions or {}
        batch, dim, k, _ = x.shape
        if timestep.ndim == 0:
            timestep = timestep.expand(batch)
        tokens = self.inp(x.flatten(2).transpose(1, 2))  # (B, k², W)
        context = self.time_embed(self.time_proj(timestep.to(x.device)).to(x.dtype))  # (B, W)
        for name, layer in self.condition_layers.items():
            vector = conditions.get(name)
            if vector is None:
                vector = x.new_zeros(batch, self.config.conditions[name])
            context = context + layer(vector.to(x.dtype))
        hidden = torch.cat([context[:, None], tokens], dim=1) + self.position  # (B, 1 + k², W)
        hidden = self.blocks(hidden)
        out = self.out(self.norm(hidden[:, 1:]))  # (B, k², D)
        return out.transpose(1, 2).reshape(batch, dim, k, k)
