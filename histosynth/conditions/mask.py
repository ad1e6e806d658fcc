"""The spatial mask condition: K one-hot class channels area-averaged to latent resolution (design.md §3).

Class 0 means "unknown": it has no channel, so an unlabelled pixel is all zeros, which is also the null mask
used by condition dropout and classifier-free guidance.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from histosynth.errors import HistosynthError


def one_hot(mask: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class ids (B, H, W) -> float one-hot (B, K, H, W) over classes 1..K; class 0 maps to all zeros."""
    if mask.dtype not in (torch.int64, torch.int32, torch.uint8):
        raise TypeError(f"mask must hold integer class ids, got {mask.dtype}")
    mask = mask.long()
    highest = int(mask.max()) if mask.numel() else 0
    if highest > num_classes or int(mask.min()) < 0:
        raise HistosynthError(f"mask holds class id {highest}; the model knows ids 0..{num_classes}")
    encoded = F.one_hot(mask, num_classes + 1)[..., 1:]  # (B, H, W, K)
    return encoded.permute(0, 3, 1, 2).float()  # (B, K, H, W)


def encode_mask(mask: torch.Tensor, num_classes: int, factor: int) -> torch.Tensor:
    """Class ids (B, H, W) at image resolution -> soft one-hot (B, K, H/f, W/f) at latent resolution.

    Area averaging keeps nuclei that are about one latent pixel wide, which nearest-neighbour resizing would erase.
    """
    if mask.shape[-1] % factor or mask.shape[-2] % factor:
        raise HistosynthError(
            f"mask of {mask.shape[-1]}×{mask.shape[-2]} px is not a multiple of the latent factor {factor}"
        )
    encoded = one_hot(mask, num_classes)  # (B, K, H, W)
    return F.avg_pool2d(encoded, factor) if factor > 1 else encoded  # (B, K, H/f, W/f)


def null_mask(like: torch.Tensor) -> torch.Tensor:
    """The null condition: an all-zero ("unknown") mask shaped like ``like`` (B, K, h, w)."""
    return torch.zeros_like(like)


def encode_large_mask(mask: np.ndarray, num_classes: int, factor: int, band_pixels: int = 2**22) -> torch.Tensor:
    """A uint8 class-id mask (H, W) of any size -> soft one-hot (1, K, H/f, W/f), encoded in bands of about
    ``band_pixels`` px so the image-resolution one-hot (K + 1 int64 per pixel) never exists whole."""
    height, width = mask.shape
    band = max(factor, band_pixels // max(1, width) // factor * factor)
    encoded = torch.empty(1, num_classes, height // factor, width // factor)
    for y in range(0, height, band):
        rows = torch.from_numpy(np.ascontiguousarray(mask[y:y + band])).long()[None]
        encoded[:, :, y // factor:(y + rows.shape[1]) // factor] = encode_mask(rows, num_classes, factor)
    return encoded  # (1, K, H/f, W/f)
