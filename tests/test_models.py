"""Models: bundles save and reload exactly, pickles are refused, guidance is the CFG formula."""
import copy
import json

import numpy as np
import pytest
import torch

import histosynth
from histosynth.errors import HistosynthError
from histosynth.models.autoencoder import build_autoencoder, downsampling_factor, load_autoencoder
from histosynth.models.denoiser import ConditionedDenoiser, build_unet
from histosynth.pipelines.sample_patches import sample_images
from histosynth.sampling.guidance import GuidedDenoiser
from tiny_models import tiny_image_model

torch.set_num_threads(1)


def test_tiny_autoencoder_is_4x():
    vae = build_autoencoder("tiny")
    assert downsampling_factor(vae) == 4
    assert vae.encode(torch.zeros(1, 3, 16, 16)).latent_dist.mean.shape == (1, 4, 4, 4)


@pytest.mark.parametrize("weights_dtype", ["float32", "float16"])
def test_saved_then_loaded_model_equals_the_model_before_saving(tmp_path, weights_dtype):
    from diffusers import DDPMScheduler

    from histosynth.models.bundle import Bundle, image_model_config, load_bundle, save_bundle
    from histosynth.models.denoiser import make_train_scheduler
    from tiny_models import CLASSES

    torch.manual_seed(0)
    vae, unet = build_autoencoder("tiny").eval(), build_unet("tiny", 4 + 2, 4, 4).eval()
    config = image_model_config(CLASSES, 0.5, 16, vae, "epsilon", {"steps": 0}, {})
    path = save_bundle(tmp_path / "model", config, {"autoencoder": vae, "unet": unet}, make_train_scheduler(),
                       "# card", weights_dtype=weights_dtype)
    files = {p.suffix for p in path.rglob("*") if p.is_file()}
    assert not files & {".bin", ".pt", ".ckpt", ".pkl"}
    assert (path / "unet" / "diffusion_pytorch_model.safetensors").exists()
    loaded = load_bundle(path)

    # float16 folders are a storage format (bundle.save_bundle): what comes back is exactly the float16 rounding
    # of each float32 weight, computed in float32 again. float32 folders give every weight back bit for bit.
    stored = {"float32": lambda w: w, "float16": lambda w: w.half().float()}[weights_dtype]
    for name, original in {"autoencoder": vae, "unet": unet}.items():
        before, after = original.state_dict(), loaded.components[name].state_dict()
        assert before.keys() == after.keys(), name
        for key, weight in before.items():
            assert after[key].dtype == weight.dtype, (name, key)
            assert torch.equal(after[key], stored(weight) if weight.is_floating_point() else weight), (name, key)
    if weights_dtype == "float16":  # the tiny model has weights that float16 rounds: the comparison above bites
        assert not torch.equal(loaded.unet.conv_in.weight, unet.conv_in.weight)

    train = DDPMScheduler.from_config(loaded.scheduler_config)
    assert {k: v for k, v in train.config.items() if not k.startswith("_")} == \
        {k: v for k, v in make_train_scheduler().config.items() if not k.startswith("_")}

    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 4, 4, 4, generator=g), torch.tensor(250)
    mask = torch.rand(2, 2, 4, 4, generator=g)
    with torch.no_grad():
        got = loaded.denoiser()(x, t, {"mask": mask})
        expected = ConditionedDenoiser(unet, 4, 2).eval()(x, t, {"mask": mask})
    if weights_dtype == "float32":
        assert torch.equal(got, expected)
    else:  # float16 weights carry a relative error of 2^-11, which the tiny UNet keeps within ~1e-3 of its output
        torch.testing.assert_close(got, expected, rtol=0, atol=5e-3)
        rounded = ConditionedDenoiser(copy.deepcopy(unet).half().float(), 4, 2).eval()
        with torch.no_grad():  # and exactly the output of the float16-rounded weights: no other loss on the way
            assert torch.equal(got, rounded(x, t, {"mask": mask}))

    # End to end: the loaded folder samples the same pixels as the in-memory model with the same scheduler.
    if weights_dtype == "float32":
        # The live train scheduler's config, as training previews use it: it must sample the saved folder's
        # timesteps, although it lists the values it took by default in `_use_default_values`.
        in_memory = Bundle(config=dict(loaded.config), components={"autoencoder": vae, "unet": unet},
                           scheduler_config=make_train_scheduler().config)
        mask_ids = np.zeros((16, 16), np.uint8)
        mask_ids[:, 8:] = 2
        first = sample_images(loaded, mask_ids, n=2, steps=3, seed=7)
        assert first.shape == (2, 16, 16, 3) and first.dtype == np.uint8
        assert np.array_equal(first, sample_images(in_memory, mask_ids, n=2, steps=3, seed=7))


