"""Where a `histosynth` command reaches its peak resident memory, and what it holds there.

    python benchmarks/memory_profile.py [--threads 2] [--every 0.05] [--stop-when PATH] [--stop-after S] \
        -- generate --size 4096x4096 ... --out SLIDE

``--stop-when PATH`` sends the command SIGTERM once PATH exists (e.g. ``SLIDE.checkpoint/step-000005`` of a
``--checkpoint-every 1`` run: the canvas stops at the end of the next step, and the decoding is skipped).
``--stop-after SECONDS`` interrupts it as Ctrl-C would (e.g. a resumed gigapixel run once its restore and first rows
of decoding are seen, instead of its hour of decoding).

Runs the command in this process while a thread samples the resident set (VmRSS) every ``--every`` seconds and
the main thread's stack (histosynth frames only). Prints the peak, the largest resident set seen in each phase of a
canvas run (mask model, conditions, denoiser calls, scheduler steps, healed steps, checkpoints written and restored,
decoding, mask files), each with its file-backed part (memory-mapped files, which count as resident while their
pages are cached), and the frames of the largest highs — so a gigapixel run's peak can be found on a slide small
enough to generate in minutes, and scaled by the canvas area.
"""
from __future__ import annotations

import _thread
import argparse
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def resident_mib() -> tuple[float, float]:
    """The resident set and its file-backed part (pages of memory-mapped files: a checkpoint read lazily, a
    pyramid level spooled to disk), MiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "RssFile:")):
            fields[line.split(":")[0]] = int(line.split()[1]) / 1024
    return fields.get("VmRSS", 0.0), fields.get("RssFile", 0.0)


def histosynth_frames(frame) -> list[str]:
    """The stack below ``frame`` as 'module:function:line', histosynth's own frames only, outermost first."""
    frames = traceback.extract_stack(frame)
    return [f"{Path(f.filename).stem}:{f.name}:{f.lineno}" for f in frames if "/histosynth/" in f.filename]


# Phases by the frame on the stack ('module:function'), innermost match first. The mask model's canvas runs the same
# canvas code as the image model's, so everything under it is one phase. The guidance wrapper and the denoiser's
# forward sit inside `_evaluate`: they are the UNet's time, not the merging's (`canvas:__call__`).
PHASES = [("checkpoint:save", "checkpoint written"), ("checkpoint:restore", "checkpoint restored"),
          ("conditions:build_conditions", "conditions encoded"), ("tiff:write_label_tiff", "mask files"),
          ("generate_slide:_write_thumbnail", "thumbnail"), ("canvas:_heal", "healed step: the heal"),
          ("patch:scheduler_step", "scheduler step"), ("denoiser:forward", "denoiser: UNet on windows"),
          ("guidance:__call__", "denoiser: UNet on windows"), ("canvas:_evaluate", "denoiser: UNet on windows"),
          ("canvas:__call__", "denoiser: merging"), ("decode:decode_rows", "decoding and TIFF"),
          ("tiff:write_pyramid", "decoding and TIFF")]
OUTER_PHASES = [("masks:sample_mask_scores", "mask model")]


def phase_of(stack: list[str]) -> str:
    names = [":".join(frame.split(":")[:2]) for frame in stack]
    for name in names:
        for function, phase in OUTER_PHASES:
            if name == function:
                return phase
    for name in reversed(names):
        for function, phase in PHASES:
            if name == function:
                return phase
    return "other"


class Sampler(threading.Thread):
    def __init__(self, every: float, main_id: int, stop_when: Path | None = None, stop_after: float | None = None):
        super().__init__(daemon=True)
        self.every, self.main_id, self.stopped = every, main_id, threading.Event()
        self.stop_when, self.stop_after, self.stop_sent = stop_when, stop_after, False
        self.highs: list[tuple[float, float, float, list[str]]] = []  # (seconds, MiB, file-backed MiB, stack)
        # phase -> (MiB, file-backed MiB, seconds when first reached)
        self.phase_peaks: dict[str, tuple[float, float, float]] = {}
        self.began = time.monotonic()

    def run(self) -> None:
        high = 0.0
        while not self.stopped.is_set():
            rss, file_backed = resident_mib()
            frame = sys._current_frames().get(self.main_id)
            stack = histosynth_frames(frame) if frame else []
            phase = phase_of(stack)
            if rss > self.phase_peaks.get(phase, (0.0, 0.0, 0.0))[0]:
                self.phase_peaks[phase] = (rss, file_backed, time.monotonic() - self.began)
            if self.stop_when is not None and not self.stop_sent and self.stop_when.exists():
                os.kill(os.getpid(), signal.SIGTERM)
                self.stop_sent = True
            if self.stop_after is not None and not self.stop_sent and time.monotonic() - self.began > self.stop_after:
                _thread.interrupt_main()
                self.stop_sent = True
            if rss > high + 16:  # a new high worth recording (16 MiB above the last)
                high = rss
                self.highs.append((time.monotonic() - self.began, rss, file_backed, stack))
            time.sleep(self.every)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--every", type=float, default=0.05, help="seconds between samples")
    parser.add_argument("--top", type=int, default=8, help="how many of the highest highs to print with stacks")
    parser.add_argument("--stop-when", type=Path, help="send the command SIGTERM once this path exists")
    parser.add_argument("--stop-after", type=float, help="interrupt the command (as Ctrl-C) after this many seconds")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="a histosynth command and its options, after --")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT))
    from histosynth.cli import main as histosynth_main

    sampler = Sampler(args.every, threading.get_ident(), args.stop_when, args.stop_after)
    sampler.start()
    try:
        histosynth_main(command)
    except SystemExit as exit_:  # a stopped run exits non-zero: its profile is still wanted
        print(f"the command exited with {exit_.code}")
    except KeyboardInterrupt:
        print(f"the command was interrupted after {args.stop_after} s")
    finally:
        sampler.stopped.set()
        sampler.join()
    highs = sampler.highs
    if not highs:
        print("no samples")
        return
    print(f"peak resident {highs[-1][1]:,.0f} MiB at {highs[-1][0]:.1f} s ({highs[-1][2]:,.0f} MiB of it file-backed)")
    print("\nresident set (file-backed part) when each function was first seen at a new high (innermost histosynth "
          "frame):")
    seen = {}
    for seconds, mib, file_backed, stack in highs:
        where = stack[-1] if stack else "(outside histosynth)"
        seen.setdefault(where, (seconds, mib, file_backed))
    for where, (seconds, mib, file_backed) in seen.items():
        print(f"  {seconds:8.1f} s {mib:9,.0f} MiB ({file_backed:7,.0f})  {where}")
    print("\nlargest resident set in each phase (file-backed part):")
    for phase, (mib, file_backed, seconds) in sorted(sampler.phase_peaks.items(), key=lambda item: -item[1][0]):
        print(f"  {mib:9,.0f} MiB ({file_backed:7,.0f})  at {seconds:8.1f} s  {phase}")
    print(f"\nthe {args.top} highest highs:")
    for seconds, mib, file_backed, stack in highs[-args.top:]:
        print(f"  {seconds:8.1f} s {mib:9,.0f} MiB ({file_backed:7,.0f})  " + " > ".join(stack[-4:]))


if __name__ == "__main__":
    main()
