"""Downstream classification benchmark: print the (a) real / (b) real + synthetic / (c) synthetic table.

    python benchmarks/classification.py DATASET EXTRA [--variations] [--target dominant-class] [--labelled N]
                                        [--seeds 3] [--steps 300] [--backbone resnet18] [--out DIR]
    python benchmarks/classification.py DATASET --noise-control [--labelled N] ...

DATASET is a real dataset folder with labelled train and test splits; EXTRA a synthetic dataset folder (from
`histosynth synthesize`, labelled by its masks) or, with --variations, `histosynth vary` output folders of the real
training patches. On the bundled data with the demo models:

    histosynth prepare histosynth/data/samples/cmu_small_region.svs --out demo-data/dataset --mpp 0.5 --patch 128 \\
        --stride 64 --auto-labels --label-fraction 0.5 --seed 0
    histosynth synthesize --model histosynth/weights/demo/image --layouts demo-data/dataset -n 320 \\
        --out demo-data/synthetic
    python benchmarks/classification.py demo-data/dataset demo-data/synthetic

--noise-control is the negative control of the harness itself: EXTRA is replaced by uniform-noise images (as many
as the real training patches, labels cycling over the real classes). Noise must not help — (b) within the seed
spread of (a) — and a classifier trained on noise alone must sit near chance — (c) ≈ 1/classes; (c) far above
chance would mean real labels leak into arm (c).

Threads are pinned so timings and results are comparable between runs.
"""
from __future__ import annotations

import argparse
import time

import torch

from histosynth.eval.benchmark_reports import classification_text, write_classification_report
from histosynth.eval.classification import TARGETS, ClassifierConfig, classification_benchmark


def noise_folder(dataset: str, target: str) -> str:
    """A temporary labelled folder of uniform-noise images, one per real training patch, labels cycling over the
    real classes."""
    import csv
    import tempfile
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from histosynth.eval.classification import load_dataset_labelled

    real = load_dataset_labelled(dataset, "train", target)
    classes = sorted(set(real.labels))
    size = np.asarray(real.images[0]).shape[0]
    folder = Path(tempfile.mkdtemp(prefix="noise-control-"))
    rng = np.random.default_rng(12345)
    with open(folder / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "label"])
        for i in range(len(real)):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
            writer.writerow([f"{i:05d}.png", classes[i % len(classes)]])
    return str(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset")
    parser.add_argument("extra", nargs="?", default=None, help="synthetic dataset or variations folder")
    parser.add_argument("--noise-control", action="store_true", help="use uniform-noise images as EXTRA")
    parser.add_argument("--variations", action="store_true", help="EXTRA holds variations, not synthetic patches")
    parser.add_argument("--target", choices=TARGETS, default="dominant-class")
    parser.add_argument("--labelled", type=int, default=None, help="real labelled patches (default: all)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--external", default=None, help="extra labelled test folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (pinned)")
    parser.add_argument("--out", default=None, help="also write classification.json and report.html here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    config = ClassifierConfig(steps=args.steps, batch_size=args.batch_size, backbone=args.backbone,
                              device=args.device)
    if (args.extra is None) == (not args.noise_control):
        parser.error("give EXTRA or --noise-control")
    extra_path = noise_folder(args.dataset, args.target) if args.noise_control else args.extra
    extra = {"variations": extra_path} if args.variations else {"synthetic": extra_path}
    start = time.perf_counter()
    result = classification_benchmark(args.dataset, labelled=args.labelled, seeds=args.seeds, target=args.target,
                                      config=config, external=args.external, **extra)
    elapsed = time.perf_counter() - start
    print(classification_text(result))
    print(f"{elapsed:.0f} s with {args.threads} threads on {args.device}")
    if args.out:
        json_path, report_path = write_classification_report(result, args.out)
        print(f"wrote {json_path} and {report_path}")


if __name__ == "__main__":
    main()
