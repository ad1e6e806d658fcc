"""Deep Zoom (DZI) export of a pyramidal TIFF, and single tiles on demand for a viewer.

Deep Zoom levels: level ``L = ceil(log2(max(w, h)))`` is full resolution, each level below halves it (rounding up)
down to level 0 at 1×1 px. Tiles are ``tile_size`` px plus ``overlap`` px on every side that has a neighbour;
tile ``(col, row)`` of a level covers ``[col·ts − overlap, (col+1)·ts + overlap)`` clipped to the level. Each tile is
resampled from the closest slide level at or above its resolution with a box filter, so output is deterministic.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from histosynth.errors import HistosynthError
from histosynth.io.atomic import atomic_dir, atomic_path

DZI_NAMESPACE = "http://schemas.microsoft.com/deepzoom/2008"


def dzi_level_count(width: int, height: int) -> int:
    """Number of Deep Zoom levels of an image: ceil(log2(longest side)) + 1."""
    return math.ceil(math.log2(max(width, height, 1))) + 1


def dzi_level_dimensions(width: int, height: int) -> list[tuple[int, int]]:
    """(width, height) of every Deep Zoom level, level 0 (1×1) first."""
    top = dzi_level_count(width, height) - 1
    return [(math.ceil(width / 2 ** (top - level)), math.ceil(height / 2 ** (top - level))) for level in range(top + 1)]


def dzi_tile_grid(width: int, height: int, level: int, tile_size: int = 254) -> tuple[int, int]:
    """(columns, rows) of tiles at a Deep Zoom level."""
    level_w, level_h = dzi_level_dimensions(width, height)[level]
    return math.ceil(level_w / tile_size), math.ceil(level_h / tile_size)


def dzi_xml(width: int, height: int, tile_size: int = 254, overlap: int = 1, format: str = "jpeg") -> str:
    """The ``.dzi`` descriptor."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<Image xmlns="{DZI_NAMESPACE}" Format="{format}" Overlap="{overlap}" TileSize="{tile_size}">\n'
        f'  <Size Width="{width}" Height="{height}"/>\n'
        "</Image>\n"
    )


def dzi_tile(slide: Any, level: int, col: int, row: int, *, tile_size: int = 254, overlap: int = 1) -> np.ndarray:
    """(h, w, 3) uint8 pixels of Deep Zoom tile (col, row) at ``level`` of an open ``tiffslide.TiffSlide``."""
    width, height = slide.dimensions
    levels = dzi_level_dimensions(width, height)
    if not 0 <= level < len(levels):
        raise HistosynthError(f"Deep Zoom level {level} is outside 0..{len(levels) - 1}")
    cols, rows = dzi_tile_grid(width, height, level, tile_size)
    if not (0 <= col < cols and 0 <= row < rows):
        raise HistosynthError(f"tile ({col}, {row}) is outside the {cols}x{rows} tiles of Deep Zoom level {level}")
    level_w, level_h = levels[level]
    x0 = max(col * tile_size - overlap, 0)
    y0 = max(row * tile_size - overlap, 0)
    x1 = min((col + 1) * tile_size + overlap, level_w)
    y1 = min((row + 1) * tile_size + overlap, level_h)

    scale = 2 ** (len(levels) - 1 - level)  # level-0 px per Deep Zoom px
    source = _best_level(slide, scale)
    source_w, source_h = slide.level_dimensions[source]
    # The tile's rectangle in source-level px (fractional): Deep Zoom px -> level-0 px -> source px.
    sx, sy = source_w / width, source_h / height
    fx0, fy0 = x0 * scale * sx, y0 * scale * sy
    fx1, fy1 = min(x1 * scale, width) * sx, min(y1 * scale, height) * sy
    ix0, iy0 = int(math.floor(fx0)), int(math.floor(fy0))
    ix1, iy1 = min(int(math.ceil(fx1)), source_w), min(int(math.ceil(fy1)), source_h)
    pixels = _read_level(slide, source, ix0, iy0, ix1, iy1)  # (iy1-iy0, ix1-ix0, C)
    out_size = (x1 - x0, y1 - y0)
    if pixels.shape[1] == out_size[0] and pixels.shape[0] == out_size[1] and fx0 == ix0 and fy0 == iy0:
        return pixels
    image = Image.fromarray(pixels)
    box = (fx0 - ix0, fy0 - iy0, fx1 - ix0, fy1 - iy0)
    return np.asarray(image.resize(out_size, resample=Image.Resampling.BOX, box=box))


def export_dzi(
    slide_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    name: str | None = None,
    tile_size: int = 254,
    overlap: int = 1,
    quality: int = 90,
) -> Path:
    """Write ``out_dir/NAME.dzi`` and ``out_dir/NAME_files/<level>/<col>_<row>.jpeg`` from a pyramidal TIFF.

    The tile folder is built under a temporary name and renamed into place (replacing an older one), and the
    ``.dzi`` is written last, so a present ``.dzi`` always means a complete tile set. Returns the ``.dzi`` path.
    """
    import tiffslide

    slide_path = Path(slide_path)
    if not slide_path.is_file():
        raise HistosynthError(f"{slide_path}: file not found")
    if tile_size < 1 or overlap < 0:
        raise HistosynthError(f"tile size must be ≥ 1 and overlap ≥ 0, got {tile_size} and {overlap}")
    name = name or slide_path.name.split(".")[0]
    out_dir = Path(out_dir)
    with tiffslide.TiffSlide(slide_path) as slide:
        width, height = slide.dimensions
        with atomic_dir(out_dir / f"{name}_files", overwrite=True) as files:
            for level in range(dzi_level_count(width, height)):
                (files / str(level)).mkdir()
                cols, rows = dzi_tile_grid(width, height, level, tile_size)
                for row in range(rows):
                    for col in range(cols):
                        pixels = dzi_tile(slide, level, col, row, tile_size=tile_size, overlap=overlap)
                        Image.fromarray(pixels).save(files / str(level) / f"{col}_{row}.jpeg", quality=quality)
    descriptor = out_dir / f"{name}.dzi"
    with atomic_path(descriptor, suffix=".dzi") as tmp:
        tmp.write_text(dzi_xml(width, height, tile_size, overlap, "jpeg"), encoding="utf-8")
    return descriptor


def _best_level(slide: Any, scale: float) -> int:
    """The coarsest slide level whose downsample is ≤ ``scale`` (never upsample from a coarser level)."""
    best = 0
    for index, downsample in enumerate(slide.level_downsamples):
        if downsample <= scale * (1 + 1e-6):
            best = index
    return best


def _read_level(slide: Any, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """(y1-y0, x1-x0, 3) uint8 pixels of a rectangle in a slide level's own coordinates."""
    array = np.asarray(slide.zarr_group[str(level)][y0:y1, x0:x1])
    if array.ndim == 2:  # single-channel slides (label images) shown as grey
        array = np.repeat(array[:, :, None], 3, axis=2)
    return np.ascontiguousarray(array[:, :, :3].astype(np.uint8, copy=False))
