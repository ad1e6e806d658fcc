"""Slide-label conditioning of the mask model (DiffInfinite's subtype prompt): labels from `prepare --slide-labels`,
carried by label-map crops, a label-conditioned mask model trained and sampled from the CLI, and clear refusals."""
import json

import torch

from histosynth.data.dataset import LabelmapCrops
from histosynth.data.samples import png_path, svs_path
from histosynth.models.bundle import load_bundle
from histosynth.pipelines.masks import label_condition, sample_mask_scores
from cli_runner import cli  # noqa: F401  (fixture)
from tiny_models import tiny_image_model

torch.set_num_threads(1)


def test_slide_labels_condition_the_mask_model(tmp_path, cli):
    labels = tmp_path / "labels.csv"
    labels.write_text(f"{svs_path().name},skin\n{png_path().name},carcinoma\n")
    cases = tmp_path / "cases.csv"  # one case: both slides split into bands, so both have training regions
    cases.write_text(f"{svs_path().name},c1\n{png_path().name},c1\n")
    code, text = cli(["prepare", svs_path(), png_path(), "--source-mpp", "0.25", "--out", tmp_path / "ds", "--mpp",
                      "1.0", "--patch", "32", "--auto-labels", "--slide-labels", labels, "--cases", cases])
    assert code == 0, text
    index = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert [s["label"] for s in index["sources"]] == ["skin", "carcinoma"]
    crops = LabelmapCrops(tmp_path / "ds", crop=4, length=30)
    assert {crops[i]["source"] for i in range(30)} == {0, 1}

    code, text = cli(["train", "mask", "--data", tmp_path / "ds", "--out", tmp_path / "mask", "--crop", 4,
                      "--steps", 2, "--batch-size", 4, "--checkpoint-every", 0, "--slide-labels"])
    assert code == 0, text
    model = load_bundle(tmp_path / "mask")
    assert model.config["labels"] == ["carcinoma", "skin"] and "global_projection" in model.components
    assert model.min_region_um2 == 2500.0  # the region labels' smallest region, carried into the model
    assert torch.equal(label_condition(model, "skin")["label"], torch.tensor([[0.0, 1.0]]))
    skin, _ = sample_mask_scores(model, (8, 8), steps=2, seed=1, label="skin")
    tumour, _ = sample_mask_scores(model, (8, 8), steps=2, seed=1, label="carcinoma")
    free, counts = sample_mask_scores(model, (8, 8), steps=2, seed=1)
    assert skin.shape == (1, 3, 8, 8) and not torch.equal(skin, tumour) and not torch.equal(skin, free)
    labelled_counts = sample_mask_scores(model, (8, 8), steps=2, seed=1, label="skin")[1]
    assert labelled_counts["mask_unet_evals"] == 2 * counts["mask_unet_evals"]  # label and null passes

    image = tiny_image_model(tmp_path / "image", patch=32, classes=index["classes"])
    code, text = cli(["generate", "--model", image, "--mask-model", tmp_path / "mask", "--size", "64x64",
                      "--steps", 1, "--mask-steps", 1, "--mask-label", "lymph", "--out", tmp_path / "x.tiff"])
    assert code == 2 and "--mask-label lymph: the mask model knows carcinoma, skin" in text
    assert not (tmp_path / "x.tiff").exists()
    code, text = cli(["generate", "--model", image, "--mask-model", tmp_path / "mask", "--size", "64x64",
                      "--steps", 1, "--mask-steps", 1, "--mask-label", "skin", "--out", tmp_path / "s.tiff"])
    assert code == 0, text
    from histosynth.io.tiff import read_provenance

    assert read_provenance(tmp_path / "s.tiff")["settings"]["mask_label"] == "skin"


def test_mask_label_needs_a_label_conditioned_mask_model(tmp_path, cli):
    from tiny_models import tiny_mask_model

    code, text = cli(["generate", "--model", tiny_image_model(tmp_path / "image", patch=32), "--mask-model",
                      tiny_mask_model(tmp_path / "mask"), "--size", "64x64", "--steps", 1, "--mask-label", "skin",
                      "--out", tmp_path / "x.tiff"])
    assert code == 2 and "trained without slide labels" in text
    code, text = cli(["generate", "--model", tmp_path / "image", "--size", "64x64", "--steps", 1,
                      "--mask-label", "skin", "--out", tmp_path / "y.tiff"])
    assert code == 2 and "--mask-label steers the mask model: give --mask-model" in text
