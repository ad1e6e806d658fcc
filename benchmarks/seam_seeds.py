"""Periodicity of the random grid's latent canvas over several seeds, beside real tissue's latents.

    python benchmarks/seam_seeds.py [--size 2048] [--seeds 1,2,3] [--heal-steps 6] [--blend-last 0] [--context N]
                                    [--early-context N] [--early-context-steps K] [--shared-norms N] [--fold]
                                    [--mask-context N] [--mask-shared-norms N] [--whole-canvas] [--one-class ID]
                                    [--phases] [--threads 2]

One image-space periodicity score per generated slide scatters widely (real tissue itself spans 0.30-1.29 at 2048²
px), so comparing two heal schemes on one seed says little. This measures the same statistic on the latent canvas
(no decoding, so several seeds are cheap): the demo image model, one layout drawn once by the demo mask model, the
default sampler and steps, a seed per run; the reference is the bundled slide encoded by the model's autoencoder, 20
random crops of the same latent size (from 2048² px on, crops that overlap: one measurement more than a band).
``--whole-canvas`` draws each canvas as one window (no cut anywhere, context 0): what the same model, layout and
seeds give without any seam. ``--one-class ID`` replaces the layout by that class everywhere. ``--phases`` prints,
per axis, the phase of the gradient profile's component at 1/P for the layout (its one-hot at latent resolution) and
for each seed: a seam grid's phase follows the steps' offsets, a layout's follows the layout. Printed: rows, columns and their mean per seed, each seed's null (the same statistic on 200 stationary surrogates of
its own profiles, ``profiles_null``: 95th percentile and the p-value of the seed's score), and the reference band.
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

from histosynth.data.samples import svs_path  # noqa: E402
from histosynth.data.slides import open_slide  # noqa: E402
from histosynth.eval.seams import profile_periodicity, profiles_null  # noqa: E402
from histosynth.models.autoencoder import encode_latents  # noqa: E402
from histosynth.models.bundle import load_bundle  # noqa: E402
from histosynth.pipelines.generate_slide import GenerateSettings, SlideGenerator  # noqa: E402
from histosynth.pipelines.masks import sample_mask  # noqa: E402
from histosynth.sampling.canvas import FixedTiles  # noqa: E402
from histosynth.pixels import from_uint8  # noqa: E402

DEMO = ROOT / "histosynth" / "weights" / "demo"


class WholeCanvas(SlideGenerator):
    """The canvas denoised as one window at every step: no cut line anywhere, for comparison with the samplers."""

    def layout(self):
        height, width = self.latent_shape
        if height != width:
            raise SystemExit("--whole-canvas needs a square canvas")
        return FixedTiles(height)


def harmonic_phase(profile: np.ndarray, period: float) -> float:
    """Phase in degrees of the Hann-windowed ``profile``'s component at 1/``period``."""
    values = (profile - profile.mean()) * np.hanning(len(profile))
    return float(np.angle(np.exp(-2j * np.pi * np.arange(len(profile)) / period) @ values, deg=True))


