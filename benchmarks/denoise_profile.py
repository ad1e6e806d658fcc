"""Where a canvas's denoising time goes: one micro-batch of patch evaluations of the image model, profiled.

    python benchmarks/denoise_profile.py [--model M] [--batch 8] [--guidance 1.5] [--repeats 10] [--threads 2]

Denoising is nearly all of a large slide's time (design.md §2: the canvas costs ~1.06 patch evaluations per latent
patch per step), and each call is the guided denoiser on a micro-batch of `--batch` patches — with guidance, twice
that many UNet items. This times such calls as `generate` makes them (float32), prints the operators that take the
time (torch.profiler, self CPU time), and times two cheap variants beside them for what they would save: bfloat16
autocast (on CPUs with AVX-512 BF16 or AMX) and channels-last memory format. The figures per patch evaluation
multiply out to a slide: UNet evaluations (in every `generate` stats file) × ms per evaluation.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from histosynth.models.bundle import load_bundle  # noqa: E402
from histosynth.models.denoiser import at_precision  # noqa: E402
from histosynth.sampling.guidance import guided  # noqa: E402

DEMO = ROOT / "histosynth" / "weights" / "demo"


def micro_batch(model, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Noisy latents, a mid-trajectory timestep and a random one-hot layout, shaped as the canvas passes them."""
    side = model.latent_patch
    channels = model.unet.config.out_channels
    latents = torch.randn(batch, channels, side, side, generator=generator)
    conditions = {}
    if model.num_classes and model.config.get("conditioning", {}).get("mask"):
        ids = torch.randint(0, model.num_classes, (batch, side, side), generator=generator)
        conditions["mask"] = torch.nn.functional.one_hot(ids, model.num_classes).permute(0, 3, 1, 2).float()
    return latents, torch.tensor(500), conditions


def seconds_per_call(denoiser, inputs, repeats: int, autocast: bool) -> float:
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with torch.no_grad(), context:
        denoiser(*inputs)  # warm-up: first-call allocations and kernel choice
        began = time.perf_counter()
        for _ in range(repeats):
            denoiser(*inputs)
    return (time.perf_counter() - began) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEMO / "image"))
    parser.add_argument("--batch", type=int, default=8, help="patches per call (generate --batch)")
    parser.add_argument("--guidance", type=float, default=1.5, help="mask guidance scale (1: one pass)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=12, help="operators listed")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_bundle(args.model, kind="image")
    denoiser = guided(model.denoiser(), {"mask": args.guidance})
    passes = getattr(denoiser, "passes", 1)
    inputs = micro_batch(model, args.batch, torch.Generator().manual_seed(0))
    parameters = sum(p.numel() for p in model.unet.parameters())
    print(f"{args.model}: UNet {parameters / 1e6:.2f} M parameters, {model.latent_patch}² latent patches, "
          f"{args.batch} patches × {passes} passes per call, {args.threads} threads")

    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.no_grad(), torch.profiler.profile(activities=activities) as profile:
        for _ in range(3):
            denoiser(*inputs)
    table = profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top)
    print("\noperators by self CPU time (3 calls, float32):\n" + table)

    print("| variant | ms per call | ms per patch evaluation | relative |")
    print("|---|---|---|---|")
    base = seconds_per_call(denoiser, inputs, args.repeats, autocast=False)
    rows = [("float32 (what generate runs)", base)]
    reduced = guided(at_precision(model.denoiser(), "bfloat16"), {"mask": args.guidance})
    rows.append(("bfloat16 autocast (--precision bfloat16)",
                 seconds_per_call(reduced, inputs, args.repeats, autocast=False)))
    model.unet.to(memory_format=torch.channels_last)  # in place: every row below runs channels-last
    rows.append(("float32, channels-last", seconds_per_call(denoiser, inputs, args.repeats, autocast=False)))
    rows.append(("bfloat16 autocast, channels-last", seconds_per_call(reduced, inputs, args.repeats, autocast=False)))
    for name, seconds in rows:
        per_eval = seconds / (args.batch * passes) * 1000
        print(f"| {name} | {seconds * 1000:.0f} | {per_eval:.2f} | {base / seconds:.2f}× |")


if __name__ == "__main__":
    main()
