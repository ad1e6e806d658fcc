"""Style conditioning (STEDM): aggregation, joint training of the encoder, style sets by rule, bad input."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from histosynth.conditions.style import StyleEncoder, build_style_encoder
from histosynth.data.crops import load_style_images
from histosynth.train.sources import StyleSource, style_source
from histosynth.data.prepare import prepare_dataset
from histosynth.data.samples import png_path, svs_path
from histosynth.errors import HistosynthError
from histosynth.models.autoencoder import build_autoencoder
from histosynth.models.bundle import image_model_config, load_bundle, save_bundle
from histosynth.models.denoiser import (
    ConditionedDenoiser,
    DiffusionObjective,
    GlobalProjection,
    build_unet,
    make_train_scheduler,
    time_embedding_width,
)
from cli_runner import cli  # noqa: F401  (fixture)
from tiny_models import CLASSES, tiny_image_model

torch.set_num_threads(1)
AGGREGATIONS = ["mean", "max", "mlp", "attention"]


def tiny_encoder(aggregation="mean", set_size=3, backbone="small", seed=0):
    return build_style_encoder(backbone, 16, aggregation, set_size, seed=seed, channels=(8, 16))


def tiny_style_model(path, classes=CLASSES, patch=16, mpp=0.5, aggregation="mean", set_size=2):
    """An image model with a style encoder, random weights, saved as a real model folder."""
    torch.manual_seed(0)
    vae = build_autoencoder("tiny")
    num_classes = max(c["id"] for c in classes)
    unet = build_unet("tiny", 4 + num_classes, 4, patch // 4, global_conditioning=True)
    projection = GlobalProjection({"style": 16}, time_embedding_width(unet))
    config = image_model_config(classes, mpp, patch, vae, "epsilon", {"steps": 0}, {})
    config["conditioning"]["global"] = {"style": 16}
    save_bundle(path, config, {"autoencoder": vae, "unet": unet, "global_projection": projection,
                               "style_encoder": tiny_encoder(aggregation, set_size)}, make_train_scheduler(), "# card")
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """The bundled PNG cut into 32 px patches at 1 µm/px: train/val/test bands and a holdout."""
    out = tmp_path_factory.mktemp("style") / "data"
    prepare_dataset([png_path()], out, 1.0, 32, source_mpp=0.25, auto_labels_=True, holdout_fraction=0.2,
                    progress=False)
    return out


# ------------------------------------------------------------------------------------------------- aggregation
@pytest.mark.parametrize("aggregation", ["mean", "max", "attention"])
def test_aggregation_ignores_set_order(aggregation):
    encoder = tiny_encoder(aggregation).eval()
    sets = torch.rand(2, 5, 3, 16, 16) * 2 - 1  # (B, S, 3, H, W)
    with torch.no_grad():
        reference = encoder(sets)
        shuffled = encoder(sets[:, torch.tensor([3, 0, 4, 2, 1])])
    assert reference.shape == (2, 16)
    assert torch.allclose(reference, shuffled, atol=1e-6)


def test_attention_takes_sets_of_any_size():
    encoder = tiny_encoder("attention", set_size=3).eval()
    with torch.no_grad():
        for size in (1, 2, 7):
            assert encoder(torch.rand(2, size, 3, 16, 16) * 2 - 1).shape == (2, 16)


@pytest.mark.parametrize("aggregation", ["mean", "max"])
def test_a_set_of_one_is_that_images_embedding(aggregation):
    encoder = tiny_encoder(aggregation).eval()
    image = torch.rand(2, 1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(encoder(image), encoder.embed(image)[:, 0])


def test_mlp_takes_exactly_its_set_size():
    encoder = tiny_encoder("mlp", set_size=3).eval()
    with torch.no_grad():
        assert encoder(torch.zeros(1, 3, 3, 16, 16)).shape == (1, 16)
        with pytest.raises(HistosynthError, match="larger than the MLP aggregator's fixed size 3"):
            encoder(torch.zeros(1, 4, 3, 16, 16))


@pytest.mark.parametrize("backbone", ["small", "resnet10t"])
def test_encoder_save_reload_gives_identical_vectors(tmp_path, backbone):
    encoder = build_style_encoder(backbone, 16, "attention", 2, seed=1).eval()
    encoder.save_pretrained(tmp_path / "enc", safe_serialization=True)
    reloaded = StyleEncoder.from_pretrained(tmp_path / "enc", use_safetensors=True).eval()
    sets = torch.rand(1, 2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(encoder(sets), reloaded(sets))


def test_unknown_backbone_and_pretrained_small_are_clear_errors():
    with pytest.raises(HistosynthError, match="unknown style encoder 'no_such_net'"):
        build_style_encoder("no_such_net")
    with pytest.raises(HistosynthError, match="no pretrained weights"):
        build_style_encoder("small", pretrained=True)


# ------------------------------------------------------------------------------------------ joint training
def _objective(encoder, num_classes=2, patch=16):
    torch.manual_seed(0)
    unet = build_unet("tiny", 4 + num_classes, 4, patch // 4, global_conditioning=True)
    projection = GlobalProjection({"style": encoder.config.dim}, time_embedding_width(unet))
    return DiffusionObjective(ConditionedDenoiser(unet, 4, num_classes, projection), make_train_scheduler(),
                              {"style": encoder})


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_one_step_gives_every_encoder_parameter_a_gradient_and_changes_it(aggregation):
    """STEDM's released optimiser missed the style encoder (design.md §9); ours trains all of it."""
    encoder = tiny_encoder(aggregation, set_size=3)
    objective = _objective(encoder)
    g = torch.Generator().manual_seed(0)
    batch = {"clean": torch.randn(4, 4, 4, 4, generator=g), "noise": torch.randn(4, 4, 4, 4, generator=g),
             "timesteps": torch.tensor([10, 300, 600, 900]), "conditions": {"mask": torch.zeros(4, 2, 4, 4)},
             "raw": {"style": torch.rand(4, 3, 3, 16, 16, generator=g) * 2 - 1},
             "keep": {"style": torch.tensor([True, True, False, True])}}
    before = {name: p.detach().clone() for name, p in encoder.named_parameters()}
    # Exactly as Trainer.fit: AdamW over every trainable parameter of the task's module.
    parameters = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-3, weight_decay=0.0)
    objective(batch).backward()
    for name, p in encoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
    optimizer.step()
    for name, p in encoder.named_parameters():
        assert not torch.equal(p.detach(), before[name]), f"{name} did not change"


