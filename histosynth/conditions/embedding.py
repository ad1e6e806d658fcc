"""Self-supervised-embedding conditioning (Graikos et al. 2024, "Learned representation-guided diffusion models
for large-image generation"; design.md §3): the condition itself.

A frozen encoder (conditions/encoders.py) maps each training patch to a vector; the denoiser learns
p(patch | embedding). For an image larger than a patch, a grid of embeddings covers the canvas and each patch receives
the spherical-bilinear (slerp) interpolation of the grid at its centre: ``slerp`` / ``interpolate_grid`` /
``EmbeddingGrid`` are those rules and the per-patch condition ``CanvasDenoiser`` crops; ``EmbeddingStandardizer``
maps raw embeddings to the model's condition vectors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from histosynth.conditions.base import VectorCondition
from histosynth.errors import HistosynthError

PARALLEL_ANGLE = 1e-4  # below this angle (radians) slerp is 0/0: interpolate linearly instead (§3)


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """Interpolate ``a`` -> ``b`` (..., D) at ``t``: direction by spherical interpolation, norm linearly (§3).

    SSL embeddings are not unit vectors, so the norm is interpolated separately. Where the angle between the two is
    below ``PARALLEL_ANGLE`` (parallel or equal vectors) or either is zero, the result is the linear interpolation.
    Exactly opposite vectors turn through a fixed perpendicular direction. ``t == 0`` gives ``a`` and ``t == 1``
    gives ``b`` bit for bit.
    """
    dtype = torch.promote_types(a.dtype, b.dtype)
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    t64 = torch.as_tensor(t, dtype=torch.float64, device=a.device)
    while t64.ndim < a64.ndim:
        t64 = t64.unsqueeze(-1)  # (..., 1)
    na, nb = a64.norm(dim=-1, keepdim=True), b64.norm(dim=-1, keepdim=True)  # (..., 1)
    zero = (na == 0) | (nb == 0)
    ua = a64 / torch.where(na == 0, torch.ones_like(na), na)
    ub = b64 / torch.where(nb == 0, torch.ones_like(nb), nb)
    # The angle from |ua − ub| and |ua + ub| is accurate near 0 and π, unlike acos of the dot product.
    angle = 2 * torch.atan2((ua - ub).norm(dim=-1, keepdim=True), (ua + ub).norm(dim=-1, keepdim=True))  # (..., 1)
    linear = a64 + t64 * (b64 - a64)
    # Opposite vectors: no unique great circle; rotate through a perpendicular fixed by ua alone.
    opposite = (math.pi - angle) < PARALLEL_ANGLE
    axis = torch.zeros_like(ua)
    axis.scatter_(-1, ua.abs().argmin(dim=-1, keepdim=True), 1.0)
    perpendicular = axis - (axis * ua).sum(-1, keepdim=True) * ua
    perpendicular = perpendicular / perpendicular.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    sin = torch.sin(angle).clamp_min(1e-300)
    direction = (torch.sin((1 - t64) * angle) * ua + torch.sin(t64 * angle) * ub) / sin
    half_turn = torch.cos(t64 * math.pi) * ua + torch.sin(t64 * math.pi) * perpendicular
    direction = torch.where(opposite, half_turn, direction)
    spherical = ((1 - t64) * na + t64 * nb) * direction
    out = torch.where(zero | (angle < PARALLEL_ANGLE), linear, spherical)
    out = torch.where(t64 == 0, a64, torch.where(t64 == 1, b64, out))
    return out.to(dtype)


def interpolate_grid(grid: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Slerp-bilinear value of ``grid`` (R, C, D) at fractional node coordinates ``y``, ``x`` (N,) -> (N, D).

    Fixed order (§3): along each of the two bracketing rows first (between columns), then between the two rows.
    Coordinates are clamped to the grid, so the border nodes extend outwards; integer coordinates give the node.
    """
    rows, cols = grid.shape[:2]
    y = torch.as_tensor(y, dtype=torch.float64).clamp(0, rows - 1)
    x = torch.as_tensor(x, dtype=torch.float64).clamp(0, cols - 1)
    y0 = y.floor().long().clamp(max=rows - 1)
    x0 = x.floor().long().clamp(max=cols - 1)
    y1, x1 = (y0 + 1).clamp(max=rows - 1), (x0 + 1).clamp(max=cols - 1)
    ty, tx = y - y0, x - x0  # (N,) in [0, 1)
    top = slerp(grid[y0, x0], grid[y0, x1], tx)  # (N, D)
    bottom = slerp(grid[y1, x0], grid[y1, x1], tx)  # (N, D)
    return slerp(top, bottom, ty)  # (N, D)


