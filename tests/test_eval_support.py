"""Helpers for the evaluation tests: tiny synthetic tissue-like images, PNG folders and §5 dataset folders."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

# RGB colours of the tiny classes: 1 = nuclei-like purple, 2 = stroma-like pink.
CLASS_COLOURS = {1: (110, 60, 150), 2: (230, 150, 190)}


def tissue_image(rng: np.random.Generator, size: int = 32, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """A (size, size, 3) uint8 blob image and its (size, size) uint8 mask with classes 1 and 2; ``shift`` darkens."""
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.uniform(0, size, 2)
    radius = rng.uniform(size / 6, size / 3)
    mask = np.where((yy - cy) ** 2 + (xx - cx) ** 2 < radius ** 2, 1, 2).astype(np.uint8)  # (size, size)
    image = np.zeros((size, size, 3))
    for c, colour in CLASS_COLOURS.items():
        image[mask == c] = colour
    image = image * (1 - shift) + rng.normal(0, 12, image.shape)  # (size, size, 3)
    return np.clip(image, 0, 255).astype(np.uint8), mask


def write_pngs(folder: Path, images: list[np.ndarray]) -> Path:
    """Write arrays as 000.png, 001.png, ... into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    return folder


def image_folder(folder: Path, n: int, seed: int, size: int = 32, shift: float = 0.0) -> Path:
    """A folder of ``n`` tissue-like PNGs."""
    rng = np.random.default_rng(seed)
    return write_pngs(folder, [tissue_image(rng, size, shift)[0] for _ in range(n)])


def make_dataset(root: Path, splits: dict[str, int], seed: int = 0, size: int = 32, shift: float = 0.0,
                 sources: int = 2) -> Path:
    """A design.md §5 dataset folder with labelled patches in the given splits (``{"train": 20, ...}``)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    patches = []
    for split, count in splits.items():
        for i in range(count):
            image, mask = tissue_image(rng, size, shift)
            name = f"{split}_{i:03d}.png"
            Image.fromarray(image).save(root / "images" / name)
            Image.fromarray(mask).save(root / "masks" / name)
            patches.append({"image": f"images/{name}", "mask": f"masks/{name}", "source": i % sources,
                            "x": 32 * i, "y": 0, "split": split})
    meta = {"version": 1, "classes": [{"id": 1, "name": "nuclei", "color": "#6e3c96"},
                                      {"id": 2, "name": "stroma", "color": "#e696be"}],
            "mpp": 0.5, "patch_size": size,
            "sources": [{"id": s, "path": f"slide{s}.svs", "case": f"case{s}", "source_mpp": 0.25,
                         "width": 4096, "height": 4096} for s in range(sources)],
            "patches": patches}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root
