"""Seam score (design §7): how much stronger the image gradient is across cut lines than across lines beside them.

Definitions (all positions in image pixels, ``I`` the image as float, averaged over its C channels):

* a horizontal cut line at ``y`` is the boundary between rows ``y − 1`` and ``y``; its gradient is
  ``|I[y, x, c] − I[y − 1, x, c]|`` for every column ``x`` and channel ``c``. Only ``1 ≤ y ≤ H − 1`` are
  boundaries inside the image; other lines are ignored. A vertical line at ``x`` is the same with columns.
* control lines are either given (a generation records lines at random offsets at least ``min_distance`` from
  every recent step's cut lines, ``control_offsets``) or are the cut lines shifted by ``control_shift``:
  ``y + control_shift`` and ``x + control_shift``; either way skipped where they fall outside the image or onto a
  cut line (they would measure the seam). A shift of half a patch is right for one fixed grid only: the random grid
  cuts somewhere else at every step, and half a patch from the last step's lines may be an earlier step's lines.
* score = mean gradient over every (pixel, channel) on the cut lines / the same mean on the control lines.
  Horizontal and vertical lines are pooled pixel by pixel, so a line's weight is its length.

A seamless image scores ≈ 1; visible seams score > 1. With few lines the score scatters even on real tissue, so
compare it with ``reference_score`` (95th percentile over random grid offsets on real tissue of the same size and
patch size). Compute it on lossless pixels: JPEG's 8×8 blocks add their own edges.

The **periodicity score** needs no record of where the cuts lay: seams of a P-px grid, wherever it sits, make the
mean |gradient| profile across rows (and across columns) periodic in P. It is the energy of that profile at the
frequencies h/P, h = 1…``harmonics`` (Hann-windowed DFT), over the median energy of neighbouring frequencies (2…8
DFT bins away on both sides), averaged over rows and columns. Texture without a period scores about 1.4 (the mean
of an exponential over its median); a seam grid scores far higher. ``periodicity_reference`` gives the same
statistic on random crops of real tissue.

One profile's score scatters widely even without any period (0.7-2.4, 5th-95th percentile, for white noise; real
tissue's non-overlapping 512² px crops 0.8-3.3), so a band from real crops is only a band when the crops are many
and independent: a real slide barely larger than the output yields overlapping crops that all score about the same,
one measurement rather than a spread (``SeamReference.independent_crops`` says how many crops of that size the slide
holds side by side). ``periodicity_null`` asks the question without real tissue: how the same image's own profiles
score once any period is taken out of them (stationary surrogates with their smoothed spectrum), and the p-value of
the image's score among those draws.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import numpy as np

from histosynth.errors import HistosynthError


@dataclass(frozen=True)
class SeamReference:
    """Seam scores of real tissue over random grid offsets; ``p95`` is the threshold a generated image is held to."""

    p95: float
    mean: float
    min: float
    max: float
    patch: int
    scores: tuple[float, ...]
    offsets: tuple[tuple[int, int], ...]  # (oy, ox) per score
    # How many crops of the measured size the real image holds without overlap (periodicity references): under
    # about 4 the crops overlap so much that the "band" is one measurement, not a spread.
    independent_crops: float | None = None

    def as_dict(self) -> dict:
        """JSON-ready dict."""
        data = asdict(self)
        data["scores"] = list(self.scores)
        data["offsets"] = [list(offset) for offset in self.offsets]
        return data


def grid_lines(size: int, patch: int, offset: int = 0) -> list[int]:
    """Cut lines ``offset + k·patch`` strictly inside ``(0, size)`` along one axis; ``offset`` is taken mod ``patch``.

    >>> grid_lines(10, 4, 0), grid_lines(10, 4, 1), grid_lines(8, 4, 0), grid_lines(4, 4, 0)
    ([4, 8], [1, 5, 9], [4], [])
    """
    if patch < 1:
        raise HistosynthError(f"patch size must be ≥ 1, got {patch}")
    if size < 0:
        raise HistosynthError(f"image size must be ≥ 0, got {size}")
    first = offset % patch
    return [y for y in range(first, size, patch) if y > 0]


def line_gradients(image: np.ndarray, lines: Iterable[int], axis: int) -> tuple[float, int]:
    """(sum, count) of |difference| across the given lines: ``axis=0`` rows (horizontal lines), 1 columns."""
    array = _as_image(image)  # (H, W, C), any numeric dtype
    size = array.shape[axis]
    valid = sorted({int(line) for line in lines if 1 <= int(line) <= size - 1})
    if not valid:
        return 0.0, 0
    index = np.asarray(valid)
    # Only the rows/columns beside the lines become float: a whole large slide in float32 would not fit.
    after = np.take(array, index, axis=axis).astype(np.float32)  # (n, W, C) or (H, n, C)
    before = np.take(array, index - 1, axis=axis).astype(np.float32)
    diff = np.abs(after - before)
    return float(diff.sum(dtype=np.float64)), int(diff.size)


def seam_score(
    image: np.ndarray,
    lines_y: Sequence[int],
    lines_x: Sequence[int],
    control_shift: int | None = None,
    control_lines: tuple[Sequence[int], Sequence[int]] | None = None,
) -> float:
    """Mean |gradient| across the cut lines divided by the same on control lines: ``control_lines`` (y, x) when
    given, else the cut lines shifted by ``control_shift``.

    ``image`` is (H, W, C) or (H, W), uint8 or float. Returns NaN where the control lines are flat (no texture to
    compare with). Raises HistosynthError when no cut line or no control line lies inside the image.
    """
    array = _as_image(image)
    height, width = array.shape[:2]
    if (control_shift is None) == (control_lines is None):
        raise HistosynthError("give either control_shift or control_lines")
    if control_shift == 0:
        raise HistosynthError("control_shift must not be 0: the control lines would be the cut lines")
    cut_y = {int(y) for y in lines_y if 1 <= int(y) <= height - 1}
    cut_x = {int(x) for x in lines_x if 1 <= int(x) <= width - 1}
    if not cut_y and not cut_x:
        raise HistosynthError(f"no cut line lies inside the {width}x{height} px image")
    if control_lines is not None:
        control_y = {int(y) for y in control_lines[0] if 1 <= int(y) <= height - 1} - cut_y
        control_x = {int(x) for x in control_lines[1] if 1 <= int(x) <= width - 1} - cut_x
    else:
        control_y = {y + control_shift for y in cut_y} - cut_y
        control_x = {x + control_shift for x in cut_x} - cut_x
    cut_sum_y, cut_n_y = line_gradients(array, cut_y, axis=0)
    cut_sum_x, cut_n_x = line_gradients(array, cut_x, axis=1)
    control_sum_y, control_n_y = line_gradients(array, control_y, axis=0)
    control_sum_x, control_n_x = line_gradients(array, control_x, axis=1)
    control_n = control_n_y + control_n_x
    if control_n == 0:
        raise HistosynthError(
            "no control line lies inside the image: " + (
                f"shift {control_shift} px moves every cut line out or onto another" if control_lines is None
                else "every given control line is outside it or on a cut line")
        )
    cut_mean = (cut_sum_y + cut_sum_x) / (cut_n_y + cut_n_x)
    control_mean = (control_sum_y + control_sum_x) / control_n
    if control_mean == 0:
        return math.nan
    return cut_mean / control_mean


def stats_seam_score(image: np.ndarray, stats: dict) -> float:
    """Seam score on the cut lines a generation recorded in its stats, against its recorded control lines (or, for
    stats without them, lines shifted by its ``seam_control_px``)."""
    lines = stats["seam_lines"]
    control = stats.get("seam_control_lines")
    if control is not None:
        return seam_score(image, lines["y"], lines["x"], control_lines=(control["y"], control["x"]))
    return seam_score(image, lines["y"], lines["x"], int(stats.get("seam_control_px") or _half(stats["patch_px"])))


def grid_seam_score(image: np.ndarray, patch: int, offset: tuple[int, int] = (0, 0)) -> float:
    """Seam score of a patch grid at ``offset`` = (oy, ox), control lines shifted by half a patch."""
    height, width = np.asarray(image).shape[:2]
    oy, ox = offset
    return seam_score(image, grid_lines(height, patch, oy), grid_lines(width, patch, ox), _half(patch))


def reference_score(real_image: np.ndarray, patch: int, n_offsets: int = 20, seed: int = 0) -> SeamReference:
    """Seam scores of real tissue over ``n_offsets`` grid offsets drawn uniformly from [0, patch)² (seeded)."""
    if n_offsets < 1:
        raise HistosynthError(f"n_offsets must be ≥ 1, got {n_offsets}")
    height, width = np.asarray(real_image).shape[:2]
    if min(height, width) <= patch:
        raise HistosynthError(f"real image of {width}x{height} px is too small for a {patch} px grid")
    array = _as_image(real_image)
    rng = np.random.default_rng(seed)
    offsets = [tuple(int(v) for v in rng.integers(0, patch, size=2)) for _ in range(n_offsets)]
    scores = [grid_seam_score(array, patch, offset) for offset in offsets]
    values = np.asarray(scores, dtype=np.float64)
    return SeamReference(
        p95=float(np.nanpercentile(values, 95)),
        mean=float(np.nanmean(values)),
        min=float(np.nanmin(values)),
        max=float(np.nanmax(values)),
        patch=int(patch),
        scores=tuple(float(v) for v in values),
        offsets=tuple(offsets),  # type: ignore[arg-type]
    )


def control_offsets(patch: int, avoid: Iterable[int], min_distance: int, count: int = 4, seed: int = 0) -> list[int]:
    """Up to ``count`` grid offsets in [0, patch), each at least ``min_distance`` px (circularly, mod ``patch``)
    from every offset in ``avoid``, drawn at random (seeded) from all that qualify; [] when none does.

    >>> control_offsets(16, [0, 8], 3, count=8)
    [3, 4, 5, 11, 12, 13]
    """
    if patch < 1 or min_distance < 0:
        raise HistosynthError(f"need patch ≥ 1 and min_distance ≥ 0, got {patch} and {min_distance}")
    avoid = [int(a) % patch for a in avoid]
    allowed = [o for o in range(patch)
               if all(min((o - a) % patch, (a - o) % patch) >= min_distance for a in avoid)]
    if len(allowed) <= count:
        return allowed
    rng = np.random.default_rng([seed, 0xC0472])
    return sorted(int(v) for v in rng.choice(allowed, size=count, replace=False))


def gradient_profiles(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean |difference| between neighbouring rows (length H−1) and between neighbouring columns (length W−1)."""
    array = _as_image(image)
    rows = np.empty(array.shape[0] - 1)
    for start in range(0, array.shape[0] - 1, 512):  # in bands: a large slide in float would not fit
        band = array[start:start + 513].astype(np.float32)
        rows[start:start + band.shape[0] - 1] = np.abs(np.diff(band, axis=0)).mean(axis=(1, 2))
    cols = np.zeros(array.shape[1] - 1)
    for start in range(0, array.shape[0], 512):
        band = array[start:start + 512].astype(np.float32)
        cols += np.abs(np.diff(band, axis=1)).sum(axis=(0, 2))
    return rows, cols / (array.shape[0] * array.shape[2])


