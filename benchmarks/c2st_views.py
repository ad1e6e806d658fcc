"""What the realism classifier uses: the classifier two-sample test of benchmarks/realism.py on views of the patches
that remove one kind of difference at a time.

    python benchmarks/c2st_views.py SLIDE.tiff DATASET [--views grey,lab-moments,lab-histogram,stain-histogram]
                                    [--n 200] [--c2st-steps 300] [--seed 0] [--threads 1] [--picture PNG]

Generated patches are the tissue crops of realism.py; real held-out patches the dataset's test split. Views:
- ``grey``: the channel mean of every patch (texture and shape without colour), generated vs test beside train vs
  test in grey — the reference;
- ``lab-moments``: the generated crops with each CIELAB channel shifted and scaled to the train patches' mean and
  spread (a Reinhard-style colour transfer);
- ``lab-histogram``: each CIELAB channel's histogram matched to the train patches' (scikit-image
  ``match_histograms``);
- ``stain-histogram``: the same in H&E-DAB stain concentrations (scikit-image ``rgb2hed``).
A palette-matched view that still scores high says the giveaway is not the palette but how colour sits on structure.
``--picture`` writes six crops of each set at full resolution: test patches, generated crops, then each
palette-matched view of the same generated crops, one row each.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from realism import generated_patches

VIEWS = ("grey", "lab-moments", "lab-histogram", "stain-histogram")


def palette_matched(generated: np.ndarray, train: np.ndarray, view: str) -> np.ndarray:
    """``generated`` (N, P, P, 3) uint8 with its colours matched to ``train``'s as ``view`` says."""
    from skimage.color import hed2rgb, lab2rgb, rgb2hed, rgb2lab
    from skimage.exposure import match_histograms

    forward, inverse = (rgb2hed, hed2rgb) if view == "stain-histogram" else (rgb2lab, lab2rgb)
    side = generated.shape[2]

    def to_space(images: np.ndarray) -> np.ndarray:  # all patches stacked as one tall image
        return forward(images.reshape(-1, side, 3) / 255.0)

    source, target = to_space(generated), to_space(train)
    if view == "lab-moments":
        flat_source, flat_target = source.reshape(-1, 3), target.reshape(-1, 3)
        matched = (source - flat_source.mean(0)) / flat_source.std(0) * flat_target.std(0) + flat_target.mean(0)
    else:
        matched = match_histograms(source, target, channel_axis=-1)
    rgb = np.clip(inverse(matched), 0, 1).reshape(generated.shape)
    return (rgb * 255).round().astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("slide", help="generated slide (pyramidal TIFF or PNG)")
    parser.add_argument("dataset", help="the real dataset (train and test splits)")
    parser.add_argument("--views", default=",".join(VIEWS), help=f"comma-separated, of {', '.join(VIEWS)}")
    parser.add_argument("--n", type=int, default=200, help="most generated patches to use")
    parser.add_argument("--c2st-steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (pinned)")
    parser.add_argument("--picture", default=None, help="PNG of six crops per row: test, generated, each view")
    args = parser.parse_args()
    views = [v for v in args.views.split(",") if v]
    unknown = sorted(set(views) - set(VIEWS))
    if unknown:
        parser.error(f"--views: unknown view(s) {', '.join(unknown)}; choose from {', '.join(VIEWS)}")
    torch.set_num_threads(args.threads)

    from histosynth.eval.c2st import C2STConfig, classifier_two_sample_test
    from histosynth.eval.features import open_images
    from histosynth.pixels import from_uint8

    train_set, test_set = open_images(args.dataset, split="train"), open_images(args.dataset, split="test")
    train = np.stack([train_set[i] for i in range(len(train_set))])  # (T, P, P, 3)
    test = np.stack([test_set[i] for i in range(len(test_set))])
    generated = generated_patches(args.slide, test.shape[1], args.n, args.seed)
    print(f"patches: generated {len(generated)}, real train {len(train)}, real test {len(test)}", flush=True)
    config = C2STConfig(steps=args.c2st_steps, seed=args.seed)

    def c2st(images: np.ndarray, grey: bool = False) -> str:
        a, b = torch.as_tensor(from_uint8(images)), torch.as_tensor(from_uint8(test))
        if grey:
            a, b = a.mean(1, keepdim=True), b.mean(1, keepdim=True)
        result = classifier_two_sample_test(a, b, config)
        return f"{result['accuracy_mean']:.3f} ± {result['accuracy_std']:.3f}"

    rows = [test[np.random.default_rng(1).permutation(len(test))[:6]], generated[:6]]
    for view in views:
        if view == "grey":
            print(f"grey: generated vs test {c2st(generated, grey=True)}, train vs test {c2st(train, grey=True)}",
                  flush=True)
        else:
            matched = palette_matched(generated, train, view)
            rows.append(matched[:6])
            print(f"{view}: palette-matched generated vs test {c2st(matched)}", flush=True)
    if args.picture:
        from PIL import Image

        Image.fromarray(np.concatenate([np.concatenate(list(row), 1) for row in rows], 0)).save(args.picture)
        print(f"wrote {args.picture}")


if __name__ == "__main__":
    main()
