"""Golden values: a few numbers from the image denoiser and the canvas samplers, so that numerical drift (a changed
operation order, a refactor that "only moves code", a new diffusers) is seen even where every structural test passes.

The numbers are what the code gave when this file was written; tolerances allow for other CPUs' SIMD rounding, not
for a change of algorithm. When a change of numbers is intended, regenerate them with

    HISTOSYNTH_PRINT_GOLDEN=1 .venv/bin/python -m pytest -q -s tests/test_golden.py

and paste the printed lists over the expected ones below (the test fails while they differ, printing or not).
"""
import os

import numpy as np
import pytest
import torch

from histosynth.conditions.mask import encode_mask
from histosynth.models.bundle import load_bundle
from histosynth.models.denoiser import ConditionedDenoiser, build_unet
from histosynth.sampling.canvas import CanvasDenoiser, X0Space, canvas_noise, make_layout
from histosynth.sampling.diffinfinite import sample_diffinfinite
from histosynth.sampling.guidance import guided
from histosynth.sampling.patch import initial_noise, run_scheduler
from tiny_models import tiny_image_model

TOLERANCE = dict(rtol=1e-4, atol=1e-4)


def _check(name: str, actual: list[float], expected: list[float]) -> None:
    if os.environ.get("HISTOSYNTH_PRINT_GOLDEN"):
        print(f"\n{name}: {[round(float(v), 6) for v in actual]}")
    torch.testing.assert_close(torch.tensor(actual, dtype=torch.float64),
                               torch.tensor(expected, dtype=torch.float64), **TOLERANCE)


def _summary(latents: torch.Tensor) -> list[float]:
    """Six values at fixed places (corners and interior of several channels), then the mean and std of the whole
    tensor, so drift anywhere in it shows even where the six values happen not to move."""
    flat = latents.flatten()
    picks = torch.linspace(0, len(flat) - 1, 6).round().long()
    return flat[picks].tolist() + [float(latents.mean()), float(latents.std())]


@pytest.fixture(scope="module")
def image_model(tmp_path_factory):
    """The tiny image model as a saved and loaded folder: the path generate takes (scheduler from the folder)."""
    return load_bundle(tiny_image_model(tmp_path_factory.mktemp("golden") / "model"))


def _mask(model, height: int, width: int) -> torch.Tensor:
    """A two-class mask with a diagonal border at image resolution: fractional latent values after area averaging."""
    factor = model.latent_factor
    rows, cols = np.mgrid[:height * factor, :width * factor]
    ids = np.where(cols > rows + 6, 2, 1).astype(np.uint8)
    return encode_mask(torch.from_numpy(ids).long()[None], model.num_classes, factor)  # (1, 2, height, width)


def test_image_denoiser_output_is_golden():
    torch.manual_seed(0)
    denoiser = ConditionedDenoiser(build_unet("tiny", 4 + 2, 4, 4), 4, 2).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 4, 4, generator=g)
    mask = torch.rand(2, 2, 4, 4, generator=g)
    with torch.no_grad():
        out = denoiser(x, torch.tensor(500), {"mask": mask})
    assert out.shape == (2, 4, 4, 4)
    _check("denoiser", _summary(out), [
        0.090114, 0.499985, -0.001548, -0.122249, -0.133324, 0.311468, 0.207069, 0.316011,
    ])


def test_random_offset_canvas_sampler_is_golden(image_model):
    """The generate path in small: random-offset grid over a latent canvas a little over two patches each way,
    stochastic DPM-Solver++, mask guidance and healed cut lines."""
    shape, steps, seed = (9, 10), 3, 11  # latent px; patches are 4 latent px
    layout = make_layout("random", image_model.latent_patch, seed=seed, heal_from=1)
    scheduler = image_model.sampling_scheduler("dpm++sde")
    denoiser = guided(image_model.denoiser(), {"mask": 2.0})
    canvas = CanvasDenoiser(denoiser, layout, shape, {"mask": _mask(image_model, *shape)}, micro_batch=4,
                            x0_space=X0Space.of(scheduler), total_steps=steps)
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    latents = run_scheduler(canvas, canvas_noise(layout, 4, shape, generator), scheduler, generator=generator)
    assert latents.shape == (1, 4, 12, 16)  # the working canvas; the output is its top-left 9×10
    assert canvas.stats.unet_evals == 12 * 2 * steps  # twelve 4×4 patches, two guidance passes, every step
    _check("canvas", _summary(latents[:, :, :shape[0], :shape[1]]), [
        -1.685501, 3.846217, 6.826363, -1.665482, -5.281636, -3.237485, -0.07299, 4.317917,
    ])


def test_diffinfinite_sampler_is_golden(image_model):
    shape, steps, seed = (9, 10), 3, 5
    denoiser = guided(image_model.denoiser(), {"mask": 2.0})
    noise = initial_noise((1, 4, *shape), torch.Generator().manual_seed(seed))
    latents, stats = sample_diffinfinite(denoiser, noise, image_model.sampling_scheduler("ddim"),
                                         image_model.latent_patch, steps, seed, {"mask": _mask(image_model, *shape)},
                                         micro_batch=4)
    assert latents.shape == (1, 4, *shape)
    # Which windows each round takes is drawn from the seed: a changed draw changes the counts as well as values.
    assert (stats.unet_evals, stats.rounds) == (66, 13)  # 33 patches × 2 guidance passes
    _check("diffinfinite", _summary(latents), [
        6.613236, 2.61277, -2.25691, 4.632021, -4.370789, -3.994848, 0.389514, 3.407564,
    ])
