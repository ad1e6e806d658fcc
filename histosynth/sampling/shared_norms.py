"""Group norms whose statistics a step's patches share (design.md §2, "Shared group-norm statistics").

A UNet trained on patches normalises every feature map by the patch's own mean and variance (GroupNorm). On a
canvas cut into patches, neighbouring patches then normalise the same tissue differently, and the early steps'
clean-latent estimates jump across the cut lines (README, "Seams"). ``SharedGroupNorms`` first runs a sample of
the step's windows in one batch with every group norm's statistics pooled over that batch, keeps those
statistics, and then lets every window of the step normalise with them — as a BatchNorm in evaluation mode uses its
running statistics. The sample costs ``windows`` extra patch evaluations per step; memory stays one batch.

Hand-written: no library swaps a GroupNorm's per-sample statistics for statistics measured on other inputs.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch
from torch import nn

from histosynth.errors import HistosynthError


class SharedGroupNorms:
    """Canvas-wide group-norm statistics for every ``nn.GroupNorm`` inside ``module``."""

    def __init__(self, module: nn.Module, windows: int):
        if windows < 1:
            raise HistosynthError(f"shared group norms need at least 1 window, got {windows}")
        self.norms = [m for m in module.modules() if isinstance(m, nn.GroupNorm)]
        if not self.norms:
            raise HistosynthError(f"{type(module).__name__} has no group norm whose statistics could be shared")
        self.windows = windows
        self.passes = 1
        self.statistics: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(norm) -> (mean, var), (passes, G)

    def sample(self, windows: list, step_index: int) -> list:
        """The windows whose pooled statistics every window of the step takes: all of them when few, else a draw
        fixed by the step (the same in every process, so results do not depend on how a canvas is shared)."""
        if len(windows) <= self.windows:
            return list(windows)
        chosen = np.random.default_rng([step_index, len(windows), 0x5EA4]).choice(len(windows), self.windows,
                                                                               replace=False)
        return [windows[i] for i in sorted(chosen)]

    @contextlib.contextmanager
    def measuring(self, passes: int = 1) -> Iterator[None]:
        """Within: every group norm pools its statistics over the batch, uses and keeps them. The batch a denoiser
        call sees is ``passes`` guidance variants one after another (GuidedDenoiser); each keeps statistics of its
        own, since the null and the conditioned pass are different inputs."""
        self.statistics = {}
        self.passes = passes
        with self._forward(self._measure):
            yield

    @contextlib.contextmanager
    def applying(self) -> Iterator[None]:
        """Within: every group norm uses the statistics kept by the last ``measuring``."""
        if len(self.statistics) != len(self.norms):
            raise RuntimeError("shared group norms: measure a step's statistics before applying them")
        with self._forward(self._apply):
            yield

    @contextlib.contextmanager
    def _forward(self, forward) -> Iterator[None]:
        for norm in self.norms:  # an instance attribute shadows the class's forward for this module only
            norm.forward = lambda x, norm=norm: forward(norm, x)
        try:
            yield
        finally:
            for norm in self.norms:
                del norm.forward

    def _grouped(self, norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, C, ...) as float32 (passes, B / passes, groups, rest)."""
        if x.shape[0] % self.passes:
            raise RuntimeError(f"a batch of {x.shape[0]} is not {self.passes} guidance passes")
        return x.float().reshape(self.passes, x.shape[0] // self.passes, norm.num_groups, -1)

    def _measure(self, norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        grouped = self._grouped(norm, x)
        var, mean = torch.var_mean(grouped, dim=(1, 3), unbiased=False)  # (passes, G)
        self.statistics[id(norm)] = (mean, var)
        return self._normalise(norm, x, grouped, mean, var)

    def _apply(self, norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        mean, var = self.statistics[id(norm)]
        return self._normalise(norm, x, self._grouped(norm, x), mean.to(x.device), var.to(x.device))

    @staticmethod
    def _normalise(norm: nn.GroupNorm, x: torch.Tensor, grouped: torch.Tensor, mean: torch.Tensor,
                   var: torch.Tensor) -> torch.Tensor:
        y = ((grouped - mean[:, None, :, None]) * torch.rsqrt(var[:, None, :, None] + norm.eps)).reshape(x.shape)
        if norm.affine:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            y = y * norm.weight.float().view(shape) + norm.bias.float().view(shape)
        # Under autocast a group norm returns float32 too; outside it, the input's dtype.
        return y if torch.is_autocast_enabled(x.device.type) else y.to(x.dtype)
