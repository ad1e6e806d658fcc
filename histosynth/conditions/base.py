"""What a sampler knows of a condition (design.md §3): ``crop`` it to a patch, and ``null`` it for guidance.

Every condition a model takes — the mask, a style vector, an SSL embedding or an embedding grid, a slide label — is
one of these, so the canvas samplers (sampling/) crop all of them the same way and never look inside.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Condition(Protocol):
    """A condition over an output canvas of ``canvas`` = (h, w) latent px (None: the same for every position).

    ``crop(rows, cols)`` is its value for the patch covering working-canvas ``rows`` × ``cols`` (index tensors,
    possibly past the output canvas into the sampler's scratch margin, or wrapped around it): (B, K, P, P) for a
    spatial field, (B, D) for a vector. ``null()`` is the condition that says nothing (classifier-free guidance's ∅).
    ``spatial``: whether ``crop`` is a field over the rows and columns (a patch evaluated with context around it
    gets the field over the context too) or one vector per patch (taken for the patch alone).
    """

    canvas: tuple[int, int] | None
    spatial: bool

    def crop(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor: ...

    def null(self) -> Condition: ...

    def to(self, device) -> Condition: ...


def mirror(indices: torch.Tensor, size: int) -> torch.Tensor:
    """Indices mapped into 0..size-1 by repeated mirror reflection: how a spatial condition fills the margin (a null
    condition there would feed the model half-null patches it never saw in training)."""
    folded = indices % (2 * size)
    return torch.where(folded < size, folded, 2 * size - 1 - folded)


class SpatialCondition:
    """A field over the output canvas (B, K, h, w), e.g. the one-hot mask at latent resolution.

    Held in float16 when that loses nothing (one-hot masks area-averaged by a power of two are multiples of 2^-k):
    at 32768² px a float32 mask canvas of a few classes is gigabytes. Crops are float32.
    """

    def __init__(self, value: torch.Tensor):
        if value.ndim != 4:
            raise ValueError(f"a spatial condition is (B, K, h, w); got shape {tuple(value.shape)}")
        half = value.half() if value.dtype == torch.float32 else None
        self.value = half if half is not None and torch.equal(half.float(), value) else value

    spatial = True

    @property
    def canvas(self) -> tuple[int, int]:
        return int(self.value.shape[-2]), int(self.value.shape[-1])

    def crop(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        h, w = self.canvas
        return self.value[:, :, mirror(rows, h)[:, None], mirror(cols, w)[None, :]].float()  # (B, K, P, P)

    def null(self) -> SpatialCondition:
        return SpatialCondition(torch.zeros_like(self.value))

    def to(self, device) -> SpatialCondition:
        moved = SpatialCondition.__new__(SpatialCondition)
        moved.value = self.value.to(device)
        return moved


class VectorCondition:
    """One vector per image (B, D), shared by every patch of it: a style vector, a single embedding, a label."""

    canvas = None
    spatial = False

    def __init__(self, value: torch.Tensor):
        if value.ndim != 2:
            raise ValueError(f"a vector condition is (B, D); got shape {tuple(value.shape)}")
        self.value = value

    def crop(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return self.value  # (B, D)

    def null(self) -> VectorCondition:
        return VectorCondition(torch.zeros_like(self.value))

    def to(self, device) -> VectorCondition:
        return VectorCondition(self.value.to(device))


def as_condition(value: Condition | torch.Tensor) -> Condition:
    """A condition as it is, or a plain tensor read as one: (B, K, h, w) a spatial field, (B, D) a vector."""
    if isinstance(value, Condition):
        return value
    if isinstance(value, torch.Tensor) and value.ndim == 4:
        return SpatialCondition(value)
    if isinstance(value, torch.Tensor) and value.ndim == 2:
        return VectorCondition(value)
    raise TypeError(f"not a condition: {type(value).__name__} of shape {tuple(getattr(value, 'shape', ()))}")
