"""Canvas samplers compared on one model and seed: cost, time, memory and seams; then memory at large sizes.

    python benchmarks/canvas.py [--model M --mask-model MM] [--sizes 2048] [--steps 20] [--seed 0]
                                [--keep DIR]
                                [--large 8192,16384]

The memory runs at large sizes use ``--large-steps`` (2) image-model steps and ``--large-mask-steps`` (2) mask-model
steps: two steps already hold everything the second-order scheduler keeps, so more steps add time, not memory.

Each generation runs in its own process (`histosynth generate`) so peak RSS is that run's alone. Two seam measures,
both on lossless (deflate) level-0 pixels, each beside its real-tissue band (range and 95th percentile over 20 draws
on the bundled slide at the model's µm/px):

- seam score: mean gradient across the last step's cut lines over that across the control lines the run recorded
  (random offsets away from every recent step's cuts); the band: 20 random grids on real tissue of the same size.
- periodicity: energy of the row/column gradient profiles at the patch period and its harmonics over neighbouring
  frequencies, blind to where the cuts were; the band: 20 random crops of real tissue of the same size (where the
  output is larger than the 2215 × 2961 px slide at 0.5 µm/px, crops two patches smaller than the slide, which
  still move: 1959 × 2705 px at P = 128). From 2048² px on the slide holds one such crop side by side, so those
  crops overlap and score alike: the band is one measurement rather than a spread (printed: independent crops).
  Beside it, the null that needs no real tissue (``periodicity_null``): the same statistic on 200 stationary
  surrogates of the generated image's own gradient profiles; the p-value says how often texture without a period
  scores as high.
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
from histosynth.eval.seams import (  # noqa: E402
    periodicity_null,
    periodicity_reference,
    real_tissue_like,
    reference_score,
    stats_seam_score,
)

DEMO = ROOT / "histosynth" / "weights" / "demo"


def generate(model, mask_model, size, sampler, steps, out: Path, threads: int, extra=(), seed: int = 0) -> dict:
    stats = out.with_suffix(".json")
    command = [sys.executable, "-m", "histosynth", "generate", "--model", str(model), "--mask-model", str(mask_model),
               "--size", f"{size}x{size}", "--sampler", sampler, "--steps", str(steps), "--seed", str(seed),
               "--out", str(out), "--stats", str(stats), *extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(stats.read_text())


def level0(path: Path) -> np.ndarray:
    with tiffslide.TiffSlide(str(path)) as slide:
        return np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))


def save_stretched_background(pixels: np.ndarray, path: Path, side: int = 512) -> str:
    """The brightest side² crop (mostly background, where faint seams show first), its grey levels stretched from
    their 45th to 99.5th percentile to the full range so that a step of one or two levels in the pale half shows."""
    from PIL import Image

    grey = pixels.mean(axis=2)
    side = min(side, *grey.shape)
    corners = [(y, x) for y in range(0, grey.shape[0] - side + 1, side // 2)
               for x in range(0, grey.shape[1] - side + 1, side // 2)]
    y, x = max(corners, key=lambda c: grey[c[0]:c[0] + side, c[1]:c[1] + side].mean())
    crop = grey[y:y + side, x:x + side]
    low, high = np.percentile(crop, [45, 99.5])
    stretched = np.clip((crop - low) / max(high - low, 1e-6) * 255, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(stretched).save(path)
    return f"{path}: crop at (y {y}, x {x}), grey {low:.0f}-{high:.0f} stretched to 0-255"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEMO / "image"))
    parser.add_argument("--mask-model", default=str(DEMO / "mask"))
    parser.add_argument("--sizes", default="2048", help="output sizes (px, square) for the sampler comparison")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="seed of the mask and of the image")
    parser.add_argument("--samplers", default="random,random --heal-steps 1,random --heal-steps 3,random --no-heal,"
                        "tiles,multidiffusion,diffinfinite", help="comma-separated runs: a sampler, then any extra `generate` options")
    parser.add_argument("--pictures", default=None, help="folder for each run's contrast-stretched brightest crop")
    parser.add_argument("--keep", default=None, help="folder to keep each comparison run's slide and stats in "
                        "(default: deleted once measured)")
    parser.add_argument("--large", default="8192,16384", help="sizes for the memory runs ('' to skip)")
    parser.add_argument("--large-steps", type=int, default=2)
    parser.add_argument("--large-mask-steps", type=int, default=2)
    args = parser.parse_args()
    config = json.loads((Path(args.model) / "histosynth.json").read_text())
    patch_px, mpp = config["patch_size"], config["mpp"]
    real_slide = np.asarray(open_slide(svs_path()).thumbnail(mpp))[..., :3]
    print(f"model {args.model}: patch {patch_px} px at {mpp} µm/px; {args.steps} steps, {args.threads} threads")

    with tempfile.TemporaryDirectory() as tmp:
        for size in [int(v) for v in args.sizes.split(",")]:
            seam_band = reference_score(real_tissue_like(real_slide, size, size), patch_px)
            period_band = periodicity_reference(real_slide, (size, size), patch_px)
            print(f"\n{size}² px: real tissue seam score {seam_band.min:.3f}-{seam_band.max:.3f} "
                  f"(p95 {seam_band.p95:.3f}), periodicity {period_band.min:.2f}-{period_band.max:.2f} "
                  f"(p95 {period_band.p95:.2f}; {period_band.independent_crops:.0f} independent crops)")
            print("| sampler | cost per pass | UNet evals / latent px / step | seconds | peak RSS MiB | seam score "
                  "| periodicity | its null p95 (p-value) | inside both bands |")
            print("|---|---|---|---|---|---|---|---|---|")
            phases, pictures = {}, []
            for run in args.samplers.split(","):
                sampler, *extra = run.split()
                out = Path(tmp) / f"{'_'.join(run.split()).strip('-')}-{size}.tiff"
                stats = generate(args.model, args.mask_model, size, sampler, args.steps, out, args.threads,
                                 ["--compression", "deflate", *extra], seed=args.seed)
                pixels = level0(out)
                if args.pictures:
                    pictures.append(save_stretched_background(pixels, Path(args.pictures) / f"{out.stem}.png"))
                seam, null = stats_seam_score(pixels, stats), periodicity_null(pixels, patch_px)
                period = null.score
                inside = seam <= seam_band.p95 and period <= period_band.p95
                print(f"| {run} | {stats['cost_per_pass']:.3f} | "
                      f"{stats['unet_evals_per_output_latent_pixel_per_step']:.3f} | {stats['seconds']:.0f} | "
                      f"{stats['peak_rss_mb']:.0f} | {seam:.3f} | {period:.2f} | {null.p95:.2f} ({null.p_value:.3f}) | "
                      f"{'yes' if inside else 'no'} |",
                      flush=True)
                del pixels
                if args.keep:
                    Path(args.keep).mkdir(parents=True, exist_ok=True)
                    for kept in out.parent.glob(f"{out.stem}.*"):  # the slide, its stats, mask files, thumbnail
                        kept.replace(Path(args.keep) / kept.name)
                else:
                    out.unlink()
                phases[run] = stats["phase_seconds"]
            print("\nwhere the seconds go (load, mask model, denoising, decoding + TIFF, mask files + thumbnail):")
            for sampler, seconds in phases.items():
                print(f"  {sampler}: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
            print("\n".join(pictures))
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
