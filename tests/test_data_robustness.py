"""Data layer edge cases: padding, resolution tags, ink-robust weak labels, overlapping strides, label rasters and
annotation files for several slides, dataset index errors, per-worker augmentation."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from histosynth.data import dataset as dataset_module
from histosynth.data.dataset import LabelmapCrops, PatchDataset, load_dataset_index
from histosynth.data.labels import auto_label_thresholds, auto_labels, rasterize_features
from histosynth.data.prepare import prepare_dataset
from histosynth.data.samples import png_path, svs_path
from histosynth.data.slides import open_slide
from histosynth.data.tiling import choose_holdout, drop_overlapping, patch_grid
from histosynth.errors import HistosynthError
from cli_runner import cli  # noqa: F401  (fixture)


def _boxes(index, split):
    """(source, x0, y0, x1, y1) level-0 boxes of one split's patches."""
    out = []
    for p in index["patches"]:
        if p["split"] == split:
            size = index["patch_size"] * index["mpp"] / index["sources"][p["source"]]["source_mpp"]
            out.append((p["source"], p["x"], p["y"], p["x"] + size, p["y"] + size))
    return out


def _strict_overlap(a, b):
    return a[0] == b[0] and a[1] < b[3] and b[1] < a[3] and a[2] < b[4] and b[2] < a[4]


def _small_png(path, corner=(0, 0), side=256):
    pixels = np.asarray(Image.open(png_path()))[corner[1]:corner[1] + side, corner[0]:corner[0] + side]
    Image.fromarray(pixels).save(path)
    return path


@pytest.mark.parametrize("path,mpp", [(svs_path(), None), (png_path(), 0.25)])
def test_outside_the_slide_is_white(path, mpp):
    slide = open_slide(path, mpp)
    w, h = slide.dimensions
    corner = slide.read_region(-16, -16, 32, 32, slide.mpp)  # (32, 32, 3)
    assert (corner[:16] == 255).all() and (corner[:, :16] == 255).all()
    np.testing.assert_array_equal(corner[16:, 16:], slide.read_region(0, 0, 16, 16, slide.mpp))
    far = slide.read_region(w - 8, h - 8, 16, 16, slide.mpp)
    assert (far[8:] == 255).all() and (far[:, 8:] == 255).all()


def test_tiff_resolution_tags(tmp_path):
    pixels = np.asarray(Image.open(png_path()))[:64, :64]
    Image.fromarray(pixels).save(tmp_path / "screen.tif", dpi=(72, 72))  # a screen default, not a scanner's
    Image.fromarray(pixels).save(tmp_path / "scan.tif", dpi=(50800, 50800))  # 0.5 µm/px
    with pytest.raises(HistosynthError, match="screen.tif: no resolution"):
        open_slide(tmp_path / "screen.tif")
    assert open_slide(tmp_path / "screen.tif", source_mpp=0.3).mpp == 0.3
    with open_slide(tmp_path / "scan.tif") as slide:
        assert slide.mpp == pytest.approx(0.5)


@pytest.mark.parametrize("path,mpp,box", [(svs_path(), None, (1400, 1000, 640, 640)),
                                          (png_path(), 0.25, (0, 0, 500, 500))])
def test_weak_labels_survive_ink_at_full_resolution(path, mpp, box):
    """The SVS region holds ink specks whose haematoxylin is ~20x a nucleus's; they must not decide the threshold."""
    slide = open_slide(path, mpp)
    rgb = slide.read_region(*box, 0.5)  # (h, w, 3) at the usual patch resolution
    labels = auto_labels(rgb, auto_label_thresholds(rgb))
    tissue = np.isin(labels, (2, 3)).sum()
    assert 0.10 <= (labels == 3).sum() / tissue <= 0.35
    assert all((labels == k).mean() > 0.03 for k in (1, 2, 3))


