"""Few labels: do synthetic pairs from a generator that saw only n labelled patches help a segmenter trained on them?

    python benchmarks/few_labels.py DATASET --work DIR [--labelled 20] [--config configs/demo/image.yaml]
                                    [--image-steps 2500] [--pairs 320] [--seg-steps 200] [--seeds 3]

The fair form of `benchmarks/segmentation.py` with few labels: nothing downstream may have seen more than the n
labelled patches the real arm trains on. Stages, each skipped when its output is already in WORK (so a stopped run
continues):

1. WORK/data: DATASET with the masks of all but n (seeded) training patches dropped; the other splits keep theirs,
   the label maps are left out (they label the whole slide). Images are linked, not copied.
2. WORK/image: the image model trained on WORK/data from scratch with --config's recipe (its data and out
   replaced; --image-steps steps): the n masks steer, every other patch trains the null condition.
3. WORK/synthetic: --pairs pairs from that model, its layouts the n real masks flipped, rotated and deformed.
4. The segmentation table: real (the n patches) / real + synthetic / synthetic, on DATASET's test split.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent


def few_label_dataset(source: Path, out: Path, labelled: int, seed: int = 0) -> None:
    index = json.loads((source / "dataset.json").read_text())
    train = [i for i, p in enumerate(index["patches"]) if p["split"] == "train" and p.get("mask")]
    if labelled > len(train):
        raise SystemExit(f"{source}: {len(train)} labelled training patches, fewer than --labelled {labelled}")
    kept = set(np.random.default_rng(seed).choice(train, labelled, replace=False).tolist())
    for i in train:
        if i not in kept:
            index["patches"][i]["mask"] = None
    for entry in index["sources"]:
        entry["labelmap"] = None
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True)
    for folder in ("images", "masks"):
        (tmp / folder).symlink_to((source / folder).resolve())
    (tmp / "dataset.json").write_text(json.dumps(index, indent=1))
    os.replace(tmp, out)


def histosynth(*args: str, threads: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    subprocess.run([sys.executable, "-m", "histosynth", *args], check=True, env=env, cwd=ROOT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--labelled", type=int, default=20)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo" / "image.yaml")
    parser.add_argument("--image-steps", type=int, default=2500)
    parser.add_argument("--pairs", type=int, default=320)
    parser.add_argument("--seg-steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    data, image, synthetic = args.work / "data", args.work / "image", args.work / "synthetic"
    if not data.exists():
        few_label_dataset(args.dataset, data, args.labelled)
    if not image.exists():
        config = yaml.safe_load(args.config.read_text())
        config.update(data=str(data), out=str(image), steps=args.image_steps)
        config_path = args.work / "image.yaml"
        config_path.write_text(yaml.safe_dump(config))
        resume = ["--resume"] if (args.work / "image.train" / "checkpoints").exists() else []
        histosynth("train", "image", "--config", str(config_path), *resume, threads=args.threads)
    if not synthetic.exists():
        histosynth("synthesize", "--model", str(image), "--layouts", str(data), "-n", str(args.pairs),
                   "--out", str(synthetic), threads=args.threads)
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "segmentation.py"), str(data), str(synthetic),
                    "--labelled", str(args.labelled), "--steps", str(args.seg_steps), "--seeds", str(args.seeds),
                    "--threads", str(args.threads), "--out", str(args.work / "segmentation")], check=True)


if __name__ == "__main__":
    main()
