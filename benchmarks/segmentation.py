"""Downstream segmentation benchmark: print the (a) real / (b) real + synthetic / (c) synthetic table.

    python benchmarks/segmentation.py DATASET SYNTHETIC [--labelled N] [--seeds 3] [--steps 300] [--out DIR]

DATASET is a real dataset folder with labelled train and test splits, SYNTHETIC a dataset folder of generated
image/mask pairs (design.md §5). Threads are pinned so timings and results are comparable between runs.
"""
from __future__ import annotations

import argparse
import time

import torch

from histosynth.eval.benchmark_reports import segmentation_text, write_segmentation_report
from histosynth.eval.segmentation import SEGMENTER_SIZES, TrainConfig, segmentation_benchmark


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset")
    parser.add_argument("synthetic")
    parser.add_argument("--labelled", type=int, default=None, help="real labelled patches (default: all)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", choices=sorted(SEGMENTER_SIZES), default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (pinned)")
    parser.add_argument("--out", default=None, help="also write segmentation.json and report.html here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, size=args.size, device=args.device)
    start = time.perf_counter()
    result = segmentation_benchmark(args.dataset, args.synthetic, labelled=args.labelled, seeds=args.seeds,
                                    config=config)
    elapsed = time.perf_counter() - start
    print(segmentation_text(result))
    print(f"{elapsed:.0f} s with {args.threads} threads on {args.device}")
    if args.out:
        json_path, report_path = write_segmentation_report(result, args.out)
        print(f"wrote {json_path} and {report_path}")


if __name__ == "__main__":
    main()
