"""Generate a synthetic slide of any size: mask (given or sampled) -> latent canvas -> streamed pyramidal TIFF.

Resumable: every ``checkpoint_every`` steps, and on SIGTERM/SIGINT, the latent canvas, the scheduler state and the
step index are written atomically; ``resume=True`` continues and writes byte-identical files.
"""
from __future__ import annotations

import hashlib
import json
import math
import resource
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import histosynth
from histosynth.conditions.mask import encode_large_mask
from histosynth.errors import HistosynthError
from histosynth.io.atomic import atomic_dir, atomic_path
from histosynth.io.masks import overlay, write_geojson, write_mask_preview, write_png
from histosynth.io.state import load_state, save_state
from histosynth.io.tiff import write_label_tiff, write_pyramid
from histosynth.models.autoencoder import decode_latents
from histosynth.models.bundle import Bundle, load_bundle
from histosynth.pipelines.masks import BandedMask, fit_mask, mask_digest, read_mask, sample_mask
from histosynth.sampling.canvas import (
    CanvasDenoiser,
    MultiDiffusion,
    X0Space,
    canvas_noise,
    cost_per_pass,
    cut_lines,
    make_layout,
)
from histosynth.sampling.decode import decode_rows
from histosynth.sampling.guidance import guided
from histosynth.sampling.diffinfinite import sample_diffinfinite
from histosynth.sampling.distributed import ProcessGroup, gather_chunks, process_group
from histosynth.sampling.patch import initial_noise, run_scheduler


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
    heal: bool = True  # random sampler: heal the last step's cut lines from the previous step's x0 (no extra cost)
    blend_last: int = 0  # random sampler: blend a half-shifted second grid over the last N steps (0: never)
    extra_guidance: dict = field(default_factory=dict)  # group -> scale for global conditions, e.g. {"style": 3}


class Interrupted(Exception):
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
    return parts[0], parts[1]


def _digest(value) -> str:
    """A stable fingerprint of a condition value for checkpoint matching."""
    tensor = value if isinstance(value, torch.Tensor) else getattr(value, "grid", None)
    if tensor is None:
        return type(value).__name__
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _scheduler_state(scheduler) -> dict:
    """The mutable state of a diffusers scheduler (step index, solver history, ...)."""
    state = {}
    for key, value in vars(scheduler).items():
        if key in ("config", "_internal_dict"):
            continue
        if isinstance(value, (torch.Tensor, int, float, bool, str, type(None))) or (
                isinstance(value, list) and all(isinstance(v, (torch.Tensor, type(None), int, float)) for v in value)):
            state[key] = value
    return state