def test_train_image_trains_and_saves_the_style_encoder(tmp_path, dataset, cli):
    """The real CLI path: ``train image --style`` trains the encoder jointly and bundles it."""
    autoencoder = tiny_image_model(tmp_path / "ae", patch=32)
    config = tmp_path / "image.yaml"
    config.write_text(f"data: {dataset}\nout: {tmp_path / 'model'}\nautoencoder: {autoencoder}\nsteps: 2\n"
                      "batch_size: 4\nema_decay: 0\ncheckpoint_every: 0\nstyle: nearby\nstyle_set_size: 2\n"
                      "style_dropout: 0\nstyle_aggregation: attention\n")
    initial = style_source(dataset, "nearby", 2, 0.0, "attention", seed=0).encoder  # what the CLI builds first
    code, text = cli(["train", "image", "--config", config])
    assert code == 0, text
    model = load_bundle(tmp_path / "model")
    assert model.config["conditioning"]["global"] == {"style": 128}
    trained = model.components["style_encoder"]
    assert trained.config.aggregation == "attention" and trained.config.set_size == 2
    after = dict(trained.named_parameters())
    for name, p in initial.named_parameters():
        assert not torch.equal(p.detach(), after[name].detach()), f"{name} was not trained"


# ------------------------------------------------------------------------------------------------ style sets
@pytest.mark.parametrize("rule", ["nearby", "slide", "augmented"])
def test_style_sets_by_rule_are_seeded_and_stay_in_training_pixels(dataset, rule):
    from histosynth.data.dataset import PatchDataset

    source = StyleSource(dataset, tiny_encoder(), rule, set_size=3, dropout=0.0)
    items = PatchDataset(dataset)
    one = source.draw(5, items[5], 0, torch.Generator().manual_seed(7))
    two = source.draw(5, items[5], 0, torch.Generator().manual_seed(7))
    assert one.shape == (3, 3, 32, 32) and one.min() >= -1 and one.max() <= 1
    assert torch.equal(one, two)
    assert source.collate([one, two]).shape == (2, 3, 3, 32, 32)
    if rule == "augmented":
        return
    index = json.loads((dataset / "dataset.json").read_text())
    area = source.areas[0]
    train_box = [r["box"] for r in index["regions"] if r["split"] == "train"][0]
    held = [(p["x"], p["y"]) for p in index["patches"] if p["split"] != "train"]
    rng = np.random.default_rng(0)
    patch = source.patches[5]
    for _ in range(30):
        x, y = area.position(rule, patch["x"], patch["y"], 2.0, rng)
        assert train_box[0] - 1 <= x and x + area.size0 <= train_box[2] + 1
        assert train_box[1] - 1 <= y and y + area.size0 <= train_box[3] + 1
        assert not any(abs(x - hx) < area.size0 - 1 and abs(y - hy) < area.size0 - 1 for hx, hy in held)


