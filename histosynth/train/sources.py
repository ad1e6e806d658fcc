"""Condition sources of the image model's training: per patch, a style set (STEDM's nearby / slide / augmented rules)
or an SSL embedding, drawn from the batch generator alone and dropped to the null with a probability."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from histosynth.conditions.embedding import EmbeddingStandardizer
from histosynth.conditions.embedding_cache import EmbeddingCache
from histosynth.conditions.style import NAME, StyleEncoder, build_style_encoder
from histosynth.data.crops import SlideCrops
from histosynth.data.dataset import hed_jitter, load_dataset_index
from histosynth.dihedral import dihedral
from histosynth.errors import HistosynthError
from histosynth.pixels import from_uint8, to_uint8

RULES = ("nearby", "slide", "augmented")
CACHE_MB = 512  # decoded slide blocks kept in memory by a training StyleSource, all slides together


class _SourceArea:
    """Where style crops of one dataset source may come from: inside the slide, the train regions, tissue, and
    off every non-train patch (val/test/holdout pixels are never trained on)."""

    def __init__(self, root: Path, source: dict, index: dict, cache_mb: int = 256):
        self.cache_mb = cache_mb
        path = Path(source["path"])
        self.path = path if path.is_absolute() else root / path
        self.source_mpp = float(source["source_mpp"])
        self.mpp = float(index["mpp"])
        self.size0 = index["patch_size"] * self.mpp / self.source_mpp
        self.width, self.height = source.get("width"), source.get("height")
        regions = index.get("regions")
        if regions is None:
            self.allowed = [(0.0, 0.0, float(self.width or math.inf), float(self.height or math.inf))]
        else:
            self.allowed = [tuple(map(float, r["box"])) for r in regions
                            if r["source"] == source["id"] and r["split"] == "train"]
        others = [(p["x"], p["y"]) for p in index["patches"] if p["source"] == source["id"] and p["split"] != "train"]
        self.forbidden = np.array(others, np.float64).reshape(-1, 2)
        self.train = [(p["x"], p["y"]) for p in index["patches"] if p["source"] == source["id"]
                      and p["split"] == "train"]
        self._crops: SlideCrops | None = None

    @property
    def crops(self) -> SlideCrops:
        if self._crops is None:
            self._crops = SlideCrops(self.path, self.source_mpp, self.mpp, cache_mb=self.cache_mb)
            self.width, self.height = self._crops.slide.dimensions
        return self._crops

    def valid(self, x: float, y: float) -> bool:
        s = self.size0
        if x < 0 or y < 0 or x + s > self.crops.width / self.crops.scale + 1 or \
                y + s > self.crops.height / self.crops.scale + 1:
            return False
        if not any(x >= a - 1 and y >= b - 1 and x + s <= c + 1 and y + s <= d + 1 for a, b, c, d in self.allowed):
            return False
        if len(self.forbidden):
            fx, fy = self.forbidden[:, 0], self.forbidden[:, 1]
            if np.any((x < fx + s - 1) & (fx < x + s - 1) & (y < fy + s - 1) & (fy < y + s - 1)):
                return False
        return self.crops.tissue_fraction(x, y, s) >= 0.5

    def position(self, rule: str, x: float, y: float, radius: float, rng: np.random.Generator,
                 attempts: int = 20) -> tuple[float, float]:
        """A valid top-left for a style crop; falls back to a random training patch of the same source."""
        s = self.size0
        for _ in range(attempts):
            if rule == "nearby":
                cx, cy = x + rng.uniform(-radius, radius) * s, y + rng.uniform(-radius, radius) * s
            else:
                a, b, c, d = self.allowed[int(rng.integers(len(self.allowed)))]
                c, d = min(c, self.crops.width / self.crops.scale), min(d, self.crops.height / self.crops.scale)
                if c - a < s or d - b < s:
                    continue
                cx, cy = rng.uniform(a, c - s), rng.uniform(b, d - s)
            if self.valid(cx, cy):
                return cx, cy
        return self.train[int(rng.integers(len(self.train)))] if self.train else (x, y)


class StyleSource:
    """The ``style`` condition for ``train_image``: per content patch a style set of ``set_size`` images drawn by
    ``rule`` (nearby | slide | augmented), encoded by the jointly trained ``encoder``, dropped with ``dropout``."""

    name = NAME

    def __init__(self, data: str | Path, encoder: StyleEncoder, rule: str = "nearby", set_size: int = 4,
                 dropout: float = 0.1, radius: float = 2.0, jitter: float = 0.05):
        if rule not in RULES:
            raise HistosynthError(f"unknown style rule '{rule}'; choose one of {', '.join(RULES)}")
        if not 0 <= dropout <= 1:
            raise HistosynthError(f"--style-dropout must be between 0 and 1, got {dropout}")
        if set_size < 1:
            raise HistosynthError(f"--style-set-size must be at least 1, got {set_size}")
        if encoder.config.aggregation == "mlp" and set_size != encoder.config.set_size:
            raise HistosynthError(f"the MLP aggregator takes sets of exactly {encoder.config.set_size} images, "
                                  f"not {set_size}")
        self.root = Path(data)
        index = load_dataset_index(self.root)
        self.encoder, self.rule, self.set_size, self.dropout = encoder, rule, set_size, dropout
        self.dim = int(encoder.config.dim)
        self.radius, self.jitter = radius, jitter
        self.patch_size = int(index["patch_size"])
        self.patches = [p for p in index["patches"] if p["split"] == "train"]  # PatchDataset's order
        self.areas: dict[int, _SourceArea] = {}
        if rule != "augmented":
            used = {p["source"] for p in self.patches}
            cache_mb = max(8, CACHE_MB // max(1, len(used)))  # one budget for the block caches of all slides
            for source in index["sources"]:
                if source["id"] in used:
                    area = _SourceArea(self.root, source, index, cache_mb)
                    if not area.path.exists():
                        raise HistosynthError(f"{area.path}: source slide of {self.root} not found; --style {rule} "
                                              "reads style crops from the original slides (or use --style augmented)")
                    self.areas[source["id"]] = area

    def draw(self, index: int, item: dict, k: int, generator: torch.Generator) -> torch.Tensor:
        """The style set of training patch ``index``: (S, 3, P, P) in [-1, 1]; random from ``generator`` only."""
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
        if self.rule == "augmented":
            rgb = to_uint8(item["image"])
            crops = [self._augment(rgb, rng) for _ in range(self.set_size)]
        else:
            patch = self.patches[index]
            area = self.areas[patch["source"]]
            crops = []
            for _ in range(self.set_size):
                x, y = area.position(self.rule, patch["x"], patch["y"], self.radius, rng)
                crops.append(dihedral(area.crops.crop(x, y, self.patch_size), int(rng.integers(8)), axes=(0, 1)))
        return torch.stack([from_uint8(c) for c in crops])  # (S, 3, P, P)

    def _augment(self, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A flipped/rotated, re-cropped copy with a slight HED jitter (slight: the stain is what style carries)."""
        size = rgb.shape[0]
        side = int(rng.integers(int(size * 0.7), size + 1))
        y, x = (int(v) for v in rng.integers(0, size - side + 1, size=2))
        crop = rgb[y:y + side, x:x + side]
        if side != size:
            crop = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.BILINEAR))
        if self.jitter > 0:
            crop = hed_jitter(crop, self.jitter, rng)
        return dihedral(crop, int(rng.integers(8)), axes=(0, 1))

    def collate(self, values: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(values)  # (B, S, 3, P, P)


def style_source(data: str | Path, rule: str, set_size: int = 4, dropout: float = 0.1, aggregation: str = "mean",
                 encoder: str = "small", pretrained: bool = False, dim: int = 128, seed: int = 0) -> StyleSource:
    """The StyleSource of the ``train image --style ...`` options, with a freshly built encoder."""
    if rule not in RULES:
        raise HistosynthError(f"unknown --style '{rule}'; choose one of {', '.join(RULES)}")
    built = build_style_encoder(encoder, dim, aggregation, set_size, pretrained=pretrained, seed=seed)
    return StyleSource(data, built, rule, set_size, dropout)


class EmbeddingSource:
    """The ``embedding`` condition of ``ImageTask``: each training patch's cached embedding (of the same dihedral
    transform when the cache has all eight, else of the original), standardised by ``encoder``; dropped to the
    zero vector (the null) with probability ``dropout``."""

    name = "embedding"

    def __init__(self, cache: EmbeddingCache, data: str | Path, dropout: float = 0.1, normalize: bool = False):
        if not 0 <= dropout < 1:
            raise HistosynthError(f"embedding dropout must be in [0, 1), got {dropout}")
        train = [p["image"] for p in load_dataset_index(data)["patches"] if p["split"] == "train"]
        if not train:
            raise HistosynthError(f"{data}: no training patches")
        self.table = cache.embeddings[cache.rows(train)].float()  # (N_train, V, D) raw
        self.dim = cache.dim
        # Applied inside the objective and saved with the model; it has buffers only, so nothing trains.
        self.encoder = EmbeddingStandardizer(cache.dim, normalize).fit(self.table.reshape(-1, cache.dim))
        self.dropout = dropout
        self.bundle_settings = {"embedding_encoder": cache.encoder, "embedding_weights_hash": cache.weights_hash,
                                "embedding_normalize": bool(normalize), "embedding_views": cache.views}

    def draw(self, index: int, item: dict, k: int, generator: torch.Generator) -> torch.Tensor:
        return self.table[index, k if self.table.shape[1] == 8 else 0]  # (D,)

    def collate(self, values: list) -> torch.Tensor:
        return torch.stack(values)  # (B, D)