class SlideGenerator:
    """One generation run of an image model (plus a mask source) at fixed settings."""

    def __init__(self, model: Bundle, settings: GenerateSettings, mask: np.ndarray | None = None,
                 mask_model: Bundle | None = None, device: str = "cpu", progress: bool = True,
                 global_conditions: dict | None = None, group: ProcessGroup = ProcessGroup()):
        """``global_conditions``: name -> (1, D) vector shared by every patch, or an object whose
        ``crop(rows, cols)`` gives each patch its own vector (an embedding grid)."""
        self.model, self.settings, self.device, self.group = model, settings, device, group
        self.progress = progress and group.is_main
        self.global_conditions = dict(global_conditions or {})
        expected = set(model.config.get("conditioning", {}).get("global", {}))
        if set(self.global_conditions) - expected:
            extra = sorted(set(self.global_conditions) - expected)[0]
            raise HistosynthError(f"the model takes no '{extra}' condition (it takes: {', '.join(expected) or 'none'})")
        s = settings
        factor = model.latent_factor
        if s.width % factor or s.height % factor:
            raise HistosynthError(f"size {s.width}×{s.height} px is not a multiple of the model's pixel stride "
                                  f"{factor} px (try {s.width // factor * factor}×{s.height // factor * factor})")
        self.latent_shape = (s.height // factor, s.width // factor)
        self.mask = mask
        self.mask_model = mask_model
        self.mask_stats: dict = {}
        self.stats: dict = {}

    # ------------------------------------------------------------------------------------------------ masks
    def prepare_mask(self) -> np.ndarray | None:
        s = self.settings
        if self.mask is None and self.mask_model is not None:
            bar = tqdm(total=s.mask_steps, desc="mask", disable=not self.progress, dynamic_ncols=True)
            self.mask, self.mask_stats = sample_mask(
                self.mask_model, s.width, s.height, s.sampler if s.sampler != "diffinfinite" else "random",
                s.mask_steps, s.seed, s.batch, s.scheduler, s.stride, self.device,
                progress=lambda i, n, _: bar.update(1), group=self.group)
            bar.close()
        return self.mask

    def settings_hash(self) -> str:
        record = asdict(self.settings) | {"model": self.model.model_hash,
                                          "mask": mask_digest(self.mask) if self.mask is not None else None,
                                          "global": {k: _digest(v) for k, v in self.global_conditions.items()}}
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()

    # ---------------------------------------------------------------------------------------------- latents
    def _conditioned_denoiser(self):
        """The model's denoiser with guidance over its condition groups, and the canvas-sized conditions."""
        s, model = self.settings, self.model
        conditions = {}
        scales = dict(s.extra_guidance)
        denoiser = model.denoiser().to(self.device)
        if model.num_classes and model.config.get("conditioning", {}).get("mask"):
            mask_condition = (encode_large_mask(self.mask, model.num_classes, model.latent_factor)
                              if self.mask is not None else
                              torch.zeros(1, model.num_classes, *self.latent_shape))
            conditions["mask"] = mask_condition.to(self.device)
            scales["mask"] = s.guidance
        for name, value in self.global_conditions.items():
            conditions[name] = value.to(self.device) if isinstance(value, torch.Tensor) else value
        return guided(denoiser, scales), conditions

    def _record(self, evals: int, per_pass: float, passes: int, lines: tuple[list, list], began: float) -> None:
        s, f = self.settings, self.model.latent_factor
        self.stats = {
            "sampler": s.sampler, "size": [s.width, s.height], "steps": s.steps,
            "unet_evals": evals, "cost_per_pass": round(per_pass, 4), "guidance_passes": passes,
            "unet_evals_per_output_latent_pixel_per_step": round(per_pass * passes, 4),
            "patch_px": self.model.latent_patch * f, "seam_control_px": self.model.latent_patch * f // 2,
            "seam_lines": {"y": [y * f for y in lines[0]], "x": [x * f for x in lines[1]]},
            "denoise_seconds": round(time.perf_counter() - began, 2),
        } | self.mask_stats

    def sample_latents(self, checkpoint_dir: Path | None = None, checkpoint_every: int = 0,
                       resume: bool = False) -> torch.Tensor:
        """Latents of the output canvas (1, C, H/f, W/f) from the chosen sampler."""
        if self.settings.sampler == "diffinfinite":
            if resume or checkpoint_every or self.group.world > 1:
                raise HistosynthError("the diffinfinite sampler is asynchronous: it cannot checkpoint, resume or "
                                      "share a canvas among processes")
            return self._sample_asynchronous()
        s, model = self.settings, self.model
        layout = make_layout(s.sampler, model.latent_patch, seed=s.seed, stride=s.stride,
                             blend_from=s.steps - s.blend_last if s.blend_last > 0 else None,
                             heal_from=s.steps - 1 if s.heal and s.steps > 1 else None)
        denoiser, conditions = self._conditioned_denoiser()
        scheduler = model.sampling_scheduler(s.scheduler)
        canvas = CanvasDenoiser(denoiser, layout, self.latent_shape, conditions, micro_batch=s.batch,
                                rank=self.group.rank, world=self.group.world, gather=gather_chunks,
                                x0_space=X0Space.of(scheduler) if s.heal else None, total_steps=s.steps)
        del conditions  # the canvas keeps its own (compact) copy
        scheduler.set_timesteps(s.steps, device=self.device)
        generator = torch.Generator().manual_seed(s.seed)
        start = 0
        expected = self.settings_hash()
        if resume:
            latents, start, canvas.stats.unet_evals, canvas.previous_x0 = self._restore(checkpoint_dir, scheduler,
                                                                                          generator, expected)
        else:
            latents = canvas_noise(layout, model.unet.config.out_channels, self.latent_shape, generator, self.device)
        stop_requested = []
        previous = {sig: signal.signal(sig, lambda *_: stop_requested.append(True))
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        bar = tqdm(total=s.steps, initial=start, desc="denoising", disable=not self.progress, dynamic_ncols=True)

        def on_step(done: int, total: int, current: torch.Tensor) -> None:
            bar.update(1)
            due = checkpoint_every and done % checkpoint_every == 0 and done < total
            if checkpoint_dir is not None and (due or stop_requested) and self.group.is_main:
                self._save(checkpoint_dir, current, done, scheduler, generator, expected, canvas.stats.unet_evals,
                           canvas.previous_x0)
            if stop_requested:
                raise Interrupted(f"stopped at step {done}/{total}; continue with --resume")

        began = time.perf_counter()
        try:
            # Handed over, not kept: this frame holding the starting canvas would cost a canvas of memory all run.
            start_latents, latents = [latents], None
            latents = run_scheduler(canvas, start_latents.pop(), scheduler, generator=generator, start_step=start,
                                    callback=on_step)
        finally:
            bar.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        last = layout.windows(s.steps - 1, layout.working_shape(*self.latent_shape), self.latent_shape)
        self._record(canvas.stats.unet_evals, cost_per_pass(layout, self.latent_shape, s.steps),
                     getattr(denoiser, "passes", 1), cut_lines(layout, last, self.latent_shape), began)
        if (getattr(layout, "blended", lambda _: False)(s.steps - 1) or canvas.heal_from is not None) and \
                tuple(layout.working_shape(*self.latent_shape)) != tuple(self.latent_shape):
            # Two half-shifted grids cut the last step (blended), or the last two steps (healed): control lines a
            # quarter patch away touch neither.
            self.stats["seam_control_px"] = self.stats["patch_px"] // 4
        if isinstance(layout, MultiDiffusion):  # window borders every stride: controls half a stride away
            self.stats["seam_control_px"] = max(1, layout.stride * model.latent_factor // 2)
        self.stats["processes"] = self.group.world
        self.stats["unet_evals_this_process"] = canvas.stats.local_evals
        return latents[:, :, :self.latent_shape[0], :self.latent_shape[1]]

    def _sample_asynchronous(self) -> torch.Tensor:
        """DiffInfinite's original scheme (DDIM updates, pixels at their own steps)."""
        s, model = self.settings, self.model
        denoiser, conditions = self._conditioned_denoiser()
        generator = torch.Generator().manual_seed(s.seed)
        noise = initial_noise((1, model.unet.config.out_channels, *self.latent_shape), generator, self.device)
        bar = tqdm(total=s.steps, desc="denoising (asynchronous)", disable=not self.progress, dynamic_ncols=True)
        began = time.perf_counter()
        latents, stats = sample_diffinfinite(
            denoiser, noise, model.sampling_scheduler("ddim"), model.latent_patch, s.steps, s.seed, conditions,
            s.batch, model.config.get("prediction_type", "epsilon"), callback=lambda done, n, _: bar.update(done - bar.n))
        bar.close()
        passes = getattr(denoiser, "passes", 1)
        per_pass = stats.unet_evals / passes * model.latent_patch ** 2 / (s.steps * math.prod(self.latent_shape))
        p = model.latent_patch
        lines = (sorted({v for y, _ in stats.last_windows for v in (y, y + p) if 0 < v < self.latent_shape[0]}),
                 sorted({v for _, x in stats.last_windows for v in (x, x + p) if 0 < v < self.latent_shape[1]}))
        self._record(stats.unet_evals, per_pass, passes, lines, began)
        return latents

    def _save(self, folder: Path, latents, step, scheduler, generator, expected, evals, previous_x0=None) -> None:
        """Write ``folder/step-N`` atomically, then drop older ones: a kill at any moment leaves one complete."""
        with atomic_dir(folder / f"step-{step:06d}", overwrite=True) as tmp:
            state = {"latents": latents, "scheduler": _scheduler_state(scheduler), "generator": generator.get_state()}
            if previous_x0 is not None:  # a healed step comes next: it needs the last x0 estimate
                state["previous_x0"] = previous_x0
            save_state(state, tmp, "state")
            (tmp / "progress.json").write_text(json.dumps({"step": step, "settings_hash": expected,
                                                            "unet_evals": evals}))
        for old in sorted(folder.glob("step-*"))[:-1]:
            shutil.rmtree(old, ignore_errors=True)

    def _restore(self, folder: Path | None, scheduler, generator,
                 expected) -> tuple[torch.Tensor, int, int, torch.Tensor | None]:
        found = sorted(folder.glob("step-*")) if folder is not None and folder.exists() else []
        if not found:
            raise HistosynthError(f"{folder}: --resume given but no checkpoint there")
        latest = found[-1]
        progress = json.loads((latest / "progress.json").read_text())
        if progress["settings_hash"] != expected:
            raise HistosynthError(f"{folder}: checkpoint was written with different settings, model or mask; "
                                  "rerun without --resume or with the original settings")
        state = load_state(latest, "state")
        for key, value in state["scheduler"].items():
            if isinstance(value, list):
                value = [v.to(self.device) if isinstance(v, torch.Tensor) else v for v in value]
            setattr(scheduler, key, value.to(self.device) if isinstance(value, torch.Tensor) else value)
        generator.set_state(state["generator"])
        previous_x0 = state.get("previous_x0")
        return (state["latents"].to(self.device), int(progress["step"]), int(progress["unet_evals"]),
                previous_x0.to(self.device) if previous_x0 is not None else None)

    # ----------------------------------------------------------------------------------------------- output
    def provenance(self) -> dict:
        return {"software": "histosynth", "version": histosynth.__version__, "synthetic": True,
                "model_hash": self.model.model_hash, "seed": self.settings.seed, "settings": asdict(self.settings)}

    def write(self, latents: torch.Tensor, out: Path) -> None:
        s, model = self.settings, self.model
        vae = model.autoencoder.to(self.device)
        rows_total = -(-self.latent_shape[0] // 64)
        bar = tqdm(total=rows_total, desc="decoding", disable=not self.progress, dynamic_ncols=True)
        rows = decode_rows(lambda z: decode_latents(vae, z), latents, model.latent_factor,
                           progress=lambda r: bar.update(1))
        write_pyramid(out, s.width, s.height, rows, mpp=model.config["mpp"], format=s.format,
                      compression=s.compression, description=self.provenance())
        bar.close()


def output_paths(out: Path) -> dict[str, Path]:
    """Files written beside a generated slide ``NAME.tiff``."""
    stem = out.name[: -len("".join(out.suffixes))] if out.suffixes else out.name
    base = out.parent / stem
    return {"slide": out, "mask_tiff": Path(f"{base}.mask.tiff"), "geojson": Path(f"{base}.mask.geojson"),
            "mask_png": Path(f"{base}.mask.png"), "thumbnail": Path(f"{base}.thumbnail.png"),
            "checkpoint": Path(f"{base}.checkpoint")}


def generate_slide(model_path: str, out: str, settings: GenerateSettings, mask_path: str | None = None,
                   mask_model_path: str | None = None, checkpoint_every: int = 0, resume: bool = False,
                   stats_path: str | None = None, device: str | None = None, progress: bool = True,
                   global_conditions: dict | None = None) -> dict:
    """Generate a slide and everything beside it; returns the stats (also written to ``stats_path``)."""
    began = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(out)
    paths = output_paths(out)
    model = load_bundle(model_path)
    if model.kind != "image":
        raise HistosynthError(f"{model_path}: a {model.kind} model, not an image model")
    mask = None
    if mask_path is not None:
        mask = fit_mask(read_mask(mask_path, model.classes), settings.width, settings.height, mask_path)
    mask_model = load_bundle(mask_model_path) if mask_model_path else None
    if mask_model is not None and mask_model.kind != "mask":
        raise HistosynthError(f"{mask_model_path}: a {mask_model.kind} model, not a mask model")
    if mask_model is not None and mask_model.num_classes != model.num_classes:
        raise HistosynthError(f"{mask_model_path}: mask model has {mask_model.num_classes} classes, "
                              f"the image model {model.num_classes}")
    group = process_group()
    if group.world > 1 and device == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
    generator = SlideGenerator(model, settings, mask, mask_model, device, progress, global_conditions, group)
    mask = generator.prepare_mask()
    if mask is not None:  # compressed while the canvas is denoised: at 16384² px the plain mask is 256 MiB
        generator.mask = mask = BandedMask.of(mask)
    latents = generator.sample_latents(paths["checkpoint"], checkpoint_every, resume)
    if not group.is_main:  # every rank holds the same canvas; the main process writes it
        group.barrier()
        return generator.stats | {"rank": group.rank, "seconds": round(time.perf_counter() - began, 2),
                                  "peak_rss_mb": round(peak_rss_mb(), 1)}
    generator.write(latents, out)
    if mask is not None:
        classes = [c for c in model.classes if c["id"] != 0]
        band = 1024
        write_label_tiff(paths["mask_tiff"], settings.width, settings.height,
                         (mask[y:y + band] for y in range(0, settings.height, band)),
                         mpp=model.config["mpp"], description=generator.provenance(), classes=model.classes)
        step = max(1, max(settings.width, settings.height) // 1024)
        small = mask[::step, ::step]
        write_mask_preview(paths["mask_png"], small, model.classes)
        write_geojson(paths["geojson"], small, classes, scale=step)
    _write_thumbnail(out, paths["thumbnail"], mask, model.classes)
    shutil.rmtree(paths["checkpoint"], ignore_errors=True)
    stats = generator.stats | {"seconds": round(time.perf_counter() - began, 2), "peak_rss_mb": round(peak_rss_mb(), 1),
                               "files": {k: str(v) for k, v in paths.items() if k != "checkpoint" and v.exists()}}
    if stats_path:
        with atomic_path(stats_path) as tmp:
            tmp.write_text(json.dumps(stats, indent=2))
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
