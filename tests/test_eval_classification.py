"""Downstream classification benchmark on tiny settings: end to end, identical arms, a sanity check with noise
images as the "synthetic" set, and bad input."""
import csv
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from histosynth.cli import app
from histosynth.errors import HistosynthError
from histosynth.eval.classification import ClassifierConfig, classification_benchmark, classification_scores

torch.set_num_threads(1)
COLOURS = {1: (110, 60, 150), 2: (230, 150, 190), 3: (235, 235, 235)}  # nuclei, stroma, background
NAMES = {1: "nuclei", 2: "stroma", 3: "background"}


def one_class_dataset(root, splits, seed=0, size=24):
    """A §5 dataset whose every patch is one class (its colour plus noise): dominant class = colour."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    patches = []
    for split, count in splits.items():
        for i in range(count):
            c = i % 3 + 1
            image = np.clip(np.array(COLOURS[c]) + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            name = f"{split}_{i:03d}.png"
            Image.fromarray(image).save(root / "images" / name)
            Image.fromarray(np.full((size, size), c, np.uint8)).save(root / "masks" / name)
            patches.append({"image": f"images/{name}", "mask": f"masks/{name}", "source": i % 2, "x": size * i,
                            "y": 0, "split": split})
    meta = {"version": 1, "classes": [{"id": c, "name": n} for c, n in NAMES.items()], "mpp": 0.5,
            "patch_size": size, "patches": patches,
            "sources": [{"id": s, "path": f"slide{s}.svs", "width": 999, "height": 999} for s in range(2)]}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def labelled_folder(root, images, labels):
    root.mkdir(parents=True)
    with open(root / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "label"])
        for i, (image, label) in enumerate(zip(images, labels)):
            Image.fromarray(image).save(root / f"{i:03d}.png")
            writer.writerow([f"{i:03d}.png", label])
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cls")
    real = one_class_dataset(root / "real", {"train": 18, "test": 12})
    rng = np.random.default_rng(5)
    noise = labelled_folder(root / "noise", list(rng.integers(0, 256, (24, 24, 24, 3), dtype=np.uint8)),
                            [NAMES[i % 3 + 1] for i in range(24)])
    return {"root": root, "real": real, "noise": noise}


def test_scores_hand_computed():
    scores = classification_scores([0, 0, 0, 1], [0, 0, 1, 1], 2)
    assert scores["balanced_accuracy"] == pytest.approx((2 / 3 + 1) / 2)
    assert scores["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)  # class 0: P 1, R 2/3; class 1: P 1/2, R 1


def test_cli_end_to_end_with_identical_arms(data):
    out = data["root"] / "report"
    synthetic = one_class_dataset(data["root"] / "synthetic", {"train": 9}, seed=3)
    result = CliRunner().invoke(app, ["benchmark", "classification", "--data", str(data["real"]), "--synthetic",
                                      str(synthetic), "--labelled", "6", "--seeds", "2", "--steps", "3",
                                      "--batch-size", "4", "--backbone", "test_efficientnet", "--external",
                                      str(data["noise"]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "(a) real" in result.output and "(b) real+synthetic" in result.output and "(c) synthetic" in result.output
    saved = json.loads((out / "classification.json").read_text())
    assert saved["classes"] == ["background", "nuclei", "stroma"] and saved["settings"]["labelled"] == 6
    configs = [arm["config"] for arm in saved["arms"].values()]
    assert list(saved["arms"]) == ["real", "real+synthetic", "synthetic"]
    assert configs[0] == configs[1] == configs[2] and configs[0]["steps"] == 3 and configs[0]["batch_size"] == 4
    assert [run["n_train"] for run in saved["arms"]["real"]["runs"]] == [6, 6]
    assert [run["n_train"] for run in saved["arms"]["real+synthetic"]["runs"]] == [15, 15]
    for arm in saved["arms"].values():
        assert len(arm["runs"]) == 2 and set(arm["summary"]) == {"real_test", "external"}
        assert set(arm["summary"]["real_test"]["per_source"]) == {"slide0.svs", "slide1.svs"}
    page = (out / "report.html").read_text()
    assert all(s.startswith("data:image/png;base64,") for s in re.findall(r'src="([^"]*)"', page))


def test_each_arm_trains_on_exactly_its_own_images(data):
    """(a) the n real patches of its seed, (b) the same plus every extra image, (c) the extra images alone — so (c)
    cannot see a real label. Whether noise images help or hurt a trained classifier is a statistical question:
    `benchmarks/classification.py --noise-control` measures it (noise as the extra set: (b) ≈ (a), (c) ≈ chance)."""
    config = ClassifierConfig(steps=1, batch_size=2, backbone="test_efficientnet")
    result = classification_benchmark(data["real"], synthetic=data["noise"], labelled=6, seeds=2, config=config)
    assert [run["n_train"] for run in result.arms["real"]["runs"]] == [6, 6]
    assert [run["n_train"] for run in result.arms["real+synthetic"]["runs"]] == [30, 30]
    assert [run["n_train"] for run in result.arms["synthetic"]["runs"]] == [24, 24]
    assert result.settings["n_extra"] == 24 and result.settings["labelled"] == 6
    assert {result.arms[arm]["config"]["steps"] for arm in result.arms} == {1}
    for arm in result.arms:
        scores = result.arms[arm]["summary"]["real_test"]["balanced_accuracy"]
        assert len(scores) == 2 and 0 <= scores[0] <= 1


def test_variations_inherit_their_reference_label(data, tmp_path):
    variations = tmp_path / "variations"
    real_images = sorted((data["real"] / "images").glob("train_*.png"))[:4]
    for reference in real_images:
        folder = variations / reference.stem
        folder.mkdir(parents=True)
        Image.open(reference).save(folder / "variation-00.png")
        (folder / "variations.json").write_text(json.dumps({"reference": str(reference),
                                                            "files": ["variation-00.png"]}))
    result = classification_benchmark(data["real"], variations=variations, labelled=4, seeds=1,
                                      config=ClassifierConfig(steps=1, batch_size=2, backbone="test_efficientnet"))
    assert result.settings["n_extra"] == 4
    # seed 0 draws 4 of the 18 real patches; (b) adds only the variations of those
    chosen = np.sort(np.random.default_rng(0).choice(18, 4, replace=False))
    expected = 4 + sum(1 for i in chosen if i < 4)
    assert result.arms["real+synthetic"]["runs"][0]["n_train"] == expected


def test_bad_input_one_line_errors(data, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(bare / "a.png")
    unknown = labelled_folder(tmp_path / "unknown", [np.zeros((24, 24, 3), np.uint8)], ["tumour"])
    cases = [(["--synthetic", str(data["noise"]), "--external", str(bare)], "no labels.csv"),
             (["--synthetic", str(unknown)], "labels tumour are not among the real training labels"),
             (["--synthetic", str(data["noise"]), "--target", "colour"], "unknown --target 'colour'")]
    for extra, message in cases:
        result = CliRunner().invoke(app, ["benchmark", "classification", "--data", str(data["real"]),
                                          "--out", str(tmp_path / "r"), "--steps", "1", *extra])
        assert isinstance(result.exception, HistosynthError), result.output
        assert message in str(result.exception)
        assert not (tmp_path / "r").exists()
