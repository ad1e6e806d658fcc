"""Classifier-free guidance as a wrapper around a denoiser (k-diffusion style), not a sampler flag.

ε = ε_null + Σ_g s_g · (ε_g − ε_null) over guided condition groups g; g guided groups cost g + 1 passes, all
evaluated in one batch.
"""
from __future__ import annotations

from typing import Callable

import torch

from histosynth.sampling.patch import Denoiser

NullFn = Callable[[dict], dict]


def zero_null(keys: tuple[str, ...]) -> NullFn:
    """A null function that replaces the named conditions with zeros (the null mask, a zero style vector)."""

    def null(conditions: dict) -> dict:
        return {k: (torch.zeros_like(v) if k in keys else v) for k, v in conditions.items()}

    return null


class GuidedDenoiser:
    """Wraps ``denoiser`` so that each call returns the guided output; ``passes`` counts UNet passes per item."""

    def __init__(self, denoiser: Denoiser, scales: dict[str, float], nulls: dict[str, NullFn], base: NullFn):
        """``scales[g]`` is group g's guidance scale, ``nulls[g]`` nulls only group g, ``base`` nulls every group."""
        self.denoiser = denoiser
        self.scales = scales
        self.nulls = nulls
        self.base = base

    @property
    def passes(self) -> int:
        return len(self.scales) + 1

    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor, conditions: dict) -> torch.Tensor:
        batch = latents.shape[0]
        # Variant g keeps group g and nulls the others; the last variant nulls all of them.
        variants = [self._only(group, conditions) for group in self.scales] + [self.base(conditions)]
        stacked = {k: torch.cat([v[k] for v in variants]) for k in conditions}
        outputs = self.denoiser(latents.repeat(len(variants), 1, 1, 1), timestep, stacked)  # (P·B, C, h, w)
        chunks = outputs.split(batch)
        null = chunks[-1]
        guided = null.clone()
        for scale, conditional in zip(self.scales.values(), chunks[:-1]):
            guided = guided + scale * (conditional - null)
        return guided

    def _only(self, group: str, conditions: dict) -> dict:
        """Conditions with every guided group except ``group`` nulled."""
        result = dict(conditions)
        for other, null in self.nulls.items():
            if other != group:
                result = null(result)
        return result


def guided(denoiser: Denoiser, scales: dict[str, float]) -> Denoiser:
    """Guide each condition group at its scale; a group at scale 1 is simply kept (it costs no extra pass).

    With mask and style both present and only style guided, the layout is always kept, as in STEDM.
    """
    active = {group: scale for group, scale in scales.items() if scale != 1.0}
    if not active:
        return denoiser
    nulls = {group: zero_null((group,)) for group in active}
    return GuidedDenoiser(denoiser, active, nulls, zero_null(tuple(active)))
