"""Feature extraction for the evaluation measures: images in, one (N, D) matrix in a named feature space out.

Metrics (fidelity.py, privacy.py) are pure functions over the matrices made here (design.md §8).

Sources of images (``open_images``):
  * a folder of PNG/JPEG files (not recursive, sorted by name);
  * a dataset folder (design.md §5, it holds ``dataset.json``) with ``split=`` ("train", "test", "holdout", ...;
    ``None`` takes every patch), or the string ``"DATASET:split"``;
  * a list of (H, W, 3) arrays (uint8, or float in [0, 1]).

Every image of one set must have the same size: mixed sizes are refused, naming the first odd file. Resizing
would change the µm per pixel that texture features and FID depend on, and cropping would silently drop tissue,
so the user decides how to make them uniform.

Named extractors (``register_extractor`` adds more, e.g. an SSL encoder):
  * ``"stain-texture"`` (offline default, no weights): 45 hand-crafted features —
    HED stain colour statistics (skimage ``rgb2hed`` after Ruifrok & Johnston 2001: mean, std and the
    5/25/50/75/95th percentiles of each of the haematoxylin, eosin and DAB optical densities; 21),
    grey-level mean and std (2),
    multi-scale texture (Gaussian gradient magnitude mean/std and |Laplacian of Gaussian| mean / LoG std at
    σ = 1, 2, 4 px; 12),
    and the rotation-invariant uniform LBP histogram (Ojala et al. 2002, P = 8, R = 1; 10 bins).
    The columns have different units, so the evaluation z-scores them on the real training set.
  * ``"inception"``: the 2048-d pool features of the FID Inception-v3 (torchmetrics ``NoTrainInceptionV3``, the
    torch-fidelity port of the TensorFlow FID graph). Weights are never downloaded: they come from ``weights=`` /
    ``--inception-weights``, the ``HISTOSYNTH_INCEPTION_WEIGHTS`` variable, or the torch hub cache.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from histosynth.errors import HistosynthError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
FeatureFn = Callable[[np.ndarray], np.ndarray]  # (B, H, W, 3) uint8 -> (B, D)
Source = Union[str, os.PathLike, Sequence[np.ndarray], "ImageSet"]


class Features(NamedTuple):
    """Features of N images in a named feature space."""

    values: np.ndarray  # (N, D) float64
    names: list[str]  # D column names
    space: str  # the feature space, e.g. "stain-texture"; every result reports it
    items: list[str]  # N row labels: file paths, or "array[i]"


# ----------------------------------------------------------------------------------------------------------------
# Images


def _as_rgb_uint8(array: np.ndarray, label: str) -> np.ndarray:
    """Accept (H, W), (H, W, 3) or (H, W, 4) arrays, uint8 or float in [0, 1]; return (H, W, 3) uint8."""
    array = np.asarray(array)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)  # (H, W, 3)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise HistosynthError(f"{label}: expected an (H, W, 3) RGB image, got shape {tuple(array.shape)}")
    array = array[..., :3]
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if np.issubdtype(array.dtype, np.floating):
        return (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    raise HistosynthError(f"{label}: expected uint8 or float pixels, got {array.dtype}")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read one PNG/JPEG file as (H, W, 3) uint8; an unreadable file is a HistosynthError naming it."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
    except FileNotFoundError:
        raise HistosynthError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise HistosynthError(f"{path}: cannot read image ({error})") from None


def _image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            return height, width
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise HistosynthError(f"{path}: cannot read image ({error})") from None


class ImageSet(Sequence):
    """A set of same-sized RGB images, from files (read lazily) or arrays; indexing gives (H, W, 3) uint8."""

    def __init__(self, items: Sequence[Path | np.ndarray], label: str, masks: Sequence[Path | None] | None = None,
                 sources: Sequence[str] | None = None):
        if len(items) == 0:
            raise HistosynthError(f"{label}: no images")
        self.items = list(items)
        self.label = label
        self.masks = list(masks) if masks is not None else None
        self.sources = list(sources) if sources is not None else None
        self.size = self._check_sizes()  # (H, W)

    def _check_sizes(self) -> tuple[int, int]:
        # Refuse mixed sizes up front (header reads only), before any expensive feature extraction.
        first_size, first_name = None, None
        for index, item in enumerate(self.items):
            if isinstance(item, np.ndarray):
                size, name = tuple(item.shape[:2]), f"{self.label}[{index}]"
            else:
                size, name = _image_size(Path(item)), str(item)
            if first_size is None:
                first_size, first_name = size, name
            elif size != first_size:
                raise HistosynthError(
                    f"{name}: image is {size[1]}x{size[0]} px but {first_name} is {first_size[1]}x{first_size[0]} px;"
                    " every image of a set must have one size (crop or resize them first)")
        return first_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        item = self.items[index]
        if isinstance(item, np.ndarray):
            return _as_rgb_uint8(item, f"{self.label}[{index}]")
        return read_image(item)

    def name(self, index: int) -> str:
        """A row label: the file path, or ``label[i]`` for arrays."""
        item = self.items[index]
        return f"{self.label}[{index}]" if isinstance(item, np.ndarray) else str(item)

    def mask(self, index: int) -> np.ndarray | None:
        """The class-id mask of image ``index`` ((H, W) uint8), or None where it has none."""
        if self.masks is None or self.masks[index] is None:
            return None
        path = self.masks[index]
        try:
            with Image.open(path) as image:
                return np.asarray(image)  # (H, W) uint8
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
            raise HistosynthError(f"{path}: cannot read mask ({error})") from None

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Yield (B, H, W, 3) uint8 stacks in order."""
        for start in range(0, len(self), batch_size):
            yield np.stack([self[i] for i in range(start, min(start + batch_size, len(self)))])


