"""Style-extracting conditioning (STEDM, Öttl et al. 2024; design.md §3): a set of style images → one vector.

An encoder (a small CNN by default, or any timm backbone by name) embeds each image of a style set; an aggregation
block (mean, max, an MLP over the concatenation of a fixed-size set, or attention pooling over a set of any size)
turns the set into one style vector (B, D), which enters the denoiser as the global condition ``"style"``.

Training draws, per content patch, a style set by one of three rules — crops *nearby* in the same slide, random
crops of the same *slide*, or *augmented* copies of the patch — and drops it with a probability (the zero vector
is the null style, so style can be guided while the layout is kept). The encoder is the source's ``encoder``: it
runs inside ``DiffusionObjective`` and trains jointly with the denoiser (the published code's optimiser missed it).

At sampling time a style is given as image files, a folder of images, or a slide (random tissue crops at the
model's µm/px); ``style_vector`` computes the vector once with the bundle's ``style_encoder`` component.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from PIL import Image

from histosynth.data.dataset import hed_jitter, load_dataset_index
from histosynth.data.slides import open_slide
from histosynth.data.tiling import tissue_mask
from histosynth.errors import HistosynthError
from histosynth.models.bundle import Bundle, register_component

NAME = "style"
AGGREGATIONS = ("mean", "max", "mlp", "attention")
RULES = ("nearby", "slide", "augmented")
SLIDE_SUFFIXES = {".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide"}
STYLE_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
TISSUE_THUMB_FACTOR = 8  # tissue masks are computed on thumbnails 8× coarser than the patches (as in prepare)
CACHE_MB = 512  # decoded slide blocks kept in memory by a training StyleSource, all slides together


# ------------------------------------------------------------------------------------------------------- encoder
class SmallStyleCNN(nn.Module):
    """Strided conv blocks, then per-channel mean and standard deviation over the image: the feature statistics
    that carry style (Huang & Belongie 2017, AdaIN), independent of where things are in the image."""

    def __init__(self, channels: Sequence[int] = (32, 64, 128)):
        super().__init__()
        layers, width = [], 3
        for c in channels:
            layers += [nn.Conv2d(width, c, 3, stride=2, padding=1), nn.GroupNorm(min(8, c), c), nn.SiLU(),
                       nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(min(8, c), c), nn.SiLU()]
            width = c
        self.body = nn.Sequential(*layers)
        self.num_features = 2 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)  # (N, C, h, w)
        mean = h.mean(dim=(2, 3))  # (N, C)
        std = (h.var(dim=(2, 3), unbiased=False) + 1e-5).sqrt()  # (N, C)
        return torch.cat([mean, std], dim=1)  # (N, 2C)


def _timm_backbone(name: str, pretrained: bool = False) -> nn.Module:
    import timm

    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0)
    except RuntimeError as error:  # timm: "Unknown model (...)"
        if "Unknown model" in str(error):
            raise HistosynthError(f"unknown style encoder '{name}': use 'small' or a timm model name "
                                  "(e.g. resnet18, efficientnet_b0)") from None
        raise


class StyleEncoder(ModelMixin, ConfigMixin):
    """Embeds each image of a style set (B, S, 3, H, W) in [-1, 1] and aggregates the set to one vector (B, D).

    ``backbone``: ``"small"`` (a small CNN) or a timm model name (random weights; ``build_style_encoder`` loads
    pretrained ones when asked). ``aggregation``: mean, max, mlp (fixed ``set_size``) or attention (any size).
    ``input_size`` resizes style images to that side before the backbone (None: as given).
    """

    @register_to_config
    def __init__(self, backbone: str = "small", dim: int = 128, aggregation: str = "mean", set_size: int = 4,
                 heads: int = 4, channels: Sequence[int] = (32, 64, 128), input_size: int | None = None):
        super().__init__()
        if aggregation not in AGGREGATIONS:
            raise HistosynthError(f"unknown style aggregation '{aggregation}'; choose one of {', '.join(AGGREGATIONS)}")
        if set_size < 1:
            raise HistosynthError(f"style set size must be at least 1, got {set_size}")
        if aggregation == "attention" and dim % heads:
            raise HistosynthError(f"style dimension {dim} is not divisible by {heads} attention heads")
        if backbone == "small":
            self.network = SmallStyleCNN(channels)
            width = self.network.num_features
            mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # [-1, 1] in, as given
        else:
            self.network = _timm_backbone(backbone)
            width = self.network.num_features
            cfg = getattr(self.network, "pretrained_cfg", None) or {}
            mean, std = tuple(cfg.get("mean", (0.5, 0.5, 0.5))), tuple(cfg.get("std", (0.5, 0.5, 0.5)))
        # Rebuilt from the config, so not saved with the weights.
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.head = nn.Linear(width, dim)
        if aggregation == "mlp":
            self.mlp = nn.Sequential(nn.Linear(set_size * dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, dim))
        elif aggregation == "attention":
            self.query = nn.Parameter(torch.randn(1, 1, dim) * dim ** -0.5)
            self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Style sets (B, S, 3, H, W) in [-1, 1] -> per-image embeddings (B, S, D)."""
        if images.ndim != 5 or images.shape[2] != 3:
            raise HistosynthError(f"style images must be (batch, set, 3, H, W), got {tuple(images.shape)}")
        b, s = images.shape[:2]
        x = images.flatten(0, 1).to(self.head.weight.dtype)  # (B·S, 3, H, W)
        size = self.config.input_size
        if size and x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        x = ((x + 1) / 2 - self.pixel_mean) / self.pixel_std
        features = self.network(x)  # (B·S, F)
        return self.head(features).view(b, s, -1)  # (B, S, D)

    def aggregate(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Per-image embeddings (B, S, D) -> one style vector per set (B, D)."""
        mode, s = self.config.aggregation, embeddings.shape[1]
        if mode == "mean":
            return embeddings.mean(dim=1)
        if mode == "max":
            return embeddings.amax(dim=1)
        if mode == "mlp":
            if s != self.config.set_size:
                relation = "larger" if s > self.config.set_size else "smaller"
                raise HistosynthError(f"a style set of {s} images is {relation} than the MLP aggregator's fixed size "
                                      f"{self.config.set_size}; give exactly {self.config.set_size} style images")
            return self.mlp(embeddings.flatten(1))  # (B, D)
        query = self.query.expand(embeddings.shape[0], -1, -1)  # (B, 1, D)
        pooled, _ = self.attention(query, embeddings, embeddings, need_weights=False)  # (B, 1, D)
        return pooled[:, 0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.aggregate(self.embed(images))  # (B, D)

    @torch.no_grad()
    def encode_set(self, images: torch.Tensor, chunk: int = 32) -> torch.Tensor:
        """One style set (S, 3, H, W) of any size -> its vector (1, D), embedding ``chunk`` images at a time."""
        parts = [self.embed(part[None]) for part in images.split(chunk)]  # [(1, s, D)]
        return self.aggregate(torch.cat(parts, dim=1))  # (1, D)


register_component(f"{NAME}_encoder", StyleEncoder)


def build_style_encoder(backbone: str = "small", dim: int = 128, aggregation: str = "mean", set_size: int = 4,
                        pretrained: bool = False, seed: int = 0, **kwargs) -> StyleEncoder:
    """A StyleEncoder with seeded initial weights; ``pretrained`` loads a timm backbone's published weights (only
    when asked; a clear error where they cannot be loaded, e.g. offline)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = StyleEncoder(backbone, dim, aggregation, set_size, **kwargs)
    if pretrained:
        if backbone == "small":
            raise HistosynthError("the small style CNN has no pretrained weights; drop --style-pretrained "
                                  "or name a timm backbone")
        try:
            weights = _timm_backbone(backbone, pretrained=True).state_dict()
        except HistosynthError:
            raise
        except Exception as error:
            reason = str(error).splitlines()[0] if str(error) else ""
            raise HistosynthError(f"cannot load pretrained weights of timm model '{backbone}' ({type(error).__name__}"
                                  f"{': ' + reason if reason else ''}); they must be downloadable or in the "
                                  "Hugging Face cache, or train without --style-pretrained") from None
        encoder.network.load_state_dict(weights)
    return encoder


