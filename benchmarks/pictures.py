"""The README's pictures of what the models make, beside real tissue.

    python benchmarks/pictures.py DATASET [--slide demo-output/slide.tiff] [--model M] [--n 4] [--out docs/images]

Writes:
- ``side_by_side.png``: at full resolution, real test patches (top row), patches generated from their region masks
  (middle), patches generated without a layout — the null mask (bottom);
- ``overview_real_vs_generated.png``: the bundled real slide and a generated slide side by side at the same scale
  (--overview-mpp µm/px), when --slide is given.
Same seed, same pictures. Threads are pinned.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch


def grid(rows: list[list[np.ndarray]], gap: int = 4) -> np.ndarray:
    """Images (same size) laid out in rows with white gaps."""
    height, width = rows[0][0].shape[:2]
    columns = max(len(row) for row in rows)
    canvas = np.full((len(rows) * (height + gap) - gap, columns * (width + gap) - gap, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            canvas[r * (height + gap):r * (height + gap) + height, c * (width + gap):c * (width + gap) + width] = image
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", help="the real dataset (test patches with masks)")
    parser.add_argument("--model", default=None, help="image model (default: the bundled demo model)")
    parser.add_argument("--slide", default=None, help="a generated slide for the overview comparison")
    parser.add_argument("--n", type=int, default=4, help="patches per row")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=1.5)
    parser.add_argument("--overview-mpp", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (pinned)")
    parser.add_argument("--out", default="docs/images")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import tifffile
    from PIL import Image

    from histosynth.data.dataset import PatchDataset
    from histosynth.data.samples import svs_path
    from histosynth.data.slides import open_slide
    from histosynth.io.masks import write_png
    from histosynth.models.bundle import load_bundle
    from histosynth.pipelines.demo import demo_models
    from histosynth.pipelines.sample_patches import sample_images
    from histosynth.pixels import to_uint8

    out = Path(args.out)
    model = load_bundle(args.model or demo_models()[0])
    test = PatchDataset(args.dataset, "test")
    labelled = [i for i in range(len(test)) if bool(test[i]["labelled"])]
    # Spread over the split (its patches run along the test band): one in every len/n.
    chosen = labelled[:: max(1, len(labelled) // args.n)][: args.n]
    real, same_layout, free = [], [], []
    for k, i in enumerate(chosen):
        item = test[i]
        real.append(to_uint8(item["image"]))
        mask = item["mask"].numpy().astype(np.uint8)
        same_layout.append(sample_images(model, mask, n=1, guidance=args.guidance, steps=args.steps,
                                         seed=args.seed + k)[0])
        free.append(sample_images(model, None, n=1, steps=args.steps, seed=args.seed + 100 + k)[0])
    write_png(out / "side_by_side.png", grid([real, same_layout, free]))
    print(f"wrote {out / 'side_by_side.png'}: real test patches / same masks / no mask, {len(chosen)} each")

    if args.slide:
        slide = open_slide(svs_path())
        real_overview = slide.thumbnail(args.overview_mpp)
        generated = tifffile.imread(args.slide, level=0)[..., :3]
        factor = args.overview_mpp / float(model.config["mpp"])
        size = (round(generated.shape[1] / factor), round(generated.shape[0] / factor))
        generated_overview = np.asarray(Image.fromarray(generated).resize(size, Image.LANCZOS))
        height = max(real_overview.shape[0], generated_overview.shape[0])
        pad = lambda image: np.pad(image, ((0, height - image.shape[0]), (0, 0), (0, 0)), constant_values=255)
        write_png(out / "overview_real_vs_generated.png",
                  np.concatenate([pad(real_overview), np.full((height, 8, 3), 255, np.uint8),
                                  pad(generated_overview)], 1))
        print(f"wrote {out / 'overview_real_vs_generated.png'} at {args.overview_mpp} µm/px")


if __name__ == "__main__":
    main()
