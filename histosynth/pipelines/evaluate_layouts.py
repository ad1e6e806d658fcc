"""``histosynth evaluate-layouts``: the mask model's layouts beside real label maps at the same scale.

Real crops come from the dataset's label maps (coarsened as the mask model was trained), generated ones are cut
from one canvas sampled with the mask model's random-offset grid (or drawn one patch each, to tell the model's
share from the canvas's); both go through eval/layouts.py (class fractions, region sizes, boundary length per area)
and the classifier two-sample test of eval/c2st.py, the latter beside the same test between two independent sets of
real crops.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from histosynth.checks import whole_number
from histosynth.data.dataset import LabelmapCrops, load_dataset_index
from histosynth.errors import HistosynthError
from histosynth.eval.c2st import C2STConfig, classifier_two_sample_test
from histosynth.eval.layouts import (TOLERANCE, largest_differences, layout_statistics, one_hot_crops,
                                     relative_differences, within_tolerance)
from histosynth.io.atomic import atomic_dir
from histosynth.io.paths import check_outputs
from histosynth.io.masks import colorize, write_png
from histosynth.models.bundle import load_bundle
from histosynth.pipelines.masks import sample_mask_scores


def real_layout_crops(data: str | Path, crop: int, n: int, split: str, downsample: int, seed: int) -> list[np.ndarray]:
    crops = LabelmapCrops(data, crop, split=split, length=n, seed=seed, downsample=downsample)
    return [crops[i]["mask"].numpy().astype(np.uint8) for i in range(n)]


def class_ids(scores) -> np.ndarray:
    """uint8 class ids (h, w), 1..K, of class scores (1, K, h, w)."""
    return (scores[0].argmax(0) + 1).numpy().astype(np.uint8)


def generated_layout_crops(mask_model, crop: int, n: int, steps: int, seed: int,
                           context: int = 0, single_patches: bool = False) -> list[np.ndarray]:
    """``n`` crops of ``crop``² cut side by side from one canvas of the mask model (as `generate` makes layouts,
    each patch with ``context`` px of the canvas around it); with ``single_patches``, ``n`` patches each drawn on
    its own, as the model was trained — what the model draws, without what the canvas adds."""
    if single_patches:
        seeds = np.random.default_rng(seed).integers(0, 2**31 - 1, n)
        return [class_ids(sample_mask_scores(mask_model, (crop, crop), sampler="tiles", steps=steps, seed=int(s))[0])
                for s in seeds]
    side = math.ceil(math.sqrt(n))
    scores, _ = sample_mask_scores(mask_model, (side * crop, side * crop), steps=steps, seed=seed, context=context)
    labels = class_ids(scores)  # (side·crop, side·crop) at the model's scale
    return [labels[r * crop:(r + 1) * crop, c * crop:(c + 1) * crop] for r in range(side) for c in range(side)][:n]


def evaluate_layouts(mask_model: str | Path, data: str | Path, out: str | Path | None = None, n: int = 32,
                     crop: int | None = None, split: str = "train", steps: int = 25, seed: int = 0,
                     c2st: C2STConfig | None = None, context: int = 0, real_draws: int = 5,
                     single_patches: bool = False) -> dict:
    """Layout statistics and two-sample tests of ``n`` generated against ``n`` real crops; written to ``out``
    (layouts.json and layouts.png: real crops above, generated below) when given. ``real_draws`` more sets of ``n``
    real crops (seeds seed + 1, seed + 2, …) give the real-vs-real references: how far each statistic strays between
    draws (the largest difference from the reference draw) and the two-sample test against the first of them.
    ``single_patches`` draws each generated crop as one patch of its own (the crop must be the model's patch)."""
    whole_number("--n", n)
    whole_number("--real-draws", real_draws)
    whole_number("--steps", steps)
    whole_number("--seed", seed, 0)
    if crop is not None:
        whole_number("--crop", crop)
    if out is not None:
        check_outputs({"--out": out}, {"--mask-model": mask_model, "--data": data}, folders=["--out"],
                      sealed=["--mask-model"])
        if Path(out).exists() and (not Path(out).is_dir() or (any(Path(out).iterdir())
                                                               and not (Path(out) / "layouts.json").is_file())):
            # The folder is replaced as a whole: never do that to one that is not an earlier layout report.
            raise HistosynthError(f"{out}: exists and is not a layout report folder; choose another --out")
    model = load_bundle(mask_model, kind="mask")
    index = load_dataset_index(data)
    labelmap_mpp = float(index["sources"][0].get("labelmap_mpp") or 0)
    if not labelmap_mpp:
        raise HistosynthError(f"{data}: the dataset has no label maps")
    mask_mpp = float(model.config["mask_mpp"])
    downsample = round(mask_mpp / labelmap_mpp)
    if downsample < 1 or abs(downsample * labelmap_mpp - mask_mpp) > 1e-6 * mask_mpp:
        raise HistosynthError(f"{mask_model}: masks at {mask_mpp} µm/px cannot be compared with label maps at "
                              f"{labelmap_mpp} µm/px (not an integer multiple)")
    classes = model.num_classes
    if max(int(c["id"]) for c in index["classes"]) != classes:
        raise HistosynthError(f"{data}: its classes differ from the mask model's ({classes} classes)")
    crop = crop or model.latent_patch
    if single_patches and (crop != model.latent_patch or context):
        raise HistosynthError(f"--single-patches: the crops are the model's own {model.latent_patch} px patches, "
                              f"drawn without canvas context (got --crop {crop}, --context {context})")
    c2st = c2st or C2STConfig(seed=seed)
    real = real_layout_crops(data, crop, n, split, downsample, seed)
    other_draws = [real_layout_crops(data, crop, n, split, downsample, seed + k) for k in range(1, real_draws + 1)]
    generated = generated_layout_crops(model, crop, n, steps, seed, context, single_patches)
    stats_real = layout_statistics(real, classes, mask_mpp)
    stats_generated = layout_statistics(generated, classes, mask_mpp)
    differences = relative_differences(stats_generated, stats_real)
    real_spread = largest_differences([relative_differences(layout_statistics(draw, classes, mask_mpp), stats_real)
                                       for draw in other_draws])
    result = {
        "mask_model": str(mask_model), "data": str(data), "split": split, "n": n, "crop_px": crop,
        "mpp": mask_mpp, "crop_um": crop * mask_mpp, "steps": steps, "seed": seed,
        "context_px": context, "single_patches": single_patches,
        "classes": {int(c["id"]): c["name"] for c in index["classes"] if int(c["id"])},
        "real": stats_real, "generated": stats_generated, "relative_difference": differences,
        "tolerance": TOLERANCE, "within_tolerance": within_tolerance(differences),
        "real_draws": real_draws, "real_vs_real_difference": real_spread,
        "c2st": classifier_two_sample_test(one_hot_crops(generated, classes), one_hot_crops(real, classes), c2st),
        "c2st_real_vs_real": classifier_two_sample_test(one_hot_crops(other_draws[0], classes),
                                                        one_hot_crops(real, classes), c2st),
    }
    if out is not None:
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "layouts.json").write_text(json.dumps(result, indent=1))
            shown = min(8, n)
            rows = [np.concatenate([colorize(m, index["classes"]) for m in crops[:shown]], 1)
                    for crops in (real, generated)]
            write_png(tmp / "layouts.png", np.concatenate(rows, 0))
    return result


