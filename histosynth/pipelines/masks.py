"""Masks for generation: read a user's mask image, or sample one on a canvas with the mask model."""
from __future__ import annotations

import hashlib
import zlib
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from histosynth.checks import require_finite
from histosynth.data.regions import merge_small_regions
from histosynth.data.slides import open_image
from histosynth.errors import HistosynthError
from histosynth.models.bundle import Bundle
from histosynth.models.denoiser import at_precision
from histosynth.sampling.canvas import CanvasDenoiser, canvas_noise, make_layout
from histosynth.sampling.shared_norms import SharedGroupNorms
from histosynth.sampling.checkpoint import CanvasCheckpoint
from histosynth.sampling.distributed import ProcessGroup, gather_chunks
from histosynth.sampling.guidance import guided
from histosynth.sampling.patch import run_scheduler


def read_mask(path: str | Path, classes: list[dict]) -> np.ndarray:
    """A mask PNG/TIFF as uint8 class ids: either class ids directly or colours matching the class colours."""
    path = Path(path)
    image = open_image(path, "mask image")
    known = {int(c["id"]) for c in classes} | {0}
    if image.mode in ("RGB", "RGBA"):
        rgb = np.asarray(image.convert("RGB"))
        mask = np.zeros(rgb.shape[:2], np.uint8)
        matched = np.zeros(rgb.shape[:2], bool)
        for entry in classes:
            hit = np.all(rgb == np.array(_color(entry), np.uint8), axis=-1)
            mask[hit], matched = int(entry["id"]), matched | hit
        if not matched.all():
            y, x = np.argwhere(~matched)[0]
            raise HistosynthError(f"{path}: colour {tuple(int(v) for v in rgb[y, x])} at ({x}, {y}) matches no class colour")
        return mask
    mask = np.asarray(image.convert("L") if image.mode not in ("L", "P", "I", "I;16") else image).astype(np.int64)
    unknown = sorted(set(np.unique(mask).tolist()) - known)
    if unknown:
        raise HistosynthError(f"{path}: class id {unknown[0]} is not one the model knows ({sorted(known)})")
    return mask.astype(np.uint8)


def _color(entry: dict) -> tuple[int, int, int]:
    color = entry.get("color", (0, 0, 0))
    if isinstance(color, str):
        color = color.lstrip("#")
        return tuple(int(color[i:i + 2], 16) for i in (0, 2, 4))
    return tuple(int(v) for v in color[:3])


def fit_mask(mask: np.ndarray, width: int, height: int, path: str | Path = "mask") -> np.ndarray:
    """Scale a mask to the slide size by an integer factor (nearest); other sizes are refused."""
    h, w = mask.shape
    if (w, h) == (width, height):
        return mask
    if width % w or height % h or width // w != height // h:
        raise HistosynthError(f"{path}: mask of {w}×{h} px does not fit a {width}×{height} px slide "
                              "(same size or an integer fraction of it)")
    factor = width // w
    return np.repeat(np.repeat(mask, factor, axis=0), factor, axis=1)


def label_condition(mask_model: Bundle, label: str | None) -> dict:
    """The slide-label condition of a mask model trained with ``--slide-labels``: {"label": one-hot (1, L)}, or {}
    for no label (the null: layouts of any label)."""
    names = mask_model.config.get("labels", [])
    if label is None:
        return {}
    if not names:
        raise HistosynthError(f"--mask-label {label}: the mask model was trained without slide labels "
                              "(`histosynth train mask --slide-labels`)")
    if label not in names:
        raise HistosynthError(f"--mask-label {label}: the mask model knows {', '.join(names)}")
    vector = torch.zeros(1, len(names))
    vector[0, names.index(label)] = 1
    return {"label": vector}


