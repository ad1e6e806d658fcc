"""Canvas samplers (design.md §2): a model trained on P×P latent patches denoises an H×W canvas.

Hand-written because no maintained library offers a random-offset grid: the canvas is a *denoiser* — splitter →
per-patch denoiser → merger — so ``run_scheduler`` drives any diffusers scheduler over the whole canvas with one
``scheduler.step`` per step, exactly as it drives one patch.

Layouts (where the patches of a step lie):
- ``RandomOffsetGrid`` (default): a periodic working canvas cut along a grid shifted by a new offset at every step
  (a low-discrepancy sequence from a random start, so the steps' cut lines spread evenly over the patch); every
  pixel belongs to exactly one patch; cost → 1 UNet evaluation per output latent pixel per pass.
  The last steps' cut lines are never revisited: by default each of the last six steps cuts more than a quarter
  patch from the previous step's lines and, near its own lines, takes the coarse part of the clean-latent estimate
  of the previous step (``CanvasDenoiser._heal``, no extra cost), so no step from then on leaves a cut in the image.
- ``FixedTiles``: the same grid with offset 0 at every step (cost 1, visible seams).
- ``MultiDiffusion``: overlapping windows at a stride, outputs averaged (cost ≈ (P/stride)²).
DiffInfinite's original asynchronous scheme is ``sample_diffinfinite`` below: pixels advance at different times,
so it cannot be a denoiser around a synchronous scheduler.
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import torch

from histosynth.conditions.base import Condition, as_condition
from histosynth.errors import HistosynthError
from histosynth.sampling.patch import Denoiser, initial_noise, slabs
from histosynth.sampling.shared_norms import SharedGroupNorms
from histosynth.sampling.spill import Spill, SpilledCanvas, rows_of, write_rows

Window = tuple[int, int]  # top-left (y, x) in the working canvas; a window may wrap around its edges


class Layout(Protocol):
    """Where the patches of each step lie, and what ``CanvasDenoiser`` needs to know to merge them."""

    name: str
    patch: int
    overlapping: bool  # windows of one step overlap (outputs are averaged) rather than partition the canvas
    heal_from: int | None  # first step that heals its cut lines (CanvasDenoiser._heal); None: no step does

    def working_shape(self, height: int, width: int) -> tuple[int, int]: ...

    def windows(self, step_index: int, working: tuple[int, int], output: tuple[int, int]) -> list[Window]: ...

    def blended(self, step_index: int) -> bool:
        """Whether this step's windows are two grids merged with tent weights."""
        ...


def _grid_side(n: int, patch: int) -> int:
    """Working side of the random grid: no margin for exactly one patch, else the smallest multiple of P ≥ n+P−1."""
    return patch if n == patch else math.ceil((n + patch - 1) / patch) * patch


# Per-axis steps of the offset sequence, in patches: the golden ratio (rows) and √2 − 1 (columns). Both are badly
# approximable, so the offsets of any run of steps spread evenly over the patch and their phases cancel
# (|Σ exp(2πi·k·α)| ≤ 1/sin(πα), about 1.1, however many steps).
OFFSET_STEPS = ((5 ** 0.5 - 1) / 2, 2 ** 0.5 - 1)


@functools.lru_cache(maxsize=None)  # asked at every step, the same for a whole run
def offset_steps(patch: int, lattice: int = 1) -> tuple[float, float]:
    """Per-axis steps of the offset sequence for a denoiser whose down-samplings make a ``lattice``-px grid.

    A window imprints more than its cut lines: each stride-2 down-sampling ties the UNet's output to a grid of
    ``lattice`` px from the window's own corner. Those traces cancel only if the offsets spread modulo the lattice
    too, i.e. at the harmonics j·P/lattice of the patch, and the golden step does not: at P = 64, lattice 8, the
    lattice's phase moves by frac(8 · 0.618) = 0.944 of a cycle a step, nearly still, and a mask model's 20 steps
    drew layouts with a period of 8 mask px (README, "Seams"). So each axis steps by (m + α)/n patches
    (n = P/lattice): the phase within the lattice then follows α's own sequence, whatever m; of the n choices of m
    the one is kept whose patch harmonics 1 to 4 step furthest from a whole cycle, so the cut lines spread too."""
    cells = patch // lattice if lattice > 1 else 0
    if cells < 2:  # no lattice inside the patch: the plain steps
        return OFFSET_STEPS

    def worst(step: float) -> float:  # the phase step of the harmonic nearest a whole cycle, in cycles
        return min(abs((h * step + 0.5) % 1.0 - 0.5) for h in (1, 2, 3, 4))

    return tuple(max(((m + alpha) / cells for m in range(cells)), key=worst) for alpha in OFFSET_STEPS)


