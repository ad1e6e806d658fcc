"""The plain sampler: a diffusers scheduler driven by a denoiser over one latent tensor.

Every canvas sampler is this loop with a canvas-shaped denoiser (sampling/canvas.py), so a one-patch canvas
reproduces this function bit for bit.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch
from diffusers import DPMSolverMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor

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
    ``callback(step_index, total, latents)`` runs after each step (progress bars, checkpoints); the tensor it gets
    is overwritten by the next step, so a callback that keeps it must copy it.
    """
    conditions = conditions or {}
    timesteps = scheduler.timesteps
    # A fresh tensor either way: the steps overwrite it in place (scheduler_step).
    latents = latents * scheduler.init_noise_sigma if start_step == 0 else latents.clone()
    with torch.no_grad():
        for index in range(start_step, len(timesteps)):
            t = timesteps[index]
            begin = getattr(denoiser, "begin_step", None)
            if begin is not None:
                begin(index, t)
            # The model output goes straight into the scheduler, which replaces it by its x0 estimate: held here
            # as well, it would cost one more canvas of memory during every step.
            latents = scheduler_step(scheduler, denoiser(scheduler.scale_model_input(latents, t), t, conditions), t,
                                     latents, generator)
            if callback is not None:
                callback(index + 1, len(timesteps), latents)
    return latents


def scheduler_step(scheduler, model_output: torch.Tensor, t: torch.Tensor, sample: torch.Tensor,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """``scheduler.step(...).prev_sample``, with DPM-Solver++ (the default) stepped one latent channel at a time.

    DPM-Solver's update is elementwise, so each channel's result is bit for bit the whole step's; but the whole step
    holds some five canvas-sized temporaries (the x0 estimate, the solver's difference term, products), which at a
    gigapixel are gigabytes. Channel by channel they are one channel each, and nothing canvas-sized is allocated:
    ``sample`` is overwritten by the new sample and ``model_output`` by the x0 estimate the solver keeps (both are
    the caller's to give up). The SDE variant's noise is drawn for the whole canvas first, exactly as the scheduler
    would draw it. Other schedulers (and thresholding, which is not elementwise) take the plain step.
    Hand-written: diffusers steps a whole tensor at once and has no notion of splitting one.
    """
    channels = model_output.shape[1]
    if not isinstance(scheduler, DPMSolverMultistepScheduler) or scheduler.config.thresholding or channels == 1 \
            or sample.dtype != torch.float32 or model_output.dtype != torch.float32:
        return scheduler.step(model_output, t, sample, generator=generator).prev_sample
    # DPM-Solver shifts its history by one before it reads it: the oldest entry is let go now, not after the step.
    kept = list(scheduler.model_outputs)[1:]
    step_index, lower_order_nums = scheduler._step_index, scheduler.lower_order_nums
    scheduler.model_outputs = []
    noise = None
    if scheduler.config.algorithm_type in ("sde-dpmsolver", "sde-dpmsolver++"):
        noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device, dtype=torch.float32)
    for c in range(channels):
        band = slice(c, c + 1)
        # Each channel starts from the state before the step: the counters advance once per call.
        scheduler._step_index, scheduler.lower_order_nums = step_index, lower_order_nums
        scheduler.model_outputs = [None] + [None if m is None else m[:, band] for m in kept]
        prev = scheduler.step(model_output[:, band], t, sample[:, band],
                              variance_noise=None if noise is None else noise[:, band]).prev_sample
        model_output[:, band] = scheduler.model_outputs[-1]  # this channel's x0 estimate
        sample[:, band] = prev
    scheduler.model_outputs = kept + [model_output]
    return sample


def sample_patch(denoiser: Denoiser, scheduler, shape: tuple[int, ...], steps: int, seed: int,
                 conditions: dict | None = None, device: torch.device | str = "cpu",
                 callback: StepCallback | None = None) -> torch.Tensor:
    """Sample latents of ``shape`` (B, C, h, w) from seeded noise with ``steps`` scheduler steps."""
    generator = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(steps, device=device)
    noise = initial_noise(shape, generator, device)
    return run_scheduler(denoiser, noise, scheduler, conditions, generator=generator, callback=callback)
