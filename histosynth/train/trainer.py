"""The training loop shared by the autoencoder, image, mask and later models.

A *task* supplies the trainable module (whose ``forward(batch)`` returns its loss), the dataset size, and ``make_batch`` that
turns sample indices and per-sample seeds into a batch. Every random choice of step ``s`` derives from
``(seed, s)`` and per-sample seeds, so a resumed run, or a run on another number of processes, sees exactly the
same global batches as an uninterrupted single-process one.
"""
from __future__ import annotations

import csv
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
import torch.nn as nn
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from histosynth.checks import finite_number, one_of, whole_number
from histosynth.errors import HistosynthError
from histosynth.io.atomic import atomic_dir
from histosynth.io.state import load_state, save_state


@dataclass
class TrainConfig:
    """Optimisation settings; YAML config keys and CLI flags mirror these names."""

    steps: int = 1000
    batch_size: int = 16
    learning_rate: float = 2e-4
    warmup_steps: int = 50
    grad_clip: float = 1.0
    ema_decay: float = 0.999  # 0 turns EMA off
    checkpoint_every: int = 250
    preview_every: int = 0
    keep_checkpoints: int = 2
    seed: int = 0
    mixed_precision: str = "no"
    weights_dtype: str = "float32"  # of the saved model folder: float16 halves it (computation stays float32)

    def __post_init__(self):
        """Every value in range before a model is built: a YAML typo or a bad flag is one line, not a crash."""
        whole_number("--steps", self.steps)
        whole_number("--batch-size", self.batch_size)
        finite_number("--learning-rate", self.learning_rate, above=0.0)
        whole_number("--warmup-steps", self.warmup_steps, 0)
        finite_number("--grad-clip", self.grad_clip, minimum=0.0)
        finite_number("--ema-decay", self.ema_decay, minimum=0.0, maximum=0.999999)
        whole_number("--checkpoint-every", self.checkpoint_every, 0)
        whole_number("--preview-every", self.preview_every, 0)
        whole_number("--keep-checkpoints", self.keep_checkpoints)
        whole_number("--seed", self.seed, 0)
        one_of("--mixed-precision", self.mixed_precision, ("no", "fp16", "bf16"))
        one_of("--weights-dtype", self.weights_dtype, ("float32", "float16"))

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


class Task(Protocol):
    module: nn.Module

    def dataset_size(self) -> int: ...

    def make_batch(self, indices: list[int], seeds: list[int], device: torch.device) -> dict: ...


Callback = Callable[[int, nn.Module], None]


def step_plan(seed: int, step: int, batch_size: int, dataset_size: int) -> tuple[list[int], list[int]]:
    """Sample indices and per-sample seeds of the global batch of ``step``; depends on nothing else."""
    rng = np.random.default_rng([seed, step])
    indices = rng.integers(0, dataset_size, size=batch_size).tolist()
    seeds = rng.integers(0, 2**62, size=batch_size).tolist()
    return indices, seeds


def rank_slice(items: list, rank: int, world: int) -> list:
    """This process's contiguous share of the global batch."""
    if len(items) % world:
        raise HistosynthError(f"batch size {len(items)} is not divisible by {world} processes")
    share = len(items) // world
    return items[rank * share:(rank + 1) * share]


# Settings a resumed run must share with the run that wrote the checkpoint: they fix every batch and update, so
# another value would not continue that run but splice two different ones (--steps may grow: training goes on).
RESUME_MUST_MATCH = ("seed", "batch_size", "learning_rate", "warmup_steps", "grad_clip", "ema_decay",
                     "mixed_precision")


def checkpoints(work_dir: Path) -> list[Path]:
    """Completed checkpoints of a training folder, oldest first."""
    return sorted((work_dir / "checkpoints").glob("step-*"))


