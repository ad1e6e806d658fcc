"""How far the blind periodicity score scatters without any period, and what a real-tissue band of it is worth.

    python benchmarks/periodicity_null.py [--draws 1000] [--patch 128]

Printed:
1. The score on profiles with no period at all (white noise, both axes averaged as ``periodicity_score`` does) at
   the profile lengths of 512² to 8192² px images: its spread, and how often it lies at or under the real-tissue
   bands the README's tables use (p95 1.24 at 2048² px, 0.75 at 8192² px, 0.84 for 2048² px latents).
2. The bundled slide (0.5 µm/px) cut into non-overlapping crops of 512², 1024² and 2048² px: each crop's score and
   the p-value of its null (``periodicity_null``), beside the band of 20 random (overlapping) crops that
   ``periodicity_reference`` gives at that size.
3. The null's false-positive rate on white and on strongly correlated (AR 0.9) profiles with no period.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from histosynth.data.samples import svs_path  # noqa: E402
from histosynth.data.slides import open_slide  # noqa: E402
from histosynth.eval.seams import (  # noqa: E402
    periodicity_null,
    periodicity_reference,
    profile_periodicity,
    profiles_null,
)


def autoregressive(rng: np.random.Generator, length: int, coefficient: float) -> np.ndarray:
    noise = rng.standard_normal(length + 200)
    values = np.zeros_like(noise)
    for t in range(1, len(noise)):
        values[t] = coefficient * values[t - 1] + noise[t]
    return values[200:]  # past the start-up transient


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draws", type=int, default=1000, help="white-noise profile pairs per length")
    parser.add_argument("--patch", type=int, default=128, help="period in image px (the demo model's patch)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)

    print("1. no period at all: white-noise row and column profiles, scores averaged")
    print("| image side px | mean | 5th-95th percentile | share <= 1.24 | share <= 0.84 | share <= 0.75 |")
    print("|---|---|---|---|---|---|")
    for side, period in ((512, args.patch), (2048, args.patch), (8192, args.patch), (512, args.patch // 4)):
        scores = np.array([(profile_periodicity(rng.standard_normal(side - 1), period)
                            + profile_periodicity(rng.standard_normal(side - 1), period)) / 2
                           for _ in range(args.draws)])
        label = f"{side}" if period == args.patch else f"{side} (a 2048² px canvas's latents, P = {period})"
        print(f"| {label} | {scores.mean():.2f} | {np.percentile(scores, 5):.2f}-{np.percentile(scores, 95):.2f} | "
              f"{np.mean(scores <= 1.24):.2f} | {np.mean(scores <= 0.84):.2f} | {np.mean(scores <= 0.75):.2f} |",
              flush=True)

    real = np.asarray(open_slide(svs_path()).thumbnail(0.5))[..., :3]
    print(f"\n2. the bundled slide, {real.shape[1]}×{real.shape[0]} px at 0.5 µm/px, in non-overlapping crops")
    print("| crop side px | crops | their scores (min-max) | their null p-values under 0.05 | min p | "
          "band of 20 random crops (min-max, p95) |")
    print("|---|---|---|---|---|---|")
    for side in (512, 1024, 2048):
        corners = [(y, x) for y in range(0, real.shape[0] - side + 1, side)
                   for x in range(0, real.shape[1] - side + 1, side)]
        nulls = [periodicity_null(real[y:y + side, x:x + side], args.patch) for y, x in corners]
        scores = [n.score for n in nulls]
        p_values = [n.p_value for n in nulls]
        band = periodicity_reference(real, (side, side), args.patch)
        print(f"| {side} | {len(corners)} | {min(scores):.2f}-{max(scores):.2f} | "
              f"{sum(p < 0.05 for p in p_values)} | {min(p_values):.3f} | "
              f"{band.min:.2f}-{band.max:.2f}, p95 {band.p95:.2f} |", flush=True)

    print("\n3. the null's false positives (p < 0.05) on 100 profile pairs without a period, 2047 long, P = 128")
    for name, make in (("white", lambda: rng.standard_normal(2047)),
                       ("AR(0.9)", lambda: autoregressive(rng, 2047, 0.9))):
        p_values = np.array([profiles_null(make(), make(), args.patch, draws=200, seed=i).p_value
                             for i in range(100)])
        print(f"  {name}: {np.mean(p_values < 0.05):.2f}", flush=True)


if __name__ == "__main__":
    main()
