"""Slides -> dataset: splits without leakage, labels, GeoJSON rasterisation, errors, resampling."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from histosynth.data.dataset import LabelmapCrops, PatchDataset
from histosynth.data.labels import rasterize_features
from histosynth.data.samples import png_path, svs_path
from histosynth.data.slides import open_slide
from cli_runner import cli  # noqa: F401  (fixture)


def boxes(index, split):
    ratio = index["patch_size"] * index["mpp"]
    out = []
    for p in index["patches"]:
        if p["split"] == split:
            size = ratio / index["sources"][p["source"]]["source_mpp"]
            out.append((p["source"], p["x"], p["y"], p["x"] + size, p["y"] + size))
    return out


def overlap(a, b):
    return a[0] == b[0] and a[1] < b[3] - 1 and b[1] < a[3] - 1 and a[2] < b[4] - 1 and b[2] < a[4] - 1


# The skin slide with region labels (background, stroma, cellular), the all-tissue tumour image with colour labels
# (background, stroma, nuclei): it has no background region at all.
@pytest.mark.parametrize("slide,extra", [(svs_path(), ["--auto-labels"]),
                                         (png_path(), ["--auto-labels", "colour", "--source-mpp", "0.25"])])
def test_prepare_bundled_slide(tmp_path, cli, slide, extra):
    out = tmp_path / "ds"
    code, text = cli(["prepare", slide, "--out", out, "--mpp", "0.5", "--patch", "64",
                      "--label-fraction", "0.25", *extra])
    assert code == 0, text
    index = json.loads((out / "dataset.json").read_text())
    splits = {p["split"] for p in index["patches"]}
    assert splits == {"train", "val", "test", "holdout"}
    train = boxes(index, "train")
    for split in ("val", "test", "holdout"):
        assert not any(overlap(a, b) for a in boxes(index, split) for b in train), split
    labelled = [p for p in index["patches"] if p["mask"]]
    assert abs(len(labelled) / len(index["patches"]) - 0.25) < 0.03
    present = set()
    for p in labelled:
        present |= set(np.unique(np.asarray(Image.open(out / p["mask"]))).tolist())
    assert len(present - {0}) >= 3
    assert (out / index["sources"][0]["labelmap"]).exists()
    assert "wrote" in text and "labelled" in text


def test_dataset_reads_back_with_aligned_augmentation(tmp_path, cli):
    out = tmp_path / "ds"
    cli(["prepare", png_path(), "--out", out, "--mpp", "0.5", "--patch", "64", "--auto-labels", "--source-mpp", "0.25"])
    plain = PatchDataset(out, "train")
    item = plain[0]
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert -1 <= item["image"].min() and item["image"].max() <= 1
    assert item["mask"].shape == (64, 64) and item["mask"].dtype == torch.int64 and bool(item["labelled"])
    augmented = PatchDataset(out, "train", augment=True, seed=3)
    for i in range(4):
        a, b = plain[i], augmented[i]
        # The same dihedral transform moved image and mask: find it from the mask and check the image.
        matches = [k for k in range(8) if torch.equal(_dihedral(a["mask"], k), b["mask"])
                   and torch.equal(_dihedral(a["image"], k), b["image"])]
        assert matches
    crops = LabelmapCrops(out, crop=8, length=5)
    assert crops[0]["mask"].shape == (8, 8) and torch.equal(crops[0]["mask"], crops[0]["mask"])


def _dihedral(x, k):
    x = torch.rot90(x, k % 4, dims=(-2, -1))
    return x.flip(-1) if k >= 4 else x


def test_geojson_polygon_with_hole_and_multipolygon_rasterise_to_expected_counts(tmp_path):
    features = [
        {"type": "Feature", "properties": {"classification": {"name": "tumour"}},
         "geometry": {"type": "Polygon", "coordinates": [[[10, 10], [110, 10], [110, 110], [10, 110], [10, 10]],
                                                         [[40, 40], [80, 40], [80, 80], [40, 80], [40, 40]]]}},
        {"type": "Feature", "properties": {"classification": {"name": "stroma"}},
         "geometry": {"type": "MultiPolygon", "coordinates": [
             [[[130, 10], [190, 10], [190, 70], [130, 70], [130, 10]]],
             [[[130, 100], [170, 100], [170, 140], [130, 140], [130, 100]]]]}},
    ]
    classes = [{"id": 0, "name": "unknown"}, {"id": 1, "name": "tumour"}, {"id": 2, "name": "stroma"}]
    mask = rasterize_features(features, classes, (200, 150), 1.0)
    assert abs((mask == 1).sum() - (100 * 100 - 40 * 40)) / (100 * 100 - 40 * 40) < 0.01
    assert abs((mask == 2).sum() - (60 * 60 + 40 * 40)) / (60 * 60 + 40 * 40) < 0.01
    assert (mask[60, 60]) == 0  # the hole


def test_region_at_twice_the_resolution_is_an_area_downsample():
    slide = open_slide(svs_path())
    level0 = slide.read_region(400, 600, 128, 128, slide.mpp).astype(np.float64)
    half = slide.read_region(400, 600, 64, 64, slide.mpp * 2).astype(np.float64)
    expected = level0.reshape(64, 2, 64, 2, 3).mean(axis=(1, 3))
    assert np.abs(half - expected).max() <= 1.0


def _geojson(path, name="tumour", broken=False):
    if broken:
        path.write_text("{not json")
    else:
        path.write_text(json.dumps({"type": "FeatureCollection", "features": [
            {"type": "Feature", "properties": {"classification": {"name": name}},
             "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [500, 0], [500, 500], [0, 0]]]}}]}))
    return path


@pytest.mark.parametrize("case", ["missing", "truncated", "not-image", "unknown-class", "broken-json",
                                  "patch-too-large", "no-source-mpp"])
def test_bad_input_gives_one_line_error_and_no_output(tmp_path, cli, case):
    slide, extra = svs_path(), []
    if case == "missing":
        slide = tmp_path / "nowhere.svs"
        named = "nowhere.svs"
    elif case == "truncated":
        slide = tmp_path / "cut.svs"
        slide.write_bytes(svs_path().read_bytes()[:20000])
        named = "cut.svs"
    elif case == "not-image":
        slide = tmp_path / "text.svs"
        slide.write_text("hello")
        named = "text.svs"
    elif case == "unknown-class":
        classes = tmp_path / "classes.json"
        classes.write_text(json.dumps([{"id": 1, "name": "stroma"}]))
        extra = ["--annotations", _geojson(tmp_path / "a.geojson", "tumour"), "--classes", classes]
        named = "a.geojson"
    elif case == "broken-json":
        extra = ["--annotations", _geojson(tmp_path / "b.geojson", broken=True)]
        named = "b.geojson"
    elif case == "patch-too-large":
        extra = ["--patch", "4096"]
        named = "cmu_small_region.svs"
    else:
        slide = png_path()
        named = "he_tumour_region.png"
    args = ["prepare", slide, "--out", tmp_path / "out", "--mpp", "0.5"]
    args += extra if "--patch" in extra else ["--patch", "64", *extra]
    code, text = cli(args)
    assert code == 2
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], text
    assert "Traceback" not in text
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
