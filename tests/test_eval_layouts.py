"""Layout realism (eval/layouts.py), the classifier two-sample test (eval/c2st.py), the sharpness measure
(eval/sharpness.py) and `histosynth evaluate-layouts` end to end with a tiny mask model."""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from histosynth.errors import HistosynthError
from histosynth.eval.c2st import C2STConfig, classifier_two_sample_test
from histosynth.eval.layouts import (largest_differences, layout_statistics, one_hot_crops, relative_differences,
                                     within_tolerance)
from histosynth.eval.sharpness import high_frequency_ratio, high_frequency_share
from cli_runner import cli  # noqa: F401  (fixture)

torch.set_num_threads(1)


def test_layout_statistics_hand_computed():
    mask = np.array([[1, 1, 2, 2],
                     [1, 1, 2, 2],
                     [3, 3, 3, 3],
                     [0, 3, 2, 2]], np.uint8)  # at 2 µm/px: 4 µm² per pixel
    stats = layout_statistics([mask], num_classes=3, mpp=2.0)
    assert stats["class_fractions"] == pytest.approx({1: 4 / 15, 2: 6 / 15, 3: 5 / 15})
    # Class 2: two regions (4 px and 2 px) -> median 3 px = 12 µm²; class 1: one of 4 px; class 3: one of 5 px.
    assert stats["component_um2"] == pytest.approx({1: 16.0, 2: 12.0, 3: 20.0})
    area_mm2 = 16 * 4 / 1e6
    assert stats["components_per_mm2"] == pytest.approx({1: 1 / area_mm2, 2: 2 / area_mm2, 3: 1 / area_mm2})
    # Borders between known pixels of different classes: rows 0-1 one each (1|2), row 3 one (3|2): 3 horizontal;
    # columns: 1/3, 1/3, 2/3, 2/3 between rows 1-2, and 3/2, 3/2 between rows 2-3 (0 is unknown): 6 vertical.
    assert stats["boundary_um_per_mm2"] == pytest.approx(9 * 2.0 / area_mm2)


def test_relative_differences_and_tolerance():
    real = {"class_fractions": {1: 0.5, 2: 0.49, 3: 0.01}, "component_um2": {1: 100.0, 2: 200.0, 3: 5.0},
            "components_per_mm2": {1: 10.0, 2: 10.0, 3: 1.0}, "boundary_um_per_mm2": 1000.0}
    generated = {"class_fractions": {1: 0.6, 2: 0.4, 3: 0.0}, "component_um2": {1: 110.0, 2: 100.0, 3: 50.0},
                 "components_per_mm2": {1: 12.0, 2: 10.0, 3: 9.0}, "boundary_um_per_mm2": 1200.0}
    diff = relative_differences(generated, real)
    assert set(diff["class_fractions"]) == {1, 2}  # class 3 holds under 2 % of the real pixels: not compared
    assert diff["class_fractions"][1] == pytest.approx(0.2) and diff["component_um2"][2] == pytest.approx(0.5)
    assert diff["boundary_um_per_mm2"] == pytest.approx(0.2)
    checks = within_tolerance(diff)
    assert checks["boundary_um_per_mm2"] and checks["components_per_mm2"] and not checks["component_um2"]
    assert not checks["all"]


def test_largest_differences_take_each_statistic_s_maximum_over_classes_compared_in_all():
    first = {"boundary_um_per_mm2": 0.1, "class_fractions": {1: 0.2, 2: 0.05}, "component_um2": {1: 0.3, 2: 0.9},
             "components_per_mm2": {1: 0.0, 2: 0.4}}
    second = {"boundary_um_per_mm2": 0.3, "class_fractions": {1: 0.1}, "component_um2": {1: 0.5},
              "components_per_mm2": {1: 0.2}}
    largest = largest_differences([first, second])
    assert largest == {"boundary_um_per_mm2": 0.3, "class_fractions": {1: 0.2}, "component_um2": {1: 0.5},
                       "components_per_mm2": {1: 0.2}}  # class 2 was compared in one draw only
    assert largest_differences([first]) == first
    with pytest.raises(HistosynthError, match="no differences"):
        largest_differences([])


