"""Checkpoints of a canvas run: the latents, the scheduler's state, the noise generator and the heal state, written
atomically as a step callback and restored field by field, so a resumed run writes byte-identical files."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from histosynth.errors import HistosynthError
from histosynth.io.atomic import atomic_dir, atomic_path
from histosynth.io.state import load_state, save_state
from histosynth.sampling.canvas import CanvasDenoiser

RESTART = "rerun without --resume to start afresh"


def scheduler_state(scheduler) -> dict:
    """The mutable state of a diffusers scheduler (step index, solver history, ...): diffusers has no state_dict
    for schedulers, so every plain or tensor attribute outside its config is taken."""
    state = {}
    for key, value in vars(scheduler).items():
        if key in ("config", "_internal_dict"):
            continue
        if isinstance(value, (torch.Tensor, int, float, bool, str, type(None))) or (
                isinstance(value, list) and all(isinstance(v, (torch.Tensor, type(None), int, float)) for v in value)):
            state[key] = value
    return state


def keep_layout(folder: Path, layout, key: str) -> None:
    """Write ``folder/layout.npz`` (a drawn layout, anything with ``save(path, key)``) once, atomically."""
    path = Path(folder) / CanvasCheckpoint.LAYOUT
    if not path.exists():
        with atomic_path(path, suffix=".npz") as tmp:
            layout.save(tmp, key)


class CanvasCheckpoint:
    """``folder/step-N`` checkpoints of one canvas run, tagged with ``settings_hash`` so a checkpoint of other
    settings, model or conditions is never continued."""

    LAYOUT = "layout.npz"

    def __init__(self, folder: Path, settings_hash: str, total_steps: int, canvas: CanvasDenoiser, scheduler,
                 generator: torch.Generator, device="cpu", layout=None, layout_key: str = ""):
        self.folder, self.settings_hash, self.total_steps = Path(folder), settings_hash, total_steps
        self.canvas, self.scheduler, self.generator, self.device = canvas, scheduler, generator, device
        # A layout the mask model drew (anything with ``save(path, key)``), kept beside the steps so that a resumed
        # run does not draw it again: at a gigapixel that is hours of mask-model sampling.
        self.layout, self.layout_key = layout, layout_key

    def save(self, latents: torch.Tensor, step: int) -> None:
        """Write ``step-N`` atomically, then drop older ones: a kill at any moment leaves one complete."""
        if self.layout is not None:
            keep_layout(self.folder, self.layout, self.layout_key)
        with atomic_dir(self.folder / f"step-{step:06d}", overwrite=True) as tmp:
            state = {"latents": latents, "scheduler": scheduler_state(self.scheduler),
                     "generator": self.generator.get_state()}
            if self.canvas.previous_x0 is not None:  # a healed step comes next: it needs the last x0 estimate
                state["previous_x0"] = self.canvas.previous_x0
            save_state(state, tmp, "state")
            (tmp / "progress.json").write_text(json.dumps({"step": step, "settings_hash": self.settings_hash,
                                                            "unet_evals": self.canvas.stats.unet_evals}))
        for old in sorted(self.folder.glob("step-*"))[:-1]:
            shutil.rmtree(old, ignore_errors=True)

    def restore(self, channels: int) -> tuple[torch.Tensor, int]:
        """The latents and step of the latest checkpoint; the scheduler, generator and canvas continue from it.
        Checked field by field: a damaged checkpoint, or one of other settings, is refused with one line."""
        folder = self.folder
        found = sorted(folder.glob("step-*")) if folder.exists() else []
        if not found:
            raise HistosynthError(f"{folder}: --resume given but no checkpoint there; run without --resume to start "
                                  "afresh")
        latest = found[-1]
        progress = self._progress(latest)
        try:
            state = load_state(latest, "state")
            latents, generator_state = state["latents"], state["generator"]
            saved_scheduler = state["scheduler"]
            previous_x0 = state.get("previous_x0")
            if not isinstance(saved_scheduler, dict):
                raise TypeError("scheduler state is not a mapping")
            self.generator.set_state(generator_state)
        except Exception as error:  # noqa: BLE001 - safetensors, JSON and torch each fail in their own way
            raise HistosynthError(f"{latest / 'state.safetensors'}: damaged checkpoint "
                                  f"({type(error).__name__}); {RESTART}") from None
        unknown = sorted(key for key in saved_scheduler
                         if not isinstance(key, str) or not hasattr(self.scheduler, key))
        if unknown:
            raise HistosynthError(f"{latest / 'state.json'}: scheduler state of another scheduler ('{unknown[0]}'); "
                                  f"{RESTART}")
        shape = (1, channels, *self.canvas.working_shape)
        for name, tensor in (("latents", latents), ("previous_x0", previous_x0)):
            if tensor is None:
                continue
            if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape \
                    or not bool(torch.isfinite(tensor).all()):
                raise HistosynthError(f"{latest / 'state.safetensors'}: {name} do not fit this canvas or are not "
                                      f"finite; {RESTART}")
        for key, value in saved_scheduler.items():
            if isinstance(value, list):
                value = [v.to(self.device) if isinstance(v, torch.Tensor) else v for v in value]
            setattr(self.scheduler, key, value.to(self.device) if isinstance(value, torch.Tensor) else value)
        self.canvas.stats.unet_evals = progress["unet_evals"]
        self.canvas.previous_x0 = previous_x0.to(self.device) if previous_x0 is not None else None
        return latents.to(self.device), progress["step"]

    def _progress(self, latest: Path) -> dict:
        try:
            progress = json.loads((latest / "progress.json").read_text())
        except (OSError, ValueError) as error:
            raise HistosynthError(f"{latest / 'progress.json'}: unreadable checkpoint ({type(error).__name__}); "
                                  f"{RESTART}") from None
        if not isinstance(progress, dict) or not all(isinstance(progress.get(k), t) and not isinstance(
                progress.get(k), bool) for k, t in (("step", int), ("settings_hash", str), ("unet_evals", int))):
            raise HistosynthError(f"{latest / 'progress.json'}: not a checkpoint record (needs step, settings_hash, "
                                  f"unet_evals); {RESTART}")
        if progress["settings_hash"] != self.settings_hash:
            raise HistosynthError(f"{self.folder}: checkpoint was written with different settings, model or mask; "
                                  "rerun without --resume or with the original settings")
        if not 0 < progress["step"] < self.total_steps or progress["unet_evals"] < 0:
            raise HistosynthError(f"{latest / 'progress.json'}: step {progress['step']} is not inside the "
                                  f"{self.total_steps}-step run; {RESTART}")
        return progress
