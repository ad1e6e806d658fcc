"""Sample single patches from an image model, with an optional mask and classifier-free guidance."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from histosynth.checks import finite_number, one_of, require_finite, whole_number
from histosynth.errors import HistosynthError
from histosynth.io.atomic import atomic_files
from histosynth.io.masks import write_png
from histosynth.models.autoencoder import decode_latents
from histosynth.models.bundle import Bundle
from histosynth.models.denoiser import SCHEDULERS
from histosynth.pipelines.conditions import build_conditions, patch_tensors
from histosynth.pipelines.masks import read_mask
from histosynth.pixels import to_uint8
from histosynth.sampling.guidance import guided
from histosynth.sampling.patch import sample_patch


def check_sample_options(n: int, guidance: float, steps: int, scheduler: str, seed: int = 0,
                         style_guidance: float | None = None) -> None:
    """The options of ``sample``, refused up front when out of range."""
    whole_number("--n", n)
    finite_number("--guidance", guidance)
    whole_number("--steps", steps)
    one_of("--scheduler", scheduler, SCHEDULERS)
    whole_number("--seed", seed, 0)
    if style_guidance is not None:
        finite_number("--style-guidance", style_guidance)


def sample_images(model: Bundle, mask: np.ndarray | None = None, n: int = 1, guidance: float = 1.5,
                  steps: int = 25, scheduler: str = "dpm++sde", seed: int = 0, device: str = "cpu",
                  style: torch.Tensor | None = None, style_guidance: float = 2.0,
                  embedding: torch.Tensor | None = None, embedding_guidance: float = 2.0) -> np.ndarray:
    """``n`` RGB patches (n, P, P, 3) uint8 at the model's patch size; ``mask`` (P, P) class ids or None;
    ``style`` / ``embedding``: condition vectors, (1, D) for every patch or (n, D), guided at their scales."""
    check_sample_options(n, guidance, steps, scheduler, seed)
    size, factor = model.config["patch_size"], model.latent_factor
    if mask is not None and mask.shape != (size, size):
        raise HistosynthError(f"mask is {mask.shape[1]}×{mask.shape[0]} px; the model's patch size is {size}×{size}")
    conditions, scales = build_conditions(model, (size // factor, size // factor), mask=mask, guidance=guidance,
                                          style=style, style_guidance=style_guidance, embedding=embedding,
                                          embedding_guidance=embedding_guidance, device=device)
    denoiser = guided(model.denoiser().to(device), scales)
    shape = (n, model.unet.config.out_channels, size // factor, size // factor)
    latents = sample_patch(denoiser, model.sampling_scheduler(scheduler), shape, steps, seed,
                           patch_tensors(conditions, n), device)
    require_finite(latents, model.path, "the denoised latents")
    with torch.no_grad():
        images = decode_latents(model.autoencoder.to(device), latents)  # (n, 3, P, P)
    require_finite(images, model.path, "the decoded pixels")
    return to_uint8(images)


def sample_to_files(model: Bundle, out: str, mask_path: str | None = None, n: int = 1, **kwargs) -> list[Path]:
    """Sample and write ``OUT.png`` (or ``OUT-0.png``... for n > 1); nothing is written if sampling fails."""
    mask = read_mask(mask_path, model.classes) if mask_path else None
    images = sample_images(model, mask, n=n, **kwargs)
    paths = sample_paths(Path(out), n)
    with atomic_files({i: path for i, path in enumerate(paths)}) as tmp:  # all n files or none
        for i, image in enumerate(images):
            write_png(tmp[i], image)
    return paths


def sample_paths(out: Path, n: int) -> list[Path]:
    """``OUT`` for one patch, ``OUT-0``, ``OUT-1``, ... for several."""
    out = Path(out)
    return [out] if n == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(n)]
