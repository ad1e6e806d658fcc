"""Style-extracting conditioning (STEDM, Öttl et al. 2024; design.md §3): a set of style images → one vector.

An encoder (a small CNN by default, or any timm backbone by name) embeds each image of a style set; an aggregation
block (mean, max, an MLP over the concatenation of a fixed-size set, or attention pooling over a set of any size)
turns the set into one style vector (B, D), which enters the denoiser as the global condition ``"style"``.

Training draws, per content patch, a style set by one of three rules — crops *nearby* in the same slide, random
crops of the same *slide*, or *augmented* copies of the patch — and drops it with a probability (the zero vector
is the null style, so style can be guided while the layout is kept). The encoder is the source's ``encoder``: it
runs inside ``DiffusionObjective`` and trains jointly with the denoiser (the published code's optimiser missed it).

The training source is ``train/sources.py:StyleSource``; at sampling time a style is given as image files, a folder
of images, or a slide (``data/crops.py:load_style_images``), and ``pipelines/conditions.py`` turns it into the vector
with the bundle's ``style_encoder`` component.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from histosynth.errors import HistosynthError

NAME = "style"
AGGREGATIONS = ("mean", "max", "mlp", "attention")


# ------------------------------------------------------------------------------------------------------- encoder
class SmallStyleCNN(nn.Module):
    """Strided conv blocks, then per-channel mean and standard deviation over the image: the feature statistics
    that carry style (Huang & Belongie 2017, AdaIN), independent of where things are in the image."""

    def __init__(self, channels: Sequence[int] = (32, 64, 128)):
        super().__init__()
        layers, width = [], 3
        for c in channels:
            layers += [nn.Conv2d(width, c, 3, stride=2, padding=1), nn.GroupNorm(min(8, c), c), nn.SiLU(),
                       nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(min(8, c), c), nn.SiLU()]
            width = c
        self.body = nn.Sequential(*layers)
        self.num_features = 2 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)  # (N, C, h, w)
        mean = h.mean(dim=(2, 3))  # (N, C)
        std = (h.var(dim=(2, 3), unbiased=False) + 1e-5).sqrt()  # (N, C)
        return torch.cat([mean, std], dim=1)  # (N, 2C)


def _timm_backbone(name: str, pretrained: bool = False) -> nn.Module:
    import timm

    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0)
    except RuntimeError as error:  # timm: "Unknown model (...)"
        if "Unknown model" in str(error):
            raise HistosynthError(f"unknown style encoder '{name}': use 'small' or a timm model name "
                                  "(e.g. resnet18, efficientnet_b0)") from None
        raise


class StyleEncoder(ModelMixin, ConfigMixin):
    """Embeds each image of a style set (B, S, 3, H, W) in [-1, 1] and aggregates the set to one vector (B, D).

    ``backbone``: ``"small"`` (a small CNN) or a timm model name (random weights; ``build_style_encoder`` loads
    pretrained ones when asked). ``aggregation``: mean, max, mlp (fixed ``set_size``) or attention (any size).
    ``input_size`` resizes style images to that side before the backbone (None: as given).
    """

    @register_to_config
    def __init__(self, backbone: str = "small", dim: int = 128, aggregation: str = "mean", set_size: int = 4,
                 heads: int = 4, channels: Sequence[int] = (32, 64, 128), input_size: int | None = None):
        super().__init__()
        if aggregation not in AGGREGATIONS:
            raise HistosynthError(f"unknown style aggregation '{aggregation}'; choose one of {', '.join(AGGREGATIONS)}")
        if set_size < 1:
            raise HistosynthError(f"style set size must be at least 1, got {set_size}")
        if aggregation == "attention" and dim % heads:
            raise HistosynthError(f"style dimension {dim} is not divisible by {heads} attention heads")
        if backbone == "small":
            self.network = SmallStyleCNN(channels)
            width = self.network.num_features
            mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # [-1, 1] in, as given
        else:
            self.network = _timm_backbone(backbone)
            width = self.network.num_features
            cfg = getattr(self.network, "pretrained_cfg", None) or {}
            mean, std = tuple(cfg.get("mean", (0.5, 0.5, 0.5))), tuple(cfg.get("std", (0.5, 0.5, 0.5)))
        # Rebuilt from the config, so not saved with the weights.
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.head = nn.Linear(width, dim)
        if aggregation == "mlp":
            self.mlp = nn.Sequential(nn.Linear(set_size * dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, dim))
        elif aggregation == "attention":
            self.query = nn.Parameter(torch.randn(1, 1, dim) * dim ** -0.5)
            self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Style sets (B, S, 3, H, W) in [-1, 1] -> per-image embeddings (B, S, D)."""
        if images.ndim != 5 or images.shape[2] != 3:
            raise HistosynthError(f"style images must be (batch, set, 3, H, W), got {tuple(images.shape)}")
        b, s = images.shape[:2]
        x = images.flatten(0, 1).to(self.head.weight.dtype)  # (B·S, 3, H, W)
        size = self.config.input_size
        if size and x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        x = ((x + 1) / 2 - self.pixel_mean) / self.pixel_std
        features = self.network(x)  # (B·S, F)
        return self.head(features).view(b, s, -1)  # (B, S, D)

    def aggregate(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Per-image embeddings (B, S, D) -> one style vector per set (B, D)."""
        mode, s = self.config.aggregation, embeddings.shape[1]
        if mode == "mean":
            return embeddings.mean(dim=1)
        if mode == "max":
            return embeddings.amax(dim=1)
        if mode == "mlp":
            if s != self.config.set_size:
                relation = "larger" if s > self.config.set_size else "smaller"
                raise HistosynthError(f"a style set of {s} images is {relation} than the MLP aggregator's fixed size "
                                      f"{self.config.set_size}; give exactly {self.config.set_size} style images")
            return self.mlp(embeddings.flatten(1))  # (B, D)
        query = self.query.expand(embeddings.shape[0], -1, -1)  # (B, 1, D)
        pooled, _ = self.attention(query, embeddings, embeddings, need_weights=False)  # (B, 1, D)
        return pooled[:, 0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.aggregate(self.embed(images))  # (B, D)

    @torch.no_grad()
    def encode_set(self, images: torch.Tensor, chunk: int = 32) -> torch.Tensor:
        """One style set (S, 3, H, W) of any size -> its vector (1, D), embedding ``chunk`` images at a time."""
        parts = [self.embed(part[None]) for part in images.split(chunk)]  # [(1, s, D)]
        return self.aggregate(torch.cat(parts, dim=1))  # (1, D)


def build_style_encoder(backbone: str = "small", dim: int = 128, aggregation: str = "mean", set_size: int = 4,
                        pretrained: bool = False, seed: int = 0, **kwargs) -> StyleEncoder:
    """A StyleEncoder with seeded initial weights; ``pretrained`` loads a timm backbone's published weights (only
    when asked; a clear error where they cannot be loaded, e.g. offline)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = StyleEncoder(backbone, dim, aggregation, set_size, **kwargs)
    if pretrained:
        if backbone == "small":
            raise HistosynthError("the small style CNN has no pretrained weights; drop --style-pretrained "
                                  "or name a timm backbone")
        try:
            weights = _timm_backbone(backbone, pretrained=True).state_dict()
        except HistosynthError:
            raise
        except Exception as error:
            reason = str(error).splitlines()[0] if str(error) else ""
            raise HistosynthError(f"cannot load pretrained weights of timm model '{backbone}' ({type(error).__name__}"
                                  f"{': ' + reason if reason else ''}); they must be downloadable or in the "
                                  "Hugging Face cache, or train without --style-pretrained") from None
        encoder.network.load_state_dict(weights)
    return encoder
