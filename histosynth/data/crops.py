"""Crops of slides and images at a model's µm/px: cached slide blocks for training sources, and the style sets a user
gives at sampling time (image files, folders of images, slides)."""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from histosynth.data.slides import open_slide
from histosynth.data.tiling import tissue_mask
from histosynth.errors import HistosynthError

SLIDE_SUFFIXES = {".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide"}
STYLE_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
TISSUE_THUMB_FACTOR = 8  # tissue masks are computed on thumbnails 8× coarser than the patches (as in prepare)


class SlideCrops:
    """Crops of one slide at a fixed µm/px, assembled from cached blocks (reading a WSI per crop is slow)."""

    def __init__(self, path: str | Path, source_mpp: float | None, mpp: float, block: int = 1024,
                 cache_mb: int = 256):
        self.slide = open_slide(path, source_mpp)
        self.mpp = mpp
        self.scale = self.slide.mpp / mpp  # px at ``mpp`` per level-0 px
        self.width, self.height = self.slide.size_at(mpp)
        self.block = block
        self.capacity = max(4, cache_mb * 2**20 // (block * block * 3))
        self.blocks: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._tissue: tuple[np.ndarray, float] | None = None

    def _block(self, by: int, bx: int) -> np.ndarray:
        key = (by, bx)
        if key in self.blocks:
            self.blocks.move_to_end(key)
            return self.blocks[key]
        y, x = by * self.block, bx * self.block
        h, w = min(self.block, self.height - y), min(self.block, self.width - x)
        pixels = np.full((self.block, self.block, 3), 255, np.uint8)
        if h > 0 and w > 0:
            pixels[:h, :w] = self.slide.read_region(round(x / self.scale), round(y / self.scale), w, h, self.mpp)
        self.blocks[key] = pixels
        if len(self.blocks) > self.capacity:
            self.blocks.popitem(last=False)
        return pixels

    def crop(self, x0: float, y0: float, size: int) -> np.ndarray:
        """RGB (size, size, 3) whose top-left is level-0 (x0, y0); outside the slide is white."""
        px, py = int(round(x0 * self.scale)), int(round(y0 * self.scale))
        out = np.full((size, size, 3), 255, np.uint8)
        for by in range(max(0, py) // self.block, max(0, py + size - 1) // self.block + 1):
            for bx in range(max(0, px) // self.block, max(0, px + size - 1) // self.block + 1):
                block = self._block(by, bx)
                ys, xs = max(py, by * self.block), max(px, bx * self.block)
                ye, xe = min(py + size, (by + 1) * self.block), min(px + size, (bx + 1) * self.block)
                if ye > ys and xe > xs:
                    out[ys - py:ye - py, xs - px:xe - px] = block[ys - by * self.block:ye - by * self.block,
                                                                  xs - bx * self.block:xe - bx * self.block]
        return out

    def tissue(self) -> tuple[np.ndarray, float]:
        """Tissue mask of a thumbnail and its px per level-0 px."""
        if self._tissue is None:
            thumb_mpp = self.mpp * TISSUE_THUMB_FACTOR
            self._tissue = (tissue_mask(self.slide.thumbnail(thumb_mpp)), self.slide.mpp / thumb_mpp)
        return self._tissue

    def tissue_fraction(self, x0: float, y0: float, size0: float) -> float:
        mask, s = self.tissue()
        y1, x1 = int(y0 * s), int(x0 * s)
        y2, x2 = max(y1 + 1, int((y0 + size0) * s)), max(x1 + 1, int((x0 + size0) * s))
        window = mask[max(0, y1):y2, max(0, x1):x2]
        return float(window.mean()) if window.size else 0.0

    def random_tissue_crops(self, n: int, size: int, rng: np.random.Generator, attempts: int = 200) -> list[np.ndarray]:
        """``n`` random crops of ``size`` px (at ``mpp``) whose area is mostly tissue."""
        size0 = size / self.scale
        w0, h0 = self.slide.dimensions
        if w0 < size0 or h0 < size0:
            raise HistosynthError(f"{self.slide.path}: a {size} px crop at {self.mpp} µm/px is larger than the slide")
        crops = []
        for _ in range(n):
            for threshold in (0.5, 0.1):
                found = None
                for _ in range(attempts):
                    x, y = rng.uniform(0, w0 - size0), rng.uniform(0, h0 - size0)
                    if self.tissue_fraction(x, y, size0) >= threshold:
                        found = (x, y)
                        break
                if found is not None:
                    break
            if found is None:
                raise HistosynthError(f"{self.slide.path}: no tissue found for style crops")
            crops.append(self.crop(*found, size))
        return crops


def _read_style_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise HistosynthError(f"{path}: file not found") from None
    except Exception as error:
        raise HistosynthError(f"{path}: not a readable style image ({type(error).__name__})") from None


def _fit(rgb: np.ndarray, size: int) -> np.ndarray:
    """A style image at the model's patch size: centre crop when larger, bilinear resize when smaller."""
    h, w = rgb.shape[:2]
    if h >= size and w >= size:
        y, x = (h - size) // 2, (w - size) // 2
        return np.ascontiguousarray(rgb[y:y + size, x:x + size])
    return np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR))


def _is_slide(path: Path) -> bool:
    """A file to cut random tissue crops from: a slide format that carries its own resolution."""
    if path.suffix.lower() not in SLIDE_SUFFIXES:
        return False
    try:
        open_slide(path)
    except HistosynthError:
        return False  # a plain TIFF without resolution is an ordinary image
    return True


def load_style_images(specs: Sequence[str | Path], size: int, mpp: float, crops: int = 8,
                      seed: int = 0) -> tuple[list[np.ndarray], list[str]]:
    """A style set from image files, folders of images and slides: (images (size, size, 3) uint8, their labels).

    A slide gives ``crops`` random tissue crops at ``mpp``; an image is centre-cropped (or resized) to ``size``.
    """
    if not specs:
        raise HistosynthError("no style images given")
    images, labels = [], []
    for number, spec in enumerate(specs):
        path = Path(spec)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in STYLE_IMAGE_SUFFIXES)
            if not files:
                raise HistosynthError(f"{path}: no style images (PNG/JPEG/TIFF) in this folder")
            for file in files:
                images.append(_fit(_read_style_image(file), size))
                labels.append(str(file))
        elif not path.exists():
            raise HistosynthError(f"{path}: file not found")
        elif _is_slide(path):
            rng = np.random.default_rng([seed, number])
            for i, crop in enumerate(SlideCrops(path, None, mpp).random_tissue_crops(crops, size, rng)):
                images.append(crop)
                labels.append(f"{path}#crop{i}")
        else:
            images.append(_fit(_read_style_image(path), size))
            labels.append(str(path))
    return images, labels