def profile_periodicity(profile: np.ndarray, period: float, harmonics: int = 4) -> float:
    """Energy of ``profile`` at h/period (h = 1…harmonics) over the median energy 2…8 DFT bins beside each."""
    n = len(profile)
    if n < 4 * period - 1:  # a gradient profile is one shorter than the image side it comes from
        raise HistosynthError(f"a {n} px profile is too short to measure a {period:g} px period (need 4 periods)")
    values = (profile - profile.mean()) * np.hanning(n)
    positions = np.arange(n)

    def energy(frequency: float) -> float:
        return float(np.abs(np.exp(-2j * np.pi * frequency * positions) @ values) ** 2)

    peak, background = 0.0, 0.0
    for h in range(1, harmonics + 1):
        frequency = h / period
        if frequency >= 0.5:
            break
        peak += energy(frequency)
        beside = [frequency + sign * k / n for k in range(2, 9) for sign in (-1, 1)]
        background += float(np.median([energy(f) for f in beside if 0 < f < 0.5]))
    return peak / background if background > 0 else math.nan


def periodicity_score(image: np.ndarray, patch: int, harmonics: int = 4) -> float:
    """Blind seam score: periodicity at ``patch`` px of the row and column gradient profiles, averaged."""
    _check_periods(image, patch)
    rows, cols = gradient_profiles(image)
    return (profile_periodicity(rows, patch, harmonics) + profile_periodicity(cols, patch, harmonics)) / 2


