"""Specks in the background and off-palette colour, with and without shared group-norm statistics.

    python benchmarks/background_debris.py [--size 1024] [--seeds 0,1] [--shared-norms 0,16] [--threads 2]
                                           [--save-dir DIR]

The demo models draw a layout per seed (the mask model, 20 steps) and the image model a slide that follows it (20
steps, default sampler and context), once per --shared-norms value, decoded without JPEG. Printed per slide:
- stained background: the share of pixels under the layout's background class that carry stain (HSV saturation
  > 0.15 or value < 0.75) — specks of debris where the layout asks for glass;
- teal: the share of all pixels whose hue lies at 150–210° with saturation > 0.15, a colour H&E does not make;
- periodicity at the patch (eval/seams.py), 128 px.
Beside them, the same on the bundled real slide under its own region labels (the layouts' kind of label).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage.color import rgb2hsv

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from histosynth.data.samples import svs_path  # noqa: E402
from histosynth.data.slides import open_slide  # noqa: E402
from histosynth.eval.seams import periodicity_score  # noqa: E402
from histosynth.models.autoencoder import decode_latents  # noqa: E402
from histosynth.models.bundle import load_bundle  # noqa: E402
from histosynth.pipelines.demo import real_labels  # noqa: E402
from histosynth.pipelines.generate_slide import GenerateSettings, SlideGenerator  # noqa: E402
from histosynth.pipelines.masks import sample_mask  # noqa: E402
from histosynth.sampling.decode import decode_full  # noqa: E402

DEMO = ROOT / "histosynth" / "weights" / "demo"


def colour_measures(rgb: np.ndarray, labels: np.ndarray, background: int) -> tuple[float, float]:
    """(stained share of the background class's pixels, teal share of all pixels) of ``rgb`` (H, W, 3) uint8."""
    hsv = rgb2hsv(rgb)
    stained = (hsv[..., 1] > 0.15) | (hsv[..., 2] < 0.75)
    glass = labels == background
    hue = hsv[..., 0] * 360
    teal = (hue >= 150) & (hue <= 210) & (hsv[..., 1] > 0.15)
    return float(stained[glass].mean()) if glass.any() else float("nan"), float(teal.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--shared-norms", default="0,16", help="values of generate --shared-norms to compare")
    parser.add_argument("--save-dir", type=Path, default=None, help="also write each slide as PNG here")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_bundle(DEMO / "image", kind="image")
    mask_model = load_bundle(DEMO / "mask", kind="mask")
    background = next(c["id"] for c in model.config["classes"] if c["name"] == "background")
    patch_px = model.config["patch_size"]

    rgb, labels = real_labels(open_slide(svs_path()), model.config["mpp"], model.config["classes"])
    stained, teal = colour_measures(rgb[:labels.shape[0], :labels.shape[1]], labels, background)
    print(f"real slide under its region labels: stained background {stained:.3f}, teal {teal:.4f}")
    print("| seed | shared norms | stained background | teal | periodicity | seconds |")
    print("|---|---|---|---|---|---|")
    for seed in (int(v) for v in args.seeds.split(",")):
        mask, _ = sample_mask(mask_model, args.size, args.size, steps=20, seed=seed)
        for shared in (int(v) for v in args.shared_norms.split(",")):
            began = time.perf_counter()
            settings = GenerateSettings(width=args.size, height=args.size, steps=20, seed=seed, shared_norms=shared)
            latents = SlideGenerator(model, settings, mask, None, "cpu", False).sample_latents()
            with torch.no_grad():
                image = decode_full(lambda z: decode_latents(model.autoencoder, z), latents, model.latent_factor)
            stained, teal = colour_measures(image, mask, background)
            print(f"| {seed} | {shared} | {stained:.3f} | {teal:.4f} | {periodicity_score(image, patch_px):.2f} | "
                  f"{time.perf_counter() - began:.0f} |", flush=True)
            if args.save_dir is not None:
                args.save_dir.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(args.save_dir / f"seed{seed}_shared{shared}.png")


if __name__ == "__main__":
    main()
