"""The mask beside a slide: colour preview, overlay, and class polygons as GeoJSON that QuPath imports.

A mask is a (H, W) array of uint8 class ids (0 = unknown, never exported as a polygon); the class table is a list
of ``{"id", "name", "color"}`` with ``color`` as ``[r, g, b]`` or ``"#rrggbb"``.

Polygons trace the pixel edges exactly (vertices on pixel corners, pixel (r, c) covering x ∈ [c, c+1],
y ∈ [r, r+1] — QuPath's convention), so rasterising them back at pixel centres gives the mask again; a light
Douglas-Peucker pass (``simplify`` px, default ½ px) then removes the staircase vertices of slanted borders. Regions
are 4-connected (pixels touching only at a corner are separate regions; two regions may share a corner vertex).
Exterior rings run counter-clockwise and holes clockwise in (x, y) numbers, as RFC 7946 asks.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from histosynth.errors import HistosynthError
from histosynth.io.atomic import atomic_path

# Edge directions in clockwise order on screen (y down): east, south, west, north; index + 1 = a right turn.
_STEPS = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]])  # (4, [dx, dy])


def class_colors(classes: Sequence[dict[str, Any]]) -> np.ndarray:
    """(256, 3) uint8 palette indexed by class id; ids missing from the table are black."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for entry in classes:
        palette[_class_id(entry)] = _rgb(entry)
    return palette


def colorize(mask: np.ndarray, classes: Sequence[dict[str, Any]]) -> np.ndarray:
    """(H, W, 3) uint8 colour image of a class-id mask, colours from the class table."""
    mask = _check_mask(mask, classes)
    return class_colors(classes)[mask]


