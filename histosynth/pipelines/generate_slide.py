"""Generate a synthetic slide of any size: mask (given or sampled) -> latent canvas -> streamed pyramidal TIFF.

Resumable: every ``checkpoint_every`` steps and after the last, and on SIGTERM/SIGINT, the latent canvas, the
scheduler state and the step index are written atomically; ``resume=True`` continues (from the last step's
checkpoint: straight to decoding) and writes byte-identical files.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import shutil
import signal
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from histosynth.checks import finite_number, one_of, require_finite, whole_number
from histosynth.conditions.embedding import EmbeddingGrid
from histosynth.errors import HistosynthError
from histosynth.eval.seams import control_offsets, grid_lines
from histosynth.io.atomic import atomic_files
from histosynth.io.paths import check_outputs
from histosynth.io.masks import overlay, write_geojson, write_mask_preview, write_png
from histosynth.io.tiff import write_label_tiff, write_pyramid
from histosynth.models.autoencoder import decode_latents
from histosynth.models.bundle import Bundle, load_bundle
from histosynth.models.denoiser import PRECISIONS, SCHEDULERS, at_precision
from histosynth.pipelines.conditions import build_conditions, check_global_conditions, style_from_files
from histosynth.pipelines.embedding_grids import embedding_conditions
from histosynth.pipelines.masks import BandedMask, fit_mask, label_condition, mask_digest, read_mask, sample_mask
from histosynth.sampling.canvas import (
    CanvasDenoiser,
    Layout,
    MultiDiffusion,
    RandomOffsetGrid,
    X0Space,
    canvas_noise,
    cost_per_pass,
    cut_lines,
    make_layout,
)
from histosynth.sampling.checkpoint import CanvasCheckpoint, keep_layout
from histosynth.sampling.decode import decode_rows
from histosynth.sampling.guidance import guided
from histosynth.sampling.diffinfinite import sample_diffinfinite
from histosynth.sampling.distributed import ProcessGroup, gather_chunks, process_group
from histosynth.sampling.patch import initial_noise, run_scheduler
from histosynth.sampling.shared_norms import SharedGroupNorms
from histosynth.sampling.spill import Spill
from histosynth.version import __version__


@dataclass
class GenerateSettings:
    """Everything that determines the output; recorded as provenance and checked on resume."""

    width: int
    height: int
    sampler: str = "random"
    stride: int | None = None
    guidance: float = 1.5
    steps: int = 25
    seed: int = 0
    batch: int = 8
    scheduler: str = "dpm++sde"
    format: str = "tiff"
    compression: str = "jpeg"
    mask_steps: int = 25
    mask_context: int = 0  # mask px of canvas around each mask-model patch
    mask_label: str | None = None  # slide label steering a label-conditioned mask model (DiffInfinite's subtype)
    mask_label_guidance: float = 2.0
    heal: bool = True  # random sampler: heal the last steps' cut lines from the previous step's x0 (no extra cost)
    heal_steps: int = 6  # how many of the last steps heal (design.md §2)
    heal_detail: float = 1.5  # σ (latent px) below which a healed step keeps its own x0's detail (0: none)
    blend_last: int = 0  # random sampler: blend a half-shifted second grid over the last N steps (0: never)
    extra_guidance: dict = field(default_factory=dict)  # group -> scale for global conditions, e.g. {"style": 3}
    precision: str = "float32"  # the UNets' arithmetic: float32, or bfloat16/float16 autocast (models/denoiser.py)
    context: int | None = None  # latent px around each image-model patch (None: the model's default_context)
    early_context: int | None = None  # ... in the early steps (None: the same as at every other step)
    early_context_steps: int | None = None  # how many steps are early (None: a quarter of them)
    shared_norms: int = 0  # windows whose group-norm statistics every window of a step takes (0: each its own)

    def __post_init__(self):
        """Every value in range before anything is loaded or sampled: a bad one is refused, never run."""
        for side in (self.width, self.height):
            whole_number("--size", side, 1, MAX_TIFF_SIDE)
        one_of("--sampler", self.sampler, SAMPLERS)
        if self.stride is not None:
            whole_number("--stride", self.stride)
        finite_number("--guidance", self.guidance)
        whole_number("--steps", self.steps)
        whole_number("--mask-steps", self.mask_steps)
        whole_number("--mask-context", self.mask_context, 0)
        finite_number("--mask-label-guidance", self.mask_label_guidance)
        whole_number("--seed", self.seed, 0)
        whole_number("--batch", self.batch)
        one_of("--scheduler", self.scheduler, SCHEDULERS)
        one_of("--format", self.format, ("tiff", "ome-tiff"))
        one_of("--compression", self.compression, COMPRESSIONS)
        one_of("--precision", self.precision, tuple(PRECISIONS))
        whole_number("--blend-last", self.blend_last, 0, self.steps)
        whole_number("--heal-steps", self.heal_steps, 1)
        finite_number("--heal-detail", self.heal_detail, 0)
        for option, value in (("--context", self.context), ("--early-context", self.early_context)):
            if value is not None:
                whole_number(option, value, 0)
                if value and self.sampler == "diffinfinite":
                    raise HistosynthError(f"{option} applies to the random, tiles and multidiffusion samplers; "
                                          "diffinfinite denoises its patches as they are")
        if self.early_context_steps is not None:
            whole_number("--early-context-steps", self.early_context_steps, 0, self.steps)
        whole_number("--shared-norms", self.shared_norms, 0)
        if self.shared_norms and self.sampler == "diffinfinite":
            raise HistosynthError("--shared-norms applies to the random, tiles and multidiffusion samplers; "
                                  "diffinfinite denoises its patches as they are")
        for group, scale in self.extra_guidance.items():
            finite_number(f"--{group}-guidance", scale)


SAMPLERS = ("random", "tiles", "multidiffusion", "diffinfinite")
COMPRESSIONS = ("jpeg", "deflate", "none")
MAX_TIFF_SIDE = 2**32 - 1  # TIFF stores image width and height as 32-bit unsigned integers
# Float32 canvases a denoising step holds at its peak — the latents, the solver's history, the merged model output
# and, in a healed step, the previous x0 (everything else works in slabs; README "Where a run peaks, measured"): the
# memory estimate that refuses a slide this machine cannot hold. From SPILL_FROM_ELEMENTS (a 64 MiB canvas, a
# 4096×8192 px slide at 4× with 8 channels) the history and the previous x0 wait on disk between their reads
# (sampling/spill.py), and a step holds two.
CANVASES_AT_PEAK = 4
CANVASES_AT_PEAK_SPILLED = 2
SPILL_FROM_ELEMENTS = 2**24


class Interrupted(HistosynthError):
    """Raised at a step boundary after SIGTERM/SIGINT, once the checkpoint is written."""


def parse_size(text: str) -> tuple[int, int]:
    """``WxH`` or ``N`` (square) -> (width, height)."""
    try:
        parts = [int(v) for v in text.lower().replace("×", "x").split("x")]
    except ValueError:
        raise HistosynthError(f"size '{text}' is not WxH (e.g. 2048x2048)") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) <= 0:
        raise HistosynthError(f"size '{text}' is not WxH with positive sides")
    if max(parts) > MAX_TIFF_SIDE:
        raise HistosynthError(f"size '{text}': a TIFF side is at most {MAX_TIFF_SIDE} px")
    return parts[0], parts[1]


def physical_memory_bytes(device: str = "cpu") -> int | None:
    """Memory of the device the canvas lives on (RAM, or the GPU's), or None where it cannot be told."""
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(settings: GenerateSettings, model: Bundle, mask_model: Bundle | None, mask_file: bool,
                 device: str = "cpu") -> None:
    """Refuse a slide whose canvases cannot fit in memory, before any of them is allocated."""
    s, f = settings, model.latent_factor
    channels = model.unet.config.out_channels
    elements = channels * -(-s.height // f) * -(-s.width // f)
    canvas = elements * 4  # one float32 latent canvas
    needed = (CANVASES_AT_PEAK_SPILLED if elements >= SPILL_FROM_ELEMENTS else CANVASES_AT_PEAK) * canvas
    if mask_model is not None:
        fm = mask_model.latent_factor
        needed = max(needed, CANVASES_AT_PEAK * mask_model.num_classes * -(-s.height // fm) * -(-s.width // fm) * 4)
    # A mask file is read whole (uint8 ids at image resolution) before it is banded; a drawn one is banded as drawn.
    pixels_mask = s.width * s.height if mask_file else 0
    available, ram = physical_memory_bytes(device), physical_memory_bytes("cpu")
    for need, have in ((needed, available), (pixels_mask, ram)):
        if have is not None and need > have:
            raise HistosynthError(f"--size {s.width}x{s.height}: needs about {need / 2**30:.1f} GiB of memory for "
                                  f"its canvases, this machine has {have / 2**30:.1f} GiB; choose a smaller size")


def _digest(value) -> str:
    """A stable fingerprint of a condition value for checkpoint matching."""
    tensor = value if isinstance(value, torch.Tensor) else getattr(value, "grid", None)
    if tensor is None:
        return type(value).__name__
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def decoder_at_precision(vae, precision: str, model_path) -> Callable[[torch.Tensor], torch.Tensor]:
    """Latents -> float32 images in [-1, 1], the decoder under autocast at ``precision`` (float32: as it is).

    The decoder's convolutions are most of a large slide's decoding (benchmarks/decode_profile.py): they run at the
    UNets' precision, about 2x faster in bfloat16 on CPUs that have it, within 2 grey levels of float32; and in
    channels-last memory format (the weights converted in place), 1.2x faster in float32, 1.3x more in bfloat16."""
    dtype = PRECISIONS[precision]
    vae.to(memory_format=torch.channels_last)

    def decode(latents: torch.Tensor) -> torch.Tensor:
        latents = latents.contiguous(memory_format=torch.channels_last)
        with torch.autocast(latents.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            image = decode_latents(vae, latents)
        return require_finite(image.float(), model_path, "the decoded pixels")
    return decode


class SlideGenerator:
    """One generation run of an image model (plus a mask source) at fixed settings."""

    def __init__(self, model: Bundle, settings: GenerateSettings, mask: np.ndarray | None = None,
                 mask_model: Bundle | None = None, device: str = "cpu", progress: bool = True,
                 style: torch.Tensor | None = None, embedding: torch.Tensor | EmbeddingGrid | None = None,
                 group: ProcessGroup = ProcessGroup()):
        """``style``: the style vector (1, D); ``embedding``: one condition vector (1, D) or an embedding grid; each
        guided at its scale in ``settings.extra_guidance``."""
        self.model, self.settings, self.device, self.group = model, settings, device, group
        self.progress = progress and group.is_main
        self.global_conditions = {name: value for name, value in (("embedding", embedding), ("style", style))
                                  if value is not None}
        check_global_conditions(model, self.global_conditions)
        s = settings
        factor = model.latent_factor
        if s.width % factor or s.height % factor:
            raise HistosynthError(f"size {s.width}×{s.height} px is not a multiple of the model's pixel stride "
                                  f"{factor} px (try {s.width // factor * factor}×{s.height // factor * factor})")
        self.latent_shape = (s.height // factor, s.width // factor)
        self.context = model.default_context if s.context is None else s.context
        self.early_context = self.context if s.early_context is None else s.early_context
        self.early_context_steps = round(s.steps / 4) if s.early_context_steps is None else s.early_context_steps
        for option, value in (("--context", self.context), ("--early-context", self.early_context)):
            if value % model.context_step or value > model.latent_patch:
                raise HistosynthError(f"{option} {value}: the model takes 0 to {model.latent_patch} latent px "
                                      f"in steps of {model.context_step} (its UNet halves the patch "
                                      f"{len(model.unet.config.block_out_channels) - 1} times)")
        self.mask = mask
        self.mask_model = mask_model
        self.mask_stats: dict = {}
        self.stats: dict = {}

    # ------------------------------------------------------------------------------------------------ masks
    def prepare_mask(self, checkpoint_dir: Path | None = None, checkpoint_every: int = 0) -> np.ndarray | None:
        """The mask given, or one drawn by the mask model (continued from checkpoints in ``checkpoint_dir``)."""
        s = self.settings
        if self.mask is None and self.mask_model is not None:
            # ``with``: a bar closed also on failure ends its line, so the error is a line of its own
            with tqdm(total=s.mask_steps, desc="mask", disable=not self.progress, dynamic_ncols=True) as bar:
                self.mask, self.mask_stats = sample_mask(
                    self.mask_model, s.width, s.height, s.sampler if s.sampler != "diffinfinite" else "random",
                    s.mask_steps, s.seed, s.batch, s.scheduler, s.stride, self.device,
                    progress=lambda done, n, _: bar.update(done - bar.n), group=self.group, label=s.mask_label,
                    label_guidance=s.mask_label_guidance, checkpoint_dir=checkpoint_dir,
                    checkpoint_every=checkpoint_every, checkpoint_key=self.layout_key(), banded=True,
                    precision=s.precision, context=s.mask_context)
                self.mask_stats["mask_context_px"] = s.mask_context
        return self.mask

    def layout_key(self) -> str:
        """What a mask-model layout is drawn from (the mask model and the settings sample_mask takes): a layout kept
        in a checkpoint is reused only for the same key."""
        s = self.settings
        record = {"mask_model": self.mask_model.model_hash if self.mask_model is not None else None,
                  "size": [s.width, s.height], "sampler": s.sampler, "steps": s.mask_steps, "seed": s.seed,
                  "batch": s.batch, "scheduler": s.scheduler, "stride": s.stride, "label": s.mask_label,
                  "label_guidance": s.mask_label_guidance, "precision": s.precision, "context": s.mask_context}
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()

    def settings_hash(self) -> str:
        record = asdict(self.settings) | {"model": self.model.model_hash,
                                          "mask": mask_digest(self.mask) if self.mask is not None else None,
                                          "global": {k: _digest(v) for k, v in self.global_conditions.items()}}
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()

    # ---------------------------------------------------------------------------------------------- latents
    def _global_inputs(self) -> dict:
        extra = self.settings.extra_guidance
        return {"style": self.global_conditions.get("style"), "style_guidance": extra.get("style", 1.0),
                "embedding": self.global_conditions.get("embedding"),
                "embedding_guidance": extra.get("embedding", 1.0)}

    def _conditioned_denoiser(self):
        """The model's denoiser with guidance over its condition groups, and the canvas-sized conditions."""
        conditions, scales = build_conditions(self.model, self.latent_shape, mask=self.mask,
                                              guidance=self.settings.guidance, device=self.device,
                                              **self._global_inputs())
        denoiser = at_precision(self.model.denoiser().to(self.device), self.settings.precision, self.device)
        return guided(denoiser, scales), conditions

    def _record(self, evals: int, per_pass: float, passes: int, lines: tuple[list, list], began: float) -> None:
        s, f = self.settings, self.model.latent_factor
        with_context = s.sampler != "diffinfinite"  # its patches are denoised as they are
        self.stats = {
            "sampler": s.sampler, "size": [s.width, s.height], "steps": s.steps,
            "context_latent_px": self.context if with_context else 0,
            "early_context_latent_px": self.early_context if with_context else 0,
            "early_context_steps": self.early_context_steps if with_context else 0,
            "shared_norm_windows": s.shared_norms if with_context else 0,
            "unet_evals": evals, "cost_per_pass": round(per_pass, 4), "guidance_passes": passes,
            "unet_evals_per_output_latent_pixel_per_step": round(per_pass * passes, 4),
            "patch_px": self.model.latent_patch * f, "seam_control_px": self.model.latent_patch * f // 2,
            "seam_lines": {"y": [y * f for y in lines[0]], "x": [x * f for x in lines[1]]},
            "denoise_seconds": round(time.perf_counter() - began, 2),
        } | self.mask_stats

    def _record_control_lines(self, layout: RandomOffsetGrid, heal_from: int | None) -> None:
        """Control lines for the seam score, at random offsets at least P/16 (and 2 latent px; less only where a small
        patch leaves no such offset) from the cut lines of every recent step: the healed steps and the two before them, whose seams could survive into the image.
        Half a patch from the last lines would be a previous step's lines (the blended grid's, or the healed
        step's predecessor's, by construction), and a seam there would lower the score it should raise."""
        s, f, p = self.settings, self.model.latent_factor, self.model.latent_patch
        working = layout.working_shape(*self.latent_shape)
        first = max(0, (heal_from if heal_from is not None else s.steps - 1) - 2)
        recent = []
        for step in range(first, s.steps):
            offset = [v * f for v in layout.offset(step, working, self.latent_shape)]
            recent.append(offset)
            if layout.blended(step):  # its second grid, half a patch further
                recent.append([v + p // 2 * f for v in offset])
        distance = max(p * f // 16, 2 * f)
        while True:  # small patches with many recent grids may leave no offset that far: move closer, never onto
            offsets = [control_offsets(p * f, [o[axis] for o in recent], distance, count=4, seed=s.seed)
                       for axis in (0, 1)]
            if (offsets[0] and offsets[1]) or distance == 1:
                break
            distance = max(1, distance // 2)
        lines = [sorted(line for o in offsets[axis] for line in grid_lines(size, p * f, o))
                 for axis, size in enumerate((s.height, s.width))]
        self.stats["recent_cut_offsets_px"] = {"steps": list(range(first, s.steps)), "y_x": recent}
        self.stats["seam_control_min_distance_px"] = distance
        if lines[0] or lines[1]:
            self.stats["seam_control_lines"] = {"y": lines[0], "x": lines[1]}

    def layout(self) -> Layout:
        """Where the image model's patches lie at each step (the canvas samplers')."""
        s = self.settings
        return make_layout(s.sampler, self.model.latent_patch, seed=s.seed, stride=s.stride,
                           blend_from=s.steps - s.blend_last if s.blend_last > 0 else None,
                           heal_from=max(1, s.steps - s.heal_steps) if s.heal and s.steps > 1 else None,
                           lattice=self.model.lattice)

    def sample_latents(self, checkpoint_dir: Path | None = None, checkpoint_every: int = 0,
                       resume: bool = False, spill_dir: Path | None = None) -> torch.Tensor:
        """Latents of the output canvas (1, C, H/f, W/f) from the chosen sampler. A canvas of
        ``SPILL_FROM_ELEMENTS`` or more keeps its solver history and previous x0 in a temporary folder inside
        ``spill_dir`` (the output's folder: a system temporary folder may live in memory)."""
        if self.settings.sampler == "diffinfinite":
            if resume or checkpoint_every or self.group.world > 1:
                raise HistosynthError("the diffinfinite sampler is asynchronous: it cannot checkpoint, resume or "
                                      "share a canvas among processes")
            return self._sample_asynchronous()
        s, model = self.settings, self.model
        layout = self.layout()
        denoiser, conditions = self._conditioned_denoiser()
        scheduler = model.sampling_scheduler(s.scheduler)
        canvas = CanvasDenoiser(denoiser, layout, self.latent_shape, conditions, micro_batch=s.batch,
                                rank=self.group.rank, world=self.group.world, gather=gather_chunks,
                                x0_space=X0Space.of(scheduler) if s.heal else None, total_steps=s.steps,
                                context=self.context, early_context=self.early_context,
                                early_steps=self.early_context_steps, heal_detail=s.heal_detail,
                                shared_norms=SharedGroupNorms(model.unet, s.shared_norms) if s.shared_norms else None)
        del conditions  # the canvas keeps its own (compact) copy
        channels = model.unet.config.out_channels
        scheduler.set_timesteps(s.steps, device=self.device)
        generator = torch.Generator().manual_seed(s.seed)
        start = 0
        drawn = self.mask if self.mask_model is not None else None  # a given mask needs no keeping
        checkpoint = CanvasCheckpoint(checkpoint_dir, self.settings_hash(), s.steps, canvas, scheduler, generator,
                                      self.device, layout=drawn, layout_key=self.layout_key()
                                      ) if checkpoint_dir is not None else None
        if resume and checkpoint is None:
            raise HistosynthError("--resume needs the checkpoint folder beside --out")
        spill_folder = self._spill_folder(spill_dir, channels * math.prod(canvas.working_shape))
        canvas.spill = Spill(Path(spill_folder.name)) if spill_folder is not None else None
        try:
            if resume:
                latents, start = checkpoint.restore(channels)
            else:
                latents = canvas_noise(layout, channels, self.latent_shape, generator, self.device)
        except BaseException:
            if spill_folder is not None:
                spill_folder.cleanup()
            raise
        stop_requested: list[int] = []
        previous = {sig: signal.signal(sig, lambda number, _: stop_requested.append(number))
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        bar = tqdm(total=s.steps, initial=start, desc="denoising", disable=not self.progress, dynamic_ncols=True)

        def on_step(done: int, total: int, current: torch.Tensor) -> None:
            bar.update(1)
            # The finished canvas is kept too, until the slide is written: a run stopped while decoding (hours at a
            # gigapixel) resumes at the decoding, not a step before it.
            due = checkpoint_every and (done % checkpoint_every == 0 or done == total)
            if checkpoint is not None and (due or stop_requested) and self.group.is_main:
                checkpoint.save(current, done)
            if stop_requested:
                name = signal.Signals(stop_requested[0]).name
                if checkpoint_dir is None:
                    raise Interrupted(f"generate: stopped by {name} at step {done}/{total}; nothing was written")
                raise Interrupted(f"{checkpoint_dir}: stopped by {name} at step {done}/{total}; the canvas is "
                                  "checkpointed there: continue with --resume")

        began = time.perf_counter()
        try:
            # Handed over, not kept: this frame holding the starting canvas would cost a canvas of memory all run.
            start_latents, latents = [latents], None
            latents = run_scheduler(canvas, start_latents.pop(), scheduler, generator=generator, start_step=start,
                                    callback=on_step, spill=canvas.spill)
        finally:
            bar.close()
            scheduler.model_outputs, canvas.previous_x0 = [], None  # spent (and their files closed)
            if spill_folder is not None:
                spill_folder.cleanup()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        last = layout.windows(s.steps - 1, layout.working_shape(*self.latent_shape), self.latent_shape)
        self._record(canvas.stats.unet_evals, cost_per_pass(layout, self.latent_shape, s.steps),
                     getattr(denoiser, "passes", 1), cut_lines(layout, last, self.latent_shape), began)
        if isinstance(layout, RandomOffsetGrid):
            self._record_control_lines(layout, canvas.heal_from)
        if isinstance(layout, MultiDiffusion):  # window borders every stride: controls half a stride away
            self.stats["seam_control_px"] = max(1, layout.stride * model.latent_factor // 2)
        self.stats["processes"] = self.group.world
        self.stats["unet_evals_this_process"] = canvas.stats.local_evals
        return require_finite(latents[:, :, :self.latent_shape[0], :self.latent_shape[1]], self.model.path,
                              "the denoised latents")

    def _spill_folder(self, spill_dir: Path | None, elements: int) -> tempfile.TemporaryDirectory | None:
        """A temporary folder in ``spill_dir`` for a canvas of ``elements`` that spills, after checking the disk."""
        if spill_dir is None or elements < SPILL_FROM_ELEMENTS:
            return None
        # The history and the previous x0, and for a moment the history's next entry beside its last.
        needed, free = 3 * elements * 4, shutil.disk_usage(spill_dir).free
        if needed > free:
            raise HistosynthError(f"{spill_dir}: a {self.settings.width}x{self.settings.height} px canvas keeps "
                                  f"about {needed / 2**30:.1f} GiB on disk there while it is denoised, "
                                  f"{free / 2**30:.1f} GiB are free; free some space or choose another --out")
        return tempfile.TemporaryDirectory(dir=spill_dir, prefix=".histosynth-spill-")

    def _sample_asynchronous(self) -> torch.Tensor:
        """DiffInfinite's original scheme (DDIM updates, pixels at their own steps)."""
        s, model = self.settings, self.model
        denoiser, conditions = self._conditioned_denoiser()
        generator = torch.Generator().manual_seed(s.seed)
        noise = initial_noise((1, model.unet.config.out_channels, *self.latent_shape), generator, self.device)
        began = time.perf_counter()
        with tqdm(total=s.steps, desc="denoising (asynchronous)", disable=not self.progress,
                  dynamic_ncols=True) as bar:
            latents, stats = sample_diffinfinite(
                denoiser, noise, model.sampling_scheduler("ddim"), model.latent_patch, s.steps, s.seed, conditions,
                s.batch, model.config.get("prediction_type", "epsilon"),
                callback=lambda done, n, _: bar.update(done - bar.n))
        passes = getattr(denoiser, "passes", 1)
        per_pass = stats.unet_evals / passes * model.latent_patch ** 2 / (s.steps * math.prod(self.latent_shape))
        p = model.latent_patch
        lines = (sorted({v for y, _ in stats.last_windows for v in (y, y + p) if 0 < v < self.latent_shape[0]}),
                 sorted({v for _, x in stats.last_windows for v in (x, x + p) if 0 < v < self.latent_shape[1]}))
        self._record(stats.unet_evals, per_pass, passes, lines, began)
        return require_finite(latents, self.model.path, "the denoised latents")

    # ----------------------------------------------------------------------------------------------- output
    def provenance(self) -> dict:
        return {"software": "histosynth", "version": __version__, "synthetic": True,
                "model_hash": self.model.model_hash, "seed": self.settings.seed,
                "settings": asdict(self.settings) | {  # the defaults resolved
                    "context": self.context, "early_context": self.early_context,
                    "early_context_steps": self.early_context_steps}}

    def write(self, latents: torch.Tensor, out: Path) -> None:
        s, model = self.settings, self.model
        vae = model.autoencoder.to(self.device)
        rows_total = -(-self.latent_shape[0] // 64)
        decode = decoder_at_precision(vae, s.precision, model.path)
        with tqdm(total=rows_total, desc="decoding", disable=not self.progress, dynamic_ncols=True) as bar:
            rows = decode_rows(decode, latents, model.latent_factor, progress=lambda r: bar.update(1))
            write_pyramid(out, s.width, s.height, rows, mpp=model.config["mpp"], format=s.format,
                          compression=s.compression, description=self.provenance())


def output_paths(out: Path) -> dict[str, Path]:
    """Files written beside a generated slide ``NAME.tiff``."""
    stem = out.name[: -len("".join(out.suffixes))] if out.suffixes else out.name
    base = out.parent / stem
    return {"slide": out, "mask_tiff": Path(f"{base}.mask.tiff"), "geojson": Path(f"{base}.mask.geojson"),
            "mask_png": Path(f"{base}.mask.png"), "thumbnail": Path(f"{base}.thumbnail.png"),
            "checkpoint": Path(f"{base}.checkpoint")}


OUTPUT_LABELS = {"slide": "--out", "mask_tiff": "the mask TIFF", "geojson": "the mask GeoJSON",
                 "mask_png": "the mask preview", "thumbnail": "the thumbnail", "checkpoint": "the checkpoint folder"}


def check_generate_paths(out: Path, stats_path: str | os.PathLike | None, inputs: dict) -> None:
    """Refuse outputs of ``generate`` that would overwrite an input or one another (``inputs``: label -> path)."""
    paths = output_paths(Path(out))
    outputs = {OUTPUT_LABELS[key]: path for key, path in paths.items()} | {"--stats": stats_path}
    check_outputs(outputs, inputs, folders=["the checkpoint folder"], sealed=["--model", "--mask-model"])


def generate_slide(model_path: str, out: str, settings: GenerateSettings, mask_path: str | None = None,
                   mask_model_path: str | None = None, checkpoint_every: int = 0, resume: bool = False,
                   stats_path: str | None = None, device: str | None = None, progress: bool = True,
                   style: Sequence[str] | None = None, style_guidance: float = 2.0, reference: str | None = None,
                   prior: str | None = None, text: str | None = None, class_name: str | None = None,
                   embedding_guidance: float = 2.0, prior_guidance: float = 2.0) -> dict:
    """Generate a slide and everything beside it; returns the stats (also written to ``stats_path``).

    ``style``: style images, folders or slides; ``reference`` (an image or slide) or ``prior`` with ``text`` or
    ``class_name``: the SSL-embedding grid the slide follows. All or nothing: the slide, its mask files, thumbnail and
    stats appear together once everything is written.
    """
    began = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(out)
    paths = output_paths(out)
    check_generate_paths(out, stats_path, {"--model": model_path, "--mask": mask_path,
                                           "--mask-model": mask_model_path})
    whole_number("--checkpoint-every", checkpoint_every, 0)
    model = load_bundle(model_path, kind="image")
    mask_model = load_bundle(mask_model_path, kind="mask") if mask_model_path else None
    if mask_model is not None and mask_model.num_classes != model.num_classes:
        raise HistosynthError(f"{mask_model_path}: mask model has {mask_model.num_classes} classes, "
                              f"the image model {model.num_classes}")
    if settings.mask_label is not None:
        if mask_model is None:
            raise HistosynthError("--mask-label steers the mask model: give --mask-model")
        label_condition(mask_model, settings.mask_label)  # an unknown label is refused before any sampling
    check_memory(settings, model, mask_model, mask_path is not None, device)
    embedding = embedding_conditions(model, settings.width, settings.height, reference, prior, text, class_name,
                                     seed=settings.seed, steps=settings.steps, prior_guidance=prior_guidance,
                                     device=device).get("embedding")
    if embedding is not None:
        settings.extra_guidance = dict(settings.extra_guidance) | {"embedding": float(embedding_guidance)}
    style_vector = style_from_files(model, style, settings.seed)
    if style_vector is not None:
        settings.extra_guidance = dict(settings.extra_guidance) | {"style": float(style_guidance)}
    mask = None
    if mask_path is not None:
        mask = fit_mask(read_mask(mask_path, model.classes), settings.width, settings.height, mask_path)
    group = process_group()
    if group.world > 1 and device == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
    generator = SlideGenerator(model, settings, mask, mask_model, device, progress, style_vector, embedding, group)
    phases = {"load": time.perf_counter() - began}  # where the time goes, beside the UNet evaluations
    mark = time.perf_counter()
    # A checkpoint folder holds the image canvas's steps, the layout the mask model drew for them, and while that
    # layout is being drawn, the mask canvas's own steps (mask/): a gigapixel layout alone takes hours.
    checkpoints = paths["checkpoint"]
    kept_layout, mask_steps = checkpoints / CanvasCheckpoint.LAYOUT, checkpoints / "mask"
    image_steps_kept = any(checkpoints.glob("step-*"))
    if resume and not (image_steps_kept or kept_layout.exists() or any(mask_steps.glob("step-*"))):
        raise HistosynthError(f"{checkpoints}: --resume given but no checkpoint there; run without --resume to start "
                              "afresh")
    if not resume and checkpoints.is_dir() and any(checkpoints.iterdir()):
        # Refused, not cleared: at a gigapixel it holds hours of work, and a fresh run's steps would be mixed with
        # the earlier run's (the newest step wins on --resume, and that one's settings would be refused).
        raise HistosynthError(f"{checkpoints}: holds the checkpoints of an earlier run; continue it with --resume, "
                              "or delete the folder to start afresh")
    if resume and mask_model is not None and kept_layout.exists():  # drawn by the run this one continues
        generator.mask = BandedMask.load(kept_layout, generator.layout_key())
    mask = generator.prepare_mask(mask_steps, checkpoint_every)
    phases["mask"] = time.perf_counter() - mark
    if mask is not None and not isinstance(mask, BandedMask):  # a given mask, compressed as a drawn one is
        generator.mask = mask = BandedMask.of(mask)
    if mask_model is not None and checkpoint_every and group.is_main:
        keep_layout(checkpoints, mask, generator.layout_key())
    if group.is_main:
        shutil.rmtree(mask_steps, ignore_errors=True)  # the layout is drawn: its steps are spent
    mark = time.perf_counter()
    latents = generator.sample_latents(checkpoints, checkpoint_every, resume and image_steps_kept,
                                       spill_dir=paths["slide"].parent)
    phases["denoise"] = time.perf_counter() - mark
    if not group.is_main:  # every rank holds the same canvas; the main process writes it
        group.barrier()
        return generator.stats | {"rank": group.rank, "seconds": round(time.perf_counter() - began, 2),
                                  "peak_rss_mb": round(peak_rss_mb(), 1)}
    files = {key: path for key, path in paths.items() if key != "checkpoint"}
    if stats_path:
        files["stats"] = Path(stats_path)
    with atomic_files(files) as tmp:
        mark = time.perf_counter()
        generator.write(latents, tmp["slide"])
        phases["decode_and_write"] = time.perf_counter() - mark
        mark = time.perf_counter()
        if mask is not None:
            classes = [c for c in model.classes if c["id"] != 0]
            band = 1024
            write_label_tiff(tmp["mask_tiff"], settings.width, settings.height,
                             (mask[y:y + band] for y in range(0, settings.height, band)),
                             mpp=model.config["mpp"], description=generator.provenance(), classes=model.classes)
            step = max(1, max(settings.width, settings.height) // 1024)
            small = mask[::step, ::step]
            write_mask_preview(tmp["mask_png"], small, model.classes)
            write_geojson(tmp["geojson"], small, classes, scale=step)
        _write_thumbnail(tmp["slide"], tmp["thumbnail"], mask, model.classes)
        phases["mask_files_and_thumbnail"] = time.perf_counter() - mark
        written = {key: str(path) for key, path in paths.items() if key in tmp and tmp[key].exists()}
        stats = generator.stats | {"seconds": round(time.perf_counter() - began, 2),
                                   "phase_seconds": {k: round(v, 2) for k, v in phases.items()},
                                   "peak_rss_mb": round(peak_rss_mb(), 1), "files": written}
        if stats_path:
            tmp["stats"].write_text(json.dumps(stats, indent=2))
    shutil.rmtree(paths["checkpoint"], ignore_errors=True)
    group.barrier()
    return stats


def _write_thumbnail(slide: Path, path: Path, mask: np.ndarray | None, classes: list[dict]) -> None:
    """Slide thumbnail, with the mask overlay beside it when there is a mask."""
    import tiffslide

    with tiffslide.TiffSlide(str(slide)) as handle:
        level = handle.level_count - 1
        rgb = np.asarray(handle.read_region((0, 0), level, handle.level_dimensions[level]).convert("RGB"))
    if mask is not None:
        step_y = max(1, mask.shape[0] // rgb.shape[0])
        small = mask[::step_y, ::step_y][: rgb.shape[0], : rgb.shape[1]]
        if small.shape == rgb.shape[:2]:
            rgb = np.concatenate([rgb, overlay(rgb, small, classes)], axis=1)
    write_png(path, rgb)
