"""The 8 flips/90° rotations of a square (the dihedral group D4), one convention for the whole package: transform
k turns the image k % 4 quarter turns, then, for k ≥ 4, mirrors it. Histology has no preferred orientation, so
training, style sets, embeddings and the privacy search all draw from these 8 views; they must agree on which view
k is, or cached per-view embeddings and reported transform names would silently mean different images.

Imports no torch: the evaluation benchmarks use it on arrays and load torch only when they train."""
from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

import numpy as np

if TYPE_CHECKING:
    import torch

    Array = TypeVar("Array", np.ndarray, torch.Tensor)

NAMES = ("identity", "rot90", "rot180", "rot270", "flip", "rot90+flip", "rot180+flip", "rot270+flip")


def dihedral(x: Array, k: int, axes: tuple[int, int] = (-2, -1)) -> Array:
    """Transform k (0–7) of a NumPy array or torch tensor in the plane of ``axes``: rot90 by k % 4 from axes[0]
    towards axes[1], then a flip of axes[1] if k ≥ 4. The default is the last two axes, (…, H, W); channel-last
    arrays (…, H, W, C) pass their H, W axes. NumPy results are views (possibly with negative strides)."""
    if isinstance(x, np.ndarray):
        x = np.rot90(x, k % 4, axes=axes)
        return np.flip(x, axis=axes[1]) if k >= 4 else x
    x = x.rot90(k % 4, axes)
    return x.flip((axes[1],)) if k >= 4 else x


def dihedral_each(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Each sample of a batch (B, ..., H, W) by its own transform k[b] (B,) of its last two dims (square inputs)."""
    import torch

    out = torch.empty_like(x)
    for view in range(8):
        chosen = k == view
        if chosen.any():
            out[chosen] = dihedral(x[chosen], view)
    return out
