"""Resident memory of writing and restoring a canvas checkpoint at a gigapixel's canvas size, without its hours of
denoising: the latents in memory, the solver's history and the previous x0 spilled to disk, as a large `generate`
run holds them at a step's end.

    python benchmarks/checkpoint_memory.py [--output 8192] [--channels 8] [--folder DIR]

``--output`` is the latent canvas's side (8192 for a 32768² px slide at 4×). Prints the resident set before, and
its peak while the checkpoint is written and while it is restored (the peak is reset between them through
/proc/self/clear_refs), in canvases of the size asked.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from histosynth.models.denoiser import make_sampling_scheduler, make_train_scheduler
from histosynth.sampling.canvas import CanvasDenoiser, RandomOffsetGrid
from histosynth.sampling.checkpoint import CanvasCheckpoint
from histosynth.sampling.spill import Spill, SpilledCanvas


def resident_mib(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # the peak resident set starts again from the current one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=int, default=8192, help="latent canvas side (output side / latent factor)")
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--patch", type=int, default=32)
    parser.add_argument("--folder", type=Path, default=None, help="where the checkpoint and spill files go")
    args = parser.parse_args()
    torch.set_num_threads(1)
    folder = Path(tempfile.mkdtemp(dir=args.folder, prefix="checkpoint-memory-"))
    layout = RandomOffsetGrid(args.patch, seed=0, heal_from=1)
    output = (args.output, args.output)
    canvas = CanvasDenoiser(lambda x, t, c: x, layout, output, spill=Spill(folder / "spill"))
    (folder / "spill").mkdir()
    shape = (1, args.channels, *canvas.working_shape)
    canvas_mib = torch.Size(shape).numel() * 4 / 2**20
    scheduler = make_sampling_scheduler("dpm++sde", make_train_scheduler().config)
    scheduler.set_timesteps(2)
    began = time.perf_counter()
    latents = torch.full(shape, 0.25)
    history = torch.full(shape, 0.5)
    scheduler.model_outputs = [None, canvas.keep(history)]
    del history
    previous = torch.full(shape, 0.75)
    canvas.previous_x0 = canvas.keep(previous)
    del previous
    assert isinstance(canvas.previous_x0, SpilledCanvas)
    generator = torch.Generator().manual_seed(0)
    checkpoint = CanvasCheckpoint(folder / "ckpt", "bench", 2, canvas, scheduler, generator)
    before = resident_mib()
    print(f"canvas {shape}: {canvas_mib:,.0f} MiB; set up in {time.perf_counter() - began:.0f} s; resident "
          f"{before:,.0f} MiB with the latents in memory, the history and the previous x0 on disk")
    reset_peak()
    mark = time.perf_counter()
    checkpoint.save(latents, 1)
    peak = resident_mib("VmHWM")
    print(f"checkpoint written in {time.perf_counter() - mark:.0f} s: peak {peak:,.0f} MiB, "
          f"{(peak - before) / canvas_mib:+.2f} canvases over the set-up")
    del latents  # a resumed run restores before it holds any latents
    reset_peak()
    mark = time.perf_counter()
    latents, _ = checkpoint.restore(args.channels)
    peak = resident_mib("VmHWM")
    print(f"checkpoint restored in {time.perf_counter() - mark:.0f} s: peak {peak:,.0f} MiB, "
          f"{(peak - before) / canvas_mib:+.2f} canvases over the set-up (the latents read back among them)")
    restored = scheduler.model_outputs[-1]
    assert isinstance(restored, SpilledCanvas) and isinstance(canvas.previous_x0, SpilledCanvas)
    assert bool((restored.read_rows(0, 4) == 0.5).all()) and bool((canvas.previous_x0.read_rows(0, 4) == 0.75).all())
    print("restored: the history and the previous x0 back on disk, their values intact")


if __name__ == "__main__":
    main()
