"""The plain sampler: a diffusers scheduler driven by a denoiser over one latent tensor.

Every canvas sampler is this loop with a canvas-shaped denoiser (sampling/canvas.py), so a one-patch canvas
reproduces this function bit for bit.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]
StepCallback = Callable[[int, int, torch.Tensor], None]


class StepHook(Protocol):
    """Optional object told about every step before the denoiser runs (canvas samplers draw offsets here)."""

    def begin_step(self, step_index: int, timestep: torch.Tensor) -> None: ...


def initial_noise(shape: tuple[int, ...], generator: torch.Generator, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gaussian latents drawn on the CPU generator so a seed gives the same start on every device."""
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


def run_scheduler(
    denoiser: Denoiser,
    latents: torch.Tensor,
    scheduler,
    conditions: dict | None = None,
    generator: torch.Generator | None = None,
    start_step: int = 0,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Denoise ``latents`` (B, C, h, w) over ``scheduler.timesteps`` (set by the caller) from ``start_step``.

    ``latents`` at ``start_step`` 0 is unit-variance noise; it is scaled by the scheduler's initial sigma here.
    ``callback(step_index, total, latents)`` runs after each step (progress bars, checkpoints).
    """
    conditions = conditions or {}
    timesteps = scheduler.timesteps
    if start_step == 0:
        latents = latents * scheduler.init_noise_sigma
    with torch.no_grad():
        for index in range(start_step, len(timesteps)):
            t = timesteps[index]
            begin = getattr(denoiser, "begin_step", None)
            if begin is not None:
                begin(index, t)
            # The model output goes straight into the scheduler, which replaces it by its x0 estimate: held here
            # as well, it would cost one more canvas of memory during every step.
            latents = scheduler.step(denoiser(scheduler.scale_model_input(latents, t), t, conditions), t, latents,
                                     generator=generator).prev_sample
            if callback is not None:
                callback(index + 1, len(timesteps), latents)
    return latents


def sample_patch(denoiser: Denoiser, scheduler, shape: tuple[int, ...], steps: int, seed: int,
                 conditions: dict | None = None, device: torch.device | str = "cpu",
                 callback: StepCallback | None = None) -> torch.Tensor:
    """Sample latents of ``shape`` (B, C, h, w) from seeded noise with ``steps`` scheduler steps."""
    generator = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(steps, device=device)
    noise = initial_noise(shape, generator, device)
    return run_scheduler(denoiser, noise, scheduler, conditions, generator=generator, callback=callback)