def _check_periods(image: np.ndarray, patch: int) -> None:
    """A HistosynthError unless ``image`` spans four periods of ``patch`` px on each side."""
    height, width = np.asarray(image).shape[:2]
    if min(height, width) < 4 * patch:
        raise HistosynthError(f"a {width}×{height} px image is too small to measure a {patch} px period "
                              "(need 4 periods on each side)")


def periodicity_reference(real_image: np.ndarray, size: tuple[int, int], patch: int, n_crops: int = 20,
                          seed: int = 0) -> SeamReference:
    """Periodicity scores of ``n_crops`` random crops of real tissue of ``size`` (h, w), as a ``SeamReference``
    (offsets: the crops' top-left corners).

    Where a side of ``size`` is longer than the real image, that side of the crops is the image's less two patches:
    whole-image crops would all be the same crop, a band of width zero. Shorter crops are a fair reference for a
    longer output: without a period the statistic does not grow with length (it compares the energy at h/P with
    that of neighbouring frequencies of the same profile), while a seam grid's does.
    """
    array = _as_image(real_image)
    height, width = (side if side <= limit else max(limit - 2 * patch, 4 * patch)
                     for side, limit in zip(size, array.shape[:2]))
    if height > array.shape[0] or width > array.shape[1]:
        raise HistosynthError(f"a {array.shape[1]}×{array.shape[0]} px real image is too small for a periodicity "
                              f"reference at a {patch} px period (need 4 periods on each side)")
    rng = np.random.default_rng([seed, 0x9E410D])
    corners = [(int(rng.integers(0, array.shape[0] - height + 1)), int(rng.integers(0, array.shape[1] - width + 1)))
               for _ in range(n_crops)]
    values = np.asarray([periodicity_score(array[y:y + height, x:x + width], patch) for y, x in corners])
    independent = (array.shape[0] // height) * (array.shape[1] // width)
    return SeamReference(p95=float(np.nanpercentile(values, 95)), mean=float(np.nanmean(values)),
                         min=float(np.nanmin(values)), max=float(np.nanmax(values)), patch=int(patch),
                         scores=tuple(float(v) for v in values), offsets=tuple(corners),  # type: ignore[arg-type]
                         independent_crops=float(independent))


@dataclass(frozen=True)
class PeriodicityNull:
    """The periodicity score of an image beside its score's distribution once any period is taken out."""

    score: float
    p95: float
    median: float
    p_value: float  # share of the draws (the image's own score counted as one) scoring at least ``score``
    draws: int

    def as_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)


