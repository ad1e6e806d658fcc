"""Where a slide's decoding time goes: one decoder tile of the image model's autoencoder, profiled.

    python benchmarks/decode_profile.py [--model M] [--repeats 5] [--threads 2]

`generate` decodes the latent canvas in tiles of 64 latent px, each with 8 px of overlap on every side (80² latent
px in, 320² px of RGB out at the bundled models' 4× latents; sampling/decode.py), one tile at a time, so a slide's
decoding is (H / 64)·(W / 64) such calls: 16,384 at 32768² px. This times one call as `generate` makes it (float32, or
bfloat16 autocast with `--precision bfloat16`),
prints the operators that take the time (torch.profiler, self CPU time), times cheap variants beside it (bfloat16
autocast, channels-last memory format) and says how far the bfloat16 tile is from the float32 one (PSNR over a
tile decoded from the latents of a bundled real H&E image), and multiplies the figures out to slides of 8192² and 32768² px.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from histosynth.data.slides import open_image  # noqa: E402
from histosynth.models.autoencoder import decode_latents, encode_latents  # noqa: E402
from histosynth.models.bundle import load_bundle  # noqa: E402

DEMO = ROOT / "histosynth" / "weights" / "demo"
REAL = ROOT / "histosynth" / "data" / "samples" / "he_tumour_region.png"  # bundled real H&E
TILE, OVERLAP = 64, 8  # decode_rows' defaults


def real_latents(vae, factor: int) -> torch.Tensor:
    """Latents (1, C, 80, 80) of a crop of the bundled real H&E image: what a decoder tile sees."""
    side = (TILE + 2 * OVERLAP) * factor
    rgb = np.asarray(open_image(REAL, "sample image").convert("RGB"))[:side, :side]
    if rgb.shape[:2] != (side, side):
        raise SystemExit(f"{REAL}: smaller than one {side}² px tile")
    images = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        return encode_latents(vae, images)


def seconds_per_tile(vae, latents: torch.Tensor, repeats: int, autocast: bool) -> float:
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with torch.no_grad(), context:
        decode_latents(vae, latents)  # warm-up: first-call allocations and kernel choice
        began = time.perf_counter()
        for _ in range(repeats):
            decode_latents(vae, latents)
    return (time.perf_counter() - began) / repeats


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two images in [-1, 1] on the 0–255 scale."""
    mse = float(((a.float() - b.float()) * 127.5).pow(2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(255 ** 2 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEMO / "image"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=10, help="operators listed")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_bundle(args.model, kind="image")
    vae, factor = model.autoencoder.eval(), model.latent_factor
    latents = real_latents(vae, factor)
    parameters = sum(p.numel() for p in vae.decoder.parameters())
    print(f"{args.model}: decoder {parameters / 1e6:.2f} M parameters, one tile = {latents.shape[-1]}² latent px "
          f"-> {latents.shape[-1] * factor}² px, {args.threads} threads")

    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        for _ in range(3):
            decode_latents(vae, latents)
    table = profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top)
    print("\noperators by self CPU time (3 tiles, float32):\n" + table)

    with torch.no_grad():
        reference = decode_latents(vae, latents)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            approximate = decode_latents(vae, latents).float()
    variants = {"float32 (generate's default)": seconds_per_tile(vae, latents, args.repeats, False),
                "bfloat16 autocast (generate --precision bfloat16)": seconds_per_tile(vae, latents, args.repeats,
                                                                                      True)}
    vae.to(memory_format=torch.channels_last)
    channels_last = latents.contiguous(memory_format=torch.channels_last)
    variants["float32, channels-last"] = seconds_per_tile(vae, channels_last, args.repeats, False)
    variants["bfloat16 autocast, channels-last"] = seconds_per_tile(vae, channels_last, args.repeats, True)
    with torch.no_grad():
        channels_last_difference = float((decode_latents(vae, channels_last) - reference).abs().max() * 127.5)
    base = variants["float32 (generate's default)"]
    tiles = {size: math.ceil(size / factor / TILE) ** 2 for size in (8192, 32768)}
    print("| variant | s per tile | relative | 8192² px | 32768² px |")
    print("|---|---|---|---|---|")
    for name, seconds in variants.items():
        print(f"| {name} | {seconds:.3f} | {base / seconds:.2f}× | {seconds * tiles[8192] / 60:.1f} min | "
              f"{seconds * tiles[32768] / 3600:.2f} h |")
    print(f"\nbfloat16 tile against the float32 tile: PSNR {psnr(approximate, reference):.1f} dB "
          f"(largest difference {float((approximate - reference).abs().max() * 127.5):.1f} grey levels)")
    print(f"float32 channels-last tile against the float32 tile: largest difference {channels_last_difference:.3f} "
          "grey levels")
    print(f"tiles: {tiles[8192]:,} at 8192² px, {tiles[32768]:,} at 32768² px; each decodes "
          f"{((TILE + 2 * OVERLAP) / TILE) ** 2:.2f}× its own area (the overlaps)")


if __name__ == "__main__":
    main()
