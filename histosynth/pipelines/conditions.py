"""One way to build the conditions of a run (design.md §3): what the user gave — a mask, a style set, an SSL
embedding or embedding grid — becomes the conditions a sampler crops (conditions/base.py) and the guidance scale of
each. ``sample``, ``generate``, ``synthesize``, ``vary`` and text/class/reference generation all come through
``build_conditions``, so a condition means the same in every command.

Rules: a condition that is given is guided at its scale (a scale of 1 costs no extra pass); the mask of a
mask-conditioned model is always there — the null (all "unknown") mask when none is given, and then not guided,
since guiding ∅ against ∅ would only spend a UNet pass.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from histosynth.conditions.base import Condition, SpatialCondition, VectorCondition
from histosynth.conditions.embedding import EmbeddingGrid
from histosynth.conditions.mask import encode_large_mask, encode_mask
from histosynth.conditions.style import NAME as STYLE, StyleEncoder
from histosynth.data.crops import load_style_images
from histosynth.errors import HistosynthError
from histosynth.models.bundle import Bundle
from histosynth.pixels import from_uint8


def build_conditions(model: Bundle, canvas: tuple[int, int], mask: np.ndarray | torch.Tensor | None = None,
                     guidance: float = 1.5, style: torch.Tensor | None = None, style_guidance: float = 2.0,
                     embedding: torch.Tensor | EmbeddingGrid | None = None, embedding_guidance: float = 2.0,
                     device="cpu") -> tuple[dict[str, Condition], dict[str, float]]:
    """(conditions, guidance scales) of an image model for an output of ``canvas`` = (h, w) latent px.

    ``mask``: class ids at image resolution, (H, W) for one image (any size: encoded in bands) or (B, H, W) for a
    batch; ``style``: style vectors (B, D) (``style_vector``); ``embedding``: condition vectors (B, D) or a grid.
    """
    conditions: dict[str, Condition] = {}
    scales: dict[str, float] = {}
    if model.num_classes and model.config.get("conditioning", {}).get("mask"):
        if mask is None:
            conditions["mask"] = SpatialCondition(torch.zeros(1, model.num_classes, *canvas))
        else:
            conditions["mask"] = SpatialCondition(_encoded_mask(model, mask))
            scales["mask"] = float(guidance)
    if embedding is not None:
        conditions["embedding"] = embedding if isinstance(embedding, EmbeddingGrid) else VectorCondition(embedding)
        scales["embedding"] = float(embedding_guidance)
    if style is not None:
        conditions[STYLE] = VectorCondition(style)
        scales[STYLE] = float(style_guidance)
    check_global_conditions(model, [name for name in conditions if name != "mask"])
    return {key: condition.to(device) for key, condition in conditions.items()}, scales


def check_global_conditions(model: Bundle, names) -> None:
    """Refuse a global condition (style, embedding) the model was not trained with."""
    expected = set(model.config.get("conditioning", {}).get("global", {}))
    extra = sorted(set(names) - expected)
    if extra:
        raise HistosynthError(f"the model takes no '{extra[0]}' condition (it takes: {', '.join(expected) or 'none'})")


def _encoded_mask(model: Bundle, mask) -> torch.Tensor:
    """Class ids -> soft one-hot (B, K, h, w) at the model's latent resolution."""
    if not isinstance(mask, torch.Tensor) and len(mask.shape) == 2:
        # One slide's mask, an array or compressed bands, encoded band by band: made whole, the int64 ids and
        # one-hot of an 8192² px slide alone take 3 GB.
        return encode_large_mask(mask, model.num_classes, model.latent_factor)  # (1, K, h, w)
    ids = torch.as_tensor(np.asarray(mask)).long()
    return encode_mask(ids if ids.ndim == 3 else ids[None], model.num_classes, model.latent_factor)


def patch_tensors(conditions: dict[str, Condition], n: int) -> dict[str, torch.Tensor]:
    """Conditions of a one-patch canvas as the tensors of a batch of ``n`` patches (the plain sampler's form)."""
    tensors = {}
    for key, condition in conditions.items():
        h, w = condition.canvas if condition.canvas is not None else (1, 1)
        value = condition.crop(torch.arange(h), torch.arange(w))
        if value.shape[0] == 1 and n != 1:
            value = value.repeat(n, 1, 1, 1) if value.ndim == 4 else value.expand(n, -1)
        tensors[key] = value
    return tensors


# ------------------------------------------------------------------------------------------------------- style
def style_encoder_of(model: Bundle) -> StyleEncoder:
    encoder = model.components.get(f"{STYLE}_encoder")
    if encoder is None:
        raise HistosynthError(f"{model.path}: the model was not trained with style conditioning (no style_encoder); "
                              "train it with `histosynth train image --style ...`")
    return encoder


def style_vector(model: Bundle, images: Sequence[np.ndarray], device: str = "cpu") -> torch.Tensor:
    """The style vector (1, D) of a style set of (H, W, 3) uint8 images, from the bundle's style encoder."""
    encoder = style_encoder_of(model).to(device).eval()
    if not len(images):
        raise HistosynthError("empty style set")
    if encoder.config.aggregation == "mlp" and len(images) != encoder.config.set_size:
        relation = "larger" if len(images) > encoder.config.set_size else "smaller"
        raise HistosynthError(f"a style set of {len(images)} images is {relation} than the MLP aggregator's fixed "
                              f"size {encoder.config.set_size}; give exactly {encoder.config.set_size} style images")
    stack = torch.stack([from_uint8(np.asarray(i)) for i in images]).to(device)  # (S, 3, P, P)
    return encoder.encode_set(stack).float().cpu()  # (1, D)


def style_crops_per_slide(model: Bundle) -> int:
    """How many crops a slide given as a style contributes: the MLP's fixed set size, else at least 8."""
    config = style_encoder_of(model).config
    return config.set_size if config.aggregation == "mlp" else max(8, config.set_size)


def style_from_files(model: Bundle, specs: Sequence[str | Path] | None, seed: int = 0,
                     device: str = "cpu") -> torch.Tensor | None:
    """The style vector (1, D) of ``--style`` inputs (images, folders, slides), or None when none is given."""
    if not specs:
        return None
    images, _ = load_style_images(specs, int(model.config["patch_size"]), float(model.config["mpp"]),
                                  style_crops_per_slide(model), seed)
    return style_vector(model, images, device)
