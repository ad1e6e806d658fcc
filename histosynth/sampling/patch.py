"""The plain sampler: a diffusers scheduler driven by a denoiser over one latent tensor.

Every canvas sampler is this loop with a canvas-shaped denoiser (sampling/canvas.py), so a one-patch canvas
reproduces this function bit for bit.
"""
from __future__ import annotations

import math
from typing import Callable, Protocol

import torch
from diffusers import DPMSolverMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor

from histosynth.sampling.spill import Spill, slab_of

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
    spill: Spill | None = None,
) -> torch.Tensor:
    """Denoise ``latents`` (B, C, h, w) over ``scheduler.timesteps`` (set by the caller) from ``start_step``.

    ``latents`` at ``start_step`` 0 is unit-variance noise; it is scaled by the scheduler's initial sigma here.
    ``callback(step_index, total, latents)`` runs after each step (progress bars, checkpoints); the tensor it gets
    is overwritten by the next step, so a callback that keeps it must copy it. With ``spill`` the solver's history
    waits on disk between its steps (``scheduler_step``).
    """
    conditions = conditions or {}
    timesteps = scheduler.timesteps
    # A fresh tensor either way: the steps overwrite it in place (scheduler_step). With no step left (a run resumed
    # from its last step's checkpoint) nothing is overwritten, and a copy would be one more canvas while decoding.
    if start_step == 0:
        latents = latents * scheduler.init_noise_sigma
    elif start_step < len(timesteps):
        latents = latents.clone()
    with torch.no_grad():
        for index in range(start_step, len(timesteps)):
            t = timesteps[index]
            begin = getattr(denoiser, "begin_step", None)
            if begin is not None:
                begin(index, t)
            # The model output goes straight into the scheduler, which replaces it by its x0 estimate: held here
            # as well, it would cost one more canvas of memory during every step.
            latents = scheduler_step(scheduler, denoiser(scheduler.scale_model_input(latents, t), t, conditions), t,
                                     latents, generator, spill=spill)
            if callback is not None:
                callback(index + 1, len(timesteps), latents)
    return latents


SLAB_ELEMENTS = 2**22  # elements of one slab of an elementwise update: 16 MiB in float32


def slabs(shape: tuple[int, ...], elements: int = SLAB_ELEMENTS, multiple: int = 1) -> list[tuple[int, slice]]:
    """(channel, rows) of a (1, C, H, W) tensor cut into slabs of about ``elements``, in memory order: each slab is
    one contiguous run of memory, and its size a multiple of ``multiple`` wherever ``H·W`` is."""
    _, channels, height, width = shape
    step = multiple // math.gcd(width, multiple)  # rows whose length is a multiple of ``multiple``
    rows = max(step, elements // max(1, width) // step * step)
    return [(c, slice(y, min(y + rows, height))) for c in range(channels) for y in range(0, height, rows)]


def scheduler_step(scheduler, model_output: torch.Tensor, t: torch.Tensor, sample: torch.Tensor,
                   generator: torch.Generator | None = None, slab_elements: int = SLAB_ELEMENTS,
                   spill: Spill | None = None) -> torch.Tensor:
    """``scheduler.step(...).prev_sample``, with DPM-Solver++ (the default) stepped one slab at a time.

    DPM-Solver's update is elementwise, so each slab's result (``slabs``: one channel's band of rows) is bit for bit
    the whole step's; but the whole step holds some five canvas-sized temporaries (the x0 estimate, the solver's
    difference term, products), which at a gigapixel are gigabytes. Slab by slab they are a slab each, and nothing
    canvas-sized is allocated: ``sample`` is overwritten by the new sample and ``model_output`` by the x0 estimate
    the solver keeps (both are the caller's to give up). The SDE variant's noise is drawn a slab at a time too,
    where that draws the numbers of the scheduler's one draw for the whole canvas (``_draws_in_order``). After the
    step the solver's history keeps only what its next step reads: the oldest entry, which that step shifts out
    unread, is let go now rather than after the next denoiser call; with ``spill`` the entry it keeps goes to disk
    and is read back a slab at a time (sampling/spill.py), the same bits. Other schedulers (and thresholding, which is
    not elementwise) take the plain step.
    Hand-written: diffusers steps a whole tensor at once and has no notion of splitting one.
    """
    if not isinstance(scheduler, DPMSolverMultistepScheduler) or scheduler.config.thresholding \
            or model_output.ndim != 4 or model_output.shape[0] != 1 \
            or sample.dtype != torch.float32 or model_output.dtype != torch.float32:
        return scheduler.step(model_output, t, sample, generator=generator).prev_sample
    kept = list(scheduler.model_outputs)[1:]  # the oldest entry is shifted out by this step
    step_index, lower_order_nums = scheduler._step_index, scheduler.lower_order_nums
    scheduler.model_outputs = []
    stochastic = scheduler.config.algorithm_type in ("sde-dpmsolver", "sde-dpmsolver++")
    in_order = stochastic and _draws_in_order(model_output.shape, generator)
    noise = None
    if stochastic and not in_order:
        noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device, dtype=torch.float32)
    for c, rows in slabs(tuple(model_output.shape), slab_elements, multiple=16 if in_order else 1):
        where = (slice(None), slice(c, c + 1), rows)
        slab_noise = None
        if stochastic:
            slab_noise = randn_tensor(model_output[where].shape, generator=generator, device=model_output.device,
                                      dtype=torch.float32) if in_order else noise[where]
        # Each slab starts from the state before the step: the counters advance once per call.
        scheduler._step_index, scheduler.lower_order_nums = step_index, lower_order_nums
        scheduler.model_outputs = [None] + [None if m is None else slab_of(m, c, rows) for m in kept]
        prev = scheduler.step(model_output[where], t, sample[where], variance_noise=slab_noise).prev_sample
        model_output[where] = scheduler.model_outputs[-1]  # this slab's x0 estimate
        sample[where] = prev
    scheduler.model_outputs = [None] + kept[1:] + [model_output if spill is None else spill.keep(model_output)]
    return sample


def _draws_in_order(shape: torch.Size, generator: torch.Generator | None) -> bool:
    """Whether Gaussian noise drawn slab by slab, in memory order, gives the numbers of one draw of ``shape``.

    PyTorch's CPU generator fills a float32 tensor of 16 values or more with uniforms in order and turns each block
    of 16 into normals on its own, so consecutive draws whose sizes are multiples of 16 concatenate to the one draw
    (tests/test_canvas.py checks it bit for bit)."""
    return generator is not None and generator.device.type == "cpu" and shape[2] * shape[3] % 16 == 0


def sample_patch(denoiser: Denoiser, scheduler, shape: tuple[int, ...], steps: int, seed: int,
                 conditions: dict | None = None, device: torch.device | str = "cpu",
                 callback: StepCallback | None = None) -> torch.Tensor:
    """Sample latents of ``shape`` (B, C, h, w) from seeded noise with ``steps`` scheduler steps."""
    generator = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(steps, device=device)
    noise = initial_noise(shape, generator, device)
    return run_scheduler(denoiser, noise, scheduler, conditions, generator=generator, callback=callback)
