"""Periodicity of the mask model's layouts alone, at the image model's patch period, against each layout's null.

    python benchmarks/layout_periodicity.py [--size 8192] [--seeds 0,1,2,3,4,5] [--plain-offsets] [--threads 1]

A layout conditions every patch of the image model, so a period in the layout is a period in the slide, whatever
the image sampler does. Each seed's layout is drawn as `histosynth generate` draws it (the demo mask model, the
random grid, 20 steps), turned into its one-hot at the image model's latent resolution (what the image model is
conditioned on) and scored at the image model's patch, P latent px, with the null of ``profiles_null``.
``--plain-offsets`` draws the layouts with the plain golden-ratio / √2 − 1 offset steps, which ignore the mask
UNet's down-sampling lattice (``offset_steps``): the layouts as they were before the lattice-aware steps. Printed
per seed: rows, columns, their mean, the null's p95 and p-value, and the phase modulo the lattice of each step's
row and column offsets (a run of steps on one phase adds their lattice traces).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import histosynth.sampling.canvas as canvas  # noqa: E402
from histosynth.eval.seams import profile_periodicity, profiles_null  # noqa: E402
from histosynth.models.bundle import load_bundle  # noqa: E402
from histosynth.pipelines.masks import sample_mask  # noqa: E402
from seam_seeds import latent_profiles  # noqa: E402

DEMO = ROOT / "histosynth" / "weights" / "demo"


def layout_one_hot(mask: np.ndarray, factor: int) -> np.ndarray:
    """A class-id mask's one-hot (K, h, w), area-averaged to 1/``factor`` resolution: what the image model sees."""
    h, w = mask.shape[0] // factor, mask.shape[1] // factor
    return np.stack([(mask[:h * factor, :w * factor] == k).reshape(h, factor, w, factor).mean(axis=(1, 3))
                     for k in np.unique(mask)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=8192, help="slide side in px")
    parser.add_argument("--seeds", default="0,1,2,3,4,5")
    parser.add_argument("--plain-offsets", action="store_true", help="offset steps that ignore the UNet's lattice")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    image_model, mask_model = load_bundle(DEMO / "image", kind="image"), load_bundle(DEMO / "mask", kind="mask")
    patch, factor, lattice = image_model.latent_patch, image_model.latent_factor, mask_model.lattice
    if args.plain_offsets:
        canvas.offset_steps = lambda patch, lattice=1: canvas.OFFSET_STEPS
    print(f"{args.size}² px layouts, scored at {patch} latent px ({patch * factor} px); mask UNet lattice {lattice} "
          f"mask px; offset steps {'plain' if args.plain_offsets else 'lattice-aware'}: "
          + ", ".join(f"{v:.3f}" for v in canvas.offset_steps(mask_model.latent_patch, lattice)))
    print("| seed | rows | columns | mean | its null p95 (p-value) | seconds |")
    print("|---|---|---|---|---|---|")
    phases = []
    for seed in (int(v) for v in args.seeds.split(",")):
        began = time.perf_counter()
        mask, _ = sample_mask(mask_model, args.size, args.size, steps=20, seed=seed)
        rows, cols = latent_profiles(layout_one_hot(mask, factor))
        null = profiles_null(rows, cols, patch)
        print(f"| {seed} | {profile_periodicity(rows, patch):.2f} | {profile_periodicity(cols, patch):.2f} | "
              f"{null.score:.2f} | {null.p95:.2f} ({null.p_value:.3f}) | {time.perf_counter() - began:.0f} |",
              flush=True)
        grid = canvas.make_layout("random", mask_model.latent_patch, seed=seed + 1, lattice=lattice)  # sample_mask's
        side = args.size // mask_model.latent_factor
        working = grid.working_shape(side, side)
        offsets = [grid.offset(step, working, (side, side)) for step in range(20)]
        phases.append(f"  seed {seed}: rows {[o[0] % lattice for o in offsets]}, "
                      f"columns {[o[1] % lattice for o in offsets]}")
    print(f"each step's offset modulo the lattice ({lattice} mask px):")
    print("\n".join(phases))


if __name__ == "__main__":
    main()
