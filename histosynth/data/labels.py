"""Class maps and masks: label rasters, QuPath GeoJSON, and automatic weak labels."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.color import rgb2hed, rgb2hsv
from skimage.draw import polygon as draw_polygon
from skimage.filters import threshold_otsu

from histosynth.errors import HistosynthError

UNKNOWN = {"id": 0, "name": "unknown", "color": [0, 0, 0]}
# Weak labels: computed from colour, not drawn by a pathologist.
AUTO_CLASSES = [
    UNKNOWN,
    {"id": 1, "name": "background", "color": [235, 235, 235]},
    {"id": 2, "name": "stroma", "color": [230, 100, 190]},
    {"id": 3, "name": "nuclei", "color": [60, 40, 170]},
]
PALETTE = [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
           [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212]]


def load_class_map(path: str | Path) -> list[dict]:
    """A class map JSON: a list of {"id", "name", "color"}; id 0 is always "unknown"."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text())
    except FileNotFoundError:
        raise HistosynthError(f"{path}: file not found") from None
    except json.JSONDecodeError as error:
        raise HistosynthError(f"{path}: broken JSON ({error.msg} at line {error.lineno})") from error
    if not isinstance(entries, list) or not all(isinstance(e, dict) and {"id", "name"} <= set(e) for e in entries):
        raise HistosynthError(f"{path}: expected a list of {{\"id\", \"name\", \"color\"}} entries")
    classes = [UNKNOWN] + [dict(e, color=e.get("color", PALETTE[i % len(PALETTE)])) for i, e in enumerate(entries)
                           if int(e["id"]) != 0]
    return classes


# --------------------------------------------------------------------------------------------------------- GeoJSON
def _feature_class(feature: dict) -> str | None:
    props = feature.get("properties") or {}
    classification = props.get("classification")
    if isinstance(classification, dict):
        return classification.get("name")
    if isinstance(classification, str):
        return classification
    return props.get("name")


def read_geojson(path: str | Path) -> list[dict]:
    """Features of a GeoJSON file (FeatureCollection, Feature, or a list of Features as QuPath writes)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise HistosynthError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise HistosynthError(f"{path}: broken JSON ({getattr(error, 'msg', error)})") from error
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        return data.get("features", [])
    if isinstance(data, dict) and data.get("type") == "Feature":
        return [data]
    if isinstance(data, list):
        return data
    raise HistosynthError(f"{path}: not a GeoJSON Feature or FeatureCollection")


def classes_from_geojson(features: list[dict]) -> list[dict]:
    """A class map of the classification names in order of first appearance."""
    names = []
    for feature in features:
        name = _feature_class(feature)
        if name and name not in names:
            names.append(name)
    return [UNKNOWN] + [{"id": i + 1, "name": n, "color": PALETTE[i % len(PALETTE)]} for i, n in enumerate(names)]


def check_feature_classes(features: list[dict], classes: list[dict], path: str | Path) -> None:
    """Fail before any work when a feature names a class the class map lacks."""
    known = {c["name"] for c in classes}
    for feature in features:
        name = _feature_class(feature)
        if name is not None and name not in known:
            raise HistosynthError(f"{path}: unknown class name '{name}' "
                                  f"(known: {', '.join(n for n in known if n != 'unknown')})")


def rasterize_features(features: list[dict], classes: list[dict], size: tuple[int, int], scale: float,
                       path: str | Path = "annotations", origin: tuple[float, float] = (0, 0)) -> np.ndarray:
    """Polygons (level-0 px) -> uint8 class ids (h, w) of the window whose top-left is level-0 ``origin``, at
    ``scale`` output px per level-0 px; holes stay 0."""
    ids = {c["name"]: int(c["id"]) for c in classes}
    mask = np.zeros((size[1], size[0]), np.uint8)
    for feature in features:
        name = _feature_class(feature)
        if name is None:
            continue
        if name not in ids:
            raise HistosynthError(f"{path}: unknown class name '{name}' (known: {', '.join(n for n in ids if n != 'unknown')})")
        geometry = feature.get("geometry") or {}
        polygons = {"Polygon": [geometry.get("coordinates", [])],
                    "MultiPolygon": geometry.get("coordinates", [])}.get(geometry.get("type"), [])
        for rings in polygons:
            if not rings:
                continue
            inside = _fill(rings[0], origin, scale, mask.shape)
            for hole in rings[1:]:
                inside &= ~_fill(hole, origin, scale, mask.shape)
            mask[inside] = ids[name]
    return mask


def _fill(ring: list, origin: tuple[float, float], scale: float, shape: tuple[int, int]) -> np.ndarray:
    """Pixels whose centres lie inside a ring (level-0 coordinates), so areas match the polygon's area."""
    points = np.asarray([p[:2] for p in ring], np.float64)
    rows = (points[:, 1] - origin[1]) * scale - 0.5
    cols = (points[:, 0] - origin[0]) * scale - 0.5
    out = np.zeros(shape, bool)
    rr, cc = draw_polygon(rows, cols, shape)
    out[rr, cc] = True
    return out