def test_missing_source_slide_is_a_clear_error(tmp_path, dataset):
    import shutil

    moved = tmp_path / "data"
    shutil.copytree(dataset, moved)
    index = json.loads((moved / "dataset.json").read_text())
    index["sources"][0]["path"] = str(tmp_path / "gone.png")
    (moved / "dataset.json").write_text(json.dumps(index))
    with pytest.raises(HistosynthError, match="gone.png: source slide .* not found"):
        StyleSource(moved, tiny_encoder(), "nearby")
    assert StyleSource(moved, tiny_encoder(), "augmented").rule == "augmented"  # needs no slide


def test_style_from_a_slide_is_random_tissue_crops_fixed_by_seed():
    images, labels = load_style_images([svs_path()], 32, 1.0, crops=3, seed=4)
    again, _ = load_style_images([svs_path()], 32, 1.0, crops=3, seed=4)
    assert len(images) == 3 and images[0].shape == (32, 32, 3) and labels[0].endswith("#crop0")
    assert all(np.array_equal(a, b) for a, b in zip(images, again))
    assert all(a.mean() < 235 for a in images)  # tissue, not glass


# ------------------------------------------------------------------------------------------- sampling + CLI
def _write_styles(folder, count, size=24):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"s{i}.png")
    return folder


@pytest.fixture(scope="module")
def style_model(tmp_path_factory):
    return tiny_style_model(tmp_path_factory.mktemp("style_model") / "model", patch=32)


def _flat_style_set(colour, n=3, size=24):
    rng = np.random.default_rng(0)
    return [np.clip(np.array(colour) + rng.normal(0, 8, (size, size, 3)), 0, 255).astype(np.uint8) for _ in range(n)]


def test_style_vector_reaches_the_unet_and_each_style_set_gives_its_own_output(style_model):
    """The mechanism behind style transfer, without training: a style set becomes one vector, that vector changes
    the denoiser's output (and a zero vector is the null), and two different sets give two different samples
    while the same set gives the same bytes. Whether a *trained* model maps each stain to its own colours is a
    statistical property: benchmarks/style_transfer.py measures it over seeds."""
    from histosynth.pipelines.conditions import style_vector
    from histosynth.pipelines.sample_patches import sample_images

    model = load_bundle(style_model)
    pink, purple = _flat_style_set((230, 150, 190)), _flat_style_set((110, 60, 150))
    v_pink, v_purple = style_vector(model, pink), style_vector(model, purple)
    assert v_pink.shape == (1, 16) and torch.equal(v_pink, style_vector(model, pink))
    assert (v_pink - v_purple).abs().max() > 1e-3

    denoiser = model.denoiser().eval()
    g = torch.Generator().manual_seed(0)
    latents, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor(500)
    mask = torch.zeros(1, 2, 8, 8)
    with torch.no_grad():
        outputs = {name: denoiser(latents, t, {"mask": mask, "style": v})
                   for name, v in (("pink", v_pink), ("purple", v_purple), ("null", torch.zeros_like(v_pink)))}
        unconditioned = denoiser(latents, t, {"mask": mask})  # a missing global condition is its null
    assert torch.equal(outputs["null"], unconditioned)
    assert (outputs["pink"] - outputs["purple"]).abs().max() > 1e-3
    assert (outputs["pink"] - outputs["null"]).abs().max() > 1e-3

    def sample(vector):
        return sample_images(model, None, n=2, steps=3, seed=5, style=vector,
                             style_guidance=8.0)  # a strong scale: random weights differ subtly

    first, again, other = sample(v_pink), sample(v_pink), sample(v_purple)
    assert first.shape == (2, 32, 32, 3) and np.array_equal(first, again)
    assert np.abs(first.astype(int) - other.astype(int)).max() > 0


