"""Sharpness beside the last steps' cut lines, against the rest of the slide, for slides kept by canvas.py.

    python benchmarks/canvas.py --sizes 1024 --samplers "random --heal-detail 0,random,random --no-heal" --large "" --keep DIR
    python benchmarks/line_sharpness.py DIR [DIR ...]

A healed step takes the previous step's clean-latent estimate near its cut lines, and the last step near the
previous step's lines too. That estimate was made at more noise, so if it is taken whole those bands come out softer
than the rest, once per patch: a period the blind periodicity score sees at 8192² px. This folds the slide's row and
column gradient profiles (mean |difference| of neighbouring rows, of neighbouring columns) at the patch period and
prints the mean gradient within an eighth of a patch of the last step's lines and of the previous step's, over the mean
of the whole fold (1.00: no softer band). One slide's fold scatters by its texture (±10 % at 1024² px); where the
folder also holds the same seed's ``random --no-heal`` slide, the ratio of the two slides' profiles is folded as
well, which cancels the texture they share and leaves what the heal changed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from canvas import level0  # noqa: E402
from histosynth.eval.seams import gradient_profiles  # noqa: E402


def folded(profile: np.ndarray, period: int) -> np.ndarray:
    """``profile`` averaged at each phase mod ``period`` (whole periods only), over its mean."""
    whole = len(profile) // period * period
    fold = profile[:whole].reshape(-1, period).mean(axis=0)
    return fold / fold.mean()


def near(fold: np.ndarray, line: int, reach: int) -> float:
    """Mean of the fold over the gradients within ``reach`` px of a line before row ``line`` (profile index
    i is the difference between rows i and i+1, so the line's own jump sits at i = line − 1)."""
    period = len(fold)
    index = (line - 1 + np.arange(-reach, reach + 1)) % period
    return float(fold[index].mean())


def profiles(slide: Path) -> tuple[dict, np.ndarray, np.ndarray]:
    """A kept slide's stats and its row and column gradient profiles."""
    return (json.loads(slide.with_suffix(".json").read_text()), *gradient_profiles(level0(slide)))


def measure(stats: dict, rows: np.ndarray, cols: np.ndarray, unhealed: tuple | None = None) -> dict:
    """Per axis: the fold near the last and the previous step's lines, its min and max; with ``unhealed`` (the
    same seed's ``--no-heal`` profiles) the fold of the ratio of the two, which cancels the texture they share."""
    period = stats["patch_px"]
    recent = stats["recent_cut_offsets_px"]["y_x"]  # image px, oldest first
    (last_y, last_x), (before_y, before_x) = recent[-1], recent[-2]
    reach = period // 8
    out = {}
    for axis, profile, last, before in (("rows", rows, last_y, before_y), ("columns", cols, last_x, before_x)):
        if unhealed is not None:
            profile = profile / unhealed[0 if axis == "rows" else 1]
        fold = folded(profile, period)
        out[axis] = (near(fold, last, reach), near(fold, before, reach), float(fold.min()), float(fold.max()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="folders canvas.py --keep filled")
    args = parser.parse_args()
    print("| slide | axis | last step's lines | previous step's lines | fold min | fold max |")
    print("|---|---|---|---|---|---|")
    for folder in args.folders:
        slides = {slide.stem: profiles(slide) for slide in sorted(folder.glob("*.tiff"))
                  if not slide.name.endswith(".mask.tiff")}
        unhealed = next((value[1:] for stem, value in slides.items() if "--no-heal" in stem), None)
        for stem, (stats, rows, cols) in slides.items():
            runs = [(stem, None)]
            if unhealed is not None and "--no-heal" not in stem:
                runs.append((f"{stem} / no heal", unhealed))
            for name, against in runs:
                for axis, (last, before, low, high) in measure(stats, rows, cols, against).items():
                    print(f"| {folder.name}/{name} | {axis} | {last:.3f} | {before:.3f} | {low:.3f} | {high:.3f} |")


if __name__ == "__main__":
    main()