def overlay(rgb: np.ndarray, mask: np.ndarray, classes: Sequence[dict[str, Any]], alpha: float = 0.4) -> np.ndarray:
    """Blend class colours over an RGB image with opacity ``alpha``; unknown (0) pixels keep the image."""
    rgb = np.asarray(rgb)
    mask = _check_mask(mask, classes)
    if rgb.shape[:2] != mask.shape or rgb.ndim != 3 or rgb.shape[2] < 3:
        raise HistosynthError(f"overlay: image of shape {rgb.shape} does not match a mask of shape {mask.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise HistosynthError(f"overlay: alpha must be in [0, 1], got {alpha}")
    base = rgb[..., :3].astype(np.float32)  # (H, W, 3)
    colours = class_colors(classes)[mask].astype(np.float32)  # (H, W, 3)
    blended = np.where((mask > 0)[..., None], (1.0 - alpha) * base + alpha * colours, base)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def write_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write a uint8 (H, W) or (H, W, 3) array as PNG, atomically and deterministically (no timestamps)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise HistosynthError(f"{path}: PNG images must be uint8, got {image.dtype}")
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(image).save(tmp, format="PNG", compress_level=6)
    return Path(path)


def write_mask_preview(path: str | os.PathLike, mask: np.ndarray, classes: Sequence[dict[str, Any]]) -> Path:
    """Write the colour preview PNG of a mask."""
    return write_png(path, colorize(mask, classes))


def mask_to_geojson(
    mask: np.ndarray,
    classes: Sequence[dict[str, Any]],
    *,
    scale: float = 1.0,
    simplify: float = 0.5,
    min_area: int = 1,
) -> dict[str, Any]:
    """GeoJSON FeatureCollection with one Polygon Feature (holes included) per 4-connected region of each class.

    ``scale`` multiplies coordinates (slide level-0 px per mask px, for masks at lower resolution); ``simplify`` is
    the Douglas-Peucker tolerance in mask px (0: exact pixel edges); regions under ``min_area`` px are dropped.
    Class 0 (unknown) is never exported. Properties follow QuPath's annotation import.
    """
    from scipy import ndimage

    mask = _check_mask(mask, classes)
    by_id = {_class_id(entry): entry for entry in classes}
    features: list[dict[str, Any]] = []
    for class_id in np.unique(mask):
        if class_id == 0:
            continue
        entry = by_id[int(class_id)]
        classification = {"name": str(entry["name"]), "color": [int(v) for v in _rgb(entry)]}
        labels, _ = ndimage.label(mask == class_id)  # 4-connected: ndimage's default cross structure
        for index, box in enumerate(ndimage.find_objects(labels), start=1):
            region = labels[box] == index  # (h, w) bool crop of one region
            area = int(region.sum())
            if area < min_area:
                continue
            rings = _trace_rings(region)  # each (n, 2) float, closed, in crop px
            rings.sort(key=lambda ring: -abs(_signed_area(ring)))  # the exterior encloses the most area
            offset = np.array([box[1].start, box[0].start], dtype=np.float64)
            coordinates = []
            for ring in rings:
                if simplify > 0:
                    ring = _simplify_ring(ring, simplify)
                coordinates.append(_format_ring((ring + offset) * scale))
            features.append(
                {
                    "type": "Feature",
                    "geometry": {"type": "Polygon", "coordinates": coordinates},
                    "properties": {
                        "objectType": "annotation",
                        "classification": classification,
                        "classId": int(class_id),
                        "area_px": area,
                    },
                }
            )
    return {"type": "FeatureCollection", "features": features}


def write_geojson(
    path: str | os.PathLike,
    mask: np.ndarray,
    classes: Sequence[dict[str, Any]],
    *,
    scale: float = 1.0,
    simplify: float = 0.5,
    min_area: int = 1,
) -> Path:
    """Write the class polygons of a mask as a GeoJSON file (see ``mask_to_geojson``), atomically."""
    collection = mask_to_geojson(mask, classes, scale=scale, simplify=simplify, min_area=min_area)
    with atomic_path(path, suffix=".geojson") as tmp:
        tmp.write_text(json.dumps(collection, separators=(",", ":")) + "\n", encoding="utf-8")
    return Path(path)


def rasterize_geojson(collection: dict[str, Any], shape: tuple[int, int], *, scale: float = 1.0) -> np.ndarray:
    """(H, W) uint8 class-id mask from ``mask_to_geojson`` output (pixel centres inside exterior, outside holes)."""
    from skimage.draw import polygon as fill_polygon

    mask = np.zeros(shape, dtype=np.uint8)
    for feature in collection["features"]:
        geometry = feature["geometry"]
        polygons = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
        region = np.zeros(shape, dtype=bool)
        for rings in polygons:
            for index, ring in enumerate(rings):
                xy = np.asarray(ring, dtype=np.float64) / scale - 0.5  # pixel corners -> skimage's pixel centres
                rr, cc = fill_polygon(xy[:, 1], xy[:, 0], shape=shape)
                region[rr, cc] = index == 0  # exterior fills, holes clear
        mask[region] = feature["properties"]["classId"]
    return mask


# --- internals -----------------------------------------------------------------------------------------------------


def _class_id(entry: dict[str, Any]) -> int:
    """The id of a class-table entry, checked to be a uint8 value."""
    try:
        class_id = int(entry["id"])
    except (KeyError, TypeError, ValueError):
        raise HistosynthError(f"class table entry {entry!r} has no integer 'id'") from None
    if not 0 <= class_id <= 255:
        raise HistosynthError(f"class id {class_id} is outside 0..255")
    return class_id


def _rgb(entry: dict[str, Any]) -> tuple[int, int, int]:
    """The colour of a class-table entry as (r, g, b) ints from [r, g, b] or '#rrggbb'."""
    color = entry.get("color")
    try:
        if isinstance(color, str):
            text = color.lstrip("#")
            if len(text) != 6:
                raise ValueError
            rgb = tuple(int(text[i : i + 2], 16) for i in (0, 2, 4))
        else:
            rgb = tuple(int(v) for v in color)
        if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
            raise ValueError
    except (TypeError, ValueError):
        name = entry.get("name", entry.get("id"))
        raise HistosynthError(f"class {name!r}: color {color!r} is not [r, g, b] or '#rrggbb'") from None
    return rgb  # type: ignore[return-value]


def _check_mask(mask: np.ndarray, classes: Sequence[dict[str, Any]]) -> np.ndarray:
    """The mask as (H, W) uint8, every non-zero id present in the class table, or a HistosynthError."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise HistosynthError(f"a mask must be a (H, W) array of class ids, got shape {mask.shape}")
    if not np.issubdtype(mask.dtype, np.integer):
        raise HistosynthError(f"a mask must hold integer class ids, got {mask.dtype}")
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise HistosynthError("a mask must hold class ids in 0..255")
    mask = mask.astype(np.uint8, copy=False)
    known = {_class_id(entry) for entry in classes} | {0}
    missing = sorted(set(np.unique(mask).tolist()) - known)
    if missing:
        raise HistosynthError(f"mask holds class ids {missing} that are not in the class table")
    return mask


def _trace_rings(region: np.ndarray) -> list[np.ndarray]:
    """Closed rings (n, 2) of (x, y) pixel-corner coordinates along the edges between region and background.

    Every boundary edge is directed with the region on its right on screen; following the edges gives the exterior
    clockwise on screen (counter-clockwise in numbers) and holes the other way. At a corner where two region pixels
    touch only diagonally the trace turns right, keeping them apart (4-connectivity).
    """
    padded = np.pad(region, 1)  # (h+2, w+2): every ring closes inside the crop
    inside = padded[1:-1, 1:-1]
    r, c = np.nonzero(inside & ~padded[:-2, 1:-1])  # top edges, heading east from (c, r)
    starts = [np.stack([c, r], 1)]
    directions = [np.zeros(len(r), dtype=np.int64)]
    r, c = np.nonzero(inside & ~padded[1:-1, 2:])  # right edges, heading south from (c+1, r)
    starts.append(np.stack([c + 1, r], 1))
    directions.append(np.full(len(r), 1))
    r, c = np.nonzero(inside & ~padded[2:, 1:-1])  # bottom edges, heading west from (c+1, r+1)
    starts.append(np.stack([c + 1, r + 1], 1))
    directions.append(np.full(len(r), 2))
    r, c = np.nonzero(inside & ~padded[1:-1, :-2])  # left edges, heading north from (c, r+1)
    starts.append(np.stack([c, r + 1], 1))
    directions.append(np.full(len(r), 3))
    start = np.concatenate(starts)  # (E, 2) x, y
    direction = np.concatenate(directions)  # (E,)
    end = start + _STEPS[direction]

    # Successor of every edge: the edge leaving its end vertex; where two leave (a diagonal touch), the right turn.
    stride = region.shape[1] + 2
    start_key = start[:, 1] * stride + start[:, 0]
    end_key = end[:, 1] * stride + end[:, 0]
    order = np.argsort(start_key * 4 + direction, kind="stable")
    sorted_keys = start_key[order]
    first = np.searchsorted(sorted_keys, end_key, side="left")
    count = np.searchsorted(sorted_keys, end_key, side="right") - first
    successor = order[first]
    ambiguous = np.nonzero(count == 2)[0]
    if len(ambiguous):
        second = order[first[ambiguous] + 1]
        wants = (direction[ambiguous] + 1) % 4
        successor[ambiguous] = np.where(direction[second] == wants, second, successor[ambiguous])

    rings: list[np.ndarray] = []
    visited = np.zeros(len(start), dtype=bool)
    for seed in range(len(start)):
        if visited[seed]:
            continue
        chain = []
        edge = seed
        while not visited[edge]:
            visited[edge] = True
            chain.append(edge)
            edge = successor[edge]
        chain_arr = np.asarray(chain)
        # Keep only corners: vertices where the direction changes.
        turns = direction[chain_arr] != direction[np.roll(chain_arr, 1)]
        corners = start[chain_arr[turns]].astype(np.float64)  # (n, 2); `inside` indices are unpadded
        rings.append(np.vstack([corners, corners[:1]]))
    return rings


def _signed_area(ring: np.ndarray) -> float:
    """Shoelace area of a closed ring; positive for counter-clockwise in (x, y) numbers."""
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))


def _simplify_ring(ring: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas-Peucker on a closed ring; keeps the original where simplifying would collapse it."""
    if len(ring) <= 5:
        return ring
    # Split at the vertex farthest from the start so neither half is degenerate (start == end).
    far = int(np.argmax(((ring - ring[0]) ** 2).sum(axis=1)))
    simplified = np.vstack([_douglas_peucker(ring[: far + 1], tolerance), _douglas_peucker(ring[far:], tolerance)[1:]])
    if len(simplified) < 4 or abs(_signed_area(simplified)) < 0.5 * abs(_signed_area(ring)):
        return ring
    return simplified


def _douglas_peucker(points: np.ndarray, tolerance: float) -> np.ndarray:
    """Ramer-Douglas-Peucker simplification of an open polyline (n, 2), endpoints kept; iterative, vectorised."""
    keep = np.zeros(len(points), dtype=bool)
    keep[[0, -1]] = True
    xs, ys = points[:, 0], points[:, 1]
    stack = [(0, len(points) - 1)]
    while stack:  # one iteration per kept vertex: numpy per call, so method calls and math over np.* wrappers
        i, j = stack.pop()
        if j <= i + 1:
            continue
        cx, cy = xs[j] - xs[i], ys[j] - ys[i]
        dx, dy = xs[i + 1 : j] - xs[i], ys[i + 1 : j] - ys[i]
        length = math.hypot(cx, cy)
        distance = np.abs(cx * dy - cy * dx) / length if length > 0 else np.hypot(dx, dy)
        k = int(distance.argmax())
        if distance[k] > tolerance:
            keep[i + 1 + k] = True
            stack.append((i, i + 1 + k))
            stack.append((i + 1 + k, j))
    return points[keep]


def _format_ring(ring: np.ndarray) -> list[list[float | int]]:
    """Ring coordinates as JSON lists: ints where exact, else rounded to 1/1000 px (stable, compact output)."""
    rounded = np.round(ring, 3)
    if np.all(rounded == np.round(rounded)):
        return rounded.astype(np.int64).tolist()
    return rounded.tolist()