def layouts_text(result: dict) -> str:
    """A short table of the comparison for the terminal."""
    names = result["classes"]
    real, generated, diff = result["real"], result["generated"], result["relative_difference"]
    spread = result["real_vs_real_difference"]
    lines = [f"{result['n']} crops of {result['crop_px']} px at {result['mpp']:g} µm/px ({result['crop_um']:.0f} µm), "
             f"real ({result['split']} label maps) vs generated "
             f"({'each crop one patch' if result['single_patches'] else 'crops of one canvas'}); "
             f"'real draws': the most that {result['real_draws']} "
             "other draws of real crops differ by"]
    for key, label in (("class_fractions", "class fraction"), ("component_um2", "median region µm²"),
                       ("components_per_mm2", "regions per mm²")):
        for c, name in names.items():
            if c in diff[key]:
                lines.append(f"  {label:18s} {name:12s} real {real[key][c]:10.3f}  generated "
                             f"{generated[key][c]:10.3f}  (differs by {diff[key][c]:.0%}; real draws "
                             f"{spread[key][c]:.0%})")
    lines.append(f"  {'boundary µm/mm²':31s} real {real['boundary_um_per_mm2']:10.1f}  generated "
                 f"{generated['boundary_um_per_mm2']:10.1f}  (differs by {diff['boundary_um_per_mm2']:.0%}; real "
                 f"draws {spread['boundary_um_per_mm2']:.0%})")
    ok = result["within_tolerance"]["all"]
    lines.append(f"  within {result['tolerance']:.0%} of real: {'yes' if ok else 'no'}")
    c2st, ref = result["c2st"], result["c2st_real_vs_real"]
    lines.append(f"  two-sample classifier accuracy {c2st['accuracy_mean']:.2f} ± {c2st['accuracy_std']:.2f} "
                 f"(real vs real {ref['accuracy_mean']:.2f} ± {ref['accuracy_std']:.2f}; 0.5 = indistinguishable)")
    return "\n".join(lines)