def latent_profiles(latents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean |difference| between neighbouring rows and between neighbouring columns of a latent canvas (C, h, w)."""
    return np.abs(np.diff(latents, axis=1)).mean(axis=(0, 2)), np.abs(np.diff(latents, axis=2)).mean(axis=(0, 1))


def latent_periodicity(latents: np.ndarray, patch: int) -> tuple[float, float]:
    """(rows, columns) periodicity of a latent canvas (C, h, w) at ``patch`` latent px."""
    rows, cols = latent_profiles(latents)
    return profile_periodicity(rows, patch), profile_periodicity(cols, patch)


def folded_peaks(latents: np.ndarray, layout, steps: int, top: int = 6) -> list[str]:
    """Per axis: the ``top`` phases (mod P) of the gradient profile with most gradient (over the median), each with
    the steps whose cut lines lie there — where a canvas's periodic excess sits, and which steps put it there."""
    patch, shape = layout.patch, latents.shape[1:]
    working = layout.working_shape(*shape)
    offsets = [layout.offset(step, working, shape) for step in range(steps)]
    lines = []
    for axis, name in ((1, "rows"), (2, "columns")):
        profile = np.abs(np.diff(latents, axis=axis)).mean(axis=tuple(a for a in (0, 1, 2) if a != axis))
        phase = (np.arange(len(profile)) + 1) % patch  # the difference across line ``phase`` (mod P)
        folded = np.array([profile[phase == j].mean() for j in range(patch)]) / np.median(profile)
        peaks = [f"{j}: {folded[j]:.3f} (steps {[k for k, o in enumerate(offsets) if o[axis - 1] % patch == j]})"
                 for j in np.argsort(-folded)[:top]]
        lines.append(f"  {name}: " + ", ".join(peaks))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=2048, help="output side in px")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--heal-steps", type=int, default=6, help="0: no step heals")
    parser.add_argument("--blend-last", type=int, default=0, help="blend a half-shifted grid over the last N steps")
    parser.add_argument("--context", type=int, default=None, help="latent px around each patch (default: the model's)")
    parser.add_argument("--early-context", type=int, default=None, help="context of the early steps (default: --context)")
    parser.add_argument("--early-context-steps", type=int, default=None, help="how many steps are early (default: 5)")
    parser.add_argument("--shared-norms", type=int, default=0,
                        help="group-norm statistics over N of a step's windows for all of them (0: per window)")
    parser.add_argument("--mask-context", type=int, default=0, help="context of the mask model's patches")
    parser.add_argument("--mask-shared-norms", type=int, default=0, help="--shared-norms of the mask model")
    parser.add_argument("--whole-canvas", action="store_true", help="one window over the whole canvas (no cuts)")
    parser.add_argument("--one-class", type=int, default=None, help="this class id everywhere instead of the layout")
    parser.add_argument("--phases", action="store_true", help="print the phase at 1/P of the layout and each seed")
    parser.add_argument("--fold", action="store_true", help="print where the periodic excess lies (folded_peaks)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_bundle(DEMO / "image", kind="image")
    patch = model.latent_patch
    mask, _ = sample_mask(load_bundle(DEMO / "mask", kind="mask"), args.size, args.size, steps=20, seed=0,
                          context=args.mask_context, shared_norms=args.mask_shared_norms)
    if args.one_class is not None:
        mask = np.full_like(mask, args.one_class)
    if args.phases:
        from layout_periodicity import layout_one_hot  # the benchmarks import each other only here: no cycle at load

        rows, cols = latent_profiles(layout_one_hot(mask, model.latent_factor))
        print(f"layout phase at 1/P: rows {harmonic_phase(rows, patch):.0f}°, columns {harmonic_phase(cols, patch):.0f}°")

    real = np.asarray(open_slide(svs_path()).thumbnail(model.config["mpp"]))[..., :3]
    f = model.latent_factor
    pixels = from_uint8(np.ascontiguousarray(real[:real.shape[0] // f * f, :real.shape[1] // f * f]))[None]
    with torch.no_grad():
        real_latents = encode_latents(model.autoencoder, pixels, torch.Generator().manual_seed(0))[0].numpy()
    side = min(args.size // f, *real_latents.shape[1:])
    rng = np.random.default_rng(0)
    band = []
    for _ in range(20):
        y, x = (int(rng.integers(0, n - side + 1)) for n in real_latents.shape[1:])
        band.append(float(np.mean(latent_periodicity(real_latents[:, y:y + side, x:x + side], patch))))
    independent = (real_latents.shape[1] // side) * (real_latents.shape[2] // side)
    print(f"real tissue latents ({side}² crops): {min(band):.2f}-{max(band):.2f} (p95 {np.percentile(band, 95):.2f}; "
          f"{independent} independent crops)")

    print("| seed | rows | columns | mean | its null p95 (p-value) | seconds |")
    print("|---|---|---|---|---|---|")
    means = []
    for seed in (int(v) for v in args.seeds.split(",")):
        settings = GenerateSettings(width=args.size, height=args.size, steps=20, seed=seed, heal=args.heal_steps > 0,
                                    heal_steps=max(1, args.heal_steps),
                                    blend_last=args.blend_last, context=0 if args.whole_canvas else args.context,
                                    early_context=args.early_context, early_context_steps=args.early_context_steps,
                                    shared_norms=args.shared_norms)
        began = time.perf_counter()
        generator = (WholeCanvas if args.whole_canvas else SlideGenerator)(model, settings, mask, None, "cpu", False,
                                                                           None, None)
        latents = generator.sample_latents()
        seconds = time.perf_counter() - began
        rows, cols = latent_periodicity(latents[0].float().numpy(), patch)
        null = profiles_null(*latent_profiles(latents[0].float().numpy()), patch)
        means.append((rows + cols) / 2)
        print(f"| {seed} | {rows:.2f} | {cols:.2f} | {means[-1]:.2f} | {null.p95:.2f} ({null.p_value:.3f}) | "
              f"{seconds:.0f} |", flush=True)
        if args.phases:
            rows, cols = latent_profiles(latents[0].float().numpy())
            print(f"  phase at 1/P: rows {harmonic_phase(rows, patch):.0f}°, columns {harmonic_phase(cols, patch):.0f}°")
        if args.fold:
            print("\n".join(folded_peaks(latents[0].float().numpy(), generator.layout(), settings.steps)), flush=True)
    print(f"mean over seeds {np.mean(means):.2f} ± {np.std(means):.2f}")


if __name__ == "__main__":
    main()