def test_loading_a_folder_with_a_pickle_is_refused(tmp_path):
    path = tiny_image_model(tmp_path / "model")
    (path / "unet" / "extra.bin").write_bytes(b"\x80\x04")
    with pytest.raises(HistosynthError, match=r"extra\.bin: pickle-based weights are not loaded"):
        histosynth.load(path)


def test_wrong_class_id_and_wrong_size_are_refused(tmp_path):
    model = histosynth.load(tiny_image_model(tmp_path / "model"))
    with pytest.raises(HistosynthError, match="class id 5"):
        sample_images(model, np.full((16, 16), 5, np.uint8), steps=1)
    with pytest.raises(HistosynthError, match="patch size is 16"):
        sample_images(model, np.zeros((24, 24), np.uint8), steps=1)


def test_pretrained_vae_loads_by_path_like_a_hub_id(tmp_path):
    vae = build_autoencoder("tiny")
    vae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    loaded = load_autoencoder(str(tmp_path / "vae"))
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert torch.equal(vae.encode(x).latent_dist.mean, loaded.encode(x).latent_dist.mean)
    with pytest.raises(HistosynthError, match="cannot load autoencoder"):
        load_autoencoder(str(tmp_path / "missing-org/missing-model"))


def test_guidance_scale_one_is_conditional_and_zero_is_null():
    torch.manual_seed(0)
    denoiser = ConditionedDenoiser(build_unet("tiny", 4 + 2, 4, 8), 4, 2).eval()
    x, t = torch.randn(3, 4, 8, 8), torch.tensor(500)
    mask = torch.rand(3, 2, 8, 8)
    with torch.no_grad():
        conditional = denoiser(x, t, {"mask": mask})
        null = denoiser(x, t, {"mask": torch.zeros_like(mask)})
        one, zero, three = (GuidedDenoiser(denoiser, {"mask": scale}) for scale in (1.0, 0.0, 3.0))
        assert torch.allclose(one(x, t, {"mask": mask}), conditional, atol=1e-5)
        assert torch.allclose(zero(x, t, {"mask": mask}), null, atol=1e-5)
        assert torch.allclose(three(x, t, {"mask": mask}), null + 3 * (conditional - null), atol=1e-4)
    assert one.passes == 2


def _interacting_denoiser(latents, timestep, conditions):
    """A stand-in whose output has an interaction term: 1 + 2·m + 5·s + 7·m·s for mask m and style s in {0, 1}."""
    m = conditions["mask"].flatten(1).amax(1)[:, None, None, None]  # (B, 1, 1, 1)
    s = conditions["style"].amax(1)[:, None, None, None]
    return torch.ones_like(latents) * (1 + 2 * m + 5 * s + 7 * m * s)


def test_several_groups_are_guided_nested_as_in_stedm():
    """ε(∅,∅) + s_m·(ε(m,∅) − ε(∅,∅)) + s_s·(ε(m,s) − ε(m,∅)): here 1 + 2·(3 − 1) + 3·(15 − 3) = 41. Summing the
    single-group effects instead, (m, ∅), (∅, s), (∅, ∅), would give 1 + 2·2 + 3·5 = 20: the m·s term is never seen."""
    from histosynth.sampling.guidance import guidance_order, guided

    x, t = torch.zeros(2, 1, 2, 2), torch.tensor(10)
    conditions = {"style": torch.ones(2, 4), "mask": torch.ones(2, 3, 2, 2)}
    both = guided(_interacting_denoiser, {"style": 3.0, "mask": 2.0})
    assert both.groups == ["mask", "style"] and both.passes == 3
    assert torch.equal(both(x, t, conditions), torch.full_like(x, 41.0))
    # A group at scale 1 is kept in every variant: (m,∅) + 3·((m,s) − (m,∅)) = 3 + 36, one pass fewer.
    style_only = guided(_interacting_denoiser, {"style": 3.0, "mask": 1.0})
    assert style_only.passes == 2 and torch.equal(style_only(x, t, conditions), torch.full_like(x, 39.0))
    assert guided(_interacting_denoiser, {"mask": 1.0, "style": 1.0}) is _interacting_denoiser
    assert guidance_order(["style", "embedding", "mask"]) == ["mask", "embedding", "style"]


