"""Is the generated slide tissue? Realism of a generated slide against held-out real patches, with no downloaded
weights: a classifier two-sample test and FID/KID in the feature space of an SSL encoder trained on the real data.

    python benchmarks/realism.py SLIDE.tiff DATASET [--encoder ENC] [--ssl-steps 1500] [--ssl-size PX] [--n 200]
                                 [--autoencoder AE] [--out DIR]

SLIDE is a generated slide (e.g. `make demo` writes demo-output/slide.tiff), DATASET the real dataset its models were
trained on (`make demo-weights` prepares demo-data/dataset). Generated patches are non-overlapping crops of the
dataset's patch size from the slide's level 0 that are at least half tissue (the tissue rule of `prepare`); real
held-out patches are the dataset's test split, the reference is its train split against the same test split.

Prints: C2ST accuracy (mean ± std over 5 folds; 0.5 = indistinguishable) generated-vs-test beside train-vs-test;
FID and KID in the SSL space (generated-vs-test, train-vs-test, and their ratio); the same FID in the stain-texture
space; the high-frequency energy ratio (sharpness) of generated and train patches over test. With --autoencoder
(the image model's), also the same C2ST and sharpness for the autoencoder's reconstructions of the train patches:
what the decoder alone gives away, the floor no image model on that autoencoder can go under. Without --encoder a
SimCLR encoder is trained on the dataset first (`histosynth train ssl`, --ssl-steps). Threads are pinned.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def generated_patches(slide: str, size: int, limit: int, seed: int) -> np.ndarray:
    """Up to ``limit`` non-overlapping ``size``² crops of the slide's level 0 that are at least half tissue."""
    import tifffile

    from histosynth.data.labels import auto_label_thresholds, tissue_pixels

    image = tifffile.imread(slide, level=0) if slide.endswith((".tif", ".tiff")) else None
    if image is None:
        from PIL import Image

        image = np.asarray(Image.open(slide).convert("RGB"))
    image = image[..., :3]
    tissue = tissue_pixels(image, auto_label_thresholds(image[::8, ::8])["saturation"])
    crops = [image[y:y + size, x:x + size] for y in range(0, image.shape[0] - size + 1, size)
             for x in range(0, image.shape[1] - size + 1, size) if tissue[y:y + size, x:x + size].mean() >= 0.5]
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(len(crops))[:limit]
    return np.stack([crops[i] for i in sorted(chosen)])  # (N, size, size, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("slide", help="generated slide (pyramidal TIFF or PNG)")
    parser.add_argument("dataset", help="the real dataset (train and test splits)")
    parser.add_argument("--encoder", default=None, help="SSL encoder folder (default: train one on the dataset)")
    parser.add_argument("--ssl-steps", type=int, default=1500)
    parser.add_argument("--ssl-size", type=int, default=None,
                        help="side the SSL encoder sees patches at (default: the patch size; half of it costs a quarter)")
    parser.add_argument("--n", type=int, default=200, help="most generated patches to use")
    parser.add_argument("--c2st-steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--autoencoder", default=None,
                        help="also test the autoencoder's reconstructions of the train patches against test")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (pinned)")
    parser.add_argument("--out", default=None, help="work folder (encoder, patches, realism.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from histosynth.eval import fidelity
    from histosynth.eval.c2st import C2STConfig, classifier_two_sample_test
    from histosynth.eval.features import build_feature_fn, open_images
    from histosynth.eval.sharpness import high_frequency_ratio
    from histosynth.models.autoencoder import reconstruct
    from histosynth.models.bundle import load_bundle
    from histosynth.pixels import from_uint8, to_uint8
    from histosynth.train.ssl import train_ssl
    from histosynth.train.trainer import TrainConfig

    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="realism-"))
    work.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    encoder = args.encoder
    if encoder is None:
        encoder = str(work / "ssl-encoder")
        if not Path(encoder).exists():
            train_ssl(args.dataset, encoder, "tiny", image_size=args.ssl_size, config=TrainConfig(
                steps=args.ssl_steps, batch_size=128, learning_rate=2e-3, ema_decay=0, checkpoint_every=0,
                warmup_steps=50, seed=args.seed))
    train_set, test_set = open_images(args.dataset, split="train"), open_images(args.dataset, split="test")
    train = np.stack([train_set[i] for i in range(len(train_set))])  # (T, P, P, 3)
    test = np.stack([test_set[i] for i in range(len(test_set))])
    generated = generated_patches(args.slide, test.shape[1], args.n, args.seed)
    print(f"patches: generated {len(generated)}, real train {len(train)}, real test {len(test)} "
          f"({test.shape[1]} px)", flush=True)

    results: dict = {"slide": args.slide, "dataset": args.dataset, "encoder": encoder,
                     "n_generated": len(generated), "n_train": len(train), "n_test": len(test)}
    config = C2STConfig(steps=args.c2st_steps, seed=args.seed)
    for name, images in (("generated", generated), ("train", train)):
        result = classifier_two_sample_test(from_uint8(images), from_uint8(test), config)
        results[f"c2st_{name}_vs_test"] = {k: result[k] for k in ("accuracy_mean", "accuracy_std", "n_per_set")}
        print(f"C2ST {name} vs test: {result['accuracy_mean']:.3f} ± {result['accuracy_std']:.3f} "
              f"({result['n_per_set']} per set)", flush=True)

    if args.autoencoder:
        vae = load_bundle(args.autoencoder).autoencoder.eval()
        reconstructed = to_uint8(reconstruct(vae, from_uint8(train)))  # (T, P, P, 3)
        result = classifier_two_sample_test(from_uint8(reconstructed), from_uint8(test), config)
        results["c2st_reconstructed_train_vs_test"] = {k: result[k] for k in ("accuracy_mean", "accuracy_std",
                                                                                "n_per_set")}
        results["hf_ratio_reconstructed_train"] = high_frequency_ratio(reconstructed, test)
        print(f"C2ST autoencoder-reconstructed train vs test: {result['accuracy_mean']:.3f} ± "
              f"{result['accuracy_std']:.3f}; high-frequency energy over test "
              f"{results['hf_ratio_reconstructed_train']:.3f}", flush=True)

    rng = np.random.default_rng(args.seed)
    train_ref = train[np.sort(rng.choice(len(train), min(len(train), len(generated)), replace=False))]
    for space, weights in (("ssl", encoder), ("stain-texture", None)):
        fn = build_feature_fn("embedding" if space == "ssl" else space, weights=weights)
        features = {name: np.concatenate([fn(images[i:i + 64]) for i in range(0, len(images), 64)])
                    for name, images in (("generated", generated), ("train", train_ref), ("test", test))}
        if space == "stain-texture":  # columns in different units: z-score on train, as `evaluate` does
            mean, std = features["train"].mean(0), features["train"].std(0)
            std[std == 0] = 1
            features = {k: (v - mean) / std for k, v in features.items()}
        fid, reference = fidelity.fid(features["generated"], features["test"]), fidelity.fid(features["train"],
                                                                                              features["test"])
        size = max(2, min(len(features["generated"]), len(features["test"]), len(features["train"])) // 2)
        kid, _ = fidelity.kid(features["generated"], features["test"], 100, size, args.seed)
        kid_reference, _ = fidelity.kid(features["train"], features["test"], 100, size, args.seed)
        results[f"fid_{space}"] = {"generated_vs_test": fid, "train_vs_test": reference, "ratio": fid / reference,
                                   "kid_generated_vs_test": kid, "kid_train_vs_test": kid_reference}
        print(f"FID ({space}): generated-vs-test {fid:.3f}, train-vs-test {reference:.3f}, ratio "
              f"{fid / reference:.2f}; KID {kid:.4f} vs {kid_reference:.4f}", flush=True)
    results["hf_ratio_generated"] = high_frequency_ratio(generated, test)
    results["hf_ratio_train"] = high_frequency_ratio(train, test)
    print(f"high-frequency energy over test: generated {results['hf_ratio_generated']:.3f}, "
          f"train {results['hf_ratio_train']:.3f}")
    results["seconds"] = round(time.perf_counter() - began, 1)
    (work / "realism.json").write_text(json.dumps(results, indent=1))
    print(f"written: {work / 'realism.json'} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
