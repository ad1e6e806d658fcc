"""DiffInfinite's original asynchronous "random patch" sampler (Aversa et al. 2023), kept as a baseline.

Hand-written: no library offers it. Every latent pixel carries its own step counter; pixels are only ever at the
lowest step m or at m + 1. Repeatedly, a patch is centred on a random pixel among those at step m (clamped inside
the canvas). As in the official code, the patch is fed to the denoiser as the canvas stood at step m — pixels already
at m + 1 contribute their step-m values, kept in a snapshot — so the whole patch sits at one noise level t_m; only
the pixels still at step m advance, by one DDIM update t_m → t_{m+1} with η = 1 (the official setting: stochastic,
fresh noise per update). The snapshot is refreshed when every pixel has reached m + 1.

Where this differs from the released code, on purpose: every step runs (that code stops one step early), several
non-overlapping patches at step m share one batch (it evaluates one patch at a time, with the same result for
non-overlapping patches), and all mask classes enter one UNet pass as one-hot channels (it runs one pass per
class). Pixels advance at different times, so multistep solvers do not apply: the update uses the scheduler's
``alphas_cumprod`` directly. The cost is what the benchmark measures against the synchronous samplers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from histosynth.conditions.base import as_condition
from histosynth.sampling.patch import Denoiser


@dataclass
class AsyncStats:
    unet_evals: int = 0
    rounds: int = 0
    last_windows: list = field(default_factory=list)


def _ddim_update(x: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, alpha_next: torch.Tensor, eta: float,
                 noise: torch.Tensor) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) from ᾱ = ``alpha`` to ``alpha_next``; η = 1 is ancestral, η = 0 deterministic."""
    x0 = (x - (1 - alpha).sqrt() * eps) / alpha.sqrt()
    sigma = eta * ((1 - alpha_next) / (1 - alpha) * (1 - alpha / alpha_next)).clamp_min(0).sqrt()
    return alpha_next.sqrt() * x0 + (1 - alpha_next - sigma ** 2).clamp_min(0).sqrt() * eps + sigma * noise


def sample_diffinfinite(denoiser: Denoiser, noise: torch.Tensor, scheduler, patch: int, steps: int, seed: int = 0,
                        conditions: dict | None = None, micro_batch: int = 8, prediction_type: str = "epsilon",
                        callback=None, eta: float = 1.0) -> tuple[torch.Tensor, AsyncStats]:
    """Denoise ``noise`` (1, C, H, W) asynchronously; returns the latents and the evaluation count."""
    conditions = {key: as_condition(value) for key, value in (conditions or {}).items()}
    _, _, height, width = noise.shape
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps.tolist()
    alphas = scheduler.alphas_cumprod.to(torch.float64)
    final_alpha = torch.tensor(1.0, dtype=torch.float64)
    x = noise.clone()
    snapshot = x.clone()  # the canvas at step m = counter.min(): what every patch is fed
    counter = torch.zeros(height, width, dtype=torch.int64)  # completed steps per latent pixel
    generator = torch.Generator().manual_seed(seed)
    stats = AsyncStats()
    ph, pw = min(patch, height), min(patch, width)
    lowest_reported = 0
    while True:
        m = int(counter.min())
        if m >= steps:
            break
        candidates = (counter == m).nonzero()  # (n, 2) pixels at the lowest step
        order = torch.randperm(len(candidates), generator=generator)
        windows, taken = [], torch.zeros(height, width, dtype=torch.bool)
        for index in order[: 64 * micro_batch].tolist():
            cy, cx = candidates[index].tolist()
            y0 = min(max(0, cy - ph // 2), height - ph)
            x0 = min(max(0, cx - pw // 2), width - pw)
            if taken[y0:y0 + ph, x0:x0 + pw].any():
                continue
            taken[y0:y0 + ph, x0:x0 + pw] = True
            windows.append((y0, x0))
            if len(windows) == micro_batch:
                break
        t = torch.tensor(timesteps[m])
        patches = torch.cat([snapshot[:, :, y:y + ph, x_:x_ + pw] for y, x_ in windows])  # (b, C, P, P) at step m
        cropped = {k: torch.cat([c.crop(torch.arange(top, top + ph), torch.arange(left, left + pw))
                              for top, left in windows])
                   for k, c in conditions.items()}  # (b, ...)
        with torch.no_grad():
            output = denoiser(patches, t, cropped).to(torch.float64)
        stats.unet_evals += len(windows) * getattr(denoiser, "passes", 1)
        stats.rounds += 1
        alpha = alphas[timesteps[m]]
        alpha_next = alphas[timesteps[m + 1]] if m + 1 < steps else final_alpha
        for (y, x_), out in zip(windows, output):
            region = snapshot[0, :, y:y + ph, x_:x_ + pw].to(torch.float64)
            if prediction_type == "v_prediction":
                out = alpha.sqrt() * out + (1 - alpha).sqrt() * region  # ε from v
            fresh = torch.randn(region.shape, generator=generator, dtype=torch.float64) if eta else region * 0
            updated = _ddim_update(region, out, alpha, alpha_next, eta, fresh).to(x.dtype)
            due = counter[y:y + ph, x_:x_ + pw] == m  # only pixels still at step m advance
            x[0, :, y:y + ph, x_:x_ + pw] = torch.where(due, updated, x[0, :, y:y + ph, x_:x_ + pw])
            counter[y:y + ph, x_:x_ + pw] += due.long()
        stats.last_windows = windows
        new_low = int(counter.min())
        if new_low > m:  # every pixel has reached m + 1: the next patches are fed the canvas at that step
            snapshot = x.clone()
        if callback is not None and new_low > lowest_reported:
            lowest_reported = new_low
            callback(new_low, steps, x)
    return x, stats