def read_label_raster(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """A PNG/TIFF of class ids at any resolution, registered to the slide, resized (nearest) to ``size``."""
    path = Path(path)
    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError:
        raise HistosynthError(f"{path}: file not found") from None
    except Exception as error:
        raise HistosynthError(f"{path}: not a readable label image ({type(error).__name__})") from error
    if image.mode not in ("L", "P", "I", "I;16"):
        raise HistosynthError(f"{path}: label images hold one channel of class ids, not {image.mode}")
    return np.asarray(image.resize(size, Image.NEAREST)).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ weak auto labels
def tissue_pixels(rgb: np.ndarray, saturation_threshold: float) -> np.ndarray:
    """Tissue = saturated and not white; glass is bright and grey."""
    hsv = rgb2hsv(rgb)
    return (hsv[..., 1] > saturation_threshold) & (hsv[..., 2] > 0.15)


def auto_label_thresholds(rgb: np.ndarray) -> dict:
    """Per-slide thresholds of the weak labeller, from a low-resolution view of the slide."""
    saturation = rgb2hsv(rgb)[..., 1]
    sat_t = min(float(threshold_otsu(saturation)), 0.1) if saturation.std() > 1e-3 else 0.1
    tissue = tissue_pixels(rgb, sat_t)
    hem = rgb2hed(rgb)[..., 0]
    values = hem[tissue] if tissue.sum() > 100 else hem.ravel()
    return {"saturation": sat_t, "haematoxylin": float(threshold_otsu(values))}


def auto_labels(rgb: np.ndarray, thresholds: dict) -> np.ndarray:
    """Weak labels (not ground truth): 1 background, 2 stroma/eosin-rich tissue, 3 nuclei/haematoxylin-rich tissue,
    from colour deconvolution (Ruifrok & Johnston via scikit-image ``rgb2hed``) and morphology."""
    tissue = tissue_pixels(rgb, thresholds["saturation"])
    tissue = ndimage.binary_opening(ndimage.binary_closing(tissue, iterations=2), iterations=1)
    nuclei = (rgb2hed(rgb)[..., 0] > thresholds["haematoxylin"]) & tissue
    nuclei = ndimage.binary_opening(nuclei, iterations=1)
    labels = np.full(rgb.shape[:2], 1, np.uint8)
    labels[tissue] = 2
    labels[nuclei] = 3
    return labels


def downsample_labels(labels: np.ndarray, factor: int, num_classes: int) -> np.ndarray:
    """Majority vote in factor×factor blocks (labels must not be averaged); 0 wins only where nothing else is."""
    h, w = labels.shape[0] // factor * factor, labels.shape[1] // factor * factor
    blocks = labels[:h, :w].reshape(h // factor, factor, w // factor, factor)
    counts = np.stack([(blocks == c).sum(axis=(1, 3)) for c in range(1, num_classes + 1)])  # (K, h/f, w/f)
    result = counts.argmax(0).astype(np.uint8) + 1
    result[counts.max(0) == 0] = 0
    return result
