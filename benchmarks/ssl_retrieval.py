"""SSL retrieval benchmark: top-1 retrieval of held-out patches from strongly augmented views, histosynth's SimCLR
encoder against the same architecture with random weights.

    python benchmarks/ssl_retrieval.py [--data DATASET] [--encoder ENCODER] [--steps 1200] [--n 200] [--out DIR]

Without --data the bundled demo images are cut into 64 px patches at 0.5 µm/px; without --encoder one is trained
with `train ssl` settings (--preset, --steps, --batch-size, --image-size). Queries are one strongly augmented view of each of
--n patches (random resized crop, flips and 90° rotations, colour jitter, grey-scale, blur: the SimCLR family, drawn
from its own seed), the gallery is the --n originals, and a hit is a query whose nearest gallery embedding (cosine)
is its own original. Patches come from the splits the encoder never trained on (test, val, holdout) when there are
enough. Torch threads are pinned.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def top1(encoder, gallery: torch.Tensor, queries: torch.Tensor) -> float:
    """Share of queries whose most similar gallery image (cosine) is their own original."""
    g = F.normalize(encoder(gallery), dim=1)  # (N, D)
    q = F.normalize(encoder(queries), dim=1)  # (N, D)
    return float(((q @ g.T).argmax(1) == torch.arange(len(q))).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="dataset folder (default: prepare the bundled images)")
    parser.add_argument("--encoder", default=None, help="a trained encoder folder (default: train one here)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--image-size", type=int, default=32, help="encoder input px (0: the patch size)")
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--n", type=int, default=200, help="patches to retrieve")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (pinned)")
    parser.add_argument("--out", default=None, help="work folder (dataset, encoder, ssl_retrieval.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from histosynth.conditions.encoders import Encoder, SSLEncoder, load_encoder
    from histosynth.data.dataset import PatchDataset, load_dataset_index
    from histosynth.data.prepare import prepare_dataset
    from histosynth.data.samples import png_path, svs_path
    from histosynth.train.ssl import augment_view, train_ssl
    from histosynth.train.trainer import TrainConfig

    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="ssl-retrieval-"))
    work.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else work / "dataset"
    if not args.data and not (data / "dataset.json").exists():
        prepare_dataset([svs_path(), png_path()], data, mpp=0.5, patch=64, source_mpp=0.25, progress=False)
    began = time.perf_counter()
    encoder_path = Path(args.encoder) if args.encoder else \
        work / f"encoder-{args.preset}-{args.steps}-{args.batch_size}-{args.image_size or 'p'}"
    if not encoder_path.exists():
        train_ssl(str(data), str(encoder_path), args.preset, args.image_size or None, args.temperature,
                  config=TrainConfig(steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                                     warmup_steps=50, ema_decay=0.0, checkpoint_every=0, seed=args.seed))
    train_seconds = time.perf_counter() - began
    saved = encoder_path / "histosynth.json"
    if saved.exists():  # an encoder trained earlier (or here): its own training time
        train_seconds = json.loads(saved.read_text()).get("training", {}).get("seconds", train_seconds)
    trained = load_encoder(str(encoder_path))
    torch.manual_seed(args.seed)
    network = SSLEncoder(**{k: v for k, v in trained.network.config.items() if not k.startswith("_")}).eval()
    random = Encoder("random", network, trained.dim, trained.input_size, trained.mean, trained.std, "", "cpu")

    index = load_dataset_index(data)
    held_out = [s for s in ("test", "val", "holdout") if any(p["split"] == s for p in index["patches"])]
    pool = [(split, i) for split in held_out for i in range(len(PatchDataset(data, split)))]
    if len(pool) < args.n:
        pool = [("train", i) for i in range(len(PatchDataset(data, "train")))] + pool
    g = torch.Generator().manual_seed(args.seed + 1)
    picked = [pool[i] for i in torch.randperm(len(pool), generator=g)[: args.n].tolist()]
    sets = {split: PatchDataset(data, split) for split in {s for s, _ in picked}}
    gallery = torch.stack([sets[s][i]["image"] for s, i in picked])  # (N, 3, P, P) in [-1, 1]
    views = torch.stack([augment_view((image + 1) / 2, torch.Generator().manual_seed(10_000 + n), image.shape[-1])
                         for n, image in enumerate(gallery)]) * 2 - 1  # (N, 3, P, P)

    result = {"patches": len(gallery), "splits": sorted(sets), "encoder": str(encoder_path), "dim": trained.dim,
              "ssl_steps": args.steps, "train_seconds": round(train_seconds, 1), "threads": args.threads,
              "top1_trained": round(top1(trained, gallery, views), 4),
              "top1_random": round(top1(random, gallery, views), 4)}
    result["difference_points"] = round(100 * (result["top1_trained"] - result["top1_random"]), 1)
    (work / "ssl_retrieval.json").write_text(json.dumps(result, indent=2))
    print(f"top-1 retrieval of {result['patches']} patches ({', '.join(result['splits'])}) from strongly augmented "
          f"views, {trained.dim}-d embeddings:")
    print(f"  SimCLR encoder ({args.steps} steps, {result['train_seconds']} s): {100 * result['top1_trained']:.1f} %")
    print(f"  same architecture, random weights: {100 * result['top1_random']:.1f} %")
    print(f"  difference: {result['difference_points']:+.1f} points ({args.threads} torch thread(s))")


if __name__ == "__main__":
    main()