def test_overlapping_stride_keeps_holdout_and_test_pixels_out_of_training(tmp_path):
    out = tmp_path / "ds"
    summary = prepare_dataset([png_path()], out, 0.5, 32, source_mpp=0.25, stride=16, holdout_fraction=0.2,
                              seed=1, progress=False)
    index = load_dataset_index(out / "dataset.json")  # the file itself is accepted too
    train = _boxes(index, "train")
    assert sum(_strict_overlap(a, b) for a in train[:50] for b in train) > 50  # stride < patch: train overlaps
    for split in ("val", "test", "holdout"):
        assert _boxes(index, split), split
        assert not any(_strict_overlap(a, b) for a in _boxes(index, split) for b in train), split
    holdout = _boxes(index, "holdout")
    assert not any(_strict_overlap(a, b) for i, a in enumerate(holdout) for b in holdout[i + 1:])
    assert summary["unlabelled"] == summary["patches"] and all(p["mask"] is None for p in index["patches"])
    with pytest.raises(HistosynthError, match="no label maps"):
        LabelmapCrops(out, crop=8)


def test_grid_and_holdout_scale_to_a_whole_slide():
    tissue = np.ones((200, 200), bool)
    patches = patch_grid(0, (20000, 20000), 128.0, 64.0, tissue, 0.01, 0.5)  # 311² overlapping patches
    assert len(patches) == 311 * 311
    # At this scale a pairwise overlap check takes minutes: the suite's time limit is what catches a regression.
    holdout = choose_holdout(patches, 0.1 * 0.25, np.random.default_rng(0))
    kept = drop_overlapping(patches, holdout)
    assert len(holdout) == round(len(patches) * 0.025)
    # Each holdout patch removes itself and its overlapping training neighbours (up to 3×3 at stride P/2).
    assert len(patches) - 9 * len(holdout) <= len(kept) < len(patches)


def test_label_raster_keeps_rare_classes_and_rejects_unknown_ids(tmp_path, cli):
    slide = _small_png(tmp_path / "slide.png")  # 256² px at 0.25 µm/px
    raster = np.full((64, 64), 2, np.uint8)  # a quarter of the slide's resolution
    raster[:, :8] = 1
    raster[40:42, 40:42] = 7  # 8×8 slide px: rare, but a class
    Image.fromarray(raster).save(tmp_path / "labels.png")
    out = tmp_path / "ds"
    prepare_dataset([slide], out, 0.5, 32, source_mpp=0.25, labels=tmp_path / "labels.png", test_fraction=0.25,
                    val_fraction=0.0, holdout_fraction=0.0, progress=False)
    index = load_dataset_index(out)
    assert [c["id"] for c in index["classes"]] == [0, 1, 2, 7]
    for p in index["patches"]:
        mask = np.asarray(Image.open(out / p["mask"]))
        x, y = p["x"] // 4, p["y"] // 4  # raster px of the patch's corner (4 slide px per raster px)
        np.testing.assert_array_equal(mask[::2, ::2], raster[y:y + 16, x:x + 16])  # nearest, 2 mask px per raster px
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps([{"id": 1, "name": "glass"}, {"id": 2, "name": "tissue"}]))
    code, text = cli(["prepare", slide, "--out", tmp_path / "bad", "--mpp", "0.5", "--patch", "32", "--source-mpp",
                      "0.25", "--labels", tmp_path / "labels.png", "--classes", classes])
    assert code == 2 and "labels.png: class id 7 is not in the class map" in text and not (tmp_path / "bad").exists()


def _square(name, x0, y0, side):
    ring = [[x0, y0], [x0 + side, y0], [x0 + side, y0 + side], [x0, y0 + side], [x0, y0]]
    return {"type": "Feature", "properties": {"classification": {"name": name}},
            "geometry": {"type": "Polygon", "coordinates": [ring]}}


