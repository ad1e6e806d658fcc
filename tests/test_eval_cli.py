"""``histosynth evaluate`` end to end on folders of small PNGs, and its one-line errors."""
import json
import re

import pytest
from test_eval_support import image_folder, make_dataset

from histosynth.cli import main
from histosynth.eval.evaluation_report import METRIC_KEYS


def run(argv):
    """Run the CLI in-process; return its exit code (0 when it returns normally)."""
    try:
        main(argv)
    except SystemExit as exit_:
        return exit_.code
    return 0


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    return {"train": image_folder(root / "train", 40, seed=0), "test": image_folder(root / "test", 25, seed=1),
            "holdout": image_folder(root / "holdout", 25, seed=2),
            "generated": image_folder(root / "generated", 30, seed=3, shift=0.05), "root": root}


def test_evaluate_end_to_end_on_png_folders(folders, capsys):
    out = folders["root"] / "report"
    code = run(["evaluate", "--generated", str(folders["generated"]), "--real-train", str(folders["train"]),
                "--real-test", str(folders["test"]), "--real-holdout", str(folders["holdout"]),
                "--ct-k", "1", "--c2st-steps", "4", "--c2st-folds", "2", "--out", str(out)])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    # The two-sample test ran for both pairs of sets (its accuracy after 4 steps says nothing yet).
    assert 0 <= metrics["c2st"] <= 1 and 0 <= metrics["c2st_reference"] <= 1
    assert metrics["c2st_folds"] == 2 and metrics["c2st_n_per_set"] == 25  # balanced to the smaller set
    assert list(metrics)[:len(METRIC_KEYS)] == list(METRIC_KEYS)
    assert all(v is None or isinstance(v, (int, float)) for k, v in metrics.items() if k != "features")  # flat
    assert metrics["features"] == "stain-texture"
    assert (metrics["n_generated"], metrics["n_real_train"], metrics["n_real_test"]) == (30, 40, 25)
    for key in ("fid", "fid_reference", "kid", "precision", "recall", "authenticity", "authenticity_reference", "ct"):
        assert isinstance(metrics[key], float), key
    assert metrics["fid"] > metrics["fid_reference"]  # the generated set is shifted
    assert metrics["ct_cells"] >= 1
    assert "fid" in capsys.readouterr().out

    page = (out / "report.html").read_text()
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) >= 4 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert 'src="http' not in page and "href=" not in page and "<script" not in page


def test_evaluate_picks_dataset_splits(tmp_path):
    dataset = make_dataset(tmp_path / "ds", {"train": 30, "test": 20, "holdout": 20})
    generated = make_dataset(tmp_path / "gen", {"train": 20}, seed=9)
    out = tmp_path / "report"
    assert run(["evaluate", "--generated", str(generated), "--real-train", str(dataset), "--ct-k", "1",
                "--adherence", "--adherence-steps", "2", "--no-c2st", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["mask_miou"] <= 1 and 0 <= metrics["mask_miou_reference"] <= 1
    assert (metrics["n_generated"], metrics["n_real_train"], metrics["n_real_test"]) == (20, 30, 20)
    assert metrics["n_real_holdout"] == 20 and metrics["authenticity_reference"] is not None
    assert metrics["c2st"] is None and metrics["c2st_reference"] is None  # --no-c2st


def test_empty_folder_is_a_one_line_error(folders, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = run(["evaluate", "--generated", str(tmp_path / "empty"), "--real-train", str(folders["train"]),
                "--real-test", str(folders["test"]), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and "no PNG/JPEG images" in err[-1]
    assert not (tmp_path / "r" / "metrics.json").exists()


def test_too_few_samples_says_how_many(folders, tmp_path, capsys):
    few = image_folder(tmp_path / "few", 4, seed=5)
    code = run(["evaluate", "--generated", str(few), "--real-train", str(folders["train"]),
                "--real-test", str(folders["test"]), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "generated: 4 images" in err and "needs at least 6" in err


def test_mixed_sizes_are_a_one_line_error(folders, tmp_path, capsys):
    mixed = image_folder(tmp_path / "mixed", 8, seed=6)
    image_folder(tmp_path / "big", 1, seed=7, size=48)
    (tmp_path / "big" / "000.png").rename(mixed / "zz.png")
    code = run(["evaluate", "--generated", str(mixed), "--real-train", str(folders["train"]),
                "--real-test", str(folders["test"]), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "zz.png: image is 48x48 px" in err


def test_fid_in_an_ssl_encoder_space_and_encoder_misuse(folders, tmp_path, capsys):
    from test_embedding import save_encoder

    encoder = save_encoder(tmp_path / "enc", size=32)
    out = tmp_path / "report"
    code = run(["evaluate", "--generated", str(folders["generated"]), "--real-train", str(folders["train"]),
                "--real-test", str(folders["test"]), "--features", "embedding", "--encoder", str(encoder),
                "--no-c2st", "--ct-k", "1", "--out", str(out)])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["features"] == "embedding" and metrics["fid"] > 0 and metrics["fid_reference"] > 0
    code = run(["evaluate", "--generated", str(folders["generated"]), "--real-train", str(folders["train"]),
                "--real-test", str(folders["test"]), "--encoder", str(encoder), "--out", str(tmp_path / "r2")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "--encoder goes with --features embedding" in err and not (tmp_path / "r2").exists()
