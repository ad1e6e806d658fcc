"""How much one step's clean-latent estimate x̂₀ jumps across its own cut lines, with and without context.

    python benchmarks/cut_jump.py [--size 1024] [--contexts 0,4,8] [--probe-steps 3,7,11,15] [--trials 3]
                                  [--slide-context 0] [--pool-group-norms] [--shared-norms N]

The demo models draw a slide (20 steps, seed 0, drawn with --slide-context); at each probed step's timestep the slide's latents are noised
afresh and denoised once by a grid at a random offset. The gradient profile of x̂₀ across the patches (mean |Δ| over
channels and the other axis) is folded modulo the patch relative to that grid: printed is the step across a cut line
over the median step, for rows and columns and the trials (1.0: the cuts leave nothing).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from histosynth.models.bundle import load_bundle  # noqa: E402
from histosynth.pipelines.generate_slide import GenerateSettings, SlideGenerator  # noqa: E402
from histosynth.pipelines.masks import sample_mask  # noqa: E402
from histosynth.sampling.canvas import CanvasDenoiser, RandomOffsetGrid, X0Space  # noqa: E402
from histosynth.sampling.shared_norms import SharedGroupNorms  # noqa: E402

DEMO = ROOT / "histosynth" / "weights" / "demo"


class OneOffset(RandomOffsetGrid):
    """A grid at one given offset, whatever the step."""

    def __init__(self, patch: int, at: tuple[int, int]):
        super().__init__(patch)
        self.at = at

    def offset(self, step_index, working, output):
        return self.at


def cut_jump(estimate: np.ndarray, offset: tuple[int, int], patch: int) -> list[float]:
    """Gradient across the cut lines over the median gradient, rows then columns, of x̂₀ (C, h, w)."""
    ratios = []
    for axis, start in ((1, offset[0]), (2, offset[1])):
        profile = np.abs(np.diff(estimate, axis=axis)).mean(axis=tuple(a for a in (0, 1, 2) if a != axis))
        phase = (np.arange(len(profile)) + 1 - start) % patch  # 0: the difference across a cut line
        folded = np.array([profile[phase == j].mean() for j in range(patch)])
        ratios.append(float(folded[0] / np.median(folded)))
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--contexts", default="0,4,8")
    parser.add_argument("--probe-steps", default="3,7,11,15", help="of 20")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--slide-context", type=int, default=0, help="context the probed slide is drawn with")
    parser.add_argument("--pool-group-norms", action="store_true",
                        help="probe with group-norm statistics over all of a step's windows (--shared-norms all)")
    parser.add_argument("--shared-norms", type=int, default=0,
                        help="probe with the sampler's shared group norms over N of the step's windows")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_bundle(DEMO / "image", kind="image")
    patch = model.latent_patch
    mask, _ = sample_mask(load_bundle(DEMO / "mask", kind="mask"), args.size, args.size, steps=20, seed=0)
    settings = GenerateSettings(width=args.size, height=args.size, steps=20, seed=0, context=args.slide_context)
    generator = SlideGenerator(model, settings, mask, None, "cpu", False)
    clean = generator.sample_latents()
    denoiser, conditions = generator._conditioned_denoiser()
    scheduler = model.sampling_scheduler()
    scheduler.set_timesteps(20)
    space = X0Space.of(scheduler)
    rng = torch.Generator().manual_seed(1)
    sample = 10 ** 9 if args.pool_group_norms else args.shared_norms  # every window, or that many
    shared = SharedGroupNorms(model.unet, sample) if sample else None
    print("| step | timestep | " + " | ".join(f"context {c}" for c in args.contexts.split(",")) + " |")
    print("|---" * (2 + len(args.contexts.split(","))) + "|")
    for step in (int(v) for v in args.probe_steps.split(",")):
        t = scheduler.timesteps[step]
        a, s = space._coefficients(t)
        cells = []
        for context in (int(v) for v in args.contexts.split(",")):
            ratios = []
            for _ in range(args.trials):
                at = tuple(int(v) for v in torch.randint(0, patch, (2,), generator=rng))
                canvas = CanvasDenoiser(denoiser, OneOffset(patch, at), generator.latent_shape, conditions,
                                        context=context, micro_batch=8, shared_norms=shared)
                latents = torch.zeros((1, clean.shape[1], *canvas.working_shape))
                latents[:, :, :clean.shape[2], :clean.shape[3]] = clean
                noisy = a * latents + s * torch.randn(latents.shape, generator=rng)
                canvas.begin_step(step, t)
                with torch.no_grad():
                    output = canvas(scheduler.scale_model_input(noisy, t), t)
                ratios += cut_jump(space.to_x0(output, noisy, t)[0].numpy(), at, patch)
            cells.append(f"{np.mean(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})")
        print(f"| {step} | {int(t)} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