@dataclass(frozen=True)
class DatasetPatch:
    """One patch entry of a dataset.json (design.md §5), with paths resolved."""

    image: Path
    mask: Path | None
    source: str
    split: str


def read_dataset(root: str | os.PathLike, split: str | None = None) -> tuple[dict, list[DatasetPatch]]:
    """Read a §5 dataset folder: (its dataset.json as a dict, its patches of ``split``; every patch if None).

    A patch's ``source`` is named by its slide's file name (its id where names repeat or are missing).
    """
    from histosynth.data.dataset import load_dataset_index

    root = Path(root)
    meta = load_dataset_index(root)
    try:
        names = {str(s["id"]): Path(str(s.get("path") or s["id"])).name for s in meta["sources"]}
        if len(set(names.values())) < len(names):
            names = {key: f"{key}:{name}" for key, name in names.items()}
        patches = []
        for entry in meta["patches"]:
            if split is not None and entry.get("split") != split:
                continue
            source = str(entry.get("source", ""))
            mask = entry.get("mask")
            patches.append(DatasetPatch(image=root / entry["image"], mask=root / mask if mask else None,
                                        source=names.get(source, source), split=str(entry.get("split", ""))))
    except (KeyError, TypeError) as error:
        raise HistosynthError(f"{root / 'dataset.json'}: malformed patch or source entry ({error})") from None
    return meta, patches


def dataset_splits(root: str | os.PathLike) -> set[str]:
    """The split names present in a dataset folder."""
    _, patches = read_dataset(root)
    return {patch.split for patch in patches}