# ------------------------------------------------------------------------------------------------ style crops
def _to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.array(rgb[..., :3])).permute(2, 0, 1).float() / 127.5 - 1


def _to_rgb(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8."""
    return ((image.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)


def _dihedral(image: np.ndarray, k: int) -> np.ndarray:
    """One of the 8 flips/90° rotations of an (H, W, 3) array."""
    image = np.rot90(image, k % 4)
    return image[:, ::-1] if k >= 4 else image


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
            rgb = _to_rgb(item["image"])
            crops = [self._augment(rgb, rng) for _ in range(self.set_size)]
        else:
            patch = self.patches[index]
            area = self.areas[patch["source"]]
            crops = []
            for _ in range(self.set_size):
                x, y = area.position(self.rule, patch["x"], patch["y"], self.radius, rng)
                crops.append(_dihedral(area.crops.crop(x, y, self.patch_size), int(rng.integers(8))))
        return torch.stack([_to_tensor(c) for c in crops])  # (S, 3, P, P)

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
        return _dihedral(crop, int(rng.integers(8)))

    def collate(self, values: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(values)  # (B, S, 3, P, P)


def style_source(data: str | Path, rule: str, set_size: int = 4, dropout: float = 0.1, aggregation: str = "mean",
                 encoder: str = "small", pretrained: bool = False, dim: int = 128, seed: int = 0) -> StyleSource:
    """The StyleSource of the ``train image --style ...`` options, with a freshly built encoder."""
    if rule not in RULES:
        raise HistosynthError(f"unknown --style '{rule}'; choose one of {', '.join(RULES)}")
    built = build_style_encoder(encoder, dim, aggregation, set_size, pretrained=pretrained, seed=seed)
    return StyleSource(data, built, rule, set_size, dropout)


# -------------------------------------------------------------------------------------------- style at sampling
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


def style_encoder_of(model: Bundle) -> StyleEncoder:
    encoder = model.components.get(f"{NAME}_encoder")
    if encoder is None:
        raise HistosynthError(f"{model.path}: the model was not trained with style conditioning (no style_encoder); "
                              "train it with `histosynth train image --style ...`")
    return encoder


def style_vector(model: Bundle, images: Sequence[np.ndarray], device: str = "cpu") -> torch.Tensor:
    """The style vector (1, D) of a style set of (H, W, 3) uint8 images, from the bundle's style encoder."""
    encoder = style_encoder_of(model).to(device).eval()
    if not len(images):
        raise HistosynthError("empty style set")
    if encoder.config.aggregation == "mlp" and len(images) != encoder.config.set_size:
        relation = "larger" if len(images) > encoder.config.set_size else "smaller"
        raise HistosynthError(f"a style set of {len(images)} images is {relation} than the MLP aggregator's fixed "
                              f"size {encoder.config.set_size}; give exactly {encoder.config.set_size} style images")
    stack = torch.stack([_to_tensor(np.asarray(i)) for i in images]).to(device)  # (S, 3, P, P)
    return encoder.encode_set(stack).float().cpu()  # (1, D)


def style_crops_per_slide(model: Bundle) -> int:
    """How many crops a slide given as a style contributes: the MLP's fixed set size, else at least 8."""
    config = style_encoder_of(model).config
    return config.set_size if config.aggregation == "mlp" else max(8, config.set_size)


def style_conditions(model: Bundle, specs: Sequence[str | Path] | None, guidance: float = 1.0, seed: int = 0,
                     device: str = "cpu") -> tuple[dict, dict]:
    """(global_conditions, extra_guidance) for ``sample_images`` / ``generate_slide`` from ``--style`` inputs;
    empty dicts when no style is given."""
    if not specs:
        return {}, {}
    images, _ = load_style_images(specs, int(model.config["patch_size"]), float(model.config["mpp"]),
                                  style_crops_per_slide(model), seed)
    return {NAME: style_vector(model, images, device)}, {NAME: float(guidance)}