def test_one_hot_crops_drop_the_unknown_class():
    crops = one_hot_crops([np.array([[0, 1], [2, 2]], np.uint8)], 2)
    assert crops.shape == (1, 2, 2, 2)
    np.testing.assert_array_equal(crops[0, 0], [[0, 1], [0, 0]])
    np.testing.assert_array_equal(crops[0, 1], [[0, 0], [1, 1]])


def _stripes(n, seed, period):
    rng = np.random.default_rng(seed)
    x = np.arange(16)
    base = np.sign(np.sin(2 * np.pi * (x[None, :] + rng.integers(0, period, (n, 1))) / period))  # (n, 16)
    return np.repeat(base[:, None, None, :], 16, 2).repeat(3, 1).astype(np.float32)  # (n, 3, 16, 16) stripes


def test_two_sample_test_separates_different_sets_and_is_seeded():
    config = C2STConfig(folds=2, steps=60, batch_size=16, seed=3)
    fine, coarse = _stripes(20, 0, 2), _stripes(24, 1, 8)  # 1 px stripes against 4 px stripes
    result = classifier_two_sample_test(fine, coarse, config)
    assert result["n_per_set"] == 20 and len(result["fold_accuracies"]) == 2  # the larger set is subsampled
    assert result["accuracy_mean"] >= 0.9, result
    assert classifier_two_sample_test(fine, coarse, config) == result
    with pytest.raises(HistosynthError, match="at least 4 samples"):
        classifier_two_sample_test(fine[:3], coarse, config)
    with pytest.raises(HistosynthError, match="one shape"):
        classifier_two_sample_test(fine, coarse[:, :2], config)
    with pytest.raises(HistosynthError, match="square"):
        classifier_two_sample_test(fine[..., :8], coarse[..., :8], config)


def test_high_frequency_share_and_ratio():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (4, 32, 32, 3)).astype(np.uint8)
    checker = ((np.indices((32, 32)).sum(0) % 2) * 255).astype(np.uint8)[None, :, :, None].repeat(3, -1)
    smooth = np.repeat(np.linspace(0, 255, 32)[None, :], 32, 0).astype(np.uint8)[None, :, :, None].repeat(3, -1)
    flat = np.full((1, 32, 32, 3), 128, np.uint8)
    assert high_frequency_share(checker)[0] > 0.95  # all energy at Nyquist
    assert high_frequency_share(smooth)[0] < 0.01
    assert high_frequency_share(flat)[0] == 0
    blurred = ndimage.gaussian_filter(noise.astype(float), sigma=(0, 2, 2, 0), mode="wrap")
    assert high_frequency_ratio(blurred, noise) < 0.05  # a σ = 2 px blur leaves < 1 % of the power above 1/4
    assert high_frequency_ratio(noise, noise) == pytest.approx(1.0)
    with pytest.raises(HistosynthError, match="no high-frequency energy"):
        high_frequency_ratio(noise, flat)


# ------------------------------------------------------------------------------------------------ the command
@pytest.fixture(scope="module")
def layout_data(tmp_path_factory):
    from histosynth.data.prepare import prepare_dataset
    from histosynth.data.samples import svs_path
    from histosynth.models.bundle import save_bundle
    from histosynth.models.denoiser import build_unet, make_train_scheduler

    root = tmp_path_factory.mktemp("layouts")
    prepare_dataset([svs_path()], root / "data", 2.0, 32, auto_labels="regions", progress=False)  # maps: 16 µm/px
    index = json.loads((root / "data" / "dataset.json").read_text())
    torch.manual_seed(0)
    unet = build_unet("tiny", 3, 3, 8, kind="mask_unet")
    config = {"kind": "mask", "classes": index["classes"], "num_classes": 3, "mpp": 2.0, "mask_mpp": 16.0,
              "latent_factor": 8, "latent_patch": 8, "patch_size": 64, "conditioning": {}}
    save_bundle(root / "mask", config, {"unet": unet}, make_train_scheduler(), "# card")
    return root