def test_bundle_config_records_latent_scale(tmp_path):
    path = tiny_image_model(tmp_path / "model")
    config = json.loads((path / "histosynth.json").read_text())
    assert config["latent_factor"] == 4 and config["latent_patch"] == 4 and config["num_classes"] == 2
    assert "scaling_factor" in config["latent_scale"]


def test_latents_are_normalised_per_channel_and_scalar_configs_still_decode():
    from histosynth.models.autoencoder import build_autoencoder, decode_latents, encode_latents, measure_latent_scale

    torch.manual_seed(0)
    vae = build_autoencoder("tiny").eval()
    images = torch.rand(8, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        mean, std = measure_latent_scale(vae, images)
        latents = encode_latents(vae, images)  # (8, C, 4, 4)
        assert torch.allclose(latents.mean((0, 2, 3)), torch.zeros(len(mean)), atol=1e-5)
        assert torch.allclose(latents.std((0, 2, 3)), torch.ones(len(std)), atol=1e-4)
        per_channel = decode_latents(vae, latents)
        # The same VAE described the older way (one scale and shift) decodes the matching latents to the same images.
        raw = latents * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
        vae.register_to_config(latents_mean=None, latents_std=None, scaling_factor=0.5, shift_factor=0.25)
        assert torch.allclose(decode_latents(vae, (raw - 0.25) * 0.5), per_channel, atol=1e-5)


# ------------------------------------------------------------------------------------------ adversarial autoencoder
def _adversarial_objective(start=0):
    from histosynth.models.autoencoder import AutoencoderObjective, PatchDiscriminator

    torch.manual_seed(0)
    return AutoencoderObjective(build_autoencoder("tiny"), 1e-6, PatchDiscriminator(channels=8), 0.5, start)


def _autoencoder_batch():
    g = torch.Generator().manual_seed(1)
    return {"image": torch.rand(2, 3, 32, 32, generator=g) * 2 - 1,
            "latent_noise": torch.randn(2, 4, 8, 8, generator=g)}


def test_adversarial_terms_move_only_their_own_player():
    """One backward trains both: the discriminator gets exactly the hinge critic's gradient (never the generator's
    wish to fool it), and the autoencoder gets reconstruction + KL + the weighted generator term."""
    import torch.nn.functional as F

    objective, batch = _adversarial_objective(), _autoencoder_batch()
    objective(batch).backward()
    got = {n: p.grad.clone() for n, p in objective.named_parameters()}

    # The same terms by hand, each differentiated only for the player it belongs to.
    reference, batch = _adversarial_objective(), _autoencoder_batch()
    vae, critic_net = reference.vae, reference.discriminator
    posterior = vae.encode(batch["image"]).latent_dist
    reconstruction = vae.decode(posterior.mean + posterior.std * batch["latent_noise"]).sample
    critic = 0.5 * (F.relu(1 - critic_net(batch["image"])).mean() + F.relu(1 + critic_net(reconstruction.detach())).mean())
    critic_grads = torch.autograd.grad(critic, list(critic_net.parameters()))
    for (name, _), expected in zip(critic_net.named_parameters(), critic_grads):
        assert torch.allclose(got[f"discriminator.{name}"], expected, atol=1e-6), name
    generator = (reconstruction - batch["image"]).abs().mean() + 1e-6 * posterior.kl().mean() / (3 * 32 * 32) \
        - 0.5 * critic_net(reconstruction).mean()
    vae_grads = torch.autograd.grad(generator, list(vae.parameters()), allow_unused=True)
    for (name, _), expected in zip(vae.named_parameters(), vae_grads):
        if expected is not None:
            assert torch.allclose(got[f"vae.{name}"], expected, atol=1e-6), name


def test_adversary_waits_for_its_start_step_and_the_step_count_is_saved():
    objective, batch = _adversarial_objective(start=2), _autoencoder_batch()
    for step in (1, 2, 3):
        objective.zero_grad()
        objective(batch).backward()
        has_gradient = all(p.grad is not None for p in objective.discriminator.parameters())
        assert has_gradient == (step > 2), step
    assert int(objective.state_dict()["steps_seen"]) == 3
    objective.eval()
    with torch.no_grad():
        objective(batch)
    assert int(objective.steps_seen) == 3  # evaluation does not count as training


def test_float16_folders_store_half_the_bytes_and_load_as_float32(tmp_path):
    from safetensors import safe_open

    from histosynth.models.autoencoder import build_autoencoder as build
    from histosynth.models.bundle import image_model_config, load_bundle, save_bundle
    from histosynth.models.denoiser import make_train_scheduler
    from tiny_models import CLASSES

    torch.manual_seed(0)
    vae, unet = build("tiny"), build_unet("tiny", 6, 4, 4)
    config = image_model_config(CLASSES, 0.5, 16, vae, "epsilon", {"steps": 0}, {})
    for dtype in ("float32", "float16"):
        save_bundle(tmp_path / dtype, config, {"autoencoder": vae, "unet": unet}, make_train_scheduler(), "# card",
                    weights_dtype=dtype)
    with safe_open(str(tmp_path / "float16" / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    sizes = {d: (tmp_path / d / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size for d in ("float32", "float16")}
    assert sizes["float16"] < 0.55 * sizes["float32"]
    assert unet.conv_in.weight.dtype == torch.float32  # saving did not convert the caller's model
    half, full = load_bundle(tmp_path / "float16"), load_bundle(tmp_path / "float32")
    assert half.config["weights_dtype"] == "float16" and "weights_dtype" not in full.config
    assert {p.dtype for p in half.unet.parameters()} == {torch.float32}
    for p, q in zip(half.unet.parameters(), unet.parameters()):
        assert torch.equal(p, q.detach().half().float())  # exactly the float16 rounding of the trained weights
    x, t, mask = torch.randn(1, 4, 4, 4), torch.tensor(10), torch.zeros(1, 2, 4, 4)
    with torch.no_grad():
        a, b = half.denoiser()(x, t, {"mask": mask}), full.denoiser()(x, t, {"mask": mask})
    assert torch.allclose(a, b, atol=5e-3) and not torch.equal(a, b)
    with pytest.raises(HistosynthError, match="weights dtype"):
        save_bundle(tmp_path / "bad", config, {"unet": unet}, None, "# card", weights_dtype="int8")


def test_a_live_train_scheduler_samples_the_timesteps_of_a_saved_one(tmp_path):
    from diffusers import DDPMScheduler

    from histosynth.models.denoiser import make_sampling_scheduler, make_train_scheduler

    live = make_train_scheduler()
    live.save_config(tmp_path)
    saved = DDPMScheduler.load_config(tmp_path)
    for name in ("dpm++sde", "ddim", "euler"):
        timesteps = []
        for config in (live.config, saved):
            scheduler = make_sampling_scheduler(name, config)
            scheduler.set_timesteps(3)
            timesteps.append(scheduler.timesteps.tolist())
        assert timesteps[0] == timesteps[1], name


def test_a_zero_terminal_snr_schedule_ends_without_signal_and_samplers_start_there():
    from histosynth.models.denoiser import make_sampling_scheduler, make_train_scheduler

    plain, zero = make_train_scheduler("v_prediction"), make_train_scheduler("v_prediction", zero_terminal_snr=True)
    assert float(plain.alphas_cumprod[-1]) > 0.004  # the default keeps some signal at its last step
    assert float(zero.alphas_cumprod[-1]) == 0.0
    assert float(zero.alphas_cumprod[0]) == pytest.approx(float(plain.alphas_cumprod[0]), rel=1e-3)
    for name in ("dpm++sde", "dpm++", "ddim", "ddpm"):
        starts = []
        for train in (plain, zero):
            scheduler = make_sampling_scheduler(name, train.config)
            scheduler.set_timesteps(25)
            starts.append(int(scheduler.timesteps[0]))
        assert starts[0] < 990 and starts[1] == 999, name
    with pytest.raises(HistosynthError, match="needs --prediction-type v_prediction"):
        make_train_scheduler("epsilon", zero_terminal_snr=True)