def stationary_surrogate(profile: np.ndarray, rng: np.random.Generator, smoothing: int = 8) -> np.ndarray:
    """A Gaussian profile with ``profile``'s power spectrum, smoothed by a running median over 2·``smoothing``+1
    DFT bins, and random phases: the same spectral shape (its texture's scale), no period.

    The median over a window wider than a harmonic's peak (about two bins) removes the peak, so a seam grid's
    energy at h/P is not copied into its own null; phase-randomising the raw spectrum would keep it."""
    power = np.abs(np.fft.rfft(profile - profile.mean())) ** 2
    padded = np.pad(power, smoothing, mode="reflect")
    smooth = np.median(np.lib.stride_tricks.sliding_window_view(padded, 2 * smoothing + 1), axis=1)
    smooth[0] = 0.0
    coefficients = np.sqrt(smooth / 2) * (rng.standard_normal(len(power)) + 1j * rng.standard_normal(len(power)))
    return np.fft.irfft(coefficients, n=len(profile))


def periodicity_null(image: np.ndarray, patch: int, draws: int = 200, seed: int = 0,
                     harmonics: int = 4) -> PeriodicityNull:
    """``image``'s periodicity score and its null: the same statistic on ``draws`` stationary surrogates of the
    image's own row and column gradient profiles (``stationary_surrogate``). A grid of seams puts the score above
    the null's 95th percentile (p < 0.05); texture without a period lands above it one time in twenty."""
    _check_periods(image, patch)
    return profiles_null(*gradient_profiles(image), patch, draws, seed, harmonics)


