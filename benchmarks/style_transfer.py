"""Style transfer on the two bundled stains: a tiny model trained on both slides renders the same masks in the stain
of whichever slide its style set comes from.

    python benchmarks/style_transfer.py [--seeds 0,1,2] [--vae-steps 400] [--steps 1500] [--threads 1]

For each seed: prepare both bundled images at 1 µm/px in 32 px patches (48 training patches of each slide), train the
tiny autoencoder and a tiny style-conditioned image model (style sets of 4 nearby crops, style dropout 0.2), then
sample 32 patches per style (the same 8 masks, 4 from each slide; style guidance 3, DPM-Solver++ 15 steps) from 8
crops of either slide, and measure HED stain statistics of the outputs against (a) 32 real crops of each slide and
(b) the same crops passed through the model's autoencoder. The criterion is (a): each style's outputs are nearer the
real crops of their own slide. Prints every distance (×1e-4) per seed and the share of seeds where each comparison
holds, and writes style_transfer.json to --out. About 2 min per seed on one core.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

MPP, PATCH = 1.0, 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    parser.add_argument("--vae-steps", type=int, default=400)
    parser.add_argument("--steps", type=int, default=1500, help="image-model training steps")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.995)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (pinned)")
    parser.add_argument("--out", default=None, help="work folder (models, style_transfer.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from PIL import Image

    from histosynth.conditions.style import build_style_encoder
    from histosynth.data.crops import SlideCrops
    from histosynth.pipelines.conditions import style_vector
    from histosynth.train.sources import StyleSource
    from histosynth.data.prepare import prepare_dataset
    from histosynth.data.samples import png_path, svs_path
    from histosynth.eval.style import stain_distance, stain_statistics
    from histosynth.pixels import from_uint8, to_uint8
    from histosynth.models.autoencoder import reconstruct
    from histosynth.models.bundle import load_bundle
    from histosynth.pipelines.sample_patches import sample_images
    from histosynth.train.run import train_autoencoder, train_image
    from histosynth.train.trainer import TrainConfig

    def crops(which: str, n: int, seed: int) -> list[np.ndarray]:
        slide = SlideCrops(svs_path(), None, MPP) if which == "skin" else SlideCrops(png_path(), 0.25, MPP)
        return slide.random_tissue_crops(n, PATCH, np.random.default_rng(seed))

    def reconstructed(bundle, images: list[np.ndarray]) -> list[np.ndarray]:
        return list(to_uint8(reconstruct(bundle.autoencoder, from_uint8(np.stack(images)))))

    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="style-transfer-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    if not (data / "dataset.json").exists():
        prepare_dataset([svs_path(), png_path()], data, MPP, PATCH, source_mpp=0.25, auto_labels_=True,
                        test_fraction=0, val_fraction=0, holdout_fraction=0, progress=False)
        # Balance the two slides (the skin slide has ten times more tissue): keep 48 training patches of each.
        index = json.loads((data / "dataset.json").read_text())
        rng = np.random.default_rng(0)
        skin = set(rng.permutation([i for i, p in enumerate(index["patches"]) if p["source"] == 0])[:48].tolist())
        index["patches"] = [p for i, p in enumerate(index["patches"]) if p["source"] == 1 or i in skin]
        (data / "dataset.json").write_text(json.dumps(index))
    index = json.loads((data / "dataset.json").read_text())
    real = {name: crops(name, 32, 2) for name in ("skin", "tumour")}
    # The same masks for both styles: four from each slide, so neither stain is implied by the layout.
    masks = [np.asarray(Image.open(data / p["mask"])) for slide in (0, 1)
             for p in [q for q in index["patches"] if q["source"] == slide and q["mask"]][:4]]

    runs = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        began = time.perf_counter()
        folder = work / f"seed-{seed}"
        autoencoder = train_autoencoder(str(data), str(folder / "vae"), "tiny", config=TrainConfig(
            steps=args.vae_steps, batch_size=16, learning_rate=3e-3, warmup_steps=10, ema_decay=0,
            checkpoint_every=0, seed=seed))
        encoder = build_style_encoder("small", 32, "mean", 4, seed=seed, channels=(16, 32))
        source = StyleSource(data, encoder, "nearby", set_size=4, dropout=0.2)
        model = train_image(str(data), str(folder / "model"), str(autoencoder), "tiny", sources=[source],
                            config=TrainConfig(steps=args.steps, batch_size=16, learning_rate=args.learning_rate,
                                               warmup_steps=10, ema_decay=args.ema, checkpoint_every=0, seed=seed))
        bundle = load_bundle(model)
        through_autoencoder = {name: stain_statistics(reconstructed(bundle, images)) for name, images in real.items()}
        distances = {}
        for name in ("skin", "tumour"):
            style = style_vector(bundle, crops(name, 8, 1))
            images = np.concatenate([sample_images(bundle, mask, n=4, steps=15, scheduler="dpm++", seed=k,
                                                   style=style, style_guidance=3.0)
                                     for k, mask in enumerate(masks)])  # (32, P, P, 3)
            stats = stain_statistics(list(images))
            distances[name] = {f"real {target}": stain_distance(stats, stain_statistics(real[target]))
                               for target in real}
            distances[name] |= {f"autoencoded {target}": stain_distance(stats, through_autoencoder[target])
                                for target in real}
        checks = {
            "own slide nearer (real crops)": distances["skin"]["real skin"] < distances["skin"]["real tumour"]
            and distances["tumour"]["real tumour"] < distances["tumour"]["real skin"],
            "own slide nearer (autoencoded crops)":
                distances["skin"]["autoencoded skin"] < distances["skin"]["autoencoded tumour"]
                and distances["tumour"]["autoencoded tumour"] < distances["tumour"]["autoencoded skin"],
            "own style nearer than the other style":
                distances["skin"]["real skin"] < distances["tumour"]["real skin"]
                and distances["tumour"]["real tumour"] < distances["skin"]["real tumour"],
        }
        runs.append({"seed": seed, "seconds": round(time.perf_counter() - began, 1), "distances": distances,
                     "checks": checks})
        print(f"seed {seed} ({runs[-1]['seconds']:.0f} s), stain distances x1e4 (to skin, to tumour):", flush=True)
        for name, row in distances.items():
            print(f"  {name}-style  real {row['real skin'] * 1e4:6.1f} {row['real tumour'] * 1e4:6.1f}   "
                  f"autoencoded {row['autoencoded skin'] * 1e4:6.1f} {row['autoencoded tumour'] * 1e4:6.1f}")
        print("  " + "; ".join(f"{k}: {'yes' if v else 'no'}" for k, v in checks.items()), flush=True)

    print(f"\n{len(runs)} seeds:")
    for check in runs[0]["checks"]:
        print(f"  {check}: {sum(r['checks'][check] for r in runs)} of {len(runs)}")
    for name, own, other in (("skin", "real skin", "real tumour"), ("tumour", "real tumour", "real skin")):
        margin = np.array([r["distances"][name][other] - r["distances"][name][own] for r in runs]) * 1e4
        print(f"  {name}-style margin (other slide − own slide) x1e4: {margin.mean():.1f} ± {margin.std():.1f}"
              f" (min {margin.min():.1f})")
    (work / "style_transfer.json").write_text(json.dumps({"settings": vars(args), "runs": runs}, indent=1))
    print(f"written: {work / 'style_transfer.json'}")


if __name__ == "__main__":
    main()
