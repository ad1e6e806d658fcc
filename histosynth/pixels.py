"""Pixels between their two homes: uint8 RGB arrays on disk and float tensors in [-1, 1] inside the models,
rounded and clipped the same way in both directions."""
from __future__ import annotations

import numpy as np
import torch


def from_uint8(rgb: np.ndarray, device: str | torch.device | None = None) -> torch.Tensor:
    """uint8 RGB (H, W, 3+) or (N, H, W, 3+) -> float32 (3, H, W) or (N, 3, H, W) in [-1, 1]; alpha is dropped.

    With ``device`` the uint8 pixels move there first and are converted there (a quarter of the bytes to copy).
    CUDA can round that division differently from the CPU: a caller that converted on the device must keep doing so,
    or its results change."""
    rgb = np.ascontiguousarray(rgb[..., :3])
    if not rgb.flags.writeable:  # e.g. np.asarray(PIL image): torch warns about sharing read-only memory
        rgb = rgb.copy()
    tensor = torch.from_numpy(rgb)
    if device is not None:
        tensor = tensor.to(device)
    return tensor.movedim(-1, -3).float() / 127.5 - 1


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float (3, H, W) or (N, 3, H, W) in [-1, 1] -> uint8 RGB (H, W, 3) or (N, H, W, 3), rounded, clipped."""
    values = (images.detach().float().movedim(-3, -1).cpu().numpy() + 1) * 127.5
    return values.round().clip(0, 255).astype(np.uint8)
