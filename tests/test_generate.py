"""Slide generation: outputs open in slide readers, are deterministic, resume after SIGKILL, reject bad input."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tiffslide
import torch
from PIL import Image

from histosynth.errors import HistosynthError
from histosynth.io.tiff import read_provenance
from cli_runner import cli  # noqa: F401  (fixture)
from tiny_models import tiny_image_model, tiny_mask_model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return tiny_image_model(root / "image", patch=32), tiny_mask_model(root / "mask")


def generate_args(models, out, *extra):
    image, mask = models
    return ["generate", "--model", image, "--mask-model", mask, "--size", "256x192", "--out", out,
            "--steps", "3", "--batch", "4", *extra]


def test_generate_writes_readable_deterministic_files(tmp_path, models, cli):
    code, text = cli(generate_args(models, tmp_path / "a" / "slide.tiff", "--stats", tmp_path / "stats.json",
                                   "--blend-last", "0"))
    assert code == 0, text
    code, text = cli(generate_args(models, tmp_path / "b" / "slide.tiff", "--blend-last", "0"))
    assert code == 0, text
    for name in ("slide.tiff", "slide.mask.tiff", "slide.mask.geojson", "slide.mask.png", "slide.thumbnail.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    with tiffslide.TiffSlide(str(tmp_path / "a" / "slide.tiff")) as slide:
        assert slide.dimensions == (256, 192)
        assert float(slide.properties["tiffslide.mpp-x"]) == pytest.approx(0.5)
    provenance = read_provenance(tmp_path / "a" / "slide.tiff")
    assert provenance["synthetic"] is True and provenance["seed"] == 0 and len(provenance["model_hash"]) == 64
    settings = provenance["settings"]  # the defaults, resolved: a quarter of the 8 px patch at every step
    assert (settings["context"], settings["early_context"], settings["early_context_steps"]) == (2, 2, 1)
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert (stats["context_latent_px"], stats["early_context_latent_px"], stats["early_context_steps"]) == (2, 2, 1)
    for key in ("sampler", "size", "steps", "unet_evals", "cost_per_pass",
                "unet_evals_per_output_latent_pixel_per_step", "seam_lines", "seconds", "peak_rss_mb"):
        assert key in stats
    # 256x192 px = 64x48 latents, P = 8: working canvas 72x56 -> 9x7 patches x 3 steps x 2 guidance passes.
    assert stats["unet_evals"] == 9 * 7 * 3 * 2
    assert stats["cost_per_pass"] == pytest.approx(72 * 56 / (64 * 48), abs=1e-4)
    # Blending a half-shifted second grid over the last 2 of 3 steps doubles those steps' patches.
    code, text = cli(generate_args(models, tmp_path / "c" / "slide.tiff", "--stats", tmp_path / "blend.json",
                                   "--blend-last", "2"))
    assert code == 0, text
    blended = json.loads((tmp_path / "blend.json").read_text())
    assert blended["unet_evals"] == 9 * 7 * (1 + 2 * 2) * 2


def test_mask_image_input_and_ome_tiff(tmp_path, models, cli):
    mask = np.zeros((192, 256), np.uint8)
    mask[:, 128:] = 2
    mask[:96, :128] = 1
    Image.fromarray(mask).save(tmp_path / "mask.png")
    image, _ = models
    code, text = cli(["generate", "--model", image, "--mask", tmp_path / "mask.png", "--size", "256x192",
                      "--out", tmp_path / "s.ome.tiff", "--steps", "2", "--format", "ome-tiff"])
    assert code == 0, text
    with tiffslide.TiffSlide(str(tmp_path / "s.ome.tiff")) as slide:
        assert slide.dimensions == (256, 192)


@pytest.mark.parametrize("case", ["size", "classes", "resume-settings", "stale-checkpoint"])
def test_bad_input_one_line_error(tmp_path, models, cli, case):
    image, _ = models
    out = tmp_path / "slide.tiff"
    if case == "size":
        args = generate_args(models, out)
        args[args.index("256x192")] = "250x192"
        expected = "not a multiple of the model's pixel stride 4 px"
    elif case == "classes":
        Image.fromarray(np.full((192, 256), 7, np.uint8)).save(tmp_path / "mask.png")
        args = ["generate", "--model", image, "--mask", tmp_path / "mask.png", "--size", "256x192", "--out", out]
        expected = "class id 7"
    elif case == "stale-checkpoint":
        # A fresh run over an earlier run's checkpoints neither mixes its steps with them nor deletes them.
        kept = tmp_path / "slide.checkpoint" / "mask" / "step-000001"
        kept.mkdir(parents=True)
        args = generate_args(models, out)
        expected = "slide.checkpoint: holds the checkpoints of an earlier run; continue it with --resume"
    else:
        # A checkpoint from other settings must not be continued.
        assert cli(generate_args(models, out, "--checkpoint-every", "1", "--seed", "1"))[0] == 0
        # Leave a checkpoint behind by copying one made by an interrupted-looking run.
        ckpt = tmp_path / "slide.checkpoint" / "step-000001"
        ckpt.mkdir(parents=True)
        (ckpt / "progress.json").write_text(json.dumps({"step": 1, "settings_hash": "other", "unet_evals": 0,
                                                              "canvases": []}))
        args = generate_args(models, out, "--resume")
        expected = "different settings"
    code, text = cli(args)
    lines = [line for line in text.splitlines() if line.startswith("error")]
    assert code == 2 and len(lines) == 1 and expected in lines[0], text
    if case != "resume-settings":
        assert not out.exists()
    if case == "stale-checkpoint":
        assert kept.is_dir()


def healed_three_step_generator(models):
    """A factory of fresh slide generators (their layout drawn) for a 256² px, 3-step, healed run of the tiny models."""
    from histosynth.models.bundle import load_bundle
    from histosynth.pipelines.generate_slide import GenerateSettings, SlideGenerator

    image, mask = models
    model, mask_model = load_bundle(image), load_bundle(mask)
    settings = GenerateSettings(width=256, height=256, steps=3, batch=4, heal=True)

    def generator():
        g = SlideGenerator(model, settings, mask_model=mask_model, progress=False)
        g.prepare_mask()
        return g
    return generator


class Killed(Exception):
    """A run killed right after a checkpoint (the run keeps only its latest one, the finished canvas's at the end)."""


def killed_after_checkpoint(generator, folder, step: int, monkeypatch, **kwargs) -> None:
    """Run ``generator.sample_latents`` with ``--checkpoint-every 1`` into ``folder`` and kill it once the checkpoint
    of ``step`` is written."""
    from histosynth.sampling.checkpoint import CanvasCheckpoint

    save = CanvasCheckpoint.save

    def save_then_die(self, current, done):
        save(self, current, done)
        if done == step:
            raise Killed

    with monkeypatch.context() as patched:
        patched.setattr(CanvasCheckpoint, "save", save_then_die)
        with pytest.raises(Killed):
            generator.sample_latents(folder, checkpoint_every=1, **kwargs)


def test_a_spilled_canvas_run_and_its_resumed_run_equal_the_run_in_memory(tmp_path, models, monkeypatch):
    """With every canvas spilled (the threshold set to 0), the solver's history and the previous x0 wait on disk:
    the latents are the in-memory run's bit for bit, a checkpoint keeps those canvases in files of their own, a run
    resumed from it gives the same latents again, and no spill file is left behind."""
    from histosynth.pipelines import generate_slide
    from histosynth.sampling.spill import SpilledCanvas

    generator = healed_three_step_generator(models)

    in_memory = generator().sample_latents()
    monkeypatch.setattr(generate_slide, "SPILL_FROM_ELEMENTS", 0)
    spilled_canvases = []
    original = SpilledCanvas.__init__
    monkeypatch.setattr(SpilledCanvas, "__init__", lambda self, *a, **k: (spilled_canvases.append(a[1]),
                                                                           original(self, *a, **k))[1])
    spill = tmp_path / "out"
    spill.mkdir()
    spilled = generator().sample_latents(tmp_path / "ckpt", checkpoint_every=1, spill_dir=spill)
    assert torch.equal(in_memory, spilled)
    assert len(spilled_canvases) >= 3  # the history after every step and the x0 the heal keeps
    assert [p.name for p in (tmp_path / "ckpt").glob("step-*")] == ["step-000003"]  # the finished canvas
    killed_after_checkpoint(generator(), tmp_path / "killed", 2, monkeypatch, spill_dir=spill)
    kept = tmp_path / "killed" / "step-000002"
    assert json.loads((kept / "progress.json").read_text())["canvases"] == ["history-1", "previous_x0"]
    assert (kept / "previous_x0.safetensors").is_file() and (kept / "history-1.safetensors").is_file()
    resumed = generator().sample_latents(tmp_path / "killed", checkpoint_every=1, resume=True, spill_dir=spill)
    assert torch.equal(in_memory, resumed)
    assert list(spill.iterdir()) == []


def test_a_spilling_canvas_is_refused_where_its_folder_lacks_the_disk_space(tmp_path, models, monkeypatch):
    import collections

    from histosynth.errors import HistosynthError
    from histosynth.pipelines import generate_slide

    monkeypatch.setattr(generate_slide, "SPILL_FROM_ELEMENTS", 0)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(generate_slide.shutil, "disk_usage", lambda path: usage(2**20, 2**20 - 1000, 1000))
    with pytest.raises(HistosynthError, match=r"256x256 px canvas keeps about 0.0 GiB on disk there .* 0.0 GiB are free"):
        healed_three_step_generator(models)().sample_latents(spill_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_resume_before_a_healed_step_restores_the_previous_x0(tmp_path, models, monkeypatch):
    """The last steps heal their cut lines from the previous step's x0: a checkpoint taken just before one carries
    that estimate, so the resumed canvas equals the uninterrupted one."""
    from histosynth.models.bundle import load_bundle
    from histosynth.pipelines.generate_slide import GenerateSettings, SlideGenerator

    image, mask = models
    model, mask_model = load_bundle(image), load_bundle(mask)
    generator = healed_three_step_generator(models)

    whole = generator().sample_latents()
    killed_after_checkpoint(generator(), tmp_path / "ckpt", 2, monkeypatch)  # just before the healed step
    assert [p.name for p in (tmp_path / "ckpt").glob("step-*")] == ["step-000002"]
    resumed = generator().sample_latents(tmp_path / "ckpt", checkpoint_every=1, resume=True)
    assert torch.equal(whole, resumed)
    unhealed = SlideGenerator(model, GenerateSettings(width=256, height=256, steps=3, batch=4, heal=False),
                              mask_model=mask_model, progress=False)
    unhealed.prepare_mask()
    assert not torch.equal(whole, unhealed.sample_latents())  # the heal did change the last step


def test_control_lines_avoid_every_recent_steps_cut_lines(models):
    from histosynth.models.bundle import load_bundle
    from histosynth.pipelines.generate_slide import GenerateSettings, SlideGenerator

    image, mask = models
    generator = SlideGenerator(load_bundle(image), GenerateSettings(width=512, height=384, steps=6, heal_steps=2,
                                                                    batch=8),
                               mask_model=load_bundle(mask), progress=False)
    generator.prepare_mask()
    generator.sample_latents()
    stats = generator.stats
    patch, distance = stats["patch_px"], stats["seam_control_min_distance_px"]
    assert stats["recent_cut_offsets_px"]["steps"] == [2, 3, 4, 5]  # two healed steps and the two before them
    recent = stats["recent_cut_offsets_px"]["y_x"]
    assert [stats["seam_lines"]["y"][0] % patch, stats["seam_lines"]["x"][0] % patch] == recent[-1]
    for axis, key in enumerate("yx"):
        controls = stats["seam_control_lines"][key]
        assert controls, key
        for line in controls:
            nearest = min(min((line - o[axis]) % patch, (o[axis] - line) % patch) for o in recent)
            assert nearest >= distance, (key, line, recent)


def test_sigkill_then_resume_gives_identical_bytes(tmp_path, models):
    image, mask = models
    base = [sys.executable, "-m", "histosynth", "generate", "--model", str(image), "--mask-model", str(mask),
            "--size", "256x256", "--steps", "12", "--batch", "8"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    reference = tmp_path / "ref" / "slide.tiff"
    subprocess.run(base + ["--out", str(reference)], check=True, env=env, capture_output=True)

    out = tmp_path / "run" / "slide.tiff"
    ckpt = tmp_path / "run" / "slide.checkpoint"
    proc = subprocess.Popen(base + ["--out", str(out), "--checkpoint-every", "1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not any(ckpt.glob("step-00000[3-9]")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    assert any(ckpt.glob("step-*")), "the run finished before it could be killed"
    subprocess.run(base + ["--out", str(out), "--checkpoint-every", "1", "--resume"], check=True, env=env,
                   capture_output=True)
    assert out.read_bytes() == reference.read_bytes()
    assert (out.parent / "slide.mask.tiff").read_bytes() == (reference.parent / "slide.mask.tiff").read_bytes()
    assert not ckpt.exists()


def test_banded_mask_reads_like_the_array_it_holds():
    from histosynth.pipelines.masks import BandedMask, mask_digest

    mask = np.random.default_rng(0).integers(0, 4, size=(37, 29)).astype(np.uint8)
    banded = BandedMask.of(mask, band=8)  # bands of 8 rows, the last of 5
    assert banded.shape == mask.shape
    for key in [slice(None), slice(3, 20), slice(8, 16), slice(30, 100), slice(None, None, 5), slice(2, 35, 3),
                (slice(None, None, 4), slice(None, None, 4)), (slice(5, 9), slice(2, 7)), 0, 36, -1, (17, slice(3, 4))]:
        assert np.array_equal(banded[key], mask[key]), key
    assert np.array_equal(np.asarray(banded), mask)
    assert mask_digest(banded) == mask_digest(mask)
    assert mask_digest(BandedMask.of(mask, band=1)) == mask_digest(mask)
    changed = mask.copy()
    changed[36, 28] ^= 1
    assert mask_digest(changed) != mask_digest(mask)


def test_sigterm_checkpoints_exits_2_with_one_line_and_resume_finishes_identically(tmp_path, models, cli,
                                                                                    monkeypatch):
    """SIGTERM (a scheduler's kill, `kill PID`) during denoising: the canvas is checkpointed at the step boundary,
    one line says how to continue, exit status 2, no output file; --resume then writes the uninterrupted bytes."""
    from histosynth.pipelines import generate_slide as module

    reference = tmp_path / "ref" / "slide.tiff"
    assert cli(generate_args(models, reference))[0] == 0

    class TerminatedAfterStep2(module.tqdm):
        def update(self, n=1):
            super().update(n)
            if self.desc == "denoising" and self.n == 2:  # the step-end callback runs right after this
                signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(module, "tqdm", TerminatedAfterStep2)
    out = tmp_path / "run" / "slide.tiff"
    code, text = cli(generate_args(models, out))
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in text, text
    assert "stopped by SIGTERM at step 2/3" in errors[0] and "--resume" in errors[0]
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["slide.checkpoint"]
    # The mask model's layout is kept beside the step, so that the resumed run need not draw it again.
    assert sorted(p.name for p in (tmp_path / "run" / "slide.checkpoint").iterdir()) == ["layout.npz", "step-000002"]
    monkeypatch.undo()

    def no_mask_model(*args, **kwargs):
        raise AssertionError("the resumed run drew the layout again")

    monkeypatch.setattr(module, "sample_mask", no_mask_model)
    assert cli(generate_args(models, out, "--resume"))[0] == 0
    assert out.read_bytes() == reference.read_bytes()
    assert (out.parent / "slide.mask.tiff").read_bytes() == (reference.parent / "slide.mask.tiff").read_bytes()
    assert not (tmp_path / "run" / "slide.checkpoint").exists()


def test_a_kept_layout_is_used_only_for_the_settings_it_was_drawn_with(tmp_path):
    from histosynth.pipelines.masks import BandedMask

    mask = np.random.default_rng(1).integers(0, 3, size=(40, 24)).astype(np.uint8)
    path = tmp_path / "layout.npz"
    BandedMask.of(mask, band=16).save(path, "key-a")
    loaded = BandedMask.load(path, "key-a")
    assert loaded.shape == mask.shape and np.array_equal(np.asarray(loaded), mask)
    with pytest.raises(HistosynthError, match="layout drawn with different settings or mask model"):
        BandedMask.load(path, "key-b")
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(HistosynthError, match="damaged layout file"):
        BandedMask.load(path, "key-a")


def test_a_killed_runs_temporary_files_go_at_the_next_run_of_the_same_output(tmp_path, models, cli):
    out = tmp_path / "slide.tiff"
    dead = subprocess.Popen(["true"])  # once reaped, its process id belongs to no process: a writer killed earlier
    dead.wait()
    stale_file = tmp_path / f".slide.tiff.{dead.pid}-x1y2.tmp"
    stale_folder = tmp_path / f".slide.mask.png.{dead.pid}-a3b4.tmp"
    live = tmp_path / f".slide.tiff.{os.getppid()}-z9.tmp"  # a writer still running: left alone
    stale_file.write_bytes(b"half a tiff")
    stale_folder.mkdir()
    (stale_folder / "slide.mask.png").write_bytes(b"half a png")
    live.write_bytes(b"in progress")
    code, text = cli(generate_args(models, out))
    assert code == 0, text
    assert not stale_file.exists() and not stale_folder.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [live.name]


def test_a_layout_interrupted_mid_draw_continues_from_its_checkpoint_to_the_same_scores(tmp_path, models):
    """The mask canvas checkpoints its steps like the image canvas: a run killed after step 2 of 4 and continued from
    the checkpoint gives the uninterrupted run's class scores bit for bit."""
    from histosynth.models.bundle import load_bundle
    from histosynth.pipelines.masks import sample_mask_scores

    mask_model = load_bundle(str(models[1]), kind="mask")
    whole, _ = sample_mask_scores(mask_model, (24, 40), steps=4, seed=3, micro_batch=4)

    class Killed(Exception):
        pass

    def killed_after_step_2(done, total, current):
        if done == 2:
            raise Killed

    folder = tmp_path / "mask"
    with pytest.raises(Killed):
        sample_mask_scores(mask_model, (24, 40), steps=4, seed=3, micro_batch=4, progress=killed_after_step_2,
                           checkpoint_dir=folder, checkpoint_every=1, checkpoint_key="k")
    assert [p.name for p in folder.iterdir()] == ["step-000001"]  # (the callback raised before step 2 was saved)
    seen = []
    resumed, _ = sample_mask_scores(mask_model, (24, 40), steps=4, seed=3, micro_batch=4,
                                    progress=lambda done, total, current: seen.append(done),
                                    checkpoint_dir=folder, checkpoint_every=1, checkpoint_key="k")
    assert seen == [2, 3, 4] and torch.equal(resumed, whole)
    with pytest.raises(HistosynthError, match="different settings"):
        sample_mask_scores(mask_model, (24, 40), steps=4, seed=3, micro_batch=4, checkpoint_dir=folder,
                           checkpoint_every=1, checkpoint_key="other")


def test_a_drawn_layout_is_banded_as_it_is_upsampled_and_equals_the_whole_upsampling():
    """Upsampled band by band (one row of context each side), the labels equal one bilinear upsampling of the whole
    score map; banded, they equal the plain array."""
    import torch.nn.functional as F

    from histosynth.pipelines.masks import BandedMask, label_bands, upsample_labels

    scores = torch.randn(1, 3, 21, 13, generator=torch.Generator().manual_seed(0))
    whole = (F.interpolate(scores, scale_factor=4, mode="bilinear", align_corners=False)[0].argmax(0) + 1).numpy()
    plain = upsample_labels(scores, 4, band=5)
    assert plain.dtype == np.uint8 and np.array_equal(plain, whole)
    banded = BandedMask(label_bands(scores, 4, band=5), 13 * 4)
    assert [band.shape[0] for band in banded.bands()] == [20, 20, 20, 20, 4]
    assert np.array_equal(np.asarray(banded), whole)


def test_reduced_precision_approximates_float32_and_is_recorded(tmp_path, models, cli):
    from histosynth.models.bundle import load_bundle
    from histosynth.models.denoiser import AutocastDenoiser, at_precision

    image, _ = models
    denoiser = load_bundle(image).denoiser()
    assert at_precision(denoiser, "float32") is denoiser
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    mask = torch.nn.functional.one_hot(torch.randint(0, 2, (2, 8, 8), generator=generator), 2).permute(0, 3, 1, 2)
    with torch.no_grad():
        exact = denoiser(latents, torch.tensor(500), {"mask": mask.float()})
        approx = at_precision(denoiser, "bfloat16")(latents, torch.tensor(500), {"mask": mask.float()})
    assert isinstance(at_precision(denoiser, "bfloat16"), AutocastDenoiser)
    assert approx.dtype == torch.float32 and approx.shape == exact.shape
    # bfloat16 keeps 8 significant bits: close to float32, and not the float32 result itself.
    error = (approx - exact).abs().max().item()
    assert 0 < error < 0.05 * exact.abs().max().item()

    # A checkpoint or a kept layout of one precision is never continued at another.
    from histosynth.pipelines.generate_slide import GenerateSettings, SlideGenerator
    runs = {p: SlideGenerator(load_bundle(image), GenerateSettings(256, 192, precision=p),
                              mask_model=load_bundle(models[1])) for p in ("float32", "bfloat16")}
    assert runs["float32"].layout_key() != runs["bfloat16"].layout_key()
    assert runs["float32"].settings_hash() != runs["bfloat16"].settings_hash()

    # The decoder runs at the same precision: nearly, not exactly, the float32 pixels; and a slide is decoded so.
    from histosynth.pipelines.generate_slide import decoder_at_precision
    model = load_bundle(image)
    latents = torch.randn(1, model.unet.config.out_channels, 192 // model.latent_factor, 256 // model.latent_factor,
                          generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact = decoder_at_precision(model.autoencoder, "float32", image)(latents)
        approx = decoder_at_precision(model.autoencoder, "bfloat16", image)(latents)
    assert approx.dtype == torch.float32 and approx.shape == exact.shape == (1, 3, 192, 256)
    error = (approx - exact).abs().max().item()
    assert 0 < error < 0.05 * 2, error  # of the [-1, 1] range
    decoded = {}
    for precision, run in runs.items():
        run.write(latents, tmp_path / f"{precision}.tiff")
        with tiffslide.TiffSlide(str(tmp_path / f"{precision}.tiff")) as slide:
            decoded[precision] = np.asarray(slide.read_region((0, 0), 0, (256, 192)).convert("RGB"))
    assert not np.array_equal(decoded["bfloat16"], decoded["float32"])

    code, text = cli(generate_args(models, tmp_path / "bf16" / "slide.tiff", "--precision", "bfloat16"))
    assert code == 0, text
    assert read_provenance(tmp_path / "bf16" / "slide.tiff")["settings"]["precision"] == "bfloat16"


@pytest.mark.parametrize("precision, expected", [("float16", "--precision float16 needs a CUDA device"),
                                                 ("half", "--precision 'half': not one of float32, bfloat16, float16")])
def test_precision_refused_with_one_line(tmp_path, models, cli, precision, expected):
    if precision == "float16" and torch.cuda.is_available():
        pytest.skip("float16 autocast runs on this machine's GPU")
    out = tmp_path / "slide.tiff"
    code, text = cli(generate_args(models, out, "--precision", precision))
    lines = [line for line in text.splitlines() if line.startswith("error")]
    assert code == 2 and len(lines) == 1 and expected in lines[0], text
    assert not out.exists() and not list(tmp_path.iterdir())


def test_context_is_a_quarter_patch_in_the_unets_steps_and_other_values_are_refused(tmp_path, models, cli):
    from histosynth.models.bundle import Bundle, load_bundle
    from histosynth.models.denoiser import build_unet
    demo_sized = Bundle({"latent_patch": 32}, {"unet": build_unet("demo", 11, 8, 32)})  # halves the patch 3 times
    assert (demo_sized.context_step, demo_sized.default_context) == (4, 8)
    assert Bundle({"latent_patch": 12}, demo_sized.components).default_context == 0  # 3 rounds down to 0
    tiny = load_bundle(models[0])
    assert (tiny.context_step, tiny.default_context) == (1, 2)
    code, text = cli(generate_args(models, tmp_path / "s.tiff", "--context", "9"))
    assert code != 0 and "--context 9: the model takes 0 to 8 latent px in steps of 1" in text, text
    assert not (tmp_path / "s.tiff").exists()
    code, text = cli(generate_args(models, tmp_path / "s.tiff", "--context", "-1"))
    assert code != 0 and "--context" in text and not (tmp_path / "s.tiff").exists(), text
    code, text = cli(generate_args(models, tmp_path / "s.tiff", "--sampler", "diffinfinite", "--context", "2"))
    assert code != 0 and "--context applies to the random, tiles and multidiffusion samplers" in text, text
    code, text = cli(generate_args(models, tmp_path / "s.tiff", "--early-context", "10"))
    assert code != 0 and "--early-context 10: the model takes 0 to 8 latent px in steps of 1" in text, text
    code, text = cli(generate_args(models, tmp_path / "s.tiff", "--early-context-steps", "4"))  # of --steps 3
    assert code != 0 and "--early-context-steps 4: must be a whole number from 0 to 3" in text, text
    assert not (tmp_path / "s.tiff").exists()


def test_the_early_steps_take_their_own_context_only_when_asked(tmp_path, models, cli):
    code, text = cli(generate_args(models, tmp_path / "s.tiff", "--context", "1", "--stats", tmp_path / "s.json"))
    assert code == 0, text
    stats = json.loads((tmp_path / "s.json").read_text())
    assert (stats["context_latent_px"], stats["early_context_latent_px"]) == (1, 1)
    code, text = cli(generate_args(models, tmp_path / "t.tiff", "--context", "1", "--early-context", "4",
                                   "--early-context-steps", "2", "--stats", tmp_path / "t.json"))
    assert code == 0, text
    stats = json.loads((tmp_path / "t.json").read_text())
    assert (stats["context_latent_px"], stats["early_context_latent_px"], stats["early_context_steps"]) == (1, 4, 2)


def plain_and_with(models, tmp_path, cli, *options):
    """Stats of a.tiff generated with the defaults and of b.tiff with ``options``."""
    for name, extra in (("a", ()), ("b", options)):
        code, text = cli(generate_args(models, tmp_path / f"{name}.tiff", *extra, "--stats", tmp_path / f"{name}.json"))
        assert code == 0, text
    return [json.loads((tmp_path / f"{name}.json").read_text()) for name in "ab"]


def test_shared_norms_measure_a_sample_each_step_and_change_the_slide(tmp_path, models, cli):
    plain, shared = plain_and_with(models, tmp_path, cli, "--shared-norms", "4")
    assert (plain["shared_norm_windows"], shared["shared_norm_windows"]) == (0, 4)
    # 9×7 patches a step plus the sample of 4, 3 steps, 2 guidance passes.
    assert shared["unet_evals"] == plain["unet_evals"] + 4 * 3 * 2 == (9 * 7 + 4) * 3 * 2
    assert read_provenance(tmp_path / "b.tiff")["settings"]["shared_norms"] == 4
    with tiffslide.TiffSlide(str(tmp_path / "a.tiff")) as a, tiffslide.TiffSlide(str(tmp_path / "b.tiff")) as b:
        assert not np.array_equal(np.asarray(a.read_region((0, 0), 0, (256, 192))),
                                  np.asarray(b.read_region((0, 0), 0, (256, 192))))
    code, text = cli(generate_args(models, tmp_path / "c.tiff", "--shared-norms", "-1"))
    assert code != 0 and "--shared-norms" in text and not (tmp_path / "c.tiff").exists(), text
    code, text = cli(generate_args(models, tmp_path / "c.tiff", "--sampler", "diffinfinite", "--shared-norms", "4"))
    assert code != 0 and "--shared-norms applies to the random, tiles and multidiffusion samplers" in text, text


def test_the_mask_model_takes_context_when_asked(tmp_path, models, cli):
    plain, wide = plain_and_with(models, tmp_path, cli, "--mask-context", "2")
    assert (plain["mask_context_px"], wide["mask_context_px"]) == (0, 2)
    assert plain["mask_unet_evals"] == wide["mask_unet_evals"]  # context widens the patches, it adds none
    masks = [np.asarray(Image.open(tmp_path / f"{name}.mask.png")) for name in "ab"]
    assert not np.array_equal(*masks)
    assert read_provenance(tmp_path / "b.tiff")["settings"]["mask_context"] == 2
    code, text = cli(generate_args(models, tmp_path / "c.tiff", "--mask-context", "9"))
    assert code != 0 and "--mask-context 9: the mask model takes 0 to 8 px in steps of 1" in text, text
    assert not (tmp_path / "c.tiff").exists()


def test_a_run_stopped_at_its_last_step_or_while_decoding_resumes_at_the_decoding(tmp_path, models, cli,
                                                                                   monkeypatch):
    """SIGTERM in the last step checkpoints the finished canvas; so does `--checkpoint-every` after the last step,
    so that a run that dies while decoding (hours at a gigapixel) does not denoise again: --resume decodes the
    checkpointed canvas and writes the uninterrupted bytes without one UNet call."""
    from histosynth.pipelines import generate_slide as module
    from histosynth.sampling.canvas import CanvasDenoiser

    reference = tmp_path / "ref" / "slide.tiff"
    assert cli(generate_args(models, reference))[0] == 0

    class TerminatedInTheLastStep(module.tqdm):
        def update(self, n=1):
            super().update(n)
            if self.desc == "denoising" and self.n == 3:
                signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(module, "tqdm", TerminatedInTheLastStep)
    stopped = tmp_path / "stopped" / "slide.tiff"
    code, text = cli(generate_args(models, stopped))
    assert code == 2 and "stopped by SIGTERM at step 3/3" in text and "--resume" in text, text
    monkeypatch.undo()
    # The finished canvas is all a resumed run decodes: the solver's history and the previous x0 are not kept.
    finished = stopped.parent / "slide.checkpoint" / "step-000003"
    assert sorted(p.name for p in finished.iterdir()) == ["progress.json", "state.json", "state.safetensors"]

    real_write = module.SlideGenerator.write

    def dies_while_decoding(*args, **kwargs):
        raise RuntimeError("killed while decoding")

    monkeypatch.setattr(module.SlideGenerator, "write", dies_while_decoding)
    died = tmp_path / "died" / "slide.tiff"
    with pytest.raises(RuntimeError, match="killed while decoding"):
        cli(generate_args(models, died, "--checkpoint-every", "2"))
    monkeypatch.setattr(module.SlideGenerator, "write", real_write)
    assert sorted(p.name for p in (died.parent / "slide.checkpoint").glob("step-*")) == ["step-000003"]
    assert not list((died.parent / "slide.checkpoint" / "step-000003").glob("history-*"))

    def no_unet(*args, **kwargs):
        raise AssertionError("the resumed run denoised again")

    monkeypatch.setattr(CanvasDenoiser, "__call__", no_unet)
    for out, extra in ((stopped, ()), (died, ("--checkpoint-every", "2"))):
        code, text = cli(generate_args(models, out, *extra, "--resume"))
        assert code == 0, text
        assert out.read_bytes() == reference.read_bytes()
        assert not (out.parent / "slide.checkpoint").exists()


@pytest.mark.parametrize("shape", [(1, 3, 150, 100), (2, 5, 7, 9), (40_000,)])
def test_the_finiteness_check_in_parts_finds_a_bad_number_anywhere(shape):
    """`all_finite` looks at a large tensor in parts (a whole-canvas `isfinite` holds a canvas more): one NaN or
    infinity is found wherever it is, in a view as in a contiguous tensor, and a finite tensor passes."""
    from histosynth.checks import all_finite

    values = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    limit = 97  # parts far smaller than the tensor, none of them aligned with its rows
    assert all_finite(values, limit) and all_finite(values[..., 1:], limit)
    for flat in (0, values.numel() // 3, values.numel() - 1):
        for bad in (float("nan"), float("inf"), float("-inf")):
            broken = values.clone()
            broken.view(-1)[flat] = bad
            assert not all_finite(broken, limit)
            index = np.unravel_index(flat, shape)
            if index[-1] >= 1:  # inside the view that drops the first column
                assert not all_finite(broken[..., 1:], limit)
