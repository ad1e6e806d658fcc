"""Checkpoints of a canvas run: the latents, the scheduler's state, the noise generator and the heal state, written
atomically as a step callback and restored field by field, so a resumed run writes byte-identical files.

The canvases besides the latents (the solver's history, the previous x0) go to files of their own, read and written
one at a time: where the run keeps them on disk (sampling/spill.py) a checkpoint then holds no more canvases in
memory than a step does."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from histosynth.checks import all_finite
from histosynth.errors import HistosynthError
from histosynth.io.atomic import atomic_dir, atomic_path
from histosynth.io.state import load_state, save_state
from histosynth.sampling.canvas import CanvasDenoiser
from histosynth.sampling.spill import SpilledCanvas, in_memory

RESTART = "rerun without --resume to start afresh"


def scheduler_state(scheduler) -> dict:
    """The mutable state of a diffusers scheduler (step index, solver history, ...): diffusers has no state_dict
    for schedulers, so every plain or tensor attribute outside its config is taken (a spilled history entry as it
    is: ``CanvasCheckpoint`` writes it to a file of its own)."""
    state = {}
    for key, value in vars(scheduler).items():
        if key in ("config", "_internal_dict"):
            continue
        if isinstance(value, (torch.Tensor, int, float, bool, str, type(None))) or (
                isinstance(value, list) and all(isinstance(v, (torch.Tensor, SpilledCanvas, type(None), int, float))
                                                for v in value)):
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
        # The finished canvas is resumed at the decoding: the solver's history and the previous x0 are not needed
        # again, and leaving them out spares a canvas read back from disk and written (2 GiB each at 32768² px).
        finished = step == self.total_steps
        with atomic_dir(self.folder / f"step-{step:06d}", overwrite=True) as tmp:
            scheduler = scheduler_state(self.scheduler)
            canvases = {}  # name -> canvas (in memory or spilled), each written to NAME.safetensors on its own
            history = scheduler.get("model_outputs")
            if isinstance(history, list):
                for index, entry in enumerate(history):
                    if isinstance(entry, (torch.Tensor, SpilledCanvas)) and not finished:
                        canvases[f"history-{index}"] = entry
                scheduler["model_outputs"] = [None] * len(history)
            if self.canvas.previous_x0 is not None and not finished:  # the next step heals from the last x0
                canvases["previous_x0"] = self.canvas.previous_x0
            save_state({"latents": latents, "scheduler": scheduler, "generator": self.generator.get_state()},
                       tmp, "state")
            for name, canvas in canvases.items():
                save_state({name: in_memory(canvas)}, tmp, name)
            (tmp / "progress.json").write_text(json.dumps({"step": step, "settings_hash": self.settings_hash,
                                                            "unet_evals": self.canvas.stats.unet_evals,
                                                            "canvases": sorted(canvases)}))
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
        shape = (1, channels, *self.canvas.working_shape)
        # The other canvases first, each read and (where the run spills) put back on disk before the next, and the
        # latents last: a file being read is resident beside its copy, so this holds two canvases at a time, as a
        # step does.
        canvases, history_index = {}, {}
        # Resumed at the finished canvas, only the latents are decoded: canvases an older checkpoint kept beside
        # them are not read (each would be a canvas more in memory while it is).
        kept = progress["canvases"] if progress["step"] < self.total_steps else []
        for name in kept:
            numbered = re.fullmatch(r"history-(\d+)", name)
            if numbered is not None:
                history_index[name] = int(numbered.group(1))
            elif name != "previous_x0":
                raise HistosynthError(f"{latest / 'progress.json'}: names a canvas '{name}' this run has no place "
                                      f"for; {RESTART}")
            path = latest / f"{name}.safetensors"
            try:
                tensor = load_state(latest, name)[name]
            except Exception as error:  # noqa: BLE001 - safetensors, JSON and torch each fail in their own way
                raise HistosynthError(f"{path}: damaged checkpoint ({type(error).__name__}); {RESTART}") from None
            self._check_canvas(path, name, tensor, shape)
            canvases[name] = self.canvas.keep(tensor.to(self.device))
            del tensor
        try:
            state = load_state(latest, "state")
            latents, generator_state = state["latents"], state["generator"]
            saved_scheduler = state["scheduler"]
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
        self._check_canvas(latest / "state.safetensors", "latents", latents, shape)
        history = saved_scheduler.get("model_outputs")
        for name, index in history_index.items():
            if not isinstance(history, list) or not 0 <= index < len(history):
                raise HistosynthError(f"{latest / 'progress.json'}: names a canvas '{name}' this run has no place "
                                      f"for; {RESTART}")
            history[index] = canvases[name]
        for key, value in saved_scheduler.items():
            if isinstance(value, list):
                value = [v.to(self.device) if isinstance(v, torch.Tensor) else v for v in value]
            setattr(self.scheduler, key, value.to(self.device) if isinstance(value, torch.Tensor) else value)
        self.canvas.stats.unet_evals = progress["unet_evals"]
        self.canvas.previous_x0 = canvases.get("previous_x0")
        return latents.to(self.device), progress["step"]

    @staticmethod
    def _check_canvas(path: Path, name: str, tensor, shape: tuple[int, ...]) -> None:
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape or not all_finite(tensor):
            raise HistosynthError(f"{path}: {name} do not fit this canvas or are not finite; {RESTART}")

    def _progress(self, latest: Path) -> dict:
        try:
            progress = json.loads((latest / "progress.json").read_text())
        except (OSError, ValueError) as error:
            raise HistosynthError(f"{latest / 'progress.json'}: unreadable checkpoint ({type(error).__name__}); "
                                  f"{RESTART}") from None
        if not isinstance(progress, dict) or not all(isinstance(progress.get(k), t) and not isinstance(
                progress.get(k), bool) for k, t in (("step", int), ("settings_hash", str), ("unet_evals", int),
                                                    ("canvases", list))) \
                or not all(isinstance(name, str) for name in progress["canvases"]):
            raise HistosynthError(f"{latest / 'progress.json'}: not a checkpoint record (needs step, settings_hash, "
                                  f"unet_evals, canvases); {RESTART}")
        if progress["settings_hash"] != self.settings_hash:
            raise HistosynthError(f"{self.folder}: checkpoint was written with different settings, model or mask; "
                                  "rerun without --resume or with the original settings")
        # The last step's checkpoint is the finished canvas: resumed, it goes straight to decoding.
        if not 0 < progress["step"] <= self.total_steps or progress["unet_evals"] < 0:
            raise HistosynthError(f"{latest / 'progress.json'}: step {progress['step']} is not inside the "
                                  f"{self.total_steps}-step run; {RESTART}")
        return progress
