"""Paired dataset synthesis: the output is a dataset PatchDataset reads, pairs align, each pair is a pure
function of (seed, index), and bad input is a one-line error."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from histosynth.data.dataset import PatchDataset
from histosynth.data.labels import AUTO_CLASSES
from histosynth.data.prepare import prepare_dataset
from histosynth.data.samples import png_path
from histosynth.pipelines.synthesize import SynthesizeSettings, elastic_deform, synthesize_dataset
from cli_runner import cli  # noqa: F401  (fixture)
from test_style import tiny_style_model
from tiny_models import tiny_image_model, tiny_mask_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    data = root / "data"
    prepare_dataset([png_path()], data, 1.0, 32, source_mpp=0.25, auto_labels_=True, progress=False)
    model = tiny_style_model(root / "model", classes=AUTO_CLASSES, patch=16, mpp=1.0)
    styles = root / "styles"
    styles.mkdir()
    for name in sorted((data / "images").iterdir())[:3]:
        (styles / name.name).write_bytes(name.read_bytes())
    return data, model, styles


def test_synthesized_pairs_load_with_patchdataset(tmp_path, inputs, cli):
    data, model, styles = inputs
    out = tmp_path / "synthetic"
    code, text = cli(["synthesize", "--model", model, "--n", "5", "--out", out, "--layouts", data,
                      "--styles", styles, "--batch", "2", "--steps", "2", "--seed", "3"])
    assert code == 0, text
    dataset = PatchDataset(out)
    assert len(dataset) == 5
    index = json.loads((out / "dataset.json").read_text())
    assert index["classes"] == AUTO_CLASSES and index["mpp"] == 1.0 and index["patch_size"] == 16
    known = {c["id"] for c in index["classes"]}
    for i in range(5):
        item = dataset[i]
        assert item["image"].shape == (3, 16, 16) and item["mask"].shape == (16, 16) and bool(item["labelled"])
        assert set(item["mask"].unique().tolist()) <= known
    assert all(s["synthetic"] and s["path"].endswith(f"images/{s['id']:06d}.png") for s in index["sources"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert [m["index"] for m in manifest["items"]] == list(range(5))
    first = manifest["items"][0]
    assert first["layout"]["kind"] == "dataset" and first["layout"]["mask"].startswith("masks/")
    assert len(first["style"]) == 2 and all(str(styles) in s for s in first["style"])
    assert isinstance(first["seed"], int) and manifest["settings"]["seed"] == 3


def test_each_pair_depends_only_on_seed_and_index(tmp_path, inputs):
    data, model, styles = inputs
    settings = dict(seed=1, batch=2, steps=2)
    synthesize_dataset(model, tmp_path / "a", SynthesizeSettings(n=3, **settings), layouts=data, styles=[styles],
                       progress=False)
    synthesize_dataset(model, tmp_path / "b", SynthesizeSettings(n=4, **settings), layouts=data, styles=[styles],
                       progress=False)
    for i in range(3):  # item 2 is padded in run a and batched with item 3 in run b: same pixels
        for folder in ("images", "masks"):
            name = f"{folder}/{i:06d}.png"
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    items = [json.loads((tmp_path / run / "manifest.json").read_text())["items"] for run in "ab"]
    assert items[0] == items[1][:3]


def test_layouts_from_the_mask_model(tmp_path, cli):
    model = tiny_image_model(tmp_path / "image", patch=32)
    code, text = cli(["synthesize", "--model", model, "--n", "2", "--out", tmp_path / "out", "--mask-model",
                      tiny_mask_model(tmp_path / "mask"), "--steps", "2"])
    assert code == 0, text
    dataset = PatchDataset(tmp_path / "out")
    assert len(dataset) == 2 and dataset[1]["mask"].shape == (32, 32) and int(dataset[1]["mask"].max()) <= 2
    layout = json.loads((tmp_path / "out" / "manifest.json").read_text())["items"][0]["layout"]
    assert layout["kind"] == "mask-model" and isinstance(layout["seed"], int)


def test_elastic_deformation_keeps_class_ids():
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 2
    deformed = elastic_deform(mask, 0.05, np.random.default_rng(0))
    assert deformed.shape == mask.shape and set(np.unique(deformed)) <= {0, 2}
    assert not np.array_equal(deformed, mask) and abs(int((deformed == 2).sum()) - 256) < 64


@pytest.mark.parametrize("case", ["no-layouts", "both-layouts", "exists", "empty-styles", "plain-model"])
def test_bad_input_is_one_line_error(tmp_path, inputs, cli, case):
    data, model, styles = inputs
    out = tmp_path / "out"
    args = ["synthesize", "--model", model, "--n", "1", "--out", out, "--steps", "1"]
    if case == "no-layouts":
        expected = "give either --layouts"
    elif case == "both-layouts":
        args += ["--layouts", data, "--mask-model", tiny_mask_model(tmp_path / "mask")]
        expected = "not both"
    elif case == "exists":
        out.mkdir()
        args += ["--layouts", data]
        expected = "already exists"
    elif case == "empty-styles":
        (tmp_path / "empty").mkdir()
        args += ["--layouts", data, "--styles", tmp_path / "empty"]
        expected = "no style images"
    else:
        plain = tiny_image_model(tmp_path / "plain", patch=32)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "s.png")
        args = ["synthesize", "--model", plain, "--n", "1", "--out", out, "--mask-model",
                tiny_mask_model(tmp_path / "mask"), "--styles", tmp_path / "s.png"]
        expected = "not trained with style conditioning"
    code, text = cli(args)
    lines = [line for line in text.splitlines() if line.startswith("error")]
    assert code == 2 and len(lines) == 1 and expected in lines[0], text
    if case != "exists":
        assert not out.exists()


def test_each_pair_takes_its_style_set_from_one_style_source(tmp_path, inputs):
    """STEDM's protocol: the style set of a pair is drawn from one style image or slide, never a mix of sources."""
    from histosynth.data.samples import svs_path

    data, model, styles = inputs
    synthesize_dataset(model, tmp_path / "out", SynthesizeSettings(n=8, batch=4, steps=1, seed=5), layouts=data,
                       styles=[svs_path(), styles], progress=False)
    items = json.loads((tmp_path / "out" / "manifest.json").read_text())["items"]
    sources = [{label.split("#crop")[0] for label in item["style"]} for item in items]
    assert all(len(found) == 1 for found in sources)  # one source per pair
    assert len(set().union(*sources)) > 1  # and different pairs draw different sources
    assert all(len(item["style"]) == 2 for item in items)
