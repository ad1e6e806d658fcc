"""Static export of the viewer: Deep Zoom tiles plus the viewer page, for ``file://`` or any static web host.

Layout of ``OUT``: ``index.html``, ``viewer.js``, ``viewer.css``, ``config.js``, ``slide.dzi``, ``slide_files/``
and, when the slide has a mask beside it, ``mask.dzi`` and ``mask_files/`` — the same names the server uses, so one
page serves both.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from histosynth.io.atomic import atomic_dir, atomic_path
from histosynth.io.dzi import dzi_tile_grid, export_dzi
from histosynth.viewer.server import STATIC_FILES, SlideSource, encode_tile, static_text


def export_viewer(
    slide_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    mask_path: str | os.PathLike | None | bool = True,
    tile_size: int = 254,
    overlap: int = 1,
    quality: int = 90,
) -> Path:
    """Write the static viewer of ``slide_path`` into ``out_dir``; returns the path of its ``index.html``.

    ``mask_path``: True finds ``NAME.mask.tiff`` beside the slide, None/False leaves the overlay out.
    """
    out_dir = Path(out_dir)
    source = SlideSource(slide_path, mask_path=mask_path, tile_size=tile_size, overlap=overlap, quality=quality)
    try:
        export_dzi(slide_path, out_dir, name="slide", tile_size=tile_size, overlap=overlap, quality=quality)
        if source.mask is not None:
            _export_mask(source, out_dir)
        else:  # an overlay left from an earlier export of another slide would not match this one
            shutil.rmtree(out_dir / "mask_files", ignore_errors=True)
            (out_dir / "mask.dzi").unlink(missing_ok=True)
        _write_text(out_dir / "config.js", source.config_script())
        # index.html last: once it is there, everything it loads is too.
        for name in sorted(STATIC_FILES, key=lambda n: n == "index.html"):
            _write_text(out_dir / name, static_text(name))
    finally:
        source.close()
    return out_dir / "index.html"


def _export_mask(source: SlideSource, out_dir: Path) -> None:
    """``mask_files/`` (RGBA PNG tiles in class colours) and ``mask.dzi``, the descriptor last."""
    width, height = source.layer_size("mask")
    with atomic_dir(out_dir / "mask_files", overwrite=True) as files:
        for level in range(source.level_count("mask")):
            (files / str(level)).mkdir()
            cols, rows = dzi_tile_grid(width, height, level, source.tile_size)
            for row in range(rows):
                for col in range(cols):
                    # Straight to disk, not through the server's tile cache: an export visits every tile once.
                    data = encode_tile(source.tile_pixels("mask", level, col, row), "mask")
                    (files / str(level) / f"{col}_{row}.png").write_bytes(data)
    _write_text(out_dir / "mask.dzi", source.dzi("mask"))


def _write_text(path: Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