def sample_mask_scores(mask_model: Bundle, shape: tuple[int, int], sampler: str = "random", steps: int = 25,
                       seed: int = 0, micro_batch: int = 8, scheduler: str = "dpm++sde", stride: int | None = None,
                       device: str = "cpu", progress=None, group: ProcessGroup = ProcessGroup(),
                       label: str | None = None, label_guidance: float = 2.0, checkpoint_dir: Path | None = None,
                       checkpoint_every: int = 0, checkpoint_key: str = "", precision: str = "float32",
                       context: int = 0, shared_norms: int = 0) -> tuple[torch.Tensor, dict]:
    """Class scores (1, K, h, w) of a canvas of ``shape`` (h, w) at the mask model's own resolution, and the mask
    model's evaluation counts; ``label`` steers a label-conditioned model (guided at ``label_guidance``).
    ``context`` and ``shared_norms`` are the image model's canvas options (CanvasDenoiser), for the mask model's patches.

    With ``checkpoint_dir`` the canvas is checkpointed every ``checkpoint_every`` steps (tagged ``checkpoint_key``)
    and continued from the latest checkpoint found there: at a gigapixel the layout alone takes hours."""
    channels = mask_model.num_classes
    conditions = label_condition(mask_model, label)
    denoiser = guided(at_precision(mask_model.denoiser().to(device), precision, device),
                      {"label": label_guidance} if conditions else {})
    layout = make_layout(sampler, mask_model.latent_patch, seed=seed + 1, stride=stride,
                         lattice=mask_model.lattice)
    if context % mask_model.context_step or not 0 <= context <= mask_model.latent_patch:
        raise HistosynthError(f"--mask-context {context}: the mask model takes 0 to {mask_model.latent_patch} px "
                              f"in steps of {mask_model.context_step}")
    canvas = CanvasDenoiser(denoiser, layout, shape, {k: v.to(device) for k, v in conditions.items()},
                            micro_batch=micro_batch, rank=group.rank, world=group.world, gather=gather_chunks,
                            context=context,
                            shared_norms=SharedGroupNorms(mask_model.unet, shared_norms) if shared_norms else None)
    sched = mask_model.sampling_scheduler(scheduler)
    sched.set_timesteps(steps, device=device)
    generator = torch.Generator().manual_seed(seed + 1)
    checkpoint = CanvasCheckpoint(checkpoint_dir, checkpoint_key, steps, canvas, sched, generator, device) \
        if checkpoint_dir is not None else None
    start = 0
    if checkpoint is not None and any(Path(checkpoint_dir).glob("step-*")):
        noise, start = checkpoint.restore(channels)
    else:
        noise = canvas_noise(layout, channels, shape, generator, device)

    def on_step(done: int, total: int, current: torch.Tensor) -> None:
        if progress is not None:
            progress(done, total, current)
        if checkpoint is not None and checkpoint_every and done % checkpoint_every == 0 and done < total \
                and group.is_main:
            checkpoint.save(current, done)

    scores = run_scheduler(canvas, noise, sched, generator=generator, start_step=start, callback=on_step)
    require_finite(scores, mask_model.path, "the mask model's class scores")  # argmax of NaN is class 1, silently
    scores = scores[:, :, :shape[0], :shape[1]].float().cpu()  # (1, K, h, w)
    min_cells = round(mask_model.min_region_um2 / float(mask_model.config.get("mask_mpp", 1.0)) ** 2)
    if min_cells > 1:
        scores = merge_small_layout_regions(scores, min_cells)
    return scores, {"mask_unet_evals": canvas.stats.unet_evals, "mask_unet_evals_this_process": canvas.stats.local_evals}


def merge_small_layout_regions(scores: torch.Tensor, min_cells: int) -> torch.Tensor:
    """Class scores (1, K, h, w) whose argmax has no region smaller than ``min_cells`` cells.

    The labels a mask model learns from have a smallest region (``prepare --auto-labels regions`` merges smaller
    ones into their surroundings); the model's own argmax leaves specks where the last steps' noise tipped a few
    cells, so its layouts keep the same rule. A merged cell's new class is lifted just above the cell's best
    score, so upsampling still draws smooth borders."""
    labels = scores[0].argmax(0).numpy()  # (h, w)
    merged = merge_small_regions(labels, min_cells)
    rows, cols = np.nonzero(merged != labels)
    if len(rows) == 0:
        return scores
    new_class = torch.from_numpy(merged[rows, cols]).long()  # (n,)
    rows, cols = torch.from_numpy(rows), torch.from_numpy(cols)
    scores = scores.clone()
    scores[0, new_class, rows, cols] = scores[0, :, rows, cols].max(0).values + 0.1
    return scores


