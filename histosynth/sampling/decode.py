"""Tiled latent -> RGB decoding with blended overlaps, streamed as bands of rows (RGB of a whole slide is never
held in memory).

Tiles of ``tile`` latent px overlap their neighbours by ``2·overlap`` latent px; across each overlap the two
tiles' weights are linear ramps that sum to one, which hides the tile-dependent statistics of the decoder's
normalisation layers.
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch

DecodeFn = Callable[[torch.Tensor], torch.Tensor]  # latents (1, C, h, w) -> images (1, 3, h·f, w·f) in [-1, 1]


def _ramp(start: int, stop: int, core_start: int, core_stop: int, total: int, overlap: int, factor: int) -> np.ndarray:
    """Blend weights (pixels of one tile along one axis): ramps at inner edges, flat at the canvas border."""
    centres = (np.arange(start * factor, stop * factor) + 0.5) / factor  # pixel centres in latent units
    weight = np.ones_like(centres)
    if core_start > 0 and overlap > 0:
        weight *= np.clip((centres - (core_start - overlap)) / (2 * overlap), 0, 1)
    if core_stop < total and overlap > 0:
        weight *= np.clip(((core_stop + overlap) - centres) / (2 * overlap), 0, 1)
    return weight.astype(np.float32)


def decode_rows(decode: DecodeFn, latents: torch.Tensor, factor: int, tile: int = 64, overlap: int = 8,
                progress: Callable[[int], None] | None = None) -> Iterator[np.ndarray]:
    """Yield uint8 RGB bands (rows, W·f, 3) of the decoded image of ``latents`` (1, C, H, W), top to bottom."""
    _, _, height, width = latents.shape
    tile = max(tile, 2 * overlap + 1)
    row_starts = list(range(0, height, tile))
    col_starts = list(range(0, width, tile))
    acc_top = 0  # image row of acc[0]
    acc = np.zeros((0, width * factor, 3), np.float32)
    emitted = 0
    for r, core_y0 in enumerate(row_starts):
        core_y1 = min(core_y0 + tile, height)
        y0, y1 = max(0, core_y0 - overlap), min(height, core_y1 + overlap)
        needed = y1 * factor - acc_top
        if needed > acc.shape[0]:
            acc = np.concatenate([acc, np.zeros((needed - acc.shape[0], width * factor, 3), np.float32)])
        wy = _ramp(y0, y1, core_y0, core_y1, height, overlap, factor)
        for core_x0 in col_starts:
            core_x1 = min(core_x0 + tile, width)
            x0, x1 = max(0, core_x0 - overlap), min(width, core_x1 + overlap)
            with torch.no_grad():
                image = decode(latents[:, :, y0:y1, x0:x1])[0]  # (3, h·f, w·f)
            rgb = (image.float().permute(1, 2, 0).cpu().numpy() + 1) * 127.5  # (h·f, w·f, 3) in [0, 255]
            wx = _ramp(x0, x1, core_x0, core_x1, width, overlap, factor)
            acc[y0 * factor - acc_top:y1 * factor - acc_top, x0 * factor:x1 * factor] += rgb * wy[:, None, None] * wx[None, :, None]
        # Rows above the next tile row's reach are final.
        done = height * factor if r == len(row_starts) - 1 else (core_y1 - overlap) * factor
        if done > emitted:
            band = acc[emitted - acc_top:done - acc_top]
            yield np.clip(np.rint(band), 0, 255).astype(np.uint8)
            acc = acc[done - acc_top:]
            acc_top, emitted = done, done
        if progress is not None:
            progress(r + 1)


def decode_full(decode: DecodeFn, latents: torch.Tensor, factor: int, tile: int = 64, overlap: int = 8) -> np.ndarray:
    """The whole decoded image as one uint8 array (H·f, W·f, 3); for patches and previews only."""
    return np.concatenate(list(decode_rows(decode, latents, factor, tile, overlap)))
