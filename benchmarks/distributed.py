"""Speed-up of one canvas shared by 2 processes over 1 process (1 thread each), and communication per step.

    python benchmarks/distributed.py [--model M --mask-model MM] [--size 1024] [--steps 10]

Both runs write the same bytes (checked). Communication: every step each rank all-gathers the model outputs of
the whole working canvas (padded to equal shares), so each rank receives about (world−1)/world of
(patches × guidance passes... the guided output, one tensor per patch) × C × P² × 4 bytes per step.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "histosynth" / "weights" / "demo"


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEMO / "image"))
    parser.add_argument("--mask-model", default=str(DEMO / "mask"))
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    common = ["-m", "histosynth", "generate", "--model", args.model, "--mask-model", args.mask_model,
              "--size", f"{args.size}x{args.size}", "--steps", str(args.steps), "--batch", str(args.batch)]
    with tempfile.TemporaryDirectory() as tmp:
        timings = {}
        for world in (1, 2):
            out, stats = Path(tmp) / f"w{world}.tiff", Path(tmp) / f"w{world}.json"
            launcher = [sys.executable] if world == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                             "--nproc_per_node", str(world), "--master_port", free_port()]
            began = time.perf_counter()
            subprocess.run(launcher + common + ["--out", str(out), "--stats", str(stats)], check=True, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            timings[world] = (time.perf_counter() - began, json.loads(stats.read_text()))
        identical = (Path(tmp) / "w1.tiff").read_bytes() == (Path(tmp) / "w2.tiff").read_bytes()
    config = json.loads((Path(args.model) / "histosynth.json").read_text())
    stats = timings[2][1]
    patches_per_step = stats["unet_evals"] / stats["steps"] / stats["guidance_passes"]
    channels, patch = config["latent_channels"], config["latent_patch"]
    per_step_mb = patches_per_step * channels * patch * patch * 4 / 2 ** 20  # every rank gathers every output
    print(f"{args.size}² px, {args.steps} steps, micro-batch {args.batch}, 1 thread per process")
    print("| processes | wall s (process start incl.) | denoising s | UNet evals this process |")
    print("|---|---|---|---|")
    for world, (seconds, st) in timings.items():
        print(f"| {world} | {seconds:.1f} | {st['denoise_seconds']:.1f} | {st.get('unet_evals_this_process', st['unet_evals'])} |")
    print(f"speed-up of denoising: {timings[1][1]['denoise_seconds'] / timings[2][1]['denoise_seconds']:.2f}×; "
          f"whole run: {timings[1][0] / timings[2][0]:.2f}×")
    print(f"communication: all-gather of {patches_per_step:.0f} patch outputs per step = {per_step_mb:.2f} MiB per "
          f"step per rank (float32, {channels}×{patch}² each)")
    print(f"outputs identical: {identical}")


if __name__ == "__main__":
    main()