def profiles_null(rows: np.ndarray, cols: np.ndarray, patch: int, draws: int = 200, seed: int = 0,
                  harmonics: int = 4) -> PeriodicityNull:
    """``periodicity_null`` of a row and a column gradient profile (of an image, or of a latent canvas), their
    scores averaged as ``periodicity_score`` does. Hand-written: a surrogate test at one known period is too small
    a thing for a library (scipy and statsmodels look for unknown periods)."""
    if draws < 1:
        raise HistosynthError(f"a periodicity null needs at least 1 draw, got {draws}")
    score = (profile_periodicity(rows, patch, harmonics) + profile_periodicity(cols, patch, harmonics)) / 2
    rng = np.random.default_rng([seed, 0x5A11])
    values = np.asarray([(profile_periodicity(stationary_surrogate(rows, rng), patch, harmonics)
                          + profile_periodicity(stationary_surrogate(cols, rng), patch, harmonics)) / 2
                         for _ in range(draws)])
    return PeriodicityNull(score=score, p95=float(np.nanpercentile(values, 95)), median=float(np.nanmedian(values)),
                           p_value=float((1 + np.sum(values >= score)) / (1 + draws)), draws=int(draws))


def real_tissue_like(real: np.ndarray, height: int, width: int) -> np.ndarray:
    """A (height, width, C) crop of real tissue: centred if it fits, else the image mirrored (symmetric) to size.

    Mirroring repeats tissue without adding a step at the joins (the gradient across a mirror line is 0 there),
    so a grid line landing on a join reads slightly smooth; it is the least biased way to reach a larger size.
    """
    real = np.asarray(real)
    pad_y, pad_x = max(height - real.shape[0], 0), max(width - real.shape[1], 0)
    if pad_y or pad_x:
        # numpy's "symmetric" keeps mirroring for pads larger than the image.
        pad = [(pad_y // 2, pad_y - pad_y // 2), (pad_x // 2, pad_x - pad_x // 2)] + [(0, 0)] * (real.ndim - 2)
        real = np.pad(real, pad, mode="symmetric")
    top = (real.shape[0] - height) // 2
    left = (real.shape[1] - width) // 2
    return real[top : top + height, left : left + width]


def _half(patch: int) -> int:
    """Control shift for a patch grid: half a patch (at least 1 px)."""
    return max(patch // 2, 1)


def _as_image(image: np.ndarray) -> np.ndarray:
    """(H, W, C) view of an image given as (H, W) or (H, W, C) with numeric pixels, checked."""
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[0] < 2 or array.shape[1] < 2:
        raise HistosynthError(f"seam score needs an (H, W[, C]) image of at least 2x2 px, got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise HistosynthError(f"seam score needs numeric pixels, got {array.dtype}")
    return array
