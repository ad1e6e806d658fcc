"""Does a mask model take its layouts' class fractions from the starting noise?

    python benchmarks/layout_noise_mean.py [--mask-model DIR] [--data demo-data/dataset] [--seeds 0,1,2]
                                           [--steps 25] [--threads 2]

A diffusion schedule whose last timestep keeps some signal (the default: √ᾱ = 0.068 at t = 999, and samplers start
at t ≈ 950, √ᾱ = 0.09) trains the model to read what that signal shows best: each channel's mean over a patch,
which for a one-hot layout (×2 − 1) is its class fraction. Sampling starts from pure noise, whose channel means are
0 — a layout half of every class, which no training crop is — and the model reads its fractions from that. This
script draws the same seeds' layouts twice, from the plain starting noise and from the noise with the training
crops' mean layout added at the first step's signal level (what the model saw at that step in training, on
average), and prints the layout statistics of `evaluate-layouts` for both, against the real crops. A model that
takes its fractions from the noise changes with the shift; a model trained with `train mask --zero-terminal-snr`
starts where the signal is 0, so the shift is 0 and nothing changes.

Printed per seed and start: the signal level, the ten statistics' relative differences (boundary; class fractions;
median region; regions per mm², each background / stroma / cellular), how many are within 25 %, and the class
fractions.
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

import histosynth.pipelines.masks as masks  # noqa: E402
from histosynth.data.dataset import LabelmapCrops, load_dataset_index  # noqa: E402
from histosynth.eval.layouts import TOLERANCE, layout_statistics, relative_differences  # noqa: E402
from histosynth.models.bundle import load_bundle  # noqa: E402
from histosynth.pipelines.evaluate_layouts import generated_layout_crops, real_layout_crops  # noqa: E402

CROPS = 32  # as `evaluate-layouts -n 32`: 32 crops of the model's patch, cut from a 6 × 6 patch canvas


def mean_layout(data: Path, crop: int, downsample: int, classes: int, n: int = 2000) -> torch.Tensor:
    """The training crops' mean one-hot (×2 − 1) per class, (1, K, 1, 1): what the model saw on average."""
    crops = LabelmapCrops(data, crop, split="train", length=n, seed=123, downsample=downsample)
    counts = np.zeros(classes)
    for i in range(n):
        labels = crops[i]["mask"].numpy()
        counts += [(labels == k).sum() for k in range(1, classes + 1)]
    return torch.tensor(counts / counts.sum() * 2 - 1, dtype=torch.float32).view(1, classes, 1, 1)


def flat_differences(stats: dict, real: dict) -> list[float]:
    differences = relative_differences(stats, real)
    return [differences["boundary_um_per_mm2"]] + [value for key in ("class_fractions", "component_um2",
                                                                     "components_per_mm2")
                                                   for _, value in sorted(differences[key].items())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mask-model", default=str(ROOT / "histosynth" / "weights" / "demo" / "mask"))
    parser.add_argument("--data", default=str(ROOT / "demo-data" / "dataset"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = load_bundle(args.mask_model, kind="mask")
    classes, crop = model.num_classes, model.latent_patch
    labelmap_mpp = float(load_dataset_index(args.data)["sources"][0]["labelmap_mpp"])
    mask_mpp = float(model.config["mask_mpp"])
    downsample = round(mask_mpp / labelmap_mpp)
    real = layout_statistics(real_layout_crops(args.data, crop, CROPS, "train", downsample, 0), classes, mask_mpp)
    mean = mean_layout(Path(args.data), crop, downsample, classes)
    scheduler = model.sampling_scheduler()
    scheduler.set_timesteps(args.steps)
    first = int(scheduler.timesteps[0])
    signal = float(scheduler.alphas_cumprod[first]) ** 0.5
    print(f"{args.mask_model}: first timestep {first}, signal √ᾱ = {signal:.4f}; training crops' class fractions "
          + " / ".join(f"{(v + 1) / 2:.3f}" for v in mean.flatten().tolist()), flush=True)

    plain_noise = masks.canvas_noise

    def shifted_noise(layout, channels, shape, generator, device="cpu"):
        noise = plain_noise(layout, channels, shape, generator, device)
        return noise.mul_((1 - signal ** 2) ** 0.5).add_(mean.to(noise.device) * signal)

    for start, noise in (("plain noise", plain_noise), ("noise + mean layout", shifted_noise)):
        masks.canvas_noise = noise
        within = []
        for seed in [int(s) for s in args.seeds.split(",")]:
            began = time.time()
            generated = generated_layout_crops(model, crop, CROPS, args.steps, seed)  # draws with masks.canvas_noise
            stats = layout_statistics(generated, classes, mask_mpp)
            differences = flat_differences(stats, real)
            within.append(sum(abs(d) <= TOLERANCE for d in differences))
            print(f"{start:>20}  seed {seed}: {within[-1]}/10 within  "
                  + " ".join(f"{d:.2f}" for d in differences) + "  fractions "
                  + " / ".join(f"{v:.3f}" for _, v in sorted(stats["class_fractions"].items()))
                  + f"  ({time.time() - began:.0f} s)", flush=True)
        print(f"{start:>20}  mean within: {np.mean(within):.1f}/10", flush=True)
    masks.canvas_noise = plain_noise


if __name__ == "__main__":
    main()
