"""An embedding-conditioned model trained in the suite (tiny VAE, tiny SimCLR encoder, tiny UNet, about 30 s on
one core): its samples follow the embedding they are given, and `vary`, `generate --reference` and
`generate --prior --text/--class` run end to end from the CLI, with one-line errors on bad input."""
import json

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from histosynth.conditions.embedding_cache import embed_dataset
from histosynth.conditions.encoders import load_encoder
from histosynth.data.dataset import PatchDataset
from histosynth.data.samples import svs_path
from histosynth.models.bundle import load_bundle, save_bundle
from histosynth.models.denoiser import make_train_scheduler
from histosynth.models.prior import EmbeddingPrior
from histosynth.pipelines.sample_patches import sample_images
from histosynth.pipelines.embedding_grids import condition_vector
from histosynth.train.run import train_autoencoder
from histosynth.train.ssl import train_ssl
from histosynth.train.trainer import TrainConfig
from cli_runner import cli, run_cli  # noqa: F401  (fixture)
from test_embedding import tiny_dataset
from tiny_models import tiny_image_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Dataset (15×15 patches of 32 px at 2 µm/px from the bundled skin slide; rows 6–8, which cross background,
    dermis and epidermis, are the test split), autoencoder, SSL encoder, embeddings, image model, prior."""
    root = tmp_path_factory.mktemp("embedding-model")
    data = tiny_dataset(root / "ds", side=15, slide="svs", mpp=2.0, origin=(80, 200), test_band=(6, 9))
    quick = dict(checkpoint_every=0, warmup_steps=10)
    train_autoencoder(str(data), str(root / "vae"), "tiny",
                      config=TrainConfig(steps=150, batch_size=16, learning_rate=2e-3, **quick))
    train_ssl(str(data), str(root / "enc"), "tiny",
              config=TrainConfig(steps=30, batch_size=32, learning_rate=1e-3, ema_decay=0, **quick))
    embed_dataset(data, load_encoder(str(root / "enc")), dihedral_views=True)
    # v-prediction: the denoiser must predict the clean patch at high noise, where only the embedding tells it,
    # which makes the condition learnable in a few hundred steps (with ε-prediction it stays near chance here).
    code, text = run_cli(["train", "image", "--data", data, "--autoencoder", root / "vae", "--out", root / "model",
                          "--embeddings", root / "enc", "--prediction-type", "v_prediction",
                          "--condition-dropout", 0.5, "--steps", 200, "--batch-size", 16, "--learning-rate", 2e-3,
                          "--checkpoint-every", 0])
    assert code == 0, text
    code, text = run_cli(["train", "prior", "--data", data, "--encoder", root / "enc", "--out", root / "prior",
                          "--grid", 3, "--text-encoder", "hashing", "--steps", 30, "--batch-size", 8,
                          "--checkpoint-every", 0])
    assert code == 0, text
    reference = root / "reference.png"  # a 64×64 px region of test tissue: a 2×2 grid of patches
    test = PatchDataset(data, "test")
    tiles = [((test[i]["image"].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8) for i in (5, 6, 20, 21)]
    Image.fromarray(np.concatenate([np.concatenate(tiles[:2], 1), np.concatenate(tiles[2:], 1)], 0)).save(reference)
    return {"root": root, "data": data, "model": root / "model", "prior": root / "prior", "reference": reference,
            "encoder": root / "enc"}


def test_model_records_its_encoder(trained):
    config = json.loads((trained["model"] / "histosynth.json").read_text())
    conditioning = config["conditioning"]
    assert conditioning["mask"] is True and conditioning["global"] == {"embedding": 64}
    assert conditioning["embedding_encoder"] == str(trained["encoder"].resolve())
    assert conditioning["embedding_views"] == 8 and len(conditioning["embedding_weights_hash"]) == 64
    assert "embedding_encoder" in config["components"]


def test_the_embedding_reaches_the_unet_and_each_embedding_gives_its_own_sample(trained):
    """The mechanism of embedding conditioning: a test patch's embedding changes the denoiser's output (a zero vector
    is the null), and two embeddings give two different samples while one gives the same bytes again. Whether the
    samples *resemble* their reference after training is statistical: benchmarks/embedding_steering.py measures it."""
    model = load_bundle(trained["model"])
    encoder = load_encoder(str(trained["encoder"]))
    test = PatchDataset(trained["data"], "test")
    with torch.no_grad():
        raw = encoder(torch.stack([test[i]["image"] for i in (0, len(test) - 1)]))  # (2, D)
    vectors = condition_vector(model, raw)
    assert vectors.shape == (2, 64) and (vectors[0] - vectors[1]).abs().max() > 1e-2

    denoiser = model.denoiser().eval()
    g = torch.Generator().manual_seed(0)
    latents, t = torch.randn(1, 4, 8, 8, generator=g).repeat(2, 1, 1, 1), torch.tensor(700)
    with torch.no_grad():
        conditioned = denoiser(latents, t, {"embedding": vectors})
        null = denoiser(latents, t, {"embedding": torch.zeros_like(vectors)})
        missing = denoiser(latents, t, {})
    assert torch.equal(null, missing)
    assert (conditioned[0] - conditioned[1]).abs().max() > 1e-3
    assert (conditioned - null).abs().max() > 1e-3

    def sample(vector):
        return sample_images(model, None, n=2, steps=4, seed=0, embedding=vector,
                             embedding_guidance=3.0)

    first, again, other = sample(vectors[:1]), sample(vectors[:1]), sample(vectors[1:])
    assert first.shape == (2, 32, 32, 3) and np.array_equal(first, again)
    assert np.abs(first.astype(int) - other.astype(int)).max() > 0


def test_vary_cli_patch_and_larger_reference(trained, tmp_path, cli):
    patch = tmp_path / "patch.png"
    Image.open(trained["reference"]).crop((0, 0, 32, 32)).save(patch)
    code, text = cli(["vary", patch, "--model", trained["model"], "--n", 3, "--out", tmp_path / "a", "--steps", 6])
    assert code == 0, text
    files = sorted((tmp_path / "a").glob("variation-*.png"))
    assert len(files) == 3 and np.asarray(Image.open(files[0])).shape == (32, 32, 3)
    record = json.loads((tmp_path / "a" / "variations.json").read_text())
    assert record["synthetic"] is True and record["grid"] == [1, 1] and record["sampler"] == "patch"
    code, text = cli(["vary", trained["reference"], "--model", trained["model"], "--n", 1, "--out", tmp_path / "b",
                      "--steps", 4, "--sampler", "tiles"])
    assert code == 0, text
    assert np.asarray(Image.open(tmp_path / "b" / "variation-00.png")).shape == (64, 64, 3)
    assert json.loads((tmp_path / "b" / "variations.json").read_text())["grid"] == [2, 2]
    code, _ = cli(["vary", trained["reference"], "--model", trained["model"], "--n", 1, "--out", tmp_path / "c",
                   "--steps", 4, "--sampler", "tiles"])
    assert (tmp_path / "b" / "variation-00.png").read_bytes() == (tmp_path / "c" / "variation-00.png").read_bytes()


def test_two_process_vary_writes_the_same_variations(trained, tmp_path, cli):
    """Groups of --batch variations (one-patch reference) and whole canvases (larger one) dealt to 2 ranks."""
    from torchrun import run_two

    patch = tmp_path / "patch.png"
    Image.open(trained["reference"]).crop((0, 0, 32, 32)).save(patch)
    for reference, n in ((patch, 3), (trained["reference"], 2)):
        args = ["vary", str(reference), "--model", str(trained["model"]), "-n", str(n), "--batch", "2",
                "--steps", "3"]
        one, two = tmp_path / f"one-{n}", tmp_path / f"two-{n}"
        code, text = cli(args + ["--out", one])
        assert code == 0, text
        run_two(["-m", "histosynth", *args, "--out", two])
        names = sorted(p.name for p in one.iterdir())
        assert names == sorted(p.name for p in two.iterdir()) and len(names) == n + 1
        for name in names:
            assert (one / name).read_bytes() == (two / name).read_bytes(), name


@pytest.mark.parametrize("sampler", ["random", "tiles", "multidiffusion", "diffinfinite"])
def test_generate_larger_image_following_a_reference(trained, tmp_path, cli, sampler):
    out = tmp_path / "slide.tiff"
    reference = svs_path() if sampler == "random" else trained["reference"]  # a whole slide, or a PNG
    code, text = cli(["generate", "--model", trained["model"], "--reference", reference,
                      "--size", "96x64", "--out", out, "--steps", 3, "--sampler", sampler, "--compression", "deflate",
                      "--stats", tmp_path / "stats.json"])
    assert code == 0, text
    assert tifffile.imread(out).shape == (64, 96, 3)
    # embedding and null: without a mask the null mask is kept in both passes, never guided against itself
    assert json.loads((tmp_path / "stats.json").read_text())["guidance_passes"] == 2


def test_generate_from_text_and_class_through_the_prior(trained, tmp_path, cli):
    prior = json.loads((trained["prior"] / "histosynth.json").read_text())
    assert prior["labels"] == ["skin"] and all(c.startswith("skin") for c in prior["captions"])
    for flag, value in (("--text", "skin, dense nuclei, much stroma"), ("--class", "skin")):
        out = tmp_path / f"{flag[2:]}.tiff"
        code, text = cli(["generate", "--model", trained["model"], "--prior", trained["prior"], flag, value,
                          "--size", "64x64", "--out", out, "--steps", 3])
        assert code == 0, text
        assert tifffile.imread(out).shape == (64, 64, 3)


def test_bad_input_gives_one_line_errors(trained, tmp_path, cli):
    # A prior over embeddings of another width than the model's.
    torch.manual_seed(0)
    other = EmbeddingPrior(dim=32, grid=2, width=16, depth=1, heads=2, conditions={"text": 384, "class": 1})
    save_bundle(tmp_path / "prior32", {"kind": "prior", "embedding_encoder": "elsewhere", "embedding_dim": 32,
                                       "grid": 2, "labels": ["x"], "text_encoder": "hashing", "text_dim": 384},
                {"prior": other}, make_train_scheduler(), "# prior")
    plain = tiny_image_model(tmp_path / "plain")
    cases = [
        (["--prior", tmp_path / "prior32", "--class", "x"], "32-wide but the model takes 64-wide"),
        (["--text", "tumour"], "need --prior"),
        (["--reference", trained["reference"], "--prior", trained["prior"], "--class", "skin"], "either --reference"),
        (["--prior", trained["prior"], "--class", "lymphoma"], "unknown class"),
        (["--reference", tmp_path / "missing.png"], "missing.png"),
    ]
    for extra, message in cases:
        code, text = cli(["generate", "--model", trained["model"], "--size", "64x64", "--out", tmp_path / "o.tiff",
                          "--steps", 2, *extra])
        lines = [line for line in text.strip().splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and message in lines[0], (extra, text)
    code, text = cli(["vary", trained["reference"], "--model", plain, "--out", tmp_path / "v"])
    assert code == 2 and "no embedding conditioning" in text
    assert not (tmp_path / "o.tiff").exists() and not (tmp_path / "v").exists()
