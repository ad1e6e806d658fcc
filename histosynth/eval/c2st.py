"""Classifier two-sample test (C2ST; Lopez-Paz & Oquab 2017): can a small CNN tell set A from set B?

Held-out accuracy near 0.5 means the sets are indistinguishable to this classifier; near 1.0, trivially different.
It needs no downloaded weights, so it works offline on any image-like data — tissue patches (realism of generated
tissue) or one-hot masks (realism of generated layouts) — and is always reported beside the same test between two
real sets. Hand-written around a few torch layers: the test is a protocol (balanced classes, k folds, dihedral
augmentation, a fixed budget), which no maintained library packages for images.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from histosynth.dihedral import dihedral_each
from histosynth.errors import HistosynthError


@dataclass
class C2STConfig:
    folds: int = 5
    steps: int = 300  # optimisation steps per fold
    batch_size: int = 32
    learning_rate: float = 2e-3
    width: int = 16  # channels of the first conv layer
    seed: int = 0


class _SmallCNN(nn.Module):
    """Conv–norm–SiLU–pool levels (up to four; fewer for small inputs, keeping at least 2² px), then a global mean."""

    def __init__(self, channels: int, width: int, size: int):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(max(1, min(4, size.bit_length() - 2))):
            out = width * 2 ** min(i, 2)
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.GroupNorm(4, out), nn.SiLU(), nn.MaxPool2d(2)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))[:, 0]  # (B,) logits


def classifier_two_sample_test(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor,
                               config: C2STConfig | None = None) -> dict:
    """Mean ± std held-out accuracy of a small CNN telling ``a`` from ``b`` over k folds.

    ``a``, ``b``: (N, C, H, W) float arrays of the same C, H = W (e.g. images in [-1, 1] or one-hot masks). The larger
    set is subsampled to the smaller (balanced classes, chance 0.5); each fold trains a fresh CNN for a fixed number
    of steps with random dihedral views and scores the held-out fifth.
    """
    config = config or C2STConfig()
    a, b = (torch.as_tensor(np.asarray(x), dtype=torch.float32) for x in (a, b))
    if a.ndim != 4 or b.ndim != 4 or a.shape[1:] != b.shape[1:]:
        raise HistosynthError(f"two-sample test: sets must be (N, C, H, W) of one shape, got {tuple(a.shape)} and "
                              f"{tuple(b.shape)}")
    if a.shape[-1] != a.shape[-2]:
        raise HistosynthError(f"two-sample test: samples must be square for dihedral views, got {tuple(a.shape[-2:])}")
    n = min(len(a), len(b))
    if n < 2 * config.folds:
        raise HistosynthError(f"two-sample test: needs at least {2 * config.folds} samples per set for "
                              f"{config.folds} folds, got {n}")
    g = torch.Generator().manual_seed(config.seed)
    a = a[torch.randperm(len(a), generator=g)[:n]]
    b = b[torch.randperm(len(b), generator=g)[:n]]
    x = torch.cat([a, b])  # (2n, C, H, W)
    y = torch.cat([torch.zeros(n), torch.ones(n)])
    # Folds stratified by set: each fold holds the same number of A and B samples.
    fold_of = torch.cat([torch.arange(n) % config.folds, torch.arange(n) % config.folds])
    accuracies = []
    for fold in range(config.folds):
        train, test = fold_of != fold, fold_of == fold
        torch.manual_seed(config.seed * 1000 + fold)
        net = _SmallCNN(x.shape[1], config.width, x.shape[-1])
        optimiser = torch.optim.Adam(net.parameters(), lr=config.learning_rate)
        xs, ys = x[train], y[train]
        for _ in range(config.steps):
            pick = torch.randint(0, len(xs), (min(config.batch_size, len(xs)),), generator=g)
            views = dihedral_each(xs[pick], torch.randint(0, 8, (len(pick),), generator=g))
            loss = F.binary_cross_entropy_with_logits(net(views), ys[pick])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        net.eval()
        with torch.no_grad():
            predicted = torch.cat([net(chunk) for chunk in x[test].split(64)]) > 0
        accuracies.append(float((predicted.float() == y[test]).float().mean()))
    return {"accuracy_mean": float(np.mean(accuracies)), "accuracy_std": float(np.std(accuracies)),
            "fold_accuracies": accuracies, "n_per_set": n, "config": asdict(config)}