def test_sample_and_generate_with_a_style(tmp_path, style_model, cli, monkeypatch):
    styles = _write_styles(tmp_path / "styles", 3)
    code, text = cli(["sample", "--model", style_model, "--out", tmp_path / "p.png", "--n", "2", "--steps", "2",
                      "--style", styles, "--style-guidance", "2"])
    assert code == 0, text
    assert Image.open(tmp_path / "p-1.png").size == (32, 32)
    calls = []
    original = StyleEncoder.encode_set
    monkeypatch.setattr(StyleEncoder, "encode_set", lambda self, x, **k: calls.append(len(x)) or original(self, x))
    code, text = cli(["generate", "--model", style_model, "--size", "96x64", "--out", tmp_path / "s.tiff",
                      "--steps", "2", "--style", styles / "s0.png", "--style", styles / "s1.png",
                      "--style-guidance", "2"])
    assert code == 0, text
    assert calls == [2]  # one style vector for the whole canvas, from both images
    from histosynth.io.tiff import read_provenance

    assert read_provenance(tmp_path / "s.tiff")["settings"]["extra_guidance"] == {"style": 2.0}


@pytest.mark.parametrize("case", ["empty-folder", "unreadable", "mlp-too-many", "no-style-model"])
def test_bad_style_input_is_one_line_error(tmp_path, cli, case):
    if case == "no-style-model":
        model, style, expected = tiny_image_model(tmp_path / "m"), _write_styles(tmp_path / "st", 1), \
            "not trained with style conditioning"
    else:
        model = tiny_style_model(tmp_path / "m", aggregation="mlp" if case == "mlp-too-many" else "mean")
        if case == "empty-folder":
            style, expected = tmp_path / "empty", "no style images"
            style.mkdir()
        elif case == "unreadable":
            style, expected = tmp_path / "broken.png", "not a readable style image"
            style.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
        else:
            style, expected = _write_styles(tmp_path / "three", 3), "larger than the MLP aggregator's fixed size 2"
    for command in (["sample", "--out", tmp_path / "x.png"],
                    ["generate", "--size", "32x32", "--out", tmp_path / "x.tiff"]):
        code, text = cli([command[0], "--model", model, *command[1:], "--steps", "1", "--style", style])
        lines = [line for line in text.splitlines() if line.startswith("error")]
        assert code == 2 and len(lines) == 1 and expected in lines[0], text
        assert not (tmp_path / "x.png").exists() and not (tmp_path / "x.tiff").exists()


# ------------------------------------------------------------------------------------------------ style fidelity
def test_style_fidelity_prefers_the_stain_of_the_style_set():
    from histosynth.data.crops import SlideCrops
    from histosynth.eval.style import stain_distance, stain_statistics, style_fidelity

    skin = SlideCrops(svs_path(), None, 1.0)
    tumour = SlideCrops(png_path(), 0.25, 1.0)
    style = skin.random_tissue_crops(16, 32, np.random.default_rng(0))
    generated = skin.random_tissue_crops(16, 32, np.random.default_rng(1))  # same stain as the style set
    training = tumour.random_tissue_crops(16, 32, np.random.default_rng(2))
    result = style_fidelity(generated, style, training)
    assert result["style_distance"] < result["style_distance_training"] and result["style_ratio"] < 1
    assert result["style_reference"] > result["style_distance"]
    stats = stain_statistics(style)
    assert stats.mean.shape == (3,) and stats.cov.shape == (3, 3)
    assert stain_distance(stats, stats) == pytest.approx(0, abs=1e-12)
    with pytest.raises(HistosynthError, match="tissue pixels"):
        stain_statistics([np.full((8, 8, 3), 255, np.uint8)])


def test_evaluate_reports_style_fidelity(tmp_path, cli):
    from test_eval_support import image_folder

    train, test = image_folder(tmp_path / "train", 12, seed=0), image_folder(tmp_path / "test", 12, seed=1)
    generated = image_folder(tmp_path / "generated", 12, seed=3, shift=0.3)
    style = image_folder(tmp_path / "style", 6, seed=4, shift=0.3)
    code, text = cli(["evaluate", "--generated", generated, "--real-train", train, "--real-test", test, "--k", "2",
                      "--no-c2st",
                      "--style-set", style, "--out", tmp_path / "report"])
    assert code == 0, text
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["style_distance"] < metrics["style_distance_training"] and metrics["style_ratio"] < 1
    assert "style: stain distance to the style set" in text
    (tmp_path / "nothing").mkdir()
    code, text = cli(["evaluate", "--generated", generated, "--real-train", train, "--real-test", test, "--k", "2",
                      "--no-c2st",
                      "--style-set", tmp_path / "nothing", "--out", tmp_path / "report2"])
    assert code == 2 and "no PNG/JPEG images" in text
