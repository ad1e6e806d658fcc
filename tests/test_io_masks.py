"""Mask outputs: colour preview, overlay, QuPath GeoJSON polygons with holes, Deep Zoom export."""
from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.draw import disk, polygon as fill_polygon

from histosynth.errors import HistosynthError
from histosynth.io.dzi import dzi_level_count, dzi_level_dimensions, dzi_tile, export_dzi
from histosynth.io.masks import (
    colorize,
    mask_to_geojson,
    overlay,
    rasterize_geojson,
    write_geojson,
    write_mask_preview,
)
from histosynth.io.tiff import iter_rows, write_pyramid

CLASSES = [
    {"id": 0, "name": "unknown", "color": [0, 0, 0]},
    {"id": 1, "name": "tumour", "color": [200, 0, 0]},
    {"id": 2, "name": "stroma", "color": "#00c800"},
]


def ring_mask() -> np.ndarray:
    """A tumour disc with a stroma-filled hole, a separate stroma blob, and two tumour pixels touching diagonally."""
    mask = np.zeros((120, 160), dtype=np.uint8)
    mask[disk((60, 60), 45, shape=mask.shape)] = 1
    mask[disk((60, 60), 18, shape=mask.shape)] = 0  # the hole
    mask[disk((60, 60), 10, shape=mask.shape)] = 2  # an island inside the hole
    rr, cc = fill_polygon([20, 100, 110, 30], [120, 110, 150, 155], shape=mask.shape)
    mask[rr, cc] = 2
    mask[5, 140] = mask[6, 141] = 1
    return mask


def rasterise_features(features: list[dict], shape: tuple[int, int], scale: float = 1.0) -> dict[str, int]:
    """Pixel counts per class name from polygons, rasterised at pixel centres with holes subtracted."""
    counts: dict[str, int] = {}
    for feature in features:
        region = np.zeros(shape, dtype=bool)
        for index, ring in enumerate(feature["geometry"]["coordinates"]):
            xy = np.asarray(ring, dtype=float) / scale - 0.5  # pixel-corner coordinates -> pixel centres
            rr, cc = fill_polygon(xy[:, 1], xy[:, 0], shape=shape)
            region[rr, cc] = index == 0
        name = feature["properties"]["classification"]["name"]
        counts[name] = counts.get(name, 0) + int(region.sum())
    return counts


def test_geojson_with_hole_round_trips(tmp_path: Path):
    mask = ring_mask()
    path = write_geojson(tmp_path / "mask.geojson", mask, CLASSES)
    collection = json.loads(path.read_text())
    assert collection["type"] == "FeatureCollection"
    features = collection["features"]
    for feature in features:
        assert feature["type"] == "Feature"
        assert feature["geometry"]["type"] == "Polygon"
        assert feature["properties"]["objectType"] == "annotation"
        assert set(feature["properties"]["classification"]) == {"name", "color"}
    names = sorted(f["properties"]["classification"]["name"] for f in features)
    assert names == ["stroma", "stroma", "tumour", "tumour", "tumour"]  # class 0 never exported
    disc = max(features, key=lambda f: f["properties"]["area_px"])
    assert len(disc["geometry"]["coordinates"]) == 2  # exterior + the hole
    assert disc["properties"]["classification"]["color"] == [200, 0, 0]

    counts = rasterise_features(features, mask.shape)
    for class_id, name in ((1, "tumour"), (2, "stroma")):
        expected = int((mask == class_id).sum())
        assert abs(counts[name] - expected) <= 0.01 * expected

    # Exact pixel edges without simplification: the mask comes back pixel for pixel.
    exact = mask_to_geojson(mask, CLASSES, simplify=0)
    np.testing.assert_array_equal(rasterize_geojson(exact, mask.shape), mask)


def test_geojson_rings_follow_rfc7946_orientation():
    mask = ring_mask()
    for feature in mask_to_geojson(mask, CLASSES, simplify=0)["features"]:
        rings = [np.asarray(ring, dtype=float) for ring in feature["geometry"]["coordinates"]]
        for index, ring in enumerate(rings):
            assert (ring[0] == ring[-1]).all()  # closed
            area = 0.5 * (np.dot(ring[:-1, 0], ring[1:, 1]) - np.dot(ring[1:, 0], ring[:-1, 1]))
            assert area > 0 if index == 0 else area < 0


