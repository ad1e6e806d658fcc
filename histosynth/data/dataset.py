"""The on-disk dataset format (design.md §5) and the torch Datasets that read it."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage.color import hed2rgb, rgb2hed
from torch.utils.data import Dataset, get_worker_info

from histosynth.data.labels import downsample_labels
from histosynth.dihedral import dihedral
from histosynth.errors import HistosynthError
from histosynth.pixels import from_uint8

INDEX = "dataset.json"
VERSION = 1


def load_dataset_index(root: str | Path) -> dict:
    """``dataset.json`` of a dataset folder (or the file itself), checked for the fields every reader relies on."""
    root = Path(root)
    if root.name == INDEX and root.is_file():
        root = root.parent
    path = root / INDEX
    if not root.exists():
        raise HistosynthError(f"{root}: dataset folder not found")
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise HistosynthError(f"{root}: not a dataset folder (no {INDEX}; run `histosynth prepare`)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise HistosynthError(f"{path}: broken JSON ({getattr(error, 'msg', error)})") from error
    if not isinstance(index, dict):
        raise HistosynthError(f"{path}: not a dataset index (expected a JSON object)")
    missing = {"classes", "mpp", "patch_size", "sources", "patches"} - set(index)
    if missing:
        raise HistosynthError(f"{path}: missing field '{sorted(missing)[0]}'")
    if int(index.get("version", VERSION)) > VERSION:
        raise HistosynthError(f"{path}: dataset format version {index['version']} is newer than this histosynth "
                              f"reads ({VERSION}); upgrade histosynth")
    return index


def _read_png(path: Path) -> np.ndarray:
    """A dataset PNG as a writable array (torch refuses read-only buffers)."""
    try:
        with Image.open(path) as image:
            return np.array(image)
    except FileNotFoundError:
        raise HistosynthError(f"{path}: file not found (dataset incomplete)") from None
    except (OSError, Image.DecompressionBombError) as error:
        raise HistosynthError(f"{path}: damaged image ({error})") from error


def hed_jitter(rgb: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Stain augmentation: scale and shift each HED channel by up to ``strength``."""
    hed = rgb2hed(rgb)
    hed = hed * rng.uniform(1 - strength, 1 + strength, 3) + rng.uniform(-strength, strength, 3) * 0.05
    return (np.clip(hed2rgb(hed), 0, 1) * 255).astype(np.uint8)


class PatchDataset(Dataset):
    """Patches of one split: ``image`` (3, H, W) float in [-1, 1], ``mask`` (H, W) int64 (zeros when unlabelled),
    ``labelled`` bool, ``source`` int; optional flips/90° rotations and HED stain jitter."""

    def __init__(self, root: str | Path, split: str = "train", augment: bool = False, stain_jitter: float = 0.0,
                 seed: int = 0):
        self.root = Path(root)
        self.index = load_dataset_index(self.root)
        self.patches = [p for p in self.index["patches"] if p["split"] == split]
        self.augment, self.stain_jitter = augment, stain_jitter
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self._worker: int | None = None

    def _generator(self) -> np.random.Generator:
        """The augmentation RNG; DataLoader workers re-seed it from their own seed, which differs per worker and
        per epoch, or every worker would repeat the same flips and jitters in the same order every epoch."""
        info = get_worker_info()
        if info is not None and self._worker != info.seed:
            self._worker = info.seed
            self.rng = np.random.default_rng([self.seed, info.seed])
        return self.rng

    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, i: int) -> dict:
        patch = self.patches[i]
        rgb = _read_png(self.root / patch["image"])[..., :3]  # (H, W, 3)
        mask = _read_png(self.root / patch["mask"]).astype(np.int64) if patch["mask"] else \
            np.zeros(rgb.shape[:2], np.int64)
        rng = self._generator()
        if self.stain_jitter > 0:
            rgb = hed_jitter(rgb, self.stain_jitter, rng)
        image = from_uint8(rgb)
        mask_t = torch.from_numpy(np.ascontiguousarray(mask))
        if self.augment:
            k = int(rng.integers(8))
            image, mask_t = dihedral(image, k), dihedral(mask_t, k)
        return {"image": image.contiguous(), "mask": mask_t.contiguous(),
                "labelled": torch.tensor(patch["mask"] is not None), "source": int(patch["source"])}


class LabelmapCrops(Dataset):
    """Random ``crop``×``crop`` crops of the low-resolution label maps inside ``split`` regions (mask model data);
    crop ``i`` is fixed by ``(seed, i)``. With ``downsample`` > 1 the maps are coarsened first (majority vote), so a
    crop of the same size spans more tissue."""

    def __init__(self, root: str | Path, crop: int, split: str = "train", length: int = 10_000, seed: int = 0,
                 downsample: int = 1):
        self.root = Path(root)
        self.index = load_dataset_index(self.root)
        self.crop, self.length, self.seed, self.downsample = crop, length, seed, downsample
        if downsample < 1:
            raise HistosynthError(f"label-map downsampling must be at least 1, got {downsample}")
        self.num_classes = max((int(c["id"]) for c in self.index["classes"]), default=0)
        self.areas = []  # (labelmap path, box in (downsampled) labelmap px)
        if not any(source.get("labelmap") for source in self.index["sources"]):
            raise HistosynthError(f"{root}: the dataset has no label maps; prepare it with --annotations, --labels "
                                  "or --auto-labels")
        for source in self.index["sources"]:
            if not source.get("labelmap"):
                continue
            scale = source["source_mpp"] / (source["labelmap_mpp"] * downsample)  # map px per level-0 px
            for region in self.index.get("regions", []):
                if region["source"] != source["id"] or region["split"] != split:
                    continue
                x0, y0, x1, y1 = (int(v * scale) for v in region["box"])
                if x1 - x0 >= crop and y1 - y0 >= crop:
                    self.areas.append((source["labelmap"], (x0, y0, x1, y1), int(source["id"])))
        if not self.areas:
            raise HistosynthError(f"{root}: no {split} region of the label maps is at least {crop}×{crop} px"
                                  + (f" after {downsample}× downsampling" if downsample > 1 else "")
                                  + "; use a smaller --crop")

    @lru_cache(maxsize=16)
    def _labelmap(self, path: str) -> np.ndarray:
        labelmap = _read_png(self.root / path)
        if self.downsample == 1:
            return labelmap
        return downsample_labels(labelmap, self.downsample, self.num_classes)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng([self.seed, i])
        path, (x0, y0, x1, y1), source = self.areas[int(rng.integers(len(self.areas)))]
        y = int(rng.integers(y0, y1 - self.crop + 1))
        x = int(rng.integers(x0, x1 - self.crop + 1))
        crop = self._labelmap(path)[y:y + self.crop, x:x + self.crop]
        return {"mask": torch.from_numpy(crop.astype(np.int64)), "source": source}