@dataclass
class EmbeddingGrid:
    """A grid of embeddings (R, C, D) stretched over a latent canvas (h, w); node (i, j) sits at the centre of
    cell (i, j) of an R×C partition of the canvas.

    ``crop(rows, cols)`` is the per-patch condition that ``CanvasDenoiser`` asks for: ``rows``/``cols`` are the
    patch's working-canvas index tensors (latent px, possibly wrapped around the periodic working canvas). A patch
    takes the embedding at the centre of the output rows and columns it writes — one contiguous run, since the
    scratch margin is at least P − 1 wide — so a patch that wraps from the margin onto row 0 gets the embedding of
    the top rows it paints, not of the bottom edge it started beside. A patch wholly in the margin writes nothing
    and takes the centre of its rows mirrored into the canvas, as spatial conditions are (``reflect_indices``).
    """

    grid: torch.Tensor  # (R, C, D)
    canvas: tuple[int, int]  # (h, w) of the output canvas in latent px
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None  # raw (N, D) -> model input (the standardiser)
    spatial: ClassVar[bool] = False  # one vector per patch

    def __post_init__(self):
        if self.grid.ndim != 3:
            raise HistosynthError(f"an embedding grid is (rows, cols, width); got shape {tuple(self.grid.shape)}")
        if not torch.isfinite(self.grid).all():
            raise HistosynthError("the embedding grid holds NaN or infinite values")
        self.grid = self.grid.detach().float().cpu()
        self._cache: dict[tuple[int, int, int, int], torch.Tensor] = {}  # windows recur across steps

    @property
    def dim(self) -> int:
        return int(self.grid.shape[-1])

    def at(self, y: float, x: float) -> torch.Tensor:
        """The embedding at canvas position (y, x) in latent px (1, D)."""
        (h, w), (rows, cols) = self.canvas, self.grid.shape[:2]
        gy = torch.tensor([y * rows / h - 0.5], dtype=torch.float64)
        gx = torch.tensor([x * cols / w - 0.5], dtype=torch.float64)
        return self._condition(interpolate_grid(self.grid, gy, gx).float())  # (1, D)

    def _condition(self, raw: torch.Tensor) -> torch.Tensor:
        if self.transform is None:
            return raw
        with torch.no_grad():
            return self.transform(raw).float()

    def crop(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """The embedding of the patch covering working-canvas ``rows`` × ``cols`` (1, D)."""
        key = (int(rows[0]), len(rows), int(cols[0]), len(cols))
        if key not in self._cache:
            (h, w), (n_rows, n_cols) = self.canvas, self.grid.shape[:2]
            # Integer arithmetic up to one division, so a patch centred on a node gets the node bit for bit.
            gy = torch.tensor([_written_span(rows, h) * n_rows - h], dtype=torch.float64) / (2 * h)
            gx = torch.tensor([_written_span(cols, w) * n_cols - w], dtype=torch.float64) / (2 * w)
            self._cache[key] = self._condition(interpolate_grid(self.grid, gy, gx).float())  # (1, D)
        return self._cache[key]

    def to(self, *_args, **_kwargs) -> "EmbeddingGrid":
        return self

    def null(self) -> VectorCondition:
        """The null embedding: zeros where the model's condition vector goes (as condition dropout trains it)."""
        return VectorCondition(torch.zeros_like(self.at(0.0, 0.0)))


def _written_span(indices: torch.Tensor, size: int) -> int:
    """Twice the centre (first + last + 1) of the output indices (< ``size``) a patch's working-canvas ``indices``
    write; for a patch wholly in the margin, of its indices mirrored into 0..size-1."""
    written = indices[indices < size]
    if len(written) == 0:
        mirrored = indices % (2 * size)
        written = torch.where(mirrored < size, mirrored, 2 * size - 1 - mirrored)
    return int(written.min()) + int(written.max()) + 1


def normalize_embeddings(vectors: torch.Tensor) -> torch.Tensor:
    """Unit-length embeddings (..., D); zero vectors stay zero."""
    return vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class EmbeddingStandardizer(ModelMixin, ConfigMixin):
    """Raw SSL embeddings (B, D) -> the denoiser's condition: optionally unit length, then standardised per
    dimension with the training patches' mean and std, so every encoder's embeddings reach the projection at unit
    scale. Zero (the dataset's mean embedding) is not used as a value: the null is the zero *output*, which the
    objective and the guidance wrapper set directly. Saved in the image model as the ``embedding_encoder``
    component (no trainable parameters)."""

    @register_to_config
    def __init__(self, dim: int, normalize: bool = False):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def fit(self, raw: torch.Tensor) -> "EmbeddingStandardizer":
        """Measure mean and std on raw embeddings (N, D)."""
        x = normalize_embeddings(raw.float()) if self.config.normalize else raw.float()
        self.mean.copy_(x.mean(0))
        self.std.copy_(x.std(0).clamp_min(1e-6) if len(x) > 1 else torch.ones_like(self.std))
        return self

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        x = normalize_embeddings(raw) if self.config.normalize else raw
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)  # (B, D)