def test_geojson_hand_checked_square_and_scale():
    mask = np.zeros((4, 5), dtype=np.uint8)
    mask[1:3, 2:4] = 1  # a 2x2 square: columns 2-3, rows 1-2
    features = mask_to_geojson(mask, CLASSES, scale=4)["features"]
    assert len(features) == 1
    assert features[0]["geometry"]["coordinates"] == [[[8, 4], [16, 4], [16, 12], [8, 12], [8, 4]]]
    # Level-0 slide px from a mask at 1/4 resolution: rasterising at the slide's size gives 16x the pixels.
    counts = rasterise_features(features, (16, 20), scale=1.0)
    assert counts == {"tumour": 64}


def test_diagonal_pixels_are_separate_regions():
    mask = np.zeros((3, 3), dtype=np.uint8)
    mask[0, 0] = mask[1, 1] = 1
    features = mask_to_geojson(mask, CLASSES)["features"]
    assert len(features) == 2
    np.testing.assert_array_equal(rasterize_geojson({"features": features}, mask.shape), mask)


def test_scaled_geojson_round_trips_at_slide_resolution():
    mask = ring_mask()
    collection = mask_to_geojson(mask, CLASSES, scale=2.0)
    counts = rasterise_features(collection["features"], (240, 320), scale=1.0)
    for class_id, name in ((1, "tumour"), (2, "stroma")):
        expected = 4 * int((mask == class_id).sum())
        assert abs(counts[name] - expected) <= 0.01 * expected


def test_preview_and_overlay(tmp_path: Path):
    mask = ring_mask()
    preview = colorize(mask, CLASSES)
    assert preview.shape == (*mask.shape, 3)
    assert preview[60, 20].tolist() == [200, 0, 0] and preview[60, 60].tolist() == [0, 200, 0]
    path = write_mask_preview(tmp_path / "preview.png", mask, CLASSES)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), preview)

    rgb = np.full((*mask.shape, 3), 100, dtype=np.uint8)
    blended = overlay(rgb, mask, CLASSES, alpha=0.5)
    assert blended[60, 20].tolist() == [150, 50, 50]  # 0.5 * 100 + 0.5 * (200, 0, 0)
    assert blended[0, 0].tolist() == [100, 100, 100]  # unknown keeps the image


def test_bad_masks_are_clear_errors():
    with pytest.raises(HistosynthError, match="not in the class table"):
        colorize(np.full((4, 4), 7, dtype=np.uint8), CLASSES)
    with pytest.raises(HistosynthError, match=r"\(H, W\)"):
        mask_to_geojson(np.zeros((4, 4, 3), dtype=np.uint8), CLASSES)
    with pytest.raises(HistosynthError, match="color"):
        colorize(np.zeros((2, 2), np.uint8), [{"id": 1, "name": "x", "color": "red"}])


def test_dzi_export(tmp_path: Path):
    width, height = 600, 300
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    slide = write_pyramid(tmp_path / "slide.tif", width, height, iter_rows(image), mpp=0.5, compression="deflate")
    descriptor = export_dzi(slide, tmp_path / "dzi")
    assert descriptor == tmp_path / "dzi" / "slide.dzi"

    root = ElementTree.parse(descriptor).getroot()
    ns = "{http://schemas.microsoft.com/deepzoom/2008}"
    assert root.tag == f"{ns}Image"
    assert root.get("TileSize") == "254" and root.get("Overlap") == "1" and root.get("Format") == "jpeg"
    size = root.find(f"{ns}Size")
    assert (size.get("Width"), size.get("Height")) == ("600", "300")

    levels = math.ceil(math.log2(max(width, height))) + 1
    assert dzi_level_count(width, height) == levels == 11
    files = tmp_path / "dzi" / "slide_files"
    assert sorted(int(p.name) for p in files.iterdir()) == list(range(levels))
    assert dzi_level_dimensions(width, height)[0] == (1, 1)
    top = files / str(levels - 1)
    assert sorted(p.name for p in top.iterdir()) == ["0_0.jpeg", "0_1.jpeg", "1_0.jpeg", "1_1.jpeg", "2_0.jpeg",
                                                      "2_1.jpeg"]
    assert Image.open(top / "0_0.jpeg").size == (255, 255)  # overlap on the right and bottom only
    assert Image.open(top / "1_1.jpeg").size == (256, 47)  # 300 - 254 + 1 rows
    assert (files / "0" / "0_0.jpeg").exists()

    import tiffslide

    with tiffslide.TiffSlide(slide) as opened:
        np.testing.assert_array_equal(dzi_tile(opened, levels - 1, 1, 0), image[0:255, 253:509])
        half = dzi_tile(opened, levels - 2, 0, 0)  # 300x150 level: one tile
        assert half.shape == (150, 255, 3)
    again = export_dzi(slide, tmp_path / "dzi2")
    assert (top / "1_1.jpeg").read_bytes() == (again.parent / "slide_files" / str(levels - 1) / "1_1.jpeg").read_bytes()