def sample_mask(mask_model: Bundle, width: int, height: int, sampler: str = "random", steps: int = 25,
                seed: int = 0, micro_batch: int = 8, scheduler: str = "dpm++sde", stride: int | None = None,
                device: str = "cpu", progress=None, group: ProcessGroup = ProcessGroup(),
                label: str | None = None, label_guidance: float = 2.0, checkpoint_dir: Path | None = None,
                checkpoint_every: int = 0, checkpoint_key: str = "", banded: bool = False,
                precision: str = "float32", context: int = 0, shared_norms: int = 0
                ) -> tuple["np.ndarray | BandedMask", dict]:
    """Sample class scores on a canvas at the mask model's resolution and upsample them with smooth boundaries.

    Returns the uint8 class-id mask at image resolution (height, width) — as a ``BandedMask`` with ``banded``, built
    band by band, so that a slide's plain mask (1 GiB at 32768² px) never exists — and the mask model's evaluation
    count.
    """
    factor = mask_model.latent_factor
    if width % factor or height % factor:
        raise HistosynthError(f"slide size {width}×{height} px is not a multiple of the mask model's {factor} px")
    scores, counts = sample_mask_scores(mask_model, (height // factor, width // factor), sampler, steps, seed,
                                        micro_batch, scheduler, stride, device, progress, group, label,
                                        label_guidance, checkpoint_dir, checkpoint_every, checkpoint_key, precision,
                                        context, shared_norms)
    if banded:
        return BandedMask(label_bands(scores, factor), width), counts
    return upsample_labels(scores, factor), counts


def label_bands(scores: torch.Tensor, factor: int, band: int = 64) -> Iterator[np.ndarray]:
    """Class scores (1, K, h, w) -> uint8 ids at ``factor``× the resolution by bilinear upsampling then argmax,
    yielded top to bottom in bands of ``band · factor`` rows."""
    h = scores.shape[2]
    for y in range(0, h, band):
        lo, hi = max(0, y - 1), min(h, y + band + 1)  # one row of context keeps bilinear exact at band edges
        up = F.interpolate(scores[:, :, lo:hi], scale_factor=factor, mode="bilinear", align_corners=False)
        start = (y - lo) * factor
        rows = min(band, h - y) * factor
        yield (up[0, :, start:start + rows].argmax(0) + 1).numpy().astype(np.uint8)


def upsample_labels(scores: torch.Tensor, factor: int, band: int = 64) -> np.ndarray:
    """Class scores (1, K, h, w) -> uint8 ids (h·f, w·f), the bands of ``label_bands`` as one array."""
    return np.concatenate(list(label_bands(scores, factor, band)))


class BandedMask:
    """A slide-sized uint8 class-id mask held as zlib-compressed bands of rows, decompressed on access.

    Label maps are runs of equal ids and compress about twelvefold even when fragmented (the demo mask model's
    2048² px layouts), so a 16384² px mask costs some 20 MB instead of 256 MiB while the canvas is denoised.
    Indexing covers what generation needs — ``mask[y0:y1]`` and strided views such as ``mask[::s, ::s]`` — and
    builds only the rows asked for.
    """

    def __init__(self, bands: Iterable[np.ndarray], width: int):
        self._bands: list[bytes] = []
        self._starts = [0]
        for band in bands:
            band = np.ascontiguousarray(band, dtype=np.uint8)
            if band.ndim != 2 or band.shape[1] != width:
                raise ValueError(f"mask band of shape {band.shape} does not have width {width}")
            self._bands.append(zlib.compress(band.tobytes(), 1))
            self._starts.append(self._starts[-1] + band.shape[0])
        self.shape = (self._starts[-1], width)

    @classmethod
    def of(cls, mask: np.ndarray, band: int = 512) -> "BandedMask":
        return cls((mask[y:y + band] for y in range(0, mask.shape[0], band)), mask.shape[1])

    def _band(self, index: int) -> np.ndarray:
        rows = self._starts[index + 1] - self._starts[index]
        return np.frombuffer(zlib.decompress(self._bands[index]), np.uint8).reshape(rows, self.shape[1])

    def __getitem__(self, key) -> np.ndarray:
        rows, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        if isinstance(rows, (int, np.integer)):
            index = int(rows) + (self.shape[0] if rows < 0 else 0)
            return self[index:index + 1][(0, *rest)]
        start, stop, step = rows.indices(self.shape[0])
        if step < 1:
            raise IndexError("a banded mask is read top to bottom (positive row step only)")
        pieces = []
        for index in range(len(self._bands)):
            top, bottom = self._starts[index], self._starts[index + 1]
            if bottom <= start or top >= stop:
                continue
            first = start + -(-(max(top, start) - start) // step) * step  # first wanted row in this band
            if first < min(bottom, stop):
                pieces.append(self._band(index)[first - top:min(bottom, stop) - top:step][(slice(None), *rest)])
        if not pieces:
            return np.zeros((0, self.shape[1]), np.uint8)[(slice(None), *rest)]
        return np.concatenate(pieces)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[:]
        return whole.astype(dtype) if dtype is not None else whole

    def bands(self) -> Iterable[np.ndarray]:
        return (self._band(i) for i in range(len(self._bands)))

    def save(self, path: Path, key: str) -> None:
        """Write the compressed bands as they are (no recompression) with ``key``, what the mask was made from."""
        with open(path, "wb") as file:  # (given a name, numpy would append .npz to it)
            np.savez(file, compressed=np.frombuffer(b"".join(self._bands), np.uint8),
                     lengths=np.array([len(b) for b in self._bands], np.int64),
                     starts=np.array(self._starts, np.int64), width=np.int64(self.shape[1]), key=np.array(key))

    @classmethod
    def load(cls, path: Path, key: str) -> "BandedMask":
        """A mask written by ``save`` for the same ``key``; anything else is refused with one line."""
        try:
            with np.load(path, allow_pickle=False) as saved:
                saved_key, compressed = str(saved["key"]), saved["compressed"].tobytes()
                lengths, starts, width = saved["lengths"], saved["starts"], int(saved["width"])
            ends = np.cumsum(lengths)
            bands = [compressed[end - length:end] for end, length in zip(ends, lengths)]
            rows = np.diff(starts)
            if len(rows) != len(bands) or any(len(zlib.decompress(b)) != r * width for b, r in zip(bands, rows)):
                raise ValueError("bands do not match their rows")
        except Exception as error:  # noqa: BLE001 - zip, zlib and numpy each fail in their own way
            raise HistosynthError(f"{path}: damaged layout file ({type(error).__name__}); rerun without --resume "
                                  "to start afresh") from None
        if saved_key != key:
            raise HistosynthError(f"{path}: layout drawn with different settings or mask model; rerun without "
                                  "--resume or with the original settings")
        mask = cls((), width)
        mask._bands, mask._starts, mask.shape = bands, [int(v) for v in starts], (int(starts[-1]), width)
        return mask


def mask_digest(mask: np.ndarray | BandedMask) -> str:
    """SHA-256 of a mask's uint8 bytes in row order, the same for an array and its banded form."""
    digest = hashlib.sha256()
    if isinstance(mask, BandedMask):
        for band in mask.bands():
            digest.update(band.tobytes())
    else:
        digest.update(np.ascontiguousarray(mask, dtype=np.uint8).data)
    return digest.hexdigest()
