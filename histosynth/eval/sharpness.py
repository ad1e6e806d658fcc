"""Sharpness as spectral energy: how much of an image's detail lies at high spatial frequencies.

A blurry decoder or generator moves energy from fine texture (nuclear chromatin, collagen fibres) to coarse shapes;
the *high-frequency energy ratio* of generated (or reconstructed) images to real ones is 1 when they are as sharp as
real tissue and falls towards 0 as they blur. A pure function of images; no learned features.
"""
from __future__ import annotations

import numpy as np

from histosynth.errors import HistosynthError

# Above this radius (cycles per pixel, Nyquist = 0.5) a spectrum counts as "high frequency": structures smaller than
# about 4 px, i.e. 2 µm at 0.5 µm/px — chromatin and fibre detail, not the outline of a nucleus.
HIGH_FREQUENCY = 0.25


def high_frequency_share(images: np.ndarray, cutoff: float = HIGH_FREQUENCY) -> np.ndarray:
    """Per image, the share of (mean-removed, Hann-windowed) luminance spectral power above ``cutoff`` cycles/px.

    ``images`` uint8 (N, H, W, 3) or float (N, H, W, 3) in [0, 255]; returns (N,).
    """
    images = np.asarray(images, dtype=np.float64)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise HistosynthError(f"expected RGB images (N, H, W, 3), got shape {images.shape}")
    grey = images @ np.array([0.299, 0.587, 0.114])  # (N, H, W)
    grey = grey - grey.mean(axis=(1, 2), keepdims=True)
    height, width = grey.shape[1:]
    window = np.hanning(height)[:, None] * np.hanning(width)[None, :]  # no leakage from the patch edges
    power = np.abs(np.fft.fft2(grey * window)) ** 2  # (N, H, W)
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.fftfreq(width)[None, :]
    high = np.hypot(fy, fx) > cutoff
    total = power.sum(axis=(1, 2))
    return np.where(total > 0, power[:, high].sum(axis=1) / np.maximum(total, 1e-12), 0.0)


def high_frequency_ratio(generated: np.ndarray, real: np.ndarray, cutoff: float = HIGH_FREQUENCY) -> float:
    """Mean high-frequency share of ``generated`` images over that of ``real`` ones: 1 = as sharp as real."""
    real_share = float(high_frequency_share(real, cutoff).mean())
    if real_share <= 0:
        raise HistosynthError("the real images have no high-frequency energy (blank images?)")
    return float(high_frequency_share(generated, cutoff).mean()) / real_share
