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

from histosynth.data.slides import open_image
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


def read_json(path: Path):
    """A JSON file's content, or a one-line error naming the file (missing, broken)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise HistosynthError(f"{path}: file not found") from None
    except json.JSONDecodeError as error:
        raise HistosynthError(f"{path}: broken JSON ({error.msg} at line {error.lineno})") from error
    except UnicodeDecodeError as error:
        raise HistosynthError(f"{path}: broken JSON (not UTF-8 text)") from error


def load_class_map(path: str | Path) -> list[dict]:
    """A class map JSON: a list of {"id", "name", "color"}; id 0 is always "unknown"."""
    path = Path(path)
    entries = read_json(path)
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
    data = read_json(path)
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
    ``scale`` output px per level-0 px; holes stay 0, later features paint over earlier ones."""
    ids = {c["name"]: int(c["id"]) for c in classes}
    mask = np.zeros((size[1], size[0]), np.uint8)
    for feature in features:
        name = _feature_class(feature)
        if name is None:
            continue
        if name not in ids:
            raise HistosynthError(f"{path}: unknown class name '{name}' (known: {', '.join(n for n in ids if n != 'unknown')})")
        for rings in _polygons(feature.get("geometry") or {}):
            if not rings:
                continue
            exterior = _ring_points(rings[0], origin, scale)  # (n, 2) rows, cols in output px
            # Only the polygon's bounding box is filled: a window meets few of a slide's thousands of annotations.
            r0, c0 = np.maximum(np.floor(exterior.min(0)).astype(int), 0)
            r1, c1 = np.minimum(np.ceil(exterior.max(0)).astype(int) + 1, mask.shape)
            if r1 <= r0 or c1 <= c0:
                continue
            inside = _fill(exterior, (r0, c0), (r1 - r0, c1 - c0))
            for hole in rings[1:]:
                inside &= ~_fill(_ring_points(hole, origin, scale), (r0, c0), (r1 - r0, c1 - c0))
            mask[r0:r1, c0:c1][inside] = ids[name]
    return mask


def _polygons(geometry: dict) -> list:
    """The polygons (lists of rings) of a Polygon, MultiPolygon or GeometryCollection; lines and points have no area."""
    kind, coordinates = geometry.get("type"), geometry.get("coordinates") or []
    if kind == "Polygon":
        return [coordinates]
    if kind == "MultiPolygon":
        return list(coordinates)
    if kind == "GeometryCollection":
        return [rings for part in geometry.get("geometries") or [] for rings in _polygons(part)]
    return []


def _ring_points(ring: list, origin: tuple[float, float], scale: float) -> np.ndarray:
    """A ring's vertices (level-0 x, y) as (n, 2) output-pixel (row, col) where pixel centres are integers."""
    points = np.asarray([p[:2] for p in ring], np.float64)  # (n, 2) x, y
    return np.stack([(points[:, 1] - origin[1]) * scale - 0.5, (points[:, 0] - origin[0]) * scale - 0.5], 1)


def _fill(points: np.ndarray, corner: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """Pixels of a ``shape`` box at ``corner`` whose centres lie inside the ring, so areas match the polygon's."""
    out = np.zeros(shape, bool)
    rr, cc = draw_polygon(points[:, 0] - corner[0], points[:, 1] - corner[1], shape)
    out[rr, cc] = True
    return out


def load_label_raster(path: str | Path) -> np.ndarray:
    """A PNG/TIFF of class ids (one channel, any resolution) as (h, w) uint8, at its own resolution."""
    path = Path(path)
    image = open_image(path, "label image")
    if image.mode not in ("1", "L", "P", "I", "I;16", "I;16B", "I;16L"):
        raise HistosynthError(f"{path}: label images hold one channel of class ids, not {image.mode}")
    ids = np.asarray(image)  # (h, w); a palette image's indices are its class ids
    if ids.size and (ids.min() < 0 or ids.max() > 255):
        raise HistosynthError(f"{path}: class ids must be 0-255, found {int(ids.min())}..{int(ids.max())}")
    return ids.astype(np.uint8)


def sample_label_raster(raster: np.ndarray, slide_size: tuple[int, int], origin: tuple[float, float],
                        size: tuple[int, int], scale: float) -> np.ndarray:
    """Nearest class ids (h, w) of a raster registered to the whole slide, for the window at level-0 ``origin``
    of ``size`` output px at ``scale`` output px per level-0 px; outside the raster is 0 (unknown)."""
    rows = (origin[1] + (np.arange(size[1]) + 0.5) / scale) * raster.shape[0] / slide_size[1]  # (h,) raster rows
    cols = (origin[0] + (np.arange(size[0]) + 0.5) / scale) * raster.shape[1] / slide_size[0]  # (w,)
    rows, cols = np.floor(rows).astype(np.int64), np.floor(cols).astype(np.int64)
    valid = (rows >= 0) & (rows < raster.shape[0]), (cols >= 0) & (cols < raster.shape[1])
    out = raster[np.clip(rows, 0, raster.shape[0] - 1)[:, None], np.clip(cols, 0, raster.shape[1] - 1)[None, :]]
    return np.where(valid[0][:, None] & valid[1][None, :], out, 0).astype(np.uint8)  # (h, w)


def check_raster_classes(raster: np.ndarray, classes: list[dict], path: str | Path) -> None:
    """Fail when a label raster holds a class id the class map lacks."""
    known = {int(c["id"]) for c in classes}
    unknown = sorted(set(np.unique(raster).tolist()) - known)
    if unknown:
        raise HistosynthError(f"{path}: class id {unknown[0]} is not in the class map "
                              f"(known ids: {', '.join(str(i) for i in sorted(known))})")


def read_label_raster(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """A PNG/TIFF of class ids at any resolution, registered to the slide, resized (nearest) to ``size``."""
    return np.asarray(Image.fromarray(load_label_raster(path)).resize(size, Image.NEAREST))


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
    # Ink, dust and pure-black pixels deconvolve to haematoxylin values ~20x those of nuclei; a few thousand of them
    # pull Otsu's threshold above every nucleus, so the histogram is clipped to its central 99 % first.
    values = np.clip(values, *np.percentile(values, [0.5, 99.5]))
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