def is_dataset(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a dataset folder (it holds dataset.json)."""
    return (Path(path) / "dataset.json").is_file()


def parse_source(text: str | os.PathLike, default_split: str | None) -> tuple[Path, str | None]:
    """Split the CLI syntax ``PATH`` or ``DATASET:split`` into (path, split); plain folders get split None.

    A dataset folder given without ``:split`` uses ``default_split`` (e.g. --real-test picks "test").
    """
    text = str(text)
    path, split = Path(text), None
    if ":" in text and not Path(text).exists():
        head, tail = text.rsplit(":", 1)
        if tail and "/" not in tail and Path(head).is_dir():
            path, split = Path(head), tail
    if not path.exists():
        raise HistosynthError(f"{path}: no such folder")
    if split is not None and not is_dataset(path):
        raise HistosynthError(f"{path}: ':{split}' selects a split, but this is not a dataset folder (no dataset.json)")
    if split is None and is_dataset(path):
        split = default_split
    return path, split


def open_images(source: Source, split: str | None = None, label: str | None = None) -> ImageSet:
    """Open a folder of PNG/JPEG, a dataset folder (optionally one ``split``), or a list of arrays as an ImageSet."""
    if isinstance(source, ImageSet):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if ":" in str(source) and not path.exists():
            path, split = parse_source(source, split)
        if is_dataset(path):
            _, patches = read_dataset(path, split)
            where = f"{path} (split {split!r})" if split is not None else str(path)
            if not patches:
                raise HistosynthError(f"{where}: no patches in this dataset split")
            return ImageSet([p.image for p in patches], label or where, masks=[p.mask for p in patches],
                            sources=[p.source for p in patches])
        if not path.is_dir():
            raise HistosynthError(f"{path}: not a folder of images")
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise HistosynthError(f"{path}: no PNG/JPEG images in this folder")
        return ImageSet(files, label or str(path))
    arrays = list(source)
    if not arrays:
        raise HistosynthError(f"{label or 'images'}: empty list of images")
    return ImageSet([np.asarray(a) for a in arrays], label or "images")


# ----------------------------------------------------------------------------------------------------------------
# Extractors


@dataclass(frozen=True)
class Extractor:
    """A registered feature space: ``factory(device=..., weights=...)`` returns a FeatureFn."""

    name: str
    factory: Callable[..., FeatureFn]
    standardize: bool  # whether the evaluation z-scores columns on real-train (mixed units)
    description: str


_EXTRACTORS: dict[str, Extractor] = {}


def register_extractor(name: str, factory: Callable[..., FeatureFn], *, standardize: bool = False,
                       description: str = "") -> None:
    """Add a named feature space: ``factory(device=, weights=)`` returns ``fn((B, H, W, 3) uint8) -> (B, D)``.

    The returned function may carry a ``feature_names`` list; otherwise columns are named ``{name}_{i}``.
    """
    _EXTRACTORS[name] = Extractor(name, factory, standardize, description)


def get_extractor(name: str) -> Extractor:
    """The registered extractor called ``name``; an unknown name is a HistosynthError listing the known ones."""
    if name not in _EXTRACTORS:
        raise HistosynthError(f"unknown feature extractor {name!r}; known: {', '.join(sorted(_EXTRACTORS))}")
    return _EXTRACTORS[name]


def extractor_names() -> list[str]:
    """Names of every registered extractor."""
    return sorted(_EXTRACTORS)


def extract_features(source: Source, extractor: str | FeatureFn = "stain-texture", batch_size: int = 32,
                     device: str = "cpu", split: str | None = None, weights: str | os.PathLike | None = None,
                     fn: FeatureFn | None = None) -> Features:
    """Features of every image of ``source`` in the named feature space, as an (N, D) float64 matrix.

    ``fn`` reuses an already built FeatureFn (so a network is loaded once for several sets).
    """
    images = open_images(source, split=split)
    if callable(extractor):
        fn, space = extractor, getattr(extractor, "__name__", "custom")
    else:
        space = get_extractor(extractor).name
        fn = fn or build_feature_fn(extractor, device=device, weights=weights)
    rows = [np.asarray(fn(batch), dtype=np.float64) for batch in images.batches(batch_size)]  # [(B, D)]
    values = np.concatenate(rows, axis=0)  # (N, D)
    names = list(getattr(fn, "feature_names", None) or [f"{space}_{i}" for i in range(values.shape[1])])
    return Features(values, names, space, [images.name(i) for i in range(len(images))])


def build_feature_fn(extractor: str, device: str = "cpu", weights: str | os.PathLike | None = None) -> FeatureFn:
    """Build the FeatureFn of a registered extractor (loads its network, if any, once)."""
    return get_extractor(extractor).factory(device=device, weights=weights)


# --- stain-texture ----------------------------------------------------------------------------------------------

_HED = ("H", "E", "D")
_PERCENTILES = (5, 25, 50, 75, 95)
_SCALES = (1.0, 2.0, 4.0)
_LBP_POINTS, _LBP_RADIUS = 8, 1


def _stain_texture_names() -> list[str]:
    names = []
    for stain in _HED:
        names += [f"hed_{stain}_mean", f"hed_{stain}_std"] + [f"hed_{stain}_p{q}" for q in _PERCENTILES]
    names += ["gray_mean", "gray_std"]
    for sigma in _SCALES:
        s = f"s{sigma:g}"
        names += [f"grad_{s}_mean", f"grad_{s}_std", f"log_{s}_absmean", f"log_{s}_std"]
    names += [f"lbp_u{_LBP_POINTS}r{_LBP_RADIUS}_bin{i}" for i in range(_LBP_POINTS + 2)]
    return names


def stain_texture_features(batch: np.ndarray) -> np.ndarray:
    """Hand-crafted stain colour + texture features of (B, H, W, 3) uint8 images -> (B, 45); see module docstring."""
    from scipy import ndimage
    from skimage.color import rgb2gray, rgb2hed
    from skimage.feature import local_binary_pattern

    rows = []
    for image in batch:
        rgb = image.astype(np.float64) / 255.0  # (H, W, 3)
        hed = rgb2hed(rgb).reshape(-1, 3)  # (H*W, 3) optical densities
        colour = []
        for c in range(3):
            channel = hed[:, c]
            colour += [channel.mean(), channel.std(), *np.percentile(channel, _PERCENTILES)]
        gray = rgb2gray(rgb)  # (H, W) in [0, 1]
        texture = [gray.mean(), gray.std()]
        for sigma in _SCALES:
            gradient = ndimage.gaussian_gradient_magnitude(gray, sigma)  # (H, W)
            laplace = ndimage.gaussian_laplace(gray, sigma)  # (H, W)
            texture += [gradient.mean(), gradient.std(), np.abs(laplace).mean(), laplace.std()]
        codes = local_binary_pattern((gray * 255).astype(np.uint8), _LBP_POINTS, _LBP_RADIUS, method="uniform")
        histogram = np.bincount(codes.astype(np.int64).ravel(), minlength=_LBP_POINTS + 2) / codes.size  # (10,)
        rows.append(np.concatenate([colour, texture, histogram]))
    return np.stack(rows)  # (B, 45)


stain_texture_features.feature_names = _stain_texture_names()  # type: ignore[attr-defined]


def _stain_texture_factory(**_: Any) -> FeatureFn:
    return stain_texture_features


# --- inception --------------------------------------------------------------------------------------------------

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's file name


def inception_weight_candidates() -> list[Path]:
    """Where the Inception weights are looked for when no path is given: the variable, then the torch hub cache."""
    import torch

    candidates = []
    if os.environ.get("HISTOSYNTH_INCEPTION_WEIGHTS"):
        candidates.append(Path(os.environ["HISTOSYNTH_INCEPTION_WEIGHTS"]))
    candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE)
    return candidates


def _inception_factory(device: str = "cpu", weights: str | os.PathLike | None = None, **_: Any) -> FeatureFn:
    import torch

    looked = [Path(weights)] if weights is not None else inception_weight_candidates()
    found = next((p for p in looked if p.is_file()), None)
    if found is None:
        raise HistosynthError(
            f"Inception weights not found (looked in: {', '.join(map(str, looked))}); histosynth never downloads"
            f" them: pass --inception-weights PATH to a copy of torch-fidelity's {INCEPTION_WEIGHTS_FILE},"
            " or set HISTOSYNTH_INCEPTION_WEIGHTS, or use --features stain-texture")
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE
    except ImportError as error:  # pragma: no cover - torchmetrics is a dependency
        raise HistosynthError(f"the inception extractor needs torchmetrics ({error})") from None
    if not _TORCH_FIDELITY_AVAILABLE:
        raise HistosynthError("the inception extractor needs torch-fidelity: pip install torch-fidelity")
    try:
        # torch-fidelity unpickles the file without restriction; check it holds tensors only before handing it on.
        torch.load(found, map_location="cpu", weights_only=True)
        network = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                     feature_extractor_weights_path=str(found))
    except Exception as error:
        raise HistosynthError(
            f"{found}: not usable Inception-v3 FID weights ({type(error).__name__}: {error})") from None
    network = network.to(device)

    @torch.no_grad()
    def inception_features(batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).to(device)  # (B, 3, H, W) uint8
        return network(x).reshape(len(batch), -1).double().cpu().numpy()  # (B, 2048)

    inception_features.feature_names = [f"inception_pool3_{i}" for i in range(2048)]  # type: ignore[attr-defined]
    return inception_features


# --- pixels (for copy detection) --------------------------------------------------------------------------------


def pixel_features(batch: np.ndarray, side: int = 16) -> np.ndarray:
    """Area-downsampled RGB pixels in [0, 1] of (B, H, W, 3) uint8 images -> (B, side*side*3); finds near-copies."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).double() / 255.0  # (B, 3, H, W)
    x = F.interpolate(x, size=(side, side), mode="area")  # (B, 3, side, side)
    return x.reshape(len(batch), -1).numpy()  # (B, side*side*3)


register_extractor("stain-texture", _stain_texture_factory, standardize=True,
                   description="45 HED stain colour and multi-scale texture statistics (no weights)")
register_extractor("inception", _inception_factory, standardize=False,
                   description="FID Inception-v3 pool3 (2048-d); weights from the user's cache or a given path")
register_extractor("pixels", lambda **_: pixel_features, standardize=False,
                   description="16x16 area-downsampled RGB pixels")



def _encoder_factory(name: str) -> Callable[..., FeatureFn]:
    """SSL encoder feature spaces (conditions/embedding.py), imported only when used."""

    def factory(**kwargs: Any) -> FeatureFn:
        from histosynth.eval.encoder_features import feature_extractor

        return feature_extractor(name, **kwargs)

    return factory


for _name in ("embedding", "uni", "phikon", "lunit-dino", "h-optimus-0"):
    register_extractor(_name, _encoder_factory(_name), standardize=False,
                       description="SSL encoder embeddings" + (" (weights: encoder id or folder)" if _name ==
                                                               "embedding" else f" of {_name} (Hugging Face cache)"))
