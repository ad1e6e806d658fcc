"""Canvas samplers compared on one model and seed: cost, time, memory and seams; then memory at large sizes.

    python benchmarks/canvas.py [--model M --mask-model MM] [--size 2048] [--steps 20] [--large 8192,16384]

The memory runs at large sizes use ``--large-steps`` (2) image-model steps and ``--large-mask-steps`` (2) mask-model
steps: two steps already hold everything the second-order scheduler keeps, so more steps add time, not memory.

Each generation runs in its own process (`histosynth generate`) so peak RSS is that run's alone. Seam scores are
computed on lossless (deflate) level-0 pixels along each sampler's last-step cut lines, beside the real-tissue
reference: the 95th percentile over 20 random grids on bundled real tissue of the same size and patch size.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import tiffslide

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from histosynth.data.samples import svs_path  # noqa: E402
from histosynth.data.slides import open_slide  # noqa: E402
from histosynth.eval.seams import real_tissue_like, reference_score, seam_score  # noqa: E402

DEMO = ROOT / "histosynth" / "weights" / "demo"


def generate(model, mask_model, size, sampler, steps, out: Path, threads: int, extra=()) -> dict:
    stats = out.with_suffix(".json")
    command = [sys.executable, "-m", "histosynth", "generate", "--model", str(model), "--mask-model", str(mask_model),
               "--size", f"{size}x{size}", "--sampler", sampler, "--steps", str(steps), "--seed", "0",
               "--out", str(out), "--stats", str(stats), *extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(stats.read_text())


def level0(path: Path) -> np.ndarray:
    with tiffslide.TiffSlide(str(path)) as slide:
        return np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEMO / "image"))
    parser.add_argument("--mask-model", default=str(DEMO / "mask"))
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samplers", default="random,tiles,multidiffusion,diffinfinite")
    parser.add_argument("--large", default="8192,16384", help="sizes for the memory runs ('' to skip)")
    parser.add_argument("--large-steps", type=int, default=2)
    parser.add_argument("--large-mask-steps", type=int, default=2)
    args = parser.parse_args()
    config = json.loads((Path(args.model) / "histosynth.json").read_text())
    patch_px, mpp = config["patch_size"], config["mpp"]

    real = real_tissue_like(open_slide(svs_path()).thumbnail(mpp), args.size, args.size)
    reference = reference_score(real, patch_px)
    print(f"model {args.model}: patch {patch_px} px at {mpp} µm/px; {args.size}² px, {args.steps} steps, "
          f"{args.threads} threads")
    print(f"real-tissue seam reference (P = {patch_px} px): p95 {reference.p95:.3f}, mean {reference.mean:.3f}, "
          f"range {reference.min:.3f}-{reference.max:.3f}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for sampler in args.samplers.split(","):
            out = Path(tmp) / f"{sampler}.tiff"
            stats = generate(args.model, args.mask_model, args.size, sampler, args.steps, out, args.threads,
                             ["--compression", "deflate"])
            lines = stats["seam_lines"]
            score = seam_score(level0(out), lines["y"], lines["x"], stats["seam_control_px"])
            rows.append((sampler, stats["cost_per_pass"], stats["unet_evals_per_output_latent_pixel_per_step"],
                         stats["seconds"], stats["peak_rss_mb"], score))
        print(f"\n| sampler | cost per pass | UNet evals / latent px / step | seconds | peak RSS MiB | seam score |")
        print("|---|---|---|---|---|---|")
        for sampler, cost, evals, seconds, rss, score in rows:
            print(f"| {sampler} | {cost:.3f} | {evals:.3f} | {seconds:.0f} | {rss:.0f} | {score:.3f} |")
        print(f"| real tissue (reference p95) | | | | | {reference.p95:.3f} |")
        if args.large:
            print(f"\nrandom sampler, {args.large_steps} steps, mask model {args.large_mask_steps} steps (memory runs):")
            print("| size | seconds | peak RSS MiB | MiB per Mpx |")
            print("|---|---|---|---|")
            for size in [int(v) for v in args.large.split(",")]:
                out = Path(tmp) / f"large-{size}.tiff"
                stats = generate(args.model, args.mask_model, size, "random", args.large_steps, out, args.threads,
                                 ["--mask-steps", str(args.large_mask_steps)])
                print(f"| {size}² | {stats['seconds']:.0f} | {stats['peak_rss_mb']:.0f} | "
                      f"{stats['peak_rss_mb'] / (size * size / 1e6):.1f} |", flush=True)
                out.unlink()


if __name__ == "__main__":
    main()