class Trainer:
    """Runs a task for ``config.steps`` steps with AdamW, warm-up, clipping, EMA, checkpoints and resume."""

    def __init__(self, task: Task, config: TrainConfig, work_dir: str | Path, callbacks: list[Callback] = (),
                 after_backward: list[Callback] = (), identity: dict | None = None):
        """``callbacks`` run after each optimiser step (previews); ``after_backward`` see the synchronised
        gradients of each step before clipping (gradient checks, monitoring). ``identity``: what the task is
        (model kind, preset, ...), stored with each checkpoint; resuming with another identity is refused."""
        self.task = task
        self.identity = dict(identity or {})
        self.config = config
        self.work_dir = Path(work_dir)
        self.callbacks = list(callbacks)
        self.after_backward = list(after_backward)
        self.accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available())
        self.history: list[tuple[int, float]] = []
        self.seconds = 0.0

    # ----------------------------------------------------------------------------------------------- state
    def _save_checkpoint(self, step: int, model: nn.Module, optimizer, ema: EMAModel | None) -> None:
        if not self.accelerator.is_main_process:
            return
        final = self.work_dir / "checkpoints" / f"step-{step:08d}"
        with atomic_dir(final, overwrite=True) as tmp:
            unwrapped = self.accelerator.unwrap_model(model)
            save_file({k: v.contiguous() for k, v in unwrapped.state_dict().items()}, str(tmp / "model.safetensors"))
            save_state(optimizer.state_dict(), tmp, "optimizer")
            if ema is not None:
                save_state(ema.state_dict(), tmp, "ema")
            (tmp / "trainer.json").write_text(json.dumps(
                {"step": step, "config": asdict(self.config), "identity": self.identity, "history": self.history,
                 "seconds": self.seconds}))
        for old in checkpoints(self.work_dir)[:-self.config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        self._write_loss_curve()

    def _read_record(self, folder: Path) -> dict:
        """``trainer.json`` of a checkpoint, checked field by field against this run."""
        path = folder / "trainer.json"
        remove = f"remove {self.work_dir} to start afresh"
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise HistosynthError(f"{path}: unreadable checkpoint record ({type(error).__name__}); {remove}") from None
        history = saved.get("history") if isinstance(saved, dict) else None
        if not (isinstance(saved, dict) and isinstance(saved.get("step"), int) and not isinstance(saved["step"], bool)
                and isinstance(saved.get("config"), dict) and isinstance(history, list)
                and all(isinstance(row, list) and len(row) == 2 and all(isinstance(v, (int, float)) for v in row)
                        for row in history)
                and isinstance(saved.get("seconds", 0.0), (int, float))):
            raise HistosynthError(f"{path}: not a checkpoint record (needs step, config, history); {remove}")
        step = saved["step"]
        if not 0 <= step <= self.config.steps or len(history) != step:
            raise HistosynthError(f"{path}: step {step} does not fit a run of --steps {self.config.steps} "
                                  f"(or its history is cut); {remove}")
        mine = asdict(self.config)
        for key in RESUME_MUST_MATCH:
            if saved["config"].get(key) != mine[key]:
                raise HistosynthError(f"{path}: the checkpoint was trained with {key} {saved['config'].get(key)!r}, "
                                      f"this run asks for {mine[key]!r}; resume with the same settings, or {remove}")
        # Checkpoints written before identities were recorded carry none: nothing to compare them with.
        theirs = saved.get("identity") or self.identity
        for key in sorted(set(theirs) | set(self.identity)):
            if theirs.get(key) != self.identity.get(key):
                raise HistosynthError(f"{path}: the checkpoint is of {key} {theirs.get(key)!r}, this run trains "
                                      f"{self.identity.get(key)!r}; resume with the same settings, or {remove}")
        return saved

    def _load_checkpoint(self, folder: Path, model: nn.Module, optimizer, ema: EMAModel | None) -> int:
        saved = self._read_record(folder)
        remove = f"remove {self.work_dir} to start afresh"
        try:
            weights = load_file(str(folder / "model.safetensors"))
        except Exception as error:  # noqa: BLE001 - safetensors raises its own error types for damaged files
            raise HistosynthError(f"{folder / 'model.safetensors'}: damaged checkpoint ({type(error).__name__}); "
                                  f"{remove}") from None
        try:
            model.load_state_dict(weights)
        except RuntimeError as error:
            lines = str(error).splitlines()
            first = (lines[1] if len(lines) > 1 else lines[0]).strip().split(": copying")[0]
            raise HistosynthError(f"{folder / 'model.safetensors'}: weights of another model ({first}); "
                                  f"{remove}") from None
        if ema is not None and not (folder / "ema.safetensors").exists():
            raise HistosynthError(f"{folder}: checkpoint has no EMA state but EMA is on")
        for name, target in (("optimizer", optimizer), ("ema", ema)):
            if target is None:
                continue
            try:
                target.load_state_dict(load_state(folder, name))
            except Exception as error:  # noqa: BLE001 - safetensors, JSON and torch each fail their own way
                raise HistosynthError(f"{folder / (name + '.safetensors')}: damaged {name} state "
                                      f"({type(error).__name__}); {remove}") from None
        self.history = [tuple(row) for row in saved["history"]]
        self.seconds = float(saved.get("seconds", 0.0))
        return int(saved["step"])

    def _write_loss_curve(self) -> None:
        with open(self.work_dir / "loss.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["step", "loss"])
            writer.writerows(self.history)

    # ------------------------------------------------------------------------------------------------ loop
    def fit(self, resume: bool = False) -> nn.Module:
        """Train; return the module carrying the EMA weights (or the raw ones when EMA is off)."""
        cfg = self.config
        model = self.task.module
        parameters = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=cfg.learning_rate, weight_decay=0.0)
        ema = EMAModel(parameters, decay=cfg.ema_decay, use_ema_warmup=True) if cfg.ema_decay > 0 else None
        start = 0
        if resume:
            found = checkpoints(self.work_dir)
            if not found:
                raise HistosynthError(f"{self.work_dir}: --resume given but no checkpoint found there (the run stopped "
                                      "before its first one); remove the folder and start afresh without --resume")
            start = self._load_checkpoint(found[-1], model, optimizer, ema)
        created = not self.work_dir.exists()
        try:
            return self._fit(model, optimizer, ema, parameters, start)
        except BaseException as error:
            if not self.accelerator.is_main_process:
                raise
            kept = checkpoints(self.work_dir)
            if not kept:
                if created:  # nothing to resume from: leave no OUT.train/ behind
                    shutil.rmtree(self.work_dir, ignore_errors=True)
                raise
            if isinstance(error, HistosynthError):
                raise HistosynthError(f"{error} (checkpoint of step {kept[-1].name.split('-')[-1].lstrip('0') or 0} "
                                      f"kept in {self.work_dir}: --resume continues from it)") from error
            raise

    def _fit(self, model, optimizer, ema, parameters, start: int) -> nn.Module:
        cfg = self.config
        model, optimizer = self.accelerator.prepare(model, optimizer)
        if ema is not None:
            ema.to(self.accelerator.device)
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        self.work_dir.mkdir(parents=True, exist_ok=True)
        bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="training",
                   disable=not self.accelerator.is_main_process, dynamic_ncols=True)
        n_data = self.task.dataset_size()
        try:  # the bar is closed on failure too: the error gets a line of its own
            for step in bar:
                began = time.perf_counter()
                for group in optimizer.param_groups:
                    group["lr"] = cfg.learning_rate * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
                indices, seeds = step_plan(cfg.seed, step, cfg.batch_size, n_data)
                batch = self.task.make_batch(rank_slice(indices, rank, world), rank_slice(seeds, rank, world),
                                             self.accelerator.device)
                with self.accelerator.autocast():
                    loss = model(batch)  # the module owns its loss; calling it lets DDP synchronise gradients
                if not torch.isfinite(loss):
                    raise HistosynthError(f"loss became {float(loss)} at step {step}; lower the learning rate")
                self.accelerator.backward(loss)
                for hook in self.after_backward:
                    hook(step + 1, self.accelerator.unwrap_model(model))
                if cfg.grad_clip > 0:
                    self.accelerator.clip_grad_norm_(parameters, cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.step(parameters)
                mean_loss = float(self.accelerator.reduce(loss.detach(), reduction="mean"))
                self.history.append((step + 1, mean_loss))
                self.seconds += time.perf_counter() - began
                bar.set_postfix(loss=f"{mean_loss:.4f}")
                done = step + 1
                if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 or done == cfg.steps:
                    self._save_checkpoint(done, model, optimizer, ema)
                for callback in self.callbacks:
                    callback(done, self.accelerator.unwrap_model(model))
        finally:
            bar.close()
        final = self.accelerator.unwrap_model(model)
        if ema is not None:
            ema.copy_to(parameters)
        return final

    def summary(self) -> dict:
        """Training facts for the model card: steps, time, loss at the start and the end."""
        losses = [loss for _, loss in self.history]
        window = max(1, min(50, len(losses) // 10 or 1))
        return {
            "steps": self.config.steps,
            "batch_size": self.config.batch_size,
            "learning_rate": self.config.learning_rate,
            "seconds": round(self.seconds, 1),
            "processes": self.accelerator.num_processes,
            "device": str(self.accelerator.device),
            "loss_first": float(np.mean(losses[:window])) if losses else math.nan,
            "loss_last": float(np.mean(losses[-window:])) if losses else math.nan,
        }
