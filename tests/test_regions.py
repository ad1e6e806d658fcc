"""Region-level weak labels (data/regions.py): class maps, merging, smooth sampling, cluster order, and `prepare`
with --auto-labels regions on the bundled skin slide."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from histosynth.data.labels import auto_label_thresholds, auto_labels
from histosynth.data.regions import (
    fit_regions,
    merge_small_regions,
    region_classes,
    region_map,
    sample_regions,
)
from histosynth.data.samples import svs_path
from histosynth.data.slides import open_slide
from histosynth.errors import HistosynthError
from cli_runner import cli  # noqa: F401  (fixture)


def test_region_classes_name_background_then_compartments_by_cellularity():
    assert [c["name"] for c in region_classes(3)] == ["unknown", "background", "stroma", "cellular"]
    assert [c["name"] for c in region_classes(5)][2:] == ["stroma", "intermediate 1", "intermediate 2", "cellular"]
    assert [c["id"] for c in region_classes(4)] == [0, 1, 2, 3, 4]
    assert [c["name"] for c in region_classes(2)] == ["unknown", "background", "tissue"]
    with pytest.raises(HistosynthError, match="at least 2"):
        region_classes(1)


def test_small_regions_join_their_surroundings():
    regions = np.full((12, 12), 2, np.uint8)
    regions[1:3, 1:3] = 3  # 4 cells: merged
    regions[6:9, 6:9] = 3  # 9 cells: kept
    regions[0, 11] = 1  # a lone background cell in the corner: merged
    merged = merge_small_regions(regions, min_cells=5)
    expected = np.full((12, 12), 2, np.uint8)
    expected[6:9, 6:9] = 3
    np.testing.assert_array_equal(merged, expected)
    np.testing.assert_array_equal(merge_small_regions(regions, min_cells=1), regions)


def test_generated_layouts_keep_the_labels_smallest_region():
    from histosynth.pipelines.masks import merge_small_layout_regions

    scores = torch.full((1, 3, 12, 12), -1.0)
    scores[0, 1] = 1.0  # class index 1 everywhere ...
    scores[0, 2, 1:3, 1:3] = 2.0  # ... but a 4-cell speck of class 2: merged
    scores[0, 2, 6:9, 6:9] = 2.0  # and a 9-cell region of class 2: kept
    merged = merge_small_layout_regions(scores, min_cells=5)
    expected = torch.ones((12, 12), dtype=torch.long)
    expected[6:9, 6:9] = 2
    assert torch.equal(merged[0].argmax(0), expected)
    speck = torch.zeros((12, 12), dtype=torch.bool)
    speck[1:3, 1:3] = True
    assert torch.equal(merged[..., ~speck], scores[..., ~speck])  # nothing else moves
    assert torch.allclose(merged[0, 1][speck], torch.tensor(2.1))  # lifted just above the speck's best score
    assert merge_small_layout_regions(scores, min_cells=4) is scores  # no region that small: untouched


def test_a_mask_model_samples_by_its_labels_region_rule(tmp_path):
    from histosynth.models.bundle import load_bundle
    from histosynth.pipelines.masks import sample_mask_scores
    from tiny_models import tiny_mask_model

    model = load_bundle(tiny_mask_model(tmp_path / "mask"))
    torch.manual_seed(0)
    for parameter in model.unet.parameters():  # an untrained model's layouts are specks: the case at hand
        parameter.data.normal_(0, 0.3)
    raw, _ = sample_mask_scores(model, (24, 40), steps=2, seed=3)
    model.config["min_region_um2"] = 8 * 4.0 ** 2  # 8 cells at the model's 4 µm/px
    kept, _ = sample_mask_scores(model, (24, 40), steps=2, seed=3)

    def smallest(scores):
        labels = scores[0].argmax(0).numpy()
        return min(np.bincount(ndimage.label(labels == v, np.ones((3, 3)))[0].ravel())[1:].min()
                   for v in np.unique(labels))

    assert smallest(raw) < 8 <= smallest(kept)


def test_sampled_windows_follow_the_cells_with_smooth_borders():
    regions = np.array([[2, 3]], np.uint8)  # two cells, each 8 level-0 px wide
    window = sample_regions(regions, (0, 0), (16, 8), scale=1.0, cell=8.0, num_classes=3)
    assert window.shape == (8, 16)
    np.testing.assert_array_equal(window[0], [2] * 8 + [3] * 8)
    finer = sample_regions(regions, (0, 0), (32, 4), scale=2.0, cell=8.0, num_classes=3)  # 2 px per level-0 px
    np.testing.assert_array_equal(finer[0], [2] * 16 + [3] * 16)
    offset = sample_regions(regions, (4, 0), (8, 2), scale=1.0, cell=8.0, num_classes=3)  # straddles the border
    np.testing.assert_array_equal(offset[0], [2] * 4 + [3] * 4)
    # A diagonal border is interpolated, not a staircase of whole cells.
    diagonal = np.array([[2, 2, 3], [2, 3, 3], [3, 3, 3]], np.uint8)
    smooth = sample_regions(diagonal, (0, 0), (24, 24), scale=1.0, cell=8.0, num_classes=3)
    staircase = np.repeat(np.repeat(diagonal, 8, 0), 8, 1)
    assert 0 < (smooth != staircase).sum() < 64


def test_clusters_are_ordered_by_nuclear_fraction():
    """Two synthetic compartments: the one with more nuclei becomes the last ('cellular') class."""
    sums = np.zeros((5, 40, 40), np.float32)
    sums[0] = 64  # every cell is tissue (8×8 px)
    sums[1, :, :20] = 40  # left half: many nuclear pixels
    sums[1, :, 20:] = 4
    for channel, (left, right) in zip((2, 3, 4), ((50, 75), (30, 25), (-20, -5))):  # L*, a*, b* × 64 px
        sums[channel, :, :20], sums[channel, :, 20:] = left * 64, right * 64
    model = fit_regions([sums], 3, cell_mpp=4.0, factor=8, seed=0, sigma_um=4.0, min_region_um2=16.0)
    regions = region_map(sums, model)
    assert (regions[:, :15] == 3).all() and (regions[:, 25:] == 2).all()
    assert set(np.unique(regions)) == {2, 3}


@pytest.fixture(scope="module")
def skin(tmp_path_factory):
    from histosynth.cli import main

    out = tmp_path_factory.mktemp("regions") / "ds"
    main(["prepare", str(svs_path()), "--out", str(out), "--mpp", "1.0", "--patch", "64", "--auto-labels",
          "--label-fraction", "1"])
    return out


def test_prepare_regions_gives_coherent_compartments_on_the_skin_slide(skin):
    index = json.loads((skin / "dataset.json").read_text())
    assert [c["name"] for c in index["classes"]] == ["unknown", "background", "stroma", "cellular"]
    assert index["labels"] == {"kind": "regions", "min_region_um2": 2500.0}  # what a mask model's layouts keep
    regions = np.asarray(Image.open(skin / index["sources"][0]["labelmap"]))  # 8 µm/px
    assert set(np.unique(regions)) == {1, 2, 3}

    slide = open_slide(svs_path())
    width, height = slide.size_at(1.0)
    rgb = slide.read_region(0, 0, width, height, 1.0)
    colour = auto_labels(rgb, auto_label_thresholds(slide.thumbnail(2.0)))  # per-pixel colour labels, 1 µm/px
    cells = colour[:regions.shape[0] * 8, :regions.shape[1] * 8]
    # Coherent: a handful of regions per class, where per-pixel colour labels make thousands of specks.
    for value in (2, 3):
        _, regions_count = ndimage.label(regions == value, np.ones((3, 3)))
        _, specks = ndimage.label(cells == value, np.ones((3, 3)))
        assert regions_count <= 12 and specks > 50 * regions_count, (value, regions_count, specks)
    # Meaningful: nuclei-coloured pixels are far denser in 'cellular' regions than in 'stroma' ones.
    upsampled = np.repeat(np.repeat(regions, 8, 0), 8, 1)
    nuclear = {name: float((cells[upsampled == value] == 3).mean()) for value, name in ((2, "stroma"), (3, "cellular"))}
    assert nuclear["cellular"] > 2 * nuclear["stroma"], nuclear
    # Patch masks carry the same compartments, with borders finer than a label-map cell.
    masks = [np.asarray(Image.open(skin / p["mask"])) for p in index["patches"] if p["mask"]]
    assert set(np.unique(np.concatenate([m.ravel() for m in masks]))) == {1, 2, 3}


def test_prepare_region_class_count_and_its_misuse(tmp_path, cli):
    code, text = cli(["prepare", svs_path(), "--out", tmp_path / "four", "--mpp", "2.0", "--patch", "32",
                      "--auto-labels", "regions", "--classes", "4"])
    assert code == 0, text
    names = [c["name"] for c in json.loads((tmp_path / "four" / "dataset.json").read_text())["classes"]]
    assert names == ["unknown", "background", "stroma", "intermediate 1", "cellular"]
    code, text = cli(["prepare", svs_path(), "--out", tmp_path / "bad", "--mpp", "2.0", "--patch", "32",
                      "--auto-labels", "colour", "--classes", "4"])
    assert code == 2 and "goes with --auto-labels regions" in text and not (tmp_path / "bad").exists()


def test_a_mask_model_takes_context_and_shared_norms_when_asked(tmp_path):
    from histosynth.errors import HistosynthError
    from histosynth.models.bundle import load_bundle
    from histosynth.pipelines.masks import sample_mask_scores
    from tiny_models import tiny_mask_model

    model = load_bundle(tiny_mask_model(tmp_path / "mask"))
    plain, counts = sample_mask_scores(model, (24, 40), steps=2, seed=3)
    again, _ = sample_mask_scores(model, (24, 40), steps=2, seed=3, context=model.context_step)
    shared, shared_counts = sample_mask_scores(model, (24, 40), steps=2, seed=3, shared_norms=2)
    assert plain.shape == again.shape == shared.shape == (1, 2, 24, 40)
    assert not torch.equal(plain, again) and not torch.equal(plain, shared)
    assert shared_counts["mask_unet_evals"] == counts["mask_unet_evals"] + 2 * 2  # a sample of 2 at each step
    with pytest.raises(HistosynthError, match="--mask-context 9: the mask model takes 0 to 8 px in steps of 1"):
        sample_mask_scores(model, (24, 40), steps=2, seed=3, context=9)