@dataclass
class RandomOffsetGrid:
    """A grid shifted by a new offset at every step: a low-discrepancy sequence from a random start per seed.

    Each step leaves a faint trace along its cut lines. Offsets drawn independently at every step add those traces
    with random phases, so a periodic component of the patch's period grows like √steps; stepping the offset by a
    fixed irrational fraction of the patch (a Weyl sequence, OFFSET_STEPS) spreads any run of steps' lines evenly
    over the patch, and their periodic components cancel instead (latent periodicity 2.24 → 1.34 over three seeds
    at 2048² px; README). Consecutive offsets lie 0.38 P (rows) and 0.41 P (columns) apart, beyond the heal's P/4.

    From step ``blend_from`` on, a second grid shifted by half a patch is evaluated too and the two are merged with
    tent weights (highest at patch centres), so the last steps' cut lines, which are never revisited, leave no seam.
    """

    patch: int
    seed: int = 0
    name: str = "random"
    blend_from: int | None = None
    heal_from: int | None = None  # from this step on, each grid lies more than P/4 from the previous step's grid
    overlapping: bool = False
    lattice: int = 1  # px of the denoiser's down-sampling grid (``offset_steps``); 1: none

    def blended(self, step_index: int) -> bool:
        return self.blend_from is not None and step_index >= self.blend_from

    def healed(self, step_index: int) -> bool:
        """Whether ``step_index`` heals its cut lines (and so cuts far from the previous step's lines)."""
        return self.heal_from is not None and step_index >= self.heal_from and step_index > 0

    def working_shape(self, height: int, width: int) -> tuple[int, int]:
        return _grid_side(height, self.patch), _grid_side(width, self.patch)

    def _sequence(self, step_index: int) -> tuple[int, int]:
        """The step's offset (y, x) in latent px before the heal's rule; stateless in (seed, step), so a resumed run
        or another process finds the same offset without shared state."""
        start = np.random.default_rng([self.seed, 0x0FF5E7]).random(2)
        steps = offset_steps(self.patch, self.lattice)
        return tuple(int((s + step_index * a) % 1.0 * self.patch) for s, a in zip(start, steps))

    def offset(self, step_index: int, working: tuple[int, int], output: tuple[int, int]) -> tuple[int, int]:
        oy, ox = self._sequence(step_index)
        if self.healed(step_index):
            # A healed step takes x0 from the previous step's estimate within P/4 of its own lines (see
            # CanvasDenoiser._heal), so its lines must lie more than P/4 from the previous step's, where that
            # estimate is continuous. The sequence keeps 0.38 P; rounding can take a small patch closer.
            low = self.patch // 4 + 1
            shifted = []
            for now, before in zip((oy, ox), self.offset(step_index - 1, working, output)):
                shift = (now - before) % self.patch
                shifted.append((before + min(max(shift, low), self.patch - low)) % self.patch)
            oy, ox = shifted
        # An axis that is exactly one patch has no margin, so its cut never moves.
        return (oy if working[0] != output[0] else 0), (ox if working[1] != output[1] else 0)

    def windows(self, step_index: int, working: tuple[int, int], output: tuple[int, int]) -> list[Window]:
        oy, ox = self.offset(step_index, working, output)
        grid = [(oy + y, ox + x) for y in range(0, working[0], self.patch) for x in range(0, working[1], self.patch)]
        if not self.blended(step_index):
            return grid
        half_y = self.patch // 2 if working[0] != output[0] else 0
        half_x = self.patch // 2 if working[1] != output[1] else 0
        if not (half_y or half_x):  # a one-patch canvas has no cut to hide
            return grid
        return grid + [(y + half_y, x + half_x) for y, x in grid]


