"""Style fidelity: does a generated set carry the stain of its style set rather than the training stains?

Stain statistics of a set are the mean (3,) and covariance (3, 3) of the haematoxylin, eosin and DAB optical
densities (skimage ``rgb2hed``, Ruifrok & Johnston 2001) over the set's tissue pixels (background — nearly white
pixels — would dominate and carry no stain). Two sets are compared by the Fréchet distance of those Gaussians
(Dowson & Landau 1982). Pure functions over pixels; no network, no weights.

Pixels are first averaged over ``block``×``block`` squares (4 by default): the statistics should describe stain,
not sharpness. Per-pixel covariances are dominated by fine texture, so a slightly blurry generator would look like a
paler, low-contrast stain. Measured on 32 crops of 32 px at 1 µm/px of each bundled slide (distances ×1e-4): a
Gaussian blur of σ = 1 px moves the skin slide's statistics by 3.9 per pixel but 0.1 with 4-px blocks, while the
skin-vs-tumour distance goes from 13.8 to 6.9.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histosynth.errors import HistosynthError
from histosynth.eval.features import IMAGE_SUFFIXES, Source, is_dataset, open_images, parse_source, read_image
from histosynth.eval.fidelity import frechet_distance

BACKGROUND_OD = 0.15  # summed RGB optical density below this is glass/background, not stained tissue
MAX_PIXELS = 200_000  # pixels per set used for the statistics (a fixed-seed subsample of the tissue pixels)
BLOCK = 4  # px: pixels are averaged over BLOCK x BLOCK squares first (stain, not sharpness)


@dataclass(frozen=True)
class StainStats:
    """Mean (3,) and covariance (3, 3) of HED optical densities of a set's tissue pixels."""

    mean: np.ndarray
    cov: np.ndarray
    pixels: int  # tissue pixels the statistics came from

    def as_dict(self) -> dict:
        return {"hed_mean": [float(v) for v in self.mean], "hed_cov": self.cov.round(8).tolist(),
                "pixels": self.pixels}


def block_mean(rgb: np.ndarray, block: int) -> np.ndarray:
    """(H, W, 3) uint8 averaged over ``block``×``block`` squares (a partial edge square is dropped)."""
    if block <= 1:
        return rgb
    h, w = rgb.shape[0] // block, rgb.shape[1] // block
    if h == 0 or w == 0:
        return rgb
    squares = rgb[:h * block, :w * block].reshape(h, block, w, block, -1).astype(np.float64)
    return squares.mean(axis=(1, 3)).round().astype(np.uint8)  # (H/b, W/b, 3)


def tissue_hed(rgb: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """HED optical densities (N, 3) of the tissue pixels (block means) of one (H, W, 3) uint8 image."""
    from skimage.color import rgb2hed

    rgb = block_mean(np.asarray(rgb)[..., :3], block)
    pixels = rgb.reshape(-1, 3).astype(np.float64)  # (N, 3)
    od = -np.log(np.clip(pixels, 1, 255) / 255.0).sum(axis=1)  # (N,) summed optical density
    hed = rgb2hed(rgb).reshape(-1, 3)  # (N, 3)
    return hed[od > BACKGROUND_OD]


def stain_statistics(images: Sequence[np.ndarray], max_pixels: int = MAX_PIXELS, seed: int = 0,
                     block: int = BLOCK) -> StainStats:
    """Stain statistics of a set of (H, W, 3) uint8 images over their tissue pixels (``block``-px means)."""
    parts = [tissue_hed(np.asarray(image), block) for image in images]
    hed = np.concatenate(parts) if parts else np.empty((0, 3))  # (N, 3)
    if len(hed) < 2:
        raise HistosynthError("stain statistics need tissue pixels; the images are blank or background only")
    if len(hed) > max_pixels:
        hed = hed[np.random.default_rng(seed).choice(len(hed), max_pixels, replace=False)]
    return StainStats(hed.mean(axis=0), np.cov(hed, rowvar=False), int(len(hed)))


def stain_distance(a: StainStats, b: StainStats) -> float:
    """Fréchet distance between the HED optical-density Gaussians of two sets (0 for identical statistics)."""
    return frechet_distance(a.mean, a.cov, b.mean, b.cov)


def style_fidelity(generated: Source | Sequence[np.ndarray], style_set: Source | Sequence[np.ndarray],
                   training: Source | Sequence[np.ndarray]) -> dict:
    """Stain distance of ``generated`` to its ``style_set`` versus to the ``training`` stains.

    ``style_ratio`` < 1 means the generated images are closer to the style than to the training data;
    ``style_reference`` (style set vs training) says how far apart the two targets are to begin with.
    Sets are folders (images of any size), dataset folders (``DATASET:split``; ``training`` defaults to the train
    split, the others to every patch) or lists of arrays.
    """
    stats = {role: stain_statistics(_images(source, role, split))
             for role, source, split in (("generated", generated, None), ("style set", style_set, None),
                                         ("training", training, "train"))}
    to_style = stain_distance(stats["generated"], stats["style set"])
    to_training = stain_distance(stats["generated"], stats["training"])
    return {
        "style_distance": to_style,
        "style_distance_training": to_training,
        "style_reference": stain_distance(stats["style set"], stats["training"]),
        "style_ratio": to_style / to_training if to_training > 0 else None,
    }


def style_summary(metrics: dict) -> str:
    """One line for the terminal."""
    ratio = metrics.get("style_ratio")
    return (f"style: stain distance to the style set {metrics['style_distance']:.3g}, to the training stains "
            f"{metrics['style_distance_training']:.3g} (ratio {'—' if ratio is None else f'{ratio:.3g}'}; style set "
            f"vs training {metrics['style_reference']:.3g})")


def _images(source, role: str, default_split: str | None) -> list[np.ndarray]:
    """Every image of a set; a plain folder may hold images of different sizes (statistics pool pixels)."""
    if isinstance(source, (list, tuple)) and source and isinstance(source[0], np.ndarray):
        return list(source)
    if isinstance(source, (str, os.PathLike)):
        path, split = parse_source(source, default_split)
        if not is_dataset(path):
            if not Path(path).is_dir():
                raise HistosynthError(f"{path}: not a folder of images ({role})")
            files = sorted(p for p in Path(path).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise HistosynthError(f"{path}: no PNG/JPEG images in this folder ({role})")
            return [read_image(p) for p in files]
        source = open_images(path, split=split)
    image_set = open_images(source, label=role)
    return [image_set[i] for i in range(len(image_set))]
