"""Training from the command line with tiny models: all three models, YAML configs, resume, sampling errors."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cli_runner import cli  # noqa: F401  (fixture)
from histosynth.data.prepare import prepare_dataset
from histosynth.data.samples import png_path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train") / "data"
    prepare_dataset([png_path()], root, 0.5, 32, source_mpp=0.25, auto_labels_=True, label_fraction=0.5,
                    progress=False)
    return root


@pytest.fixture(scope="module")
def autoencoder(data):
    from cli_runner import run_cli

    out = data.parent / "ae"
    code, text = run_cli(["train", "autoencoder", "--data", data, "--out", out, "--steps", "3", "--batch-size", "2",
                          "--crop", "16"])
    assert code == 0, text
    return out


def test_autoencoder_folder_has_measured_scale_and_no_pickles(autoencoder):
    config = json.loads((autoencoder / "histosynth.json").read_text())
    assert config["kind"] == "autoencoder" and config["latent_factor"] == 4
    scale = config["latent_scale"]
    assert scale["scaling_factor"] == 1.0 and len(scale["latents_mean"]) == len(scale["latents_std"]) == 4
    assert all(s > 0 for s in scale["latents_std"]) and scale["latents_mean"] != [0.0] * 4
    assert not [p for p in autoencoder.rglob("*") if p.suffix in (".bin", ".pt", ".ckpt", ".pkl")]
    assert (autoencoder / "README.md").exists() and (autoencoder / "loss.csv").read_text().startswith("step,loss")


def test_decoder_only_fine_tune_keeps_the_encoder_and_its_latent_scale(tmp_path, data, autoencoder, cli):
    code, text = cli(["train", "autoencoder", "--data", data, "--out", tmp_path / "ft", "--steps", "2",
                      "--batch-size", "2", "--crop", "16", "--init", autoencoder, "--decoder-only",
                      "--adversarial-weight", "0.1", "--learning-rate", "0.01"])
    assert code == 0, text
    before = load_file(str(autoencoder / "autoencoder" / "diffusion_pytorch_model.safetensors"))
    after = load_file(str(tmp_path / "ft" / "autoencoder" / "diffusion_pytorch_model.safetensors"))
    assert before.keys() == after.keys()
    for name in before:
        same = torch.equal(before[name], after[name])
        if name.startswith(("encoder.", "quant_conv.")):
            assert same, name
    assert not all(torch.equal(before[n], after[n]) for n in before if n.startswith("decoder."))
    scale = [json.loads((folder / "histosynth.json").read_text())["latent_scale"] for folder in (autoencoder, tmp_path / "ft")]
    assert scale[0] == scale[1]
    code, text = cli(["train", "autoencoder", "--data", data, "--out", tmp_path / "bad", "--decoder-only"])
    assert code != 0 and "--decoder-only needs --init" in text and not (tmp_path / "bad").exists()


def test_image_model_from_yaml_config_then_sample(tmp_path, data, autoencoder, cli):
    config = tmp_path / "image.yaml"
    config.write_text(f"data: {data}\nautoencoder: {autoencoder}\nout: {tmp_path / 'image'}\nsteps: 3\n"
                      "batch_size: 2\npreview_every: 3\n")
    code, text = cli(["train", "image", "--config", config])
    assert code == 0, text
    bundle = json.loads((tmp_path / "image" / "histosynth.json").read_text())
    assert bundle["training"]["steps"] == 3 and bundle["training"]["batch_size"] == 2
    assert list((tmp_path / "image.train" / "previews").glob("*.png"))
    mask = np.zeros((32, 32), np.uint8)
    mask[:, 16:] = 3
    Image.fromarray(mask).save(tmp_path / "mask.png")
    code, text = cli(["sample", "--model", tmp_path / "image", "--mask", tmp_path / "mask.png", "--out",
                      tmp_path / "out.png", "--steps", "2", "--n", "2"])
    assert code == 0, text
    assert np.asarray(Image.open(tmp_path / "out-1.png")).shape == (32, 32, 3)
    Image.fromarray(np.full((32, 32), 9, np.uint8)).save(tmp_path / "bad.png")
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(tmp_path / "big.png")
    for bad, message in (("bad.png", "class id 9"), ("big.png", "patch size is 32")):
        code, text = cli(["sample", "--model", tmp_path / "image", "--mask", tmp_path / bad, "--out",
                          tmp_path / "never.png", "--steps", "1"])
        errors = [line for line in text.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and message in errors[0], text
        assert not (tmp_path / "never.png").exists()
    code, text = cli(["train", "image", "--config", config, "--unknown-flag", "1"])
    assert code == 2
    config.write_text("colour: red\n")
    code, text = cli(["train", "image", "--config", config])
    assert code == 2 and "unknown option 'colour'" in text


def test_resumed_training_reaches_the_same_weights(tmp_path, data, autoencoder, cli):
    common = ["train", "image", "--data", data, "--autoencoder", autoencoder, "--batch-size", "2", "--seed", "3"]
    assert cli(common + ["--out", tmp_path / "straight", "--steps", "4"])[0] == 0
    # An interrupted run: its checkpoint at step 2 is all that survives of it.
    assert cli(common + ["--out", tmp_path / "cut", "--steps", "2", "--checkpoint-every", "2"])[0] == 0
    shutil.rmtree(tmp_path / "cut")
    code, text = cli(common + ["--out", tmp_path / "cut", "--steps", "4", "--resume"])
    assert code == 0, text
    straight = load_file(str(tmp_path / "straight" / "unet" / "diffusion_pytorch_model.safetensors"))
    resumed = load_file(str(tmp_path / "cut" / "unet" / "diffusion_pytorch_model.safetensors"))
    for name in straight:
        assert torch.allclose(straight[name], resumed[name], atol=1e-6), name
    code, text = cli(common + ["--out", tmp_path / "fresh", "--steps", "4", "--resume"])
    assert code == 2 and "no checkpoint" in text


def test_mask_model_trains_on_label_maps(tmp_path, data, cli):
    code, text = cli(["train", "mask", "--data", data, "--out", tmp_path / "mask", "--steps", "2", "--batch-size", "2",
                      "--crop", "8"])
    assert code == 0, text
    config = json.loads((tmp_path / "mask" / "histosynth.json").read_text())
    assert config["kind"] == "mask" and config["latent_factor"] == 8 and config["num_classes"] == 3


def test_a_mask_model_trains_on_a_zero_terminal_snr_schedule(tmp_path, data, cli):
    from histosynth.models.bundle import load_bundle

    common = ["train", "mask", "--data", data, "--steps", "2", "--batch-size", "2", "--crop", "8"]
    code, text = cli(common + ["--out", tmp_path / "eps", "--zero-terminal-snr"])
    assert code == 2 and "needs --prediction-type v_prediction" in text and not (tmp_path / "eps").exists()
    code, text = cli(common + ["--out", tmp_path / "mask", "--prediction-type", "v_prediction", "--zero-terminal-snr"])
    assert code == 0, text
    model = load_bundle(tmp_path / "mask", kind="mask")
    assert model.config["prediction_type"] == "v_prediction"
    scheduler = model.sampling_scheduler()
    scheduler.set_timesteps(5)
    assert scheduler.config.prediction_type == "v_prediction" and int(scheduler.timesteps[0]) == 999