class X0Space:
    """Model output <-> clean-latent estimate x0 at timestep t, for the variance-preserving inputs every diffusers
    scheduler hands the denoiser (``scale_model_input``): x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε."""

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"):
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise HistosynthError(f"cannot heal seams for prediction type '{prediction_type}'")
        self.alphas_cumprod = alphas_cumprod.double().cpu()
        self.prediction_type = prediction_type

    @classmethod
    def of(cls, scheduler) -> X0Space:
        return cls(scheduler.alphas_cumprod, scheduler.config.prediction_type)

    def _coefficients(self, t: torch.Tensor) -> tuple[float, float]:
        """(√ᾱ_t, √(1−ᾱ_t)), interpolated for the fractional timesteps of sigma-based schedulers."""
        t = float(t)
        low = min(max(int(math.floor(t)), 0), len(self.alphas_cumprod) - 1)
        high = min(low + 1, len(self.alphas_cumprod) - 1)
        alpha = float(torch.lerp(self.alphas_cumprod[low], self.alphas_cumprod[high], t - low))
        return math.sqrt(alpha), math.sqrt(1 - alpha)

    def to_x0(self, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
              out: torch.Tensor | None = None) -> torch.Tensor:
        """x0 from a model output; ``out`` (may be ``output`` itself) receives it in place."""
        a, s = self._coefficients(t)
        if self.prediction_type == "epsilon":  # (x − s·output) / a
            return _into(out, output).mul_(-s).add_(x).div_(a)
        if self.prediction_type == "v_prediction":  # a·x − s·output
            return _add_scaled(_into(out, output).mul_(-s), x, a)
        return _into(out, output)

    def from_x0(self, x0: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """The model output whose x0 is ``x0``; ``out`` (may be ``x0`` itself) receives it in place."""
        a, s = self._coefficients(t)
        if self.prediction_type == "epsilon":  # (x − a·x0) / s
            return _into(out, x0).mul_(-a).add_(x).div_(s)
        if self.prediction_type == "v_prediction":  # (a·x − x0) / s
            return _add_scaled(_into(out, x0).mul_(-1), x, a).div_(s)
        return _into(out, x0)


def _add_scaled(values: torch.Tensor, x: torch.Tensor, scale: float) -> torch.Tensor:
    """``values += x · scale`` in place, the product formed a slab at a time (a canvas-sized temporary at a
    gigapixel is gigabytes); bit for bit ``values.add_(x * scale)``."""
    if values.ndim != 4 or values.shape[0] != 1:
        return values.add_(x * scale)
    for c, rows in slabs(tuple(values.shape)):
        values[:, c:c + 1, rows].add_(x[:, c:c + 1, rows] * scale)
    return values


def _into(out: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    """``value`` copied into ``out`` (a fresh tensor when ``out`` is None; nothing to copy when they are one)."""
    if out is None:
        return value.clone()
    return out if out is value else out.copy_(value)


def line_weight_axes(working: tuple[int, int], offset: tuple[int | None, int | None], patch: int,
                     band: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-axis factors of ``line_weights`` (rows (Hw,), columns (Ww,)): the weight at a pixel is their minimum,
    so a band of rows forms its own weights without a canvas of them."""
    axes = []
    for size, start in zip(working, offset):
        if start is None:
            axes.append(torch.ones(size))
            continue
        phase = (torch.arange(size) + 0.5 - start) % patch  # distance past the last line
        distance = torch.minimum(phase, patch - phase)  # to the nearest line: 0.5 .. P/2
        axes.append(((distance - 0.5) / band).clamp(0, 1))
    return axes[0], axes[1]


def line_weights(working: tuple[int, int], offset: tuple[int | None, int | None], patch: int,
                 band: int) -> torch.Tensor:
    """(1, 1, Hw, Ww) weights: 0 beside the grid lines at ``offset`` (mod ``patch``), rising linearly to 1 at
    ``band`` latent px from them; an axis whose offset is None has no lines."""
    rows, cols = line_weight_axes(working, offset, patch, band)
    return torch.minimum(rows[:, None], cols[None, :])[None, None]


def cell_lowpass(values: torch.Tensor, lines: tuple[list[int], list[int]], patch: int, sigma: float,
                 band_rows: int = 256, out: torch.Tensor | None = None) -> torch.Tensor:
    """Gaussian low-pass (σ = ``sigma`` px) of a periodic (1, C, H, W) canvas that never averages across a cut line.

    ``lines`` holds, per axis, the offsets (mod ``patch``) of the lines that cut before that row or column; H and W
    are multiples of ``patch``. Each output pixel averages only pixels of its own cell, with weights renormalised,
    so a jump at a line stays a jump and is not smeared over its neighbours. ``out`` (may be ``values`` itself)
    receives the result: filtered in place band by band (``stream_cell_lowpass``), so a gigapixel filter needs no
    second canvas."""
    result = _into(out, values)

    def emit(start: int, stop: int, filtered: torch.Tensor) -> None:
        result[:, :, start:stop] = filtered

    stream_cell_lowpass(lambda start, stop: result[:, :, start:stop], result.shape[2], lines, patch, sigma, emit,
                        band_rows)
    return result


def stream_cell_lowpass(rows_of: Callable[[int, int], torch.Tensor], height: int, lines: tuple[list[int], list[int]],
                        patch: int, sigma: float, emit: Callable[[int, int, torch.Tensor], None],
                        band_rows: int = 256) -> None:
    """``cell_lowpass`` of a canvas that is never whole: ``rows_of(a, b)`` gives its unfiltered rows a … b − 1
    (1, C, b − a, W), and ``emit(start, stop, filtered)`` receives the filtered rows band by band, in order.

    ``emit`` may overwrite what ``rows_of`` reads for the rows it is given: the rows a later band still needs
    unfiltered (the halo above it, and the canvas's first rows for the last band) are copied before that. Each
    pixel's sum runs over the same terms in the same order whatever the band, so the result is bit for bit the same
    for every ``band_rows``. Hand-written: no library filters within the cells of a moving grid."""
    radius = max(1, math.ceil(3 * sigma))
    shifts = torch.arange(-radius, radius + 1)
    gauss = torch.exp(-0.5 * (shifts.double() / sigma) ** 2)
    head = rows_of(0, min(radius, height)).clone()

    def coefficients(axis_lines: list[int]) -> torch.Tensor:  # (P, 2r+1): weights of position p's neighbours
        position = torch.arange(patch)[:, None]
        same_cell = torch.ones(patch, len(shifts), dtype=torch.bool)
        for line in axis_lines:
            ahead = (line - position - 1) % patch < shifts  # a forward step to p+k crosses the line before `line`
            behind = (position - line) % patch < -shifts
            same_cell &= ~(ahead | behind)
        weights = gauss * same_cell
        return (weights / weights.sum(1, keepdim=True)).to(head)

    def along(band: torch.Tensor, coefs: torch.Tensor, first: int, dim: int, keep: slice) -> torch.Tensor:
        """The band filtered along ``dim`` (its positions ``first``… on the canvas), cropped to ``keep``."""
        size = band.shape[dim]
        shape = [1, 1, 1, 1, len(shifts)]
        shape[dim] = size
        weights = coefs[(first + torch.arange(size)) % patch].reshape(shape)  # each position's, per shift
        total = None
        for j, k in enumerate(shifts.tolist()):
            term = torch.roll(band, -k, dims=dim) * weights[..., j]
            total = term if total is None else total.add_(term)
        return total.narrow(dim, keep.start, keep.stop - keep.start)

    rows, cols = coefficients(lines[0]), coefficients(lines[1])
    width = head.shape[3]
    if height < radius:  # the halo wraps more than once: gather it whole
        index = torch.arange(-radius, height + radius) % height
        filtered = along(head[:, :, index], rows, -radius, 2, slice(radius, radius + height))
        emit(0, height, along(filtered, cols, 0, 3, slice(0, width)))
        return
    # Unfiltered rows a band reads around itself: those above it (wrapping to the canvas's last rows at first), and,
    # for the last bands, the canvas's first rows, which the first band has emitted by then.
    above = rows_of(height - radius, height).clone()
    for start in range(0, height, band_rows):
        stop = min(start + band_rows, height)
        below = rows_of(stop, min(stop + radius, height))
        if stop + radius > height:
            below = torch.cat([below, head[:, :, :stop + radius - height]], 2)
        band = torch.cat([above, rows_of(start, stop), below], 2)  # the band and its halo, unfiltered
        above = band[:, :, stop - start:stop - start + radius].clone()  # the rows above the next band
        filtered = along(band, rows, start - radius, 2, slice(radius, radius + stop - start))
        emit(start, stop, along(filtered, cols, 0, 3, slice(0, width)))  # rows wrap whole


HEAL_BAND_ROWS = 256  # rows of the canvas a heal works on at once


def tent(patch: int) -> torch.Tensor:
    """Blend weights of one patch (P, P): highest at the centre, small but positive at the border."""
    ramp = torch.minimum(torch.arange(patch) + 1, patch - torch.arange(patch)).float() / ((patch + 1) / 2)
    return ramp[:, None] * ramp[None, :]


@dataclass
class FixedTiles:
    """Non-overlapping tiles at the same place at every step: the seam-prone baseline."""

    patch: int
    name: str = "tiles"
    overlapping: bool = False
    heal_from: None = None

    def blended(self, step_index: int) -> bool:
        return False

    def working_shape(self, height: int, width: int) -> tuple[int, int]:
        return math.ceil(height / self.patch) * self.patch, math.ceil(width / self.patch) * self.patch

    def windows(self, step_index: int, working: tuple[int, int], output: tuple[int, int]) -> list[Window]:
        return [(y, x) for y in range(0, working[0], self.patch) for x in range(0, working[1], self.patch)]


@dataclass
class MultiDiffusion:
    """Overlapping windows at ``stride``; overlapping outputs are averaged (Bar-Tal et al. 2023)."""

    patch: int
    stride: int
    name: str = "multidiffusion"
    overlapping: bool = True
    heal_from: None = None

    def blended(self, step_index: int) -> bool:
        return False

    def __post_init__(self):
        if not 0 < self.stride <= self.patch:
            raise HistosynthError(f"stride must be in 1..{self.patch} latent px, got {self.stride}")

    def _side(self, n: int) -> int:
        return self.patch + math.ceil(max(0, n - self.patch) / self.stride) * self.stride

    def working_shape(self, height: int, width: int) -> tuple[int, int]:
        return self._side(height), self._side(width)

    def windows(self, step_index: int, working: tuple[int, int], output: tuple[int, int]) -> list[Window]:
        ys = range(0, working[0] - self.patch + 1, self.stride)
        xs = range(0, working[1] - self.patch + 1, self.stride)
        return [(y, x) for y in ys for x in xs]


@dataclass
class CanvasStats:
    """What a canvas run cost: UNet evaluations (counted per patch and guidance pass) and where cuts lay."""

    unet_evals: int = 0
    local_evals: int = 0  # UNet evaluations this process ran (its share when several processes share a canvas)
    steps: int = 0
    patches_per_step: list[int] = field(default_factory=list)
    last_windows: list[Window] = field(default_factory=list)


class CanvasDenoiser:
    """A denoiser over the whole working canvas built from a per-patch denoiser and a layout.

    Conditions (conditions/base.py) cover the output canvas; each patch gets ``condition.crop(rows, cols)`` of
    the working-canvas rows and columns it covers (a plain tensor is read as one: ``as_condition``).
    Patches run in micro-batches of one fixed shape (the last one padded) so results do not depend on which
    process evaluates which patch.
    """

    def __init__(self, denoiser: Denoiser, layout: Layout, output_shape: tuple[int, int], conditions: dict | None = None,
                 micro_batch: int = 8, rank: int = 0, world: int = 1,
                 gather: Callable[[torch.Tensor, int], torch.Tensor] | None = None, x0_space: X0Space | None = None,
                 total_steps: int | None = None, context: int = 0, early_context: int | None = None,
                 early_steps: int = 0, shared_norms: SharedGroupNorms | None = None, heal_detail: float = 0.0,
                 spill: Spill | None = None):
        for name, value in (("context", context), ("early context", early_context)):
            if value is not None and value < 0:
                raise HistosynthError(f"{name} must be at least 0 latent px, got {value}")
        if early_steps < 0:
            raise HistosynthError(f"early steps must be at least 0, got {early_steps}")
        self.denoiser = denoiser
        self.layout = layout
        self.context = context
        # The noisiest steps' patches disagree most at their borders, so they may take more context (README, "Seams").
        self.early_context = context if early_context is None else early_context
        self.early_steps = early_steps
        # Group-norm statistics measured on a sample of each step's windows and used by all of them (README, "Seams").
        self.shared_norms = shared_norms
        self.output_shape = output_shape
        self.working_shape = layout.working_shape(*output_shape)
        self.micro_batch = micro_batch
        self.rank, self.world, self.gather = rank, world, gather
        self.passes = getattr(denoiser, "passes", 1)
        self.stats = CanvasStats()
        self._windows: list[Window] = []
        self._step = 0
        self.conditions = self._check_conditions(conditions or {})
        self.x0_space = x0_space
        self.heal_from = layout.heal_from if x0_space is not None else None
        if heal_detail < 0:
            raise HistosynthError(f"heal detail must be at least 0 latent px, got {heal_detail}")
        self.heal_detail = heal_detail  # σ (latent px) of the heal's low-pass; 0: the previous x0 is taken whole
        self.total_steps = total_steps  # when known, the last step keeps no x0 estimate for a step that never comes
        # The last step's x0 estimate, kept only around healed steps; on disk between its reads with ``spill``.
        self.spill = spill
        self.previous_x0: torch.Tensor | SpilledCanvas | None = None
        self.heal_band_rows = HEAL_BAND_ROWS

    def _check_conditions(self, conditions: dict) -> dict[str, Condition]:
        (h, w) = self.output_shape
        checked = {key: as_condition(value) for key, value in conditions.items()}
        for key, condition in checked.items():
            if condition.canvas is not None and tuple(condition.canvas) != (h, w):
                ch, cw = condition.canvas
                raise HistosynthError(f"condition '{key}' is {cw}×{ch} latent px; the canvas is {w}×{h}")
        return checked

    def begin_step(self, step_index: int, timestep: torch.Tensor) -> None:
        self._step = step_index
        self._windows = self.layout.windows(step_index, self.working_shape, self.output_shape)
        self.stats.steps += 1
        self.stats.patches_per_step.append(len(self._windows))
        self.stats.unet_evals += len(self._windows) * self.passes
        self.stats.last_windows = list(self._windows)

    def _indices(self, window: Window, context: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Working-canvas rows and columns of ``window`` (P each), widened by ``context`` on every side."""
        p, (hw, ww) = self.layout.patch, self.working_shape
        rows = (window[0] - context + torch.arange(p + 2 * context)) % hw
        cols = (window[1] - context + torch.arange(p + 2 * context)) % ww
        return rows, cols

    def _crop_conditions(self, windows: list[Window], device, context: int = 0) -> dict:
        """Each condition for ``windows``: spatial fields over the window and its context, vectors for the window."""
        cropped = {}
        for key, condition in self.conditions.items():
            reach = context if condition.spatial else 0
            cropped[key] = torch.cat([condition.crop(*self._indices(w, reach)) for w in windows]).to(device)  # (n, ...)
        return cropped

    def _chunks(self) -> list[list[Window]]:
        """Fixed-size micro-batches of this step's windows (the last padded by repeating its final window)."""
        size = max(1, min(self.micro_batch, len(self._windows)))
        chunks = [self._windows[i:i + size] for i in range(0, len(self._windows), size)]
        chunks[-1] = chunks[-1] + [chunks[-1][-1]] * (size - len(chunks[-1]))
        return chunks

    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor, conditions: dict | None = None) -> torch.Tensor:
        """``latents`` (1, C, Hw, Wh) working canvas -> model output of the same shape."""
        if not self._windows:
            raise RuntimeError("begin_step must run before the canvas denoiser is called")
        chunks = self._chunks()
        mine = chunk_assignment(len(chunks), self.rank, self.world)
        p, size = self.layout.patch, len(chunks[0])
        merged = torch.zeros_like(latents)
        blended = self.layout.blended(self._step) and tuple(self.working_shape) != tuple(self.output_shape)
        # Partitions (random grid, tiles) cover each pixel once: no weight canvas, no division.
        weights = torch.zeros_like(latents[:, :1]) if blended or self.layout.overlapping else None
        weight = tent(p).to(latents) if blended else torch.ones((p, p), dtype=latents.dtype, device=latents.device)

        def merge(chunk_index: int, outputs: torch.Tensor) -> None:  # outputs (b, C, P, P); padding is skipped
            start = chunk_index * size
            for window, output in zip(self._windows[start:start + size], outputs):
                rows, cols = self._indices(window)
                if weights is None:
                    merged[:, :, rows[:, None], cols[None, :]] += output
                else:
                    merged[:, :, rows[:, None], cols[None, :]] += output * weight
                    weights[:, :, rows[:, None], cols[None, :]] += weight

        self.stats.local_evals += sum(len(chunks[i]) for i in mine) * self.passes  # (padding included)
        shared = contextlib.nullcontext()
        if self.shared_norms is not None:
            # Every process measures the same sample itself: nothing to exchange, the same statistics everywhere.
            sample = self.shared_norms.sample(self._windows, self._step)
            with self.shared_norms.measuring(self.passes):
                self._evaluate(sample, latents, timestep)
            self.stats.unet_evals += len(sample) * self.passes
            self.stats.local_evals += len(sample) * self.passes
            shared = self.shared_norms.applying()
        with shared:
            if self.world == 1:
                # Merged as soon as evaluated: a step's patch outputs never exist all at once (a canvas less memory).
                for index in mine:
                    merge(index, self._evaluate(chunks[index], latents, timestep))
            else:
                local = torch.stack([self._evaluate(chunks[i], latents, timestep) for i in mine]) if mine else \
                    latents.new_zeros((0, size, latents.shape[1], p, p))
                every = self.gather(local, len(chunks))  # (chunks, b, C, P, P)
                for index in range(len(chunks)):
                    merge(index, every[index])
                del local, every
        if weights is not None:
            merged /= weights
        return self._heal(merged, latents, timestep) if self.heal_from is not None else merged

    def _evaluate(self, windows: list[Window], latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """The denoiser's output on ``windows`` (b, C, P, P); with ``context``, each window is evaluated with that
        many latent px of the canvas around it and only its centre is kept. A UNet's outputs near a patch's border
        see its zero padding, and its group norms the patch's own statistics; those borders are the cut lines,
        and what they imprint there at the middle steps the later steps keep as tissue (README, "Seams")."""
        c = self.context_at(self._step)
        indices = [self._indices(w, c) for w in windows]
        patches = torch.cat([latents[:, :, rows[:, None], cols[None, :]] for rows, cols in indices])
        output = self.denoiser(patches, timestep, self._crop_conditions(windows, latents.device, c))
        p = self.layout.patch
        return output[:, :, c:c + p, c:c + p] if c else output  # (b, C, P, P)

    def context_at(self, step_index: int) -> int:
        """Latent px of canvas around each patch at ``step_index``."""
        return self.early_context if step_index < self.early_steps else self.context

    def _heal(self, output: torch.Tensor, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """Near this step's cut lines, move x0 to the previous step's (healed) estimate, keeping this step's detail.

        The last steps' cut lines are never revisited, so they would stay as seams; the previous step cut more than
        the blending band away, so its x0 estimate is continuous across them. Blending the two x0 estimates in a
        band around the lines — with ``heal_detail``, only their coarse parts — (and turning the result back into a
        model output) hides the cut for no extra UNet evaluation. Every healed step does so, so no step from
        ``heal_from`` on leaves a cut for later steps.
        The last step heals the previous step's lines too: at the lowest noise the UNet returns its input almost
        as it is, and it sharpens the faint trace the previous step's blending band left in the latents into a
        ridge along those lines (some 20 % more gradient there at 8192² px); the previous step's healed x0 is
        smooth across them. Hand-written: no library heals a partition's seams from the sampler's own history.
        """
        if self._step < self.heal_from - 1:
            return output
        last = self.total_steps is not None and self._step >= self.total_steps - 1
        if self._step < self.heal_from or self.previous_x0 is None:
            self.previous_x0 = None if last else self._x0_kept(output, latents, timestep)
            return output
        # Band by band, in place where a tensor is not needed again: at 32768² px every canvas is 2 GiB, and the
        # previous x0 may wait on disk (``spill``), so the heal adds no canvas to the step's two.
        x0 = self.x0_space.to_x0(output, latents, timestep, out=output)  # (1, C, Hw, Ww)
        grids = [self._windows]
        if last:
            grids.append(self.layout.windows(self._step - 1, self.working_shape, self.output_shape))
        offsets = [self._grid_offset(windows) for windows in grids]
        p = self.layout.patch
        axes = [line_weight_axes(self.working_shape, offset, p, max(1, p // 4)) for offset in offsets]
        previous = self.previous_x0
        healed_rows = None if last else previous  # each band's healed x0 over the previous x0's rows, once read

        def correction(start: int, stop: int) -> torch.Tensor:  # x0 − previous
            return x0[:, :, start:stop] - rows_of(previous, start, stop)

        def heal_rows(start: int, stop: int, difference: torch.Tensor) -> None:
            weight = functools.reduce(torch.minimum, [torch.minimum(r[start:stop, None], c[None, :]) for r, c in axes])
            healed = x0[:, :, start:stop] - difference * (1 - weight[None, None].to(difference))
            if healed_rows is not None:
                write_rows(healed_rows, start, healed)
            self.x0_space.from_x0(healed, latents[:, :, start:stop], timestep, out=x0[:, :, start:stop])

        height = self.working_shape[0]
        if self.heal_detail:
            # Only the coarser part of the difference is healed: the previous step's x0, made at more noise, is
            # blurrier, and taken whole it left the healed bands softer than the rest, a period of P in the
            # slide's sharpness. Filtered within the cells of the grids, the jump at a line is removed whole.
            lines = tuple(sorted({o[axis] for o in offsets if o[axis] is not None}) for axis in (0, 1))
            stream_cell_lowpass(correction, height, lines, p, self.heal_detail, heal_rows, self.heal_band_rows)
        else:
            for start in range(0, height, self.heal_band_rows):
                stop = min(start + self.heal_band_rows, height)
                heal_rows(start, stop, correction(start, stop))
        self.previous_x0 = healed_rows
        return output  # now the healed model output

    def _x0_kept(self, output: torch.Tensor, latents: torch.Tensor, timestep: torch.Tensor
                 ) -> torch.Tensor | SpilledCanvas:
        """This step's x0 estimate, for the next (healed) step: on disk where the canvas spills."""
        if self.spill is None:
            return self.x0_space.to_x0(output, latents, timestep)
        kept = self.spill.new(tuple(output.shape), output)
        for start in range(0, output.shape[2], self.heal_band_rows):
            rows = slice(start, start + self.heal_band_rows)
            write_rows(kept, start, self.x0_space.to_x0(output[:, :, rows], latents[:, :, rows], timestep))
        return kept

    def keep(self, tensor: torch.Tensor | None) -> torch.Tensor | SpilledCanvas | None:
        """A canvas-sized tensor this run keeps between steps (restored from a checkpoint): spilled where it spills."""
        return tensor if tensor is None or self.spill is None else self.spill.keep(tensor)

    def _grid_offset(self, windows: list[Window]) -> tuple[int | None, int | None]:
        """Where the grid of ``windows`` cuts each axis (mod P); None for an axis it does not cut."""
        p, (hw, ww) = self.layout.patch, self.working_shape
        y0, x0 = windows[0]
        return y0 % p if hw != self.output_shape[0] else None, x0 % p if ww != self.output_shape[1] else None


def chunk_assignment(n_chunks: int, rank: int, world: int) -> list[int]:
    """Contiguous, balanced share of micro-batches for ``rank`` (sizes differ by at most one)."""
    base, extra = divmod(n_chunks, world)
    start = rank * base + min(rank, extra)
    return list(range(start, start + base + (1 if rank < extra else 0)))


def make_layout(sampler: str, patch: int, seed: int = 0, stride: int | None = None,
                blend_from: int | None = None, heal_from: int | None = None, lattice: int = 1) -> Layout:
    """A layout by its CLI name: ``random`` (default), ``tiles``, ``multidiffusion``; ``lattice``: the denoiser's
    down-sampling grid in px (``offset_steps``)."""
    if sampler == "random":
        return RandomOffsetGrid(patch, seed, blend_from=blend_from, heal_from=heal_from, lattice=lattice)
    if sampler == "tiles":
        return FixedTiles(patch)
    if sampler == "multidiffusion":
        return MultiDiffusion(patch, stride or max(1, patch // 2))
    raise HistosynthError(f"unknown sampler '{sampler}'; choose random, tiles, multidiffusion or diffinfinite")


def cost_per_pass(layout: Layout, output_shape: tuple[int, int], steps: int = 1) -> float:
    """UNet evaluations per output latent pixel per step and guidance pass, counted from the layout's windows."""
    working = layout.working_shape(*output_shape)
    total = sum(len(layout.windows(i, working, output_shape)) for i in range(steps)) * layout.patch ** 2
    return total / (steps * output_shape[0] * output_shape[1])


def cut_lines(layout: Layout, windows: list[Window], output_shape: tuple[int, int]) -> tuple[list[int], list[int]]:
    """Horizontal (y) and vertical (x) lines inside the output where windows of one step meet."""
    working, p = layout.working_shape(*output_shape), layout.patch
    ys = sorted({(y + d) % working[0] for y, _ in windows for d in (0, p)} - {0})
    xs = sorted({(x + d) % working[1] for _, x in windows for d in (0, p)} - {0})
    return [y for y in ys if y < output_shape[0]], [x for x in xs if x < output_shape[1]]


def canvas_noise(layout: Layout, channels: int, output_shape: tuple[int, int], generator: torch.Generator,
                 device="cpu") -> torch.Tensor:
    """Initial noise over the working canvas (1, C, Hw, Ww), drawn once for the canvas."""
    return initial_noise((1, channels, *layout.working_shape(*output_shape)), generator, device)