def test_annotations_for_several_slides_come_from_a_folder(tmp_path, cli):
    slides = [_small_png(tmp_path / "a.png"), _small_png(tmp_path / "b.png", corner=(500, 500))]
    folder = tmp_path / "annotations"
    folder.mkdir()
    (folder / "a.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [_square("tumour", 0, 0, 256)]}))
    (folder / "b.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [_square("stroma", 0, 0, 256)]}))
    common = ["--mpp", "0.5", "--patch", "32", "--source-mpp", "0.25", "--min-tissue", "0"]
    code, text = cli(["prepare", *slides, "--out", tmp_path / "one", "--annotations", folder / "a.geojson", *common])
    assert code == 2 and "a.geojson: one annotation file for 2 slides" in text
    assert not (tmp_path / "one").exists()
    code, text = cli(["prepare", *slides, "--out", tmp_path / "ds", "--annotations", folder, *common])
    assert code == 0, text
    index = load_dataset_index(tmp_path / "ds")
    ids = {c["name"]: c["id"] for c in index["classes"]}
    for p in index["patches"]:
        mask = np.asarray(Image.open(tmp_path / "ds" / p["mask"]))
        assert (mask == ids["tumour" if p["source"] == 0 else "stroma"]).all()
    (folder / "b.geojson").unlink()
    code, text = cli(["prepare", *slides, "--out", tmp_path / "ds2", "--annotations", folder, *common])
    assert code == 2 and "no annotation file for slide 'b.png'" in text


def test_rasterising_a_window_matches_cropping_the_whole():
    features = [
        _square("tumour", 5.5, 7.25, 90),
        {"type": "Feature", "properties": {"classification": "stroma"},
         "geometry": {"type": "GeometryCollection", "geometries": [
             {"type": "Polygon", "coordinates": [[[100, 100], [145, 105], [120, 145], [100, 100]]]},
             {"type": "LineString", "coordinates": [[0, 0], [10, 10]]}]}},
    ]
    classes = [{"id": 0, "name": "unknown"}, {"id": 1, "name": "tumour"}, {"id": 2, "name": "stroma"}]
    whole = rasterize_features(features, classes, (300, 300), 2.0)  # 2 output px per level-0 px
    window = rasterize_features(features, classes, (160, 140), 2.0, origin=(60, 70))  # crosses both shapes
    np.testing.assert_array_equal(window, whole[140:280, 120:280])
    assert (whole == 2).sum() > 0 and (whole == 1).sum() == pytest.approx(180 * 180, rel=0.01)


def test_dataset_index_errors(tmp_path):
    with pytest.raises(HistosynthError, match="dataset folder not found"):
        load_dataset_index(tmp_path / "none")
    (tmp_path / "dataset.json").write_text("{")
    with pytest.raises(HistosynthError, match="dataset.json: broken JSON"):
        load_dataset_index(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"version": 99, "classes": [], "mpp": 1, "patch_size": 8,
                                                        "sources": [], "patches": []}))
    with pytest.raises(HistosynthError, match="newer"):
        load_dataset_index(tmp_path)


def test_dataloader_workers_draw_their_own_augmentations(tmp_path, monkeypatch):
    out = tmp_path / "ds"
    prepare_dataset([_small_png(tmp_path / "s.png")], out, 0.5, 32, source_mpp=0.25, auto_labels=True,
                    min_tissue=0.0, progress=False)
    dataset = PatchDataset(out, "train", augment=True, stain_jitter=0.05)
    draws = {}
    for worker_seed in (11, 12):
        # What a DataLoader worker sees: the same pickled dataset, a different per-worker (and per-epoch) seed.
        monkeypatch.setattr(dataset_module, "get_worker_info", lambda s=worker_seed: SimpleNamespace(seed=s))
        copy = PatchDataset(out, "train", augment=True, stain_jitter=0.05)
        draws[worker_seed] = torch.stack([copy[0]["image"] for _ in range(4)])
    assert not torch.equal(draws[11], draws[12])
    item = dataset[0]
    assert item["image"].dtype == torch.float32 and item["image"].abs().max() <= 1
    assert item["mask"].dtype == torch.int64 and item["labelled"].dtype == torch.bool
