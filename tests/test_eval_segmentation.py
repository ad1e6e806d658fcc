"""Downstream segmentation benchmark and mask adherence on tiny settings."""
import json
import re

import numpy as np
import pytest
from test_eval_support import make_dataset
from typer.testing import CliRunner

from histosynth.cli import app
from histosynth.errors import HistosynthError
from histosynth.eval.adherence import adherence_from_datasets
from histosynth.eval.segmentation import TrainConfig, confusion, scores

TINY = TrainConfig(steps=4, batch_size=4, size="tiny")


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    return {"real": make_dataset(root / "real", {"train": 12, "test": 6, "holdout": 4}, seed=0),
            "synthetic": make_dataset(root / "synthetic", {"train": 8}, seed=1), "root": root}


def test_dice_and_iou_hand_computed():
    target = np.array([[1, 1, 2, 0]])  # (1, 4); 0 = unknown, never scored
    pred = np.array([[1, 2, 2, 1]])
    matrix = confusion(pred, target, num_classes=3)
    assert matrix[1, 1] == 1 and matrix[1, 2] == 1 and matrix[2, 2] == 1 and matrix.sum() == 3
    result = scores(matrix)
    assert result["dice"][1] == pytest.approx(2 / 3) and result["iou"][1] == pytest.approx(1 / 2)
    assert result["dice"][2] == pytest.approx(2 / 3) and result["iou"][2] == pytest.approx(1 / 2)


def test_benchmark_cli_end_to_end(datasets):
    out = datasets["root"] / "report"
    result = CliRunner().invoke(app, ["benchmark", "segmentation", "--data", str(datasets["real"]),
                                      "--synthetic", str(datasets["synthetic"]), "--labelled", "6", "--seeds", "2",
                                      "--steps", "3", "--batch-size", "4", "--size", "tiny", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "(a) real" in result.output and "(b) real+synthetic" in result.output and "(c) synthetic" in result.output
    saved = json.loads((out / "segmentation.json").read_text())
    assert list(saved["arms"]) == ["real", "real+synthetic", "synthetic"]
    for arm in saved["arms"].values():
        assert len(arm["runs"]) == 2
        assert set(arm["summary"]["per_source"]) == {"slide0.svs", "slide1.svs"}
        mean, std = arm["summary"]["mdice"]
        assert 0 <= mean <= 1 and std >= 0
    assert saved["settings"]["labelled"] == 6 and saved["settings"]["steps"] == 3
    page = (out / "report.html").read_text()
    assert all(s.startswith("data:image/png;base64,") for s in re.findall(r'src="([^"]*)"', page))


def test_benchmark_refuses_more_labelled_patches_than_exist(datasets):
    result = CliRunner().invoke(app, ["benchmark", "segmentation", "--data", str(datasets["real"]),
                                      "--synthetic", str(datasets["synthetic"]), "--labelled", "50",
                                      "--out", str(datasets["root"] / "r")])
    assert isinstance(result.exception, HistosynthError)
    assert "has 12 labelled patches" in str(result.exception)


def test_mask_adherence_beside_real_reference(datasets):
    result = adherence_from_datasets(datasets["real"], datasets["synthetic"], TINY)
    assert 0 <= result["miou_generated"] <= 1 and 0 <= result["miou_real"] <= 1
    assert set(result["iou_generated"]) == {1, 2}


def test_synthetic_ratio_and_the_generators_labelled_count(datasets, tmp_path):
    """r·n synthetic pairs per seed in arms (b) and (c); and the real arms train on as many labelled patches as the
    generator learnt from, else a one-line refusal (the synthetic pairs would carry labels the real arm lacks)."""
    from histosynth.eval.segmentation import segmentation_benchmark

    result = segmentation_benchmark(datasets["real"], datasets["synthetic"], labelled=4, seeds=1, config=TINY,
                                    synthetic_ratio=1.5)
    assert result.settings["n_synthetic_used"] == 6 and result.settings["generator_labelled"] is None
    with pytest.raises(HistosynthError, match="--synthetic-ratio 3.0: 12 synthetic pairs for 4 real ones"):
        segmentation_benchmark(datasets["real"], datasets["synthetic"], labelled=4, seeds=1, config=TINY,
                               synthetic_ratio=3.0)
    model = tmp_path / "model"
    model.mkdir()
    (model / "histosynth.json").write_text(json.dumps({"kind": "image", "data": {"labelled_train": 5}}))
    (datasets["synthetic"] / "manifest.json").write_text(json.dumps({"model": str(model)}))
    try:
        with pytest.raises(HistosynthError, match="learnt from 5 labelled training patches, the real arms would "
                                                  "train on 4; compare with --labelled 5"):
            segmentation_benchmark(datasets["real"], datasets["synthetic"], labelled=4, seeds=1, config=TINY)
        matched = segmentation_benchmark(datasets["real"], datasets["synthetic"], labelled=5, seeds=1, config=TINY)
        assert matched.settings["generator_labelled"] == 5 and not matched.settings["labelled_mismatch"]
        allowed = segmentation_benchmark(datasets["real"], datasets["synthetic"], labelled=4, seeds=1, config=TINY,
                                         allow_labelled_mismatch=True)
        assert allowed.settings["labelled_mismatch"] is True
    finally:
        (datasets["synthetic"] / "manifest.json").unlink()
