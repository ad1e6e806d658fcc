"""Classifier-free guidance as a wrapper around a denoiser (k-diffusion style), not a sampler flag.

Several condition groups are guided *nested*, as STEDM does for layout and style: with groups g₁…g_n in a fixed
order and variant v_i conditioned on g₁…g_i (v₀ on none),

    ε = v₀ + Σ_i s_i · (v_i − v_{i−1}),

so for a mask m and a style s: ε(∅,∅) + s_m·(ε(m,∅) − ε(∅,∅)) + s_s·(ε(m,s) − ε(m,∅)). The last variant sees every
condition together — the model is never asked to add up effects it only learnt jointly. n guided groups cost n + 1
passes, evaluated in one batch. Order: groups at scale 1 first (they are in every variant: kept, never guided, no
extra pass), then ``mask``, then the global groups by name.
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


def guidance_order(groups) -> list[str]:
    """The nesting order of guided groups: the layout first, then global conditions by name."""
    return sorted(groups, key=lambda group: (group != "mask", group))


class GuidedDenoiser:
    """Wraps ``denoiser`` so that each call returns the nested-guided output; ``passes`` counts UNet passes per
    item. ``scales`` maps each guided group to its scale, in nesting order; ``null`` nulls the named groups."""

    def __init__(self, denoiser: Denoiser, scales: dict[str, float],
                 null: Callable[[tuple[str, ...]], NullFn] = zero_null):
        self.denoiser = denoiser
        self.scales = dict(scales)
        self.groups = list(self.scales)
        # Variant i keeps the first i groups and nulls the rest: variant 0 is fully null, the last fully conditional.
        self.variants = [null(tuple(self.groups[i:])) for i in range(len(self.groups) + 1)]

    @property
    def passes(self) -> int:
        return len(self.groups) + 1

    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor, conditions: dict) -> torch.Tensor:
        batch = latents.shape[0]
        variants = [make(conditions) for make in self.variants]
        stacked = {k: torch.cat([v[k] for v in variants]) for k in conditions}
        outputs = self.denoiser(latents.repeat(len(variants), 1, 1, 1), timestep, stacked)  # ((n+1)·B, C, h, w)
        chunks = outputs.split(batch)
        guided = chunks[0].clone()
        for i, group in enumerate(self.groups, start=1):
            guided = guided + self.scales[group] * (chunks[i] - chunks[i - 1])
        return guided


def guided(denoiser: Denoiser, scales: dict[str, float]) -> Denoiser:
    """Guide each condition group at its scale, nested in ``guidance_order``; a group at scale 1 is simply kept
    (in every variant: no extra pass), and with no group guided the denoiser is returned as it is."""
    active = {group: scales[group] for group in guidance_order(g for g, s in scales.items() if s != 1.0)}
    if not active:
        return denoiser
    return GuidedDenoiser(denoiser, active)
