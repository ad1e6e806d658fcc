"""Feature extraction: sources (folders, datasets, arrays), bad input, named extractors."""
import numpy as np
import pytest
from PIL import Image
from test_eval_support import image_folder, make_dataset, tissue_image

from histosynth.errors import HistosynthError
from histosynth.eval.features import (
    extract_features,
    extractor_names,
    open_images,
    parse_source,
    register_extractor,
    stain_texture_features,
)


def test_stain_texture_from_folder_names_its_space_and_columns(tmp_path):
    folder = image_folder(tmp_path / "imgs", 5, seed=0)
    result = extract_features(folder)
    assert result.values.shape == (5, 45)
    assert result.space == "stain-texture"
    assert len(result.names) == 45 and result.names[0] == "hed_H_mean" and result.names[-1] == "lbp_u8r1_bin9"
    assert result.items[0].endswith("000.png")
    assert np.isfinite(result.values).all()


def test_stain_texture_sees_stain_and_texture_differences():
    rng = np.random.default_rng(0)
    image = tissue_image(rng)[0]
    paler = (255 - (255 - image.astype(float)) * 0.5).astype(np.uint8)  # less stain
    smooth = np.full_like(image, 180)
    rows = stain_texture_features(np.stack([image, paler, smooth]))  # (3, 45)
    names = stain_texture_features.feature_names
    assert rows[1, names.index("hed_H_mean")] < rows[0, names.index("hed_H_mean")]
    assert rows[2, names.index("grad_s1_mean")] < 1e-9 < rows[0, names.index("grad_s1_mean")]


def test_arrays_and_float_arrays_are_accepted():
    rng = np.random.default_rng(1)
    images = [tissue_image(rng)[0] for _ in range(3)]
    a = extract_features(images).values
    b = extract_features([im / 255.0 for im in images]).values
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_dataset_split_and_colon_syntax(tmp_path):
    root = make_dataset(tmp_path / "ds", {"train": 4, "test": 3, "holdout": 2})
    assert len(open_images(root, split="test")) == 3
    assert len(open_images(f"{root}:holdout")) == 2
    assert len(open_images(root)) == 9
    assert parse_source(f"{root}:test", "train") == (root, "test")
    assert parse_source(str(root), "train") == (root, "train")
    with pytest.raises(HistosynthError, match="no patches in this dataset split"):
        open_images(root, split="val")


def test_empty_folder_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(HistosynthError, match="empty: no PNG/JPEG images"):
        extract_features(tmp_path / "empty")


def test_mixed_sizes_are_refused_naming_the_file(tmp_path):
    folder = image_folder(tmp_path / "imgs", 3, seed=0)
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(folder / "zz_big.png")
    with pytest.raises(HistosynthError, match=r"zz_big.png: image is 40x40 px but .*000.png is 32x32 px"):
        open_images(folder)


def test_unreadable_file_is_refused_naming_it(tmp_path):
    folder = image_folder(tmp_path / "imgs", 2, seed=0)
    (folder / "broken.png").write_bytes(b"not a png")
    with pytest.raises(HistosynthError, match="broken.png: cannot read image"):
        extract_features(folder)


def test_register_extractor_plugs_in_a_new_space(tmp_path):
    def factory(device="cpu", weights=None):
        def mean_colour(batch):
            return batch.reshape(len(batch), -1, 3).mean(1)  # (B, 3)
        return mean_colour

    register_extractor("mean-colour", factory)
    assert "mean-colour" in extractor_names()
    result = extract_features(image_folder(tmp_path / "imgs", 4, seed=0), "mean-colour")
    assert result.values.shape == (4, 3) and result.space == "mean-colour" and result.names[0] == "mean-colour_0"
    with pytest.raises(HistosynthError, match="unknown feature extractor 'nope'"):
        extract_features(tmp_path / "imgs", "nope")


def test_inception_never_downloads_and_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.delenv("HISTOSYNTH_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    folder = image_folder(tmp_path / "imgs", 2, seed=0)
    looked = r"Inception weights not found \(looked in: .*torch-home.*--inception-weights"
    with pytest.raises(HistosynthError, match=looked):
        extract_features(folder, "inception")
    with pytest.raises(HistosynthError, match="missing.pth"):
        extract_features(folder, "inception", weights=tmp_path / "missing.pth")


def test_inception_loads_weights_from_a_given_path(tmp_path, monkeypatch):
    # Real weights cannot be fetched here: write a randomly initialised state dict with the right keys instead.
    torch = pytest.importorskip("torch")
    fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    with monkeypatch.context() as patch:
        patch.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        patch.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
        state = fe.FeatureExtractorInceptionV3("random", ["2048"]).state_dict()
    monkeypatch.setattr(fe, "load_state_dict_from_url", lambda *a, **k: pytest.fail("tried to download"))
    weights = tmp_path / "inception.pth"
    torch.save({key: value.half() if value.is_floating_point() else value for key, value in state.items()}, weights)
    result = extract_features(image_folder(tmp_path / "imgs", 2, seed=0), "inception", weights=weights)
    assert result.values.shape == (2, 2048) and result.space == "inception"

    torch.save({"not": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(HistosynthError, match="wrong.pth: not usable Inception-v3 FID weights"):
        extract_features(tmp_path / "imgs", "inception", weights=tmp_path / "wrong.pth")