def test_evaluate_layouts_command(layout_data, tmp_path, cli):
    code, text = cli(["evaluate-layouts", "--mask-model", layout_data / "mask", "--data", layout_data / "data",
                      "--n", 10, "--steps", 2, "--c2st-steps", 3, "--out", tmp_path / "report"])
    assert code == 0, text
    result = json.loads((tmp_path / "report" / "layouts.json").read_text())
    assert result["mpp"] == 16.0 and result["crop_px"] == 8 and result["n"] == 10
    assert set(result["real"]["class_fractions"]) == {"1", "2", "3"}  # JSON keys
    assert result["real"]["n_masks"] == result["generated"]["n_masks"] == 10
    assert 0 <= result["c2st"]["accuracy_mean"] <= 1 and len(result["c2st_real_vs_real"]["fold_accuracies"]) == 5
    picture = np.asarray(Image.open(tmp_path / "report" / "layouts.png"))
    assert picture.shape == (16, 8 * 8, 3)  # real crops above, generated below
    assert "two-sample classifier accuracy" in text and "within 25% of real" in text
    compared = 1 + sum(len(result["relative_difference"][key])
                       for key in ("class_fractions", "component_um2", "components_per_mm2"))
    assert result["real_draws"] == 5 and len(re.findall(r"real draws \d+%\)", text)) == compared  # one per statistic


def test_evaluate_layouts_real_draws_are_the_largest_differences_of_other_real_crops(layout_data):
    from histosynth.pipelines.evaluate_layouts import evaluate_layouts, real_layout_crops

    result = evaluate_layouts(layout_data / "mask", layout_data / "data", n=10, steps=1, seed=4, real_draws=3,
                              c2st=C2STConfig(folds=2, steps=2, batch_size=4))
    downsample = 1  # the label maps are already at the mask model's 16 µm/px
    reference = layout_statistics(real_layout_crops(layout_data / "data", 8, 10, "train", downsample, 4), 3, 16.0)
    assert result["real"] == reference
    draws = [layout_statistics(real_layout_crops(layout_data / "data", 8, 10, "train", downsample, 4 + k), 3, 16.0)
             for k in (1, 2, 3)]
    expected = largest_differences([relative_differences(draw, reference) for draw in draws])
    assert result["real_draws"] == 3 and result["real_vs_real_difference"] == expected
    assert expected != largest_differences([relative_differences(draws[0], reference)])  # three draws, not one


def test_evaluate_layouts_refuses_an_image_model(layout_data, tmp_path, cli):
    from tiny_models import tiny_image_model

    code, text = cli(["evaluate-layouts", "--mask-model", tiny_image_model(tmp_path / "image"), "--data",
                      layout_data / "data", "--out", tmp_path / "report"])
    assert code == 2 and "not a mask model" in text and not (tmp_path / "report").exists()


def test_single_patch_layouts_are_each_one_patch_of_the_model_and_refuse_other_crops(layout_data, tmp_path, cli):
    from histosynth.models.bundle import load_bundle
    from histosynth.pipelines.evaluate_layouts import generated_layout_crops
    from histosynth.pipelines.masks import sample_mask_scores

    model = load_bundle(layout_data / "mask", kind="mask")
    crops = generated_layout_crops(model, 8, 3, steps=2, seed=5, single_patches=True)
    seeds = np.random.default_rng(5).integers(0, 2**31 - 1, 3)
    for crop, seed in zip(crops, seeds):
        scores, _ = sample_mask_scores(model, (8, 8), sampler="tiles", steps=2, seed=int(seed))
        np.testing.assert_array_equal(crop, scores[0].argmax(0).numpy() + 1)
    assert len(crops) == 3 and crops[0].shape == (8, 8)
    code, text = cli(["evaluate-layouts", "--mask-model", layout_data / "mask", "--data", layout_data / "data",
                      "--single-patches", "--crop", 16, "--out", tmp_path / "report"])
    assert code == 2 and "--single-patches" in text and "8 px patches" in text
    assert not (tmp_path / "report").exists()
    code, text = cli(["evaluate-layouts", "--mask-model", layout_data / "mask", "--data", layout_data / "data",
                      "--single-patches", "--context", 2, "--out", tmp_path / "report"])
    assert code == 2 and "without canvas context" in text and not (tmp_path / "report").exists()
