"""A gigapixel slide generated in segments that resume, then opened the way a viewer would open it.

    python benchmarks/gigapixel.py [--size 32768] [--work run-bench/gigapixel] [--threads 2] [--stop-after S]
                                   [--precision float32|bfloat16]

Each call continues the run in WORK: `histosynth generate` with the bundled demo models, the default sampler and
steps, `--checkpoint-every 1` (and `--resume` once a checkpoint is there). Every few seconds the call records its
segment in WORK/ledger.json — wall and CPU seconds, peak RSS, the steps the checkpoints have reached — so a call that
is killed still counts up to its last record. `--stop-after S` sends SIGTERM after S seconds: the image canvas
checkpoints at the end of its step and stops (the mask canvas keeps its last step's checkpoint). Once the slide is
written, the call prints the whole run's figures — seconds (wall and CPU, all segments), peak RSS (the largest of
any segment), UNet evaluations, file size — and opens the slide with OpenSlide and TiffSlide: every level's size,
and a 512² px region read at the centre of every level, with the time it took.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "histosynth" / "weights" / "demo"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process (fields 14 and 15 of /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def peak_rss_mib(pid: int) -> float:
    """The process's resident-set high-water mark so far (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def steps_reached(checkpoints: Path) -> dict:
    def last(folder: Path) -> int:
        steps = sorted(folder.glob("step-*")) if folder.exists() else []
        return int(steps[-1].name.split("-")[1]) if steps else 0
    return {"mask": last(checkpoints / "mask"), "image": last(checkpoints),
            "layout_kept": (checkpoints / "layout.npz").exists()}


def write_json(path: Path, value) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def run_segment(args, work: Path, ledger: list) -> int:
    out, checkpoints = work / "slide.tiff", work / "slide.checkpoint"
    resume = checkpoints.exists() and any(checkpoints.rglob("step-*")) or (checkpoints / "layout.npz").exists()
    command = [sys.executable, "-m", "histosynth", "generate", "--model", str(args.model), "--mask-model",
               str(args.mask_model), "--size", f"{args.size}x{args.size}", "--out", str(out), "--seed", "0",
               "--checkpoint-every", "1", "--stats", str(work / "stats.json"), "--precision", args.precision,
               *(["--resume"] if resume else [])]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    segment = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "resumed": resume,
               "threads": args.threads, "precision": args.precision, "wall_s": 0.0, "cpu_s": 0.0, "peak_rss_mib": 0.0}
    ledger.append(segment)
    began = time.monotonic()
    with open(work / "generate.log", "a") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        stopping = False
        while process.poll() is None:
            try:
                segment.update(cpu_s=round(cpu_seconds(process.pid), 1),
                               peak_rss_mib=round(max(segment["peak_rss_mib"], peak_rss_mib(process.pid)), 1))
            except (OSError, IndexError, ValueError):  # the process ended between poll() and the read
                pass
            segment.update(wall_s=round(time.monotonic() - began, 1), reached=steps_reached(checkpoints))
            write_json(work / "ledger.json", ledger)
            if args.stop_after and not stopping and time.monotonic() - began > args.stop_after:
                process.send_signal(signal.SIGTERM)
                stopping = True
            time.sleep(5)
    segment.update(wall_s=round(time.monotonic() - began, 1), exit=process.returncode,
                   reached=steps_reached(checkpoints))
    write_json(work / "ledger.json", ledger)
    return process.returncode


def open_everywhere(path: Path) -> None:
    import openslide
    import tiffslide

    for name, opener in (("openslide", openslide.OpenSlide), ("tiffslide", tiffslide.TiffSlide)):
        with opener(str(path)) as slide:
            print(f"\n{name}: {slide.level_count} levels")
            print("| level | size px | downsample | 512² px read at the centre, ms | mean RGB |")
            print("|---|---|---|---|---|")
            for level, (w, h) in enumerate(slide.level_dimensions):
                scale = slide.level_downsamples[level]
                side = min(512, w, h)
                x0, y0 = int((w - side) / 2 * scale), int((h - side) / 2 * scale)
                began = time.perf_counter()
                region = np.asarray(slide.read_region((x0, y0), level, (side, side)).convert("RGB"))
                ms = (time.perf_counter() - began) * 1000
                print(f"| {level} | {w} × {h} | {scale:g} | {ms:.0f} | {region.reshape(-1, 3).mean(0).round(1).tolist()} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=32768)
    parser.add_argument("--work", type=Path, default=ROOT / "run-bench" / "gigapixel")
    parser.add_argument("--model", type=Path, default=DEMO / "image")
    parser.add_argument("--mask-model", type=Path, default=DEMO / "mask")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stop-after", type=float, default=0, help="seconds, then SIGTERM (0: run to the end)")
    parser.add_argument("--precision", choices=("float32", "bfloat16"), default="float32",
                        help="`generate --precision`: bfloat16 autocast is 1.76x faster per UNet step on CPUs with "
                        "AVX-512 BF16; keep one precision for all the segments of a run")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    ledger_path, slide = args.work / "ledger.json", args.work / "slide.tiff"
    ledger = json.loads(ledger_path.read_text()) if ledger_path.exists() else []
    if not slide.exists():
        code = run_segment(args, args.work, ledger)
        if code != 0:
            print(f"segment stopped (exit {code}) at {ledger[-1]['reached']}; run again to continue")
            return
    stats = json.loads((args.work / "stats.json").read_text())
    print(f"{args.size}² px in {len(ledger)} segment(s): wall {sum(s['wall_s'] for s in ledger) / 3600:.2f} h, "
          f"CPU {sum(s['cpu_s'] for s in ledger) / 3600:.2f} h, peak RSS {max(s['peak_rss_mib'] for s in ledger):.0f} "
          f"MiB, {stats['unet_evals']:,} UNet evaluations (image model), last segment's phases "
          f"{stats.get('phase_seconds')}, file {slide.stat().st_size / 2**30:.2f} GiB")
    open_everywhere(slide)


if __name__ == "__main__":
    main()
