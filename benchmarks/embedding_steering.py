"""Do samples follow the SSL embedding they are conditioned on? A tiny embedding-conditioned model trained on the
bundled skin slide, measured over seeds.

    python benchmarks/embedding_steering.py [--seeds 0,1,2] [--steps 200] [--n 32] [--threads 1]

For each seed: `prepare` the bundled skin slide in 32 px patches at 2 µm/px (weak labels, the default splits), train the tiny autoencoder (150 steps), the tiny SimCLR
encoder (30 steps), embed every patch (8 dihedral views) and train a tiny v-prediction image model conditioned on the
embeddings (condition dropout 0.5). Then, for --n test patches, sample one patch from each patch's embedding
(guidance 3, 20 steps) and count how often the sample's embedding is nearer its own reference patch than a random
other test patch (chance: 0.5). Prints the share per seed and mean ± std, and writes embedding_steering.json to --out.
About 40 s per seed on one core.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    parser.add_argument("--steps", type=int, default=200, help="image-model training steps")
    parser.add_argument("--n", type=int, default=32, help="test patches to sample from")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (pinned)")
    parser.add_argument("--out", default=None, help="work folder (models, embedding_steering.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from typer.testing import CliRunner

    from histosynth.cli import app
    from histosynth.conditions.embedding_cache import embed_dataset
    from histosynth.conditions.encoders import load_encoder
    from histosynth.data.dataset import PatchDataset
    from histosynth.data.prepare import prepare_dataset
    from histosynth.data.samples import svs_path
    from histosynth.models.bundle import load_bundle
    from histosynth.pipelines.sample_patches import sample_images
    from histosynth.pipelines.embedding_grids import condition_vector
    from histosynth.pixels import from_uint8
    from histosynth.train.run import train_autoencoder
    from histosynth.train.ssl import train_ssl
    from histosynth.train.trainer import TrainConfig

    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="embedding-steering-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    if not (data / "dataset.json").exists():
        prepare_dataset([svs_path()], data, 2.0, 32, auto_labels=True, progress=False)
    runs = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        began = time.perf_counter()
        root = work / f"seed-{seed}"
        quick = dict(checkpoint_every=0, warmup_steps=10, seed=seed)
        train_autoencoder(str(data), str(root / "vae"), "tiny",
                          config=TrainConfig(steps=150, batch_size=16, learning_rate=2e-3, **quick))
        train_ssl(str(data), str(root / "enc"), "tiny",
                  config=TrainConfig(steps=30, batch_size=32, learning_rate=1e-3, ema_decay=0, **quick))
        encoder = load_encoder(str(root / "enc"))
        embed_dataset(data, encoder, dihedral_views=True, force=True)
        result = CliRunner().invoke(app, [str(v) for v in [
            "train", "image", "--data", data, "--autoencoder", root / "vae", "--out", root / "model",
            "--embeddings", root / "enc", "--prediction-type", "v_prediction", "--condition-dropout", 0.5,
            "--steps", args.steps, "--batch-size", 16, "--learning-rate", 2e-3, "--checkpoint-every", 0,
            "--seed", seed]])
        if result.exit_code != 0:
            raise SystemExit(result.output)
        model = load_bundle(root / "model")
        test = PatchDataset(data, "test")
        with torch.no_grad():
            embeddings = encoder(torch.stack([test[i]["image"] for i in range(len(test))]))  # (N, D)
        g = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(len(test), generator=g)[:args.n]
        others = [(int(i) + 1 + int(torch.randint(0, len(test) - 1, (1,), generator=g))) % len(test) for i in chosen]
        images = sample_images(model, None, n=len(chosen), steps=20, seed=seed,
                               embedding=condition_vector(model, embeddings[chosen]),
                               embedding_guidance=args.guidance)
        with torch.no_grad():
            generated = encoder(from_uint8(images))
        closer = [bool((generated[n] - embeddings[i]).norm() < (generated[n] - embeddings[j]).norm())
                  for n, (i, j) in enumerate(zip(chosen.tolist(), others))]
        share = sum(closer) / len(closer)
        runs.append({"seed": seed, "n": len(closer), "nearer_own": share,
                     "seconds": round(time.perf_counter() - began, 1)})
        print(f"seed {seed}: {sum(closer)} of {len(closer)} samples nearer their own reference ({share:.2f}; "
              f"chance 0.5), {runs[-1]['seconds']:.0f} s", flush=True)
    shares = np.array([r["nearer_own"] for r in runs])
    print(f"{len(runs)} seeds: nearer own reference {shares.mean():.2f} ± {shares.std():.2f} "
          f"(min {shares.min():.2f}, chance 0.50)")
    (work / "embedding_steering.json").write_text(json.dumps({"settings": vars(args), "runs": runs}, indent=1))
    print(f"written: {work / 'embedding_steering.json'}")


if __name__ == "__main__":
    main()
