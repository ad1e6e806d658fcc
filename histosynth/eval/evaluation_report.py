"""The evaluation run and its outputs: metrics.json (flat, design.md §7) and one self-contained report.html.

``evaluate`` opens the image sets, extracts features once per set, calls the pure metric functions and draws the
figures; ``write_evaluation`` writes the files atomically (the page itself is built with eval/report_html.py).

Pairings (all in one feature space, named in the output):
  * fid, kid, precision/recall/density/coverage compare generated with real-test; their ``_reference`` compares
    real-train with real-test, with real-train subsampled to the generated count (FID and KID depend on N), so a
    generator as good as the training data scores about its reference.
  * authenticity is generated vs real-train, its reference holdout vs real-train; C_T uses generated, holdout and
    real-train. Without a holdout these are null.
  * nearest-neighbour pairs are searched in 16×16 pixel space over the 8 flips/rotations of the training images.
"""
from __future__ import annotations

import html
import json
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from histosynth.errors import HistosynthError
from histosynth.eval import fidelity, privacy
from histosynth.eval.c2st import C2STConfig, classifier_two_sample_test
from histosynth.eval.features import (
    ImageSet,
    Source,
    build_feature_fn,
    dataset_splits,
    extract_features,
    get_extractor,
    is_dataset,
    open_images,
    parse_source,
    pixel_features,
)
from histosynth.eval.report_html import figure_html, finite, format_value, html_page, html_table, write_text
from histosynth.pixels import from_uint8

if TYPE_CHECKING:
    from histosynth.eval.segmentation import TrainConfig

METRIC_KEYS = ("features", "n_generated", "n_real_train", "n_real_test", "fid", "fid_reference", "kid",
               "kid_reference", "precision", "recall", "density", "coverage", "authenticity",
               "authenticity_reference", "ct", "ct_cells", "c2st", "c2st_reference")


@dataclass
class Evaluation:
    """Results of one evaluation: the flat metrics, figures (matplotlib), and tables for the report."""

    metrics: dict[str, Any]
    standardized: bool = False  # feature columns were z-scored on real-train
    figures: dict[str, Any] = field(default_factory=dict)  # caption -> matplotlib Figure
    ct_cells: list[dict[str, Any]] = field(default_factory=list)
    pairs: list[dict[str, Any]] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)  # role -> where the images came from


# ----------------------------------------------------------------------------------------------------------------
# Sources


def resolve_sources(real_train: str, real_test: str | None = None,
                    real_holdout: str | None = None) -> tuple[str, str, str | None]:
    """Fill in the CLI defaults: ``--real-test`` and ``--real-holdout`` default to the ``test`` and ``holdout``
    splits of a dataset given as ``--real-train`` (holdout only where the dataset has one)."""
    train_path, _ = parse_source(real_train, "train")
    if real_test is None:
        if not is_dataset(train_path):
            raise HistosynthError("--real-test is required when --real-train is a plain folder of images")
        real_test = f"{train_path}:test"
    if real_holdout is None and is_dataset(train_path) and "holdout" in dataset_splits(train_path):
        real_holdout = f"{train_path}:holdout"
    return real_train, real_test, real_holdout


def _open(source: Source | None, default_split: str | None, label: str) -> ImageSet | None:
    """Open one image set; a dataset folder given as a path picks ``default_split`` unless ``DATASET:split`` says."""
    if source is None:
        return None
    if isinstance(source, (str, os.PathLike)):
        path, split = parse_source(source, default_split)
        return open_images(path, split=split)
    return open_images(source, label=label)


def _check_counts(counts: dict[str, int], k: int, ct_k: int, min_cell: int) -> None:
    """Refuse too-small sets before spending time on features, saying how many each measure needs."""
    needs = [("generated", k + 1, f"precision/recall (k = {k})"), ("real_test", k + 1, f"precision/recall (k = {k})"),
             ("real_train", max(2, k + 1), f"the reference precision/recall (k = {k})")]
    if counts.get("real_holdout") is not None:
        needs += [("real_train", ct_k, f"C_T's k-means with {ct_k} cells")]
    for role, minimum, why in needs:
        if counts[role] < minimum:
            raise HistosynthError(
                f"{role.replace('_', '-')}: {counts[role]} images, but {why} needs at least {minimum}")


# ----------------------------------------------------------------------------------------------------------------
# Evaluation


def evaluate(generated: Source, real_train: Source, real_test: Source, real_holdout: Source | None = None,
             features: str = "stain-texture", device: str = "cpu", weights: str | os.PathLike | None = None,
             batch_size: int = 32, k: int = 5, ct_k: int = 5, min_cell: int = 20, kid_subsets: int = 100,
             top: int = 8, seed: int = 0, adherence: TrainConfig | None = None,
             log: Callable[[str], None] | None = None, c2st: C2STConfig | None = None) -> Evaluation:
    """Every measure of design.md §7, with figures for the report.

    With ``c2st`` settings, a classifier two-sample test (eval/c2st.py) tells generated from real-test images
    (``c2st``, accuracy ± std over folds; 0.5 = indistinguishable) beside real-train against real-test
    (``c2st_reference``): a realism measure that needs no downloaded weights.

    Mask adherence (``mask_miou`` beside ``mask_miou_reference`` on real test) trains a U-Net, so it runs only when
    ``adherence`` gives its training settings; ``generated`` and ``real_train`` must then be dataset folders.
    """
    say = log or (lambda _: None)
    sets = {"generated": _open(generated, None, "generated"),
            "real_train": _open(real_train, "train", "real-train"),
            "real_test": _open(real_test, "test", "real-test"),
            "real_holdout": _open(real_holdout, "holdout", "real-holdout")}
    if sets["generated"].size != sets["real_train"].size:
        warnings.warn(f"generated images are {sets['generated'].size[1]}x{sets['generated'].size[0]} px but real-train"
                      f" images {sets['real_train'].size[1]}x{sets['real_train'].size[0]} px: texture features"
                      " depend on scale, compare sets cut at one size and µm/px", UserWarning, stacklevel=2)
    counts = {role: (len(s) if s is not None else None) for role, s in sets.items()}
    _check_counts(counts, k, ct_k, min_cell)
    roots = []  # dataset folders of generated and real-train, for mask adherence: checked before the long work
    if adherence is not None:
        for option, source in (("--generated", generated), ("--real-train", real_train)):
            path = parse_source(source, None)[0] if isinstance(source, (str, os.PathLike)) else None
            if path is None or not is_dataset(path):
                raise HistosynthError(f"mask adherence needs {option} to be a dataset folder with masks (dataset.json)")
            roots.append(path)

    extractor = get_extractor(features)
    fn = build_feature_fn(features, device=device, weights=weights)  # a network loads once for every set
    values: dict[str, np.ndarray] = {}
    for role, images in sets.items():
        if images is not None:
            say(f"features ({extractor.name}) of {role.replace('_', '-')}: {len(images)} images")
            values[role] = extract_features(images, features, batch_size=batch_size, fn=fn).values  # (N, D)
    if extractor.standardize:
        # Columns have different units: z-score them on real-train so each counts alike in every distance.
        mean, std = values["real_train"].mean(0), values["real_train"].std(0)
        std[std == 0] = 1.0
        values = {role: (v - mean) / std for role, v in values.items()}
    gen, train, test = values["generated"], values["real_train"], values["real_test"]
    holdout = values.get("real_holdout")

    rng = np.random.default_rng(seed)
    train_ref = train[np.sort(rng.choice(len(train), min(len(train), len(gen)), replace=False))]  # (min(T, G), D)
    kid_size = max(2, min(1000, min(len(gen), len(test), len(train_ref)) // 2))

    say("fidelity: FID, KID, precision/recall/density/coverage")
    metrics: dict[str, Any] = {"features": extractor.name, "n_generated": len(gen), "n_real_train": len(train),
                               "n_real_test": len(test)}
    metrics["fid"] = fidelity.fid(gen, test)
    metrics["fid_reference"] = fidelity.fid(train_ref, test)
    metrics["kid"], kid_std = fidelity.kid(gen, test, kid_subsets, kid_size, seed)
    metrics["kid_reference"], kid_reference_std = fidelity.kid(train_ref, test, kid_subsets, kid_size, seed)
    metrics.update(fidelity.prdc(test, gen, k))
    reference_prdc = fidelity.prdc(test, train_ref, k)

    say("privacy: authenticity, C_T")
    metrics["authenticity"] = privacy.authenticity(gen, train)
    metrics["authenticity_reference"] = privacy.authenticity(holdout, train) if holdout is not None else None
    ct = None
    if holdout is not None and min(len(holdout), len(gen)) < min_cell:
        say(f"privacy: C_T skipped — {len(holdout)} holdout and {len(gen)} generated images; a cell needs at least "
            f"{min_cell} of each")
    elif holdout is not None:
        ct = privacy.ct_test(gen, holdout, train, k=ct_k, min_cell=min_cell, seed=seed)
    metrics["ct"] = ct["ct"] if ct else None
    metrics["ct_cells"] = sum(cell["z"] is not None for cell in ct["cells"]) if ct else None  # cells used
    metrics.update({"kid_std": kid_std, "kid_reference_std": kid_reference_std, "kid_subset_size": kid_size,
                    **{f"{name}_reference": value for name, value in reference_prdc.items()},
                    "prdc_k": k, "ct_k": ct_k if ct else None, "n_real_holdout": counts["real_holdout"]})

    say("nearest neighbours over flips and rotations of the training images")
    pairs = privacy.nearest_neighbours(sets["generated"], sets["real_train"], pixel_features)
    metrics["nn_pixel_distance_min"] = pairs[0].distance
    metrics["nn_pixel_distance_median"] = float(np.median([p.distance for p in pairs]))
    metrics["c2st"] = metrics["c2st_reference"] = None
    if c2st is not None and min(len(gen), len(test), len(train)) < 2 * c2st.folds:
        say(f"realism: two-sample test skipped (it needs {2 * c2st.folds} images per set for {c2st.folds} folds)")
    elif c2st is not None:
        say("realism: a small CNN telling generated from real-test, and real-train from real-test")
        generated_images, test_images, train_images = (_as_tensor(sets[role]) for role in
                                                       ("generated", "real_test", "real_train"))
        side = min(min(x.shape[-2:]) for x in (generated_images, test_images, train_images))  # square crops
        generated_images, test_images, train_images = (_centre(x, side) for x in
                                                       (generated_images, test_images, train_images))
        test_result = classifier_two_sample_test(generated_images, test_images, c2st)
        reference_result = classifier_two_sample_test(train_images, test_images, c2st)
        metrics.update({"c2st": test_result["accuracy_mean"], "c2st_std": test_result["accuracy_std"],
                        "c2st_reference": reference_result["accuracy_mean"],
                        "c2st_reference_std": reference_result["accuracy_std"],
                        "c2st_n_per_set": test_result["n_per_set"], "c2st_folds": c2st.folds})
    metrics["mask_miou"] = metrics["mask_miou_reference"] = None
    if adherence is not None:
        from histosynth.eval.adherence import adherence_from_datasets

        say("mask adherence: training a U-Net on the real training masks")
        scores = adherence_from_datasets(roots[1], roots[0], adherence, seed=seed, log=log)
        metrics["mask_miou"], metrics["mask_miou_reference"] = scores["miou_generated"], scores["miou_real"]
    metrics = {key: metrics[key] for key in METRIC_KEYS} | metrics  # the documented keys first, in their order
    metrics = {key: (value if isinstance(value, str) else finite(value)) for key, value in metrics.items()}

    evaluation = Evaluation(metrics=metrics, standardized=extractor.standardize, ct_cells=ct["cells"] if ct else [],
                            sources={role: s.label for role, s in sets.items() if s is not None})
    evaluation.pairs = [{**p.as_dict(), "generated_name": sets["generated"].name(p.generated),
                         "train_name": sets["real_train"].name(p.train)} for p in pairs[:top]]
    evaluation.figures["Closest generated / training pairs (pixel space, training image flipped/rotated to match)"] = \
        privacy.neighbour_figure(pairs, sets["generated"], sets["real_train"], top=top)
    evaluation.figures["Generated samples"] = image_grid(sets["generated"], seed=seed)
    evaluation.figures["Real training samples"] = image_grid(sets["real_train"], seed=seed)
    compared = {"generated": gen, "real-test": test, **({"holdout": holdout} if holdout is not None else {})}
    evaluation.figures[f"Nearest-neighbour distance to real-train ({extractor.name} features)"] = \
        distance_histogram(compared, train)
    return evaluation


# ----------------------------------------------------------------------------------------------------------------
# Figures


def image_grid(images, count: int = 16, columns: int = 8, seed: int = 0):
    """A Figure with up to ``count`` images of a set, chosen at random (seeded) when it holds more."""
    from matplotlib.figure import Figure

    rng = np.random.default_rng(seed)
    index = np.sort(rng.choice(len(images), min(count, len(images)), replace=False))
    columns = min(columns, len(index))
    rows = math.ceil(len(index) / columns)
    figure = Figure(figsize=(1.3 * columns, 1.3 * rows))
    axes = figure.subplots(rows, columns, squeeze=False)
    for axis in axes.ravel():
        axis.set_axis_off()
    for axis, i in zip(axes.ravel(), index):
        axis.imshow(np.asarray(images[int(i)]))
    figure.tight_layout(pad=0.2)
    return figure


def distance_histogram(sets: dict[str, np.ndarray], train: np.ndarray):
    """Histograms of each set's nearest-neighbour distance to the training features (copies pile up at 0)."""
    from matplotlib.figure import Figure

    distances = {name: privacy.nearest(x, train)[0] for name, x in sets.items()}
    upper = max(float(d.max()) for d in distances.values()) or 1.0
    bins = np.linspace(0, upper, 40)
    figure = Figure(figsize=(6, 3))
    axis = figure.subplots()
    for name, d in distances.items():
        axis.hist(d, bins=bins, alpha=0.5, density=True, label=f"{name} (n = {len(d)})")
    axis.set_xlabel("distance to nearest real-train sample")
    axis.set_ylabel("density")
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


# ----------------------------------------------------------------------------------------------------------------
# Writing


def metric_rows(metrics: dict[str, Any]) -> list[list[Any]]:
    """(measure, value, reference) rows of the summary table."""
    return [[name, metrics.get(name), metrics.get(f"{name}_reference")]
            for name in ("fid", "kid", "precision", "recall", "density", "coverage", "authenticity", "ct", "c2st",
                         "mask_miou")]


def _as_tensor(images):
    """An image set as float (N, 3, H, W) in [-1, 1]."""
    return from_uint8(np.stack([images[i] for i in range(len(images))]))


def _centre(images, side: int):
    """The central ``side``² crop of (N, C, H, W) images."""
    top, left = (images.shape[-2] - side) // 2, (images.shape[-1] - side) // 2
    return images[..., top:top + side, left:left + side]


def summary_text(metrics: dict[str, Any]) -> str:
    """The summary table as plain text, for the terminal."""
    lines = [f"features: {metrics['features']}   generated {metrics['n_generated']}, real-train"
             f" {metrics['n_real_train']}, real-test {metrics['n_real_test']}",
             f"{'measure':<14}{'value':>12}{'reference':>12}"]
    for name, value, reference in metric_rows(metrics):
        lines.append(f"{name:<14}{format_value(value):>12}{format_value(reference):>12}")
    return "\n".join(lines)


def evaluation_html(evaluation: Evaluation) -> str:
    """The report page of an evaluation."""
    m = evaluation.metrics
    sections = [
        ("Inputs", html_table(["set", "images from"], [[role.replace("_", "-"), where]
                                                       for role, where in evaluation.sources.items()])),
        ("Measures", f"<p class=\"note\">Feature space: <b>{html.escape(str(m['features']))}</b>"
                     f"{' (columns z-scored on real-train)' if evaluation.standardized else ''}. Fidelity"
                     " compares generated with real-test, its reference real-train (subsampled to the generated"
                     " count) with real-test. Authenticity: generated vs real-train, reference holdout vs"
                     " real-train. C_T ≪ 0 means copying; ct_cells counts the cells it used. mask_miou: U-Net"
                     " trained on real masks, on generated images (reference: on real test).</p>"
                     + html_table(["measure", "value", "reference"], metric_rows(m))),
    ]
    if evaluation.ct_cells:
        sections.append(("C_T cells (k-means on real-train features)", html_table(
            ["cell", "train", "holdout", "generated", "weight", "z"],
            [[c["cell"], c["n_train"], c["n_holdout"], c["n_generated"], c["weight"], c["z"]]
             for c in evaluation.ct_cells]) + "<p class=\"note\">Cells with fewer holdout or generated samples than"
                                            " the minimum are dropped (z —).</p>"))
    if evaluation.pairs:
        sections.append(("Nearest pairs", html_table(
            ["generated", "nearest training image", "transform", "pixel distance"],
            [[p["generated_name"], p["train_name"], p["transform_name"], p["distance"]] for p in evaluation.pairs])))
    sections += [(caption, figure_html(caption, figure)) for caption, figure in evaluation.figures.items()]
    sections.append(("metrics.json", f"<pre>{html.escape(json.dumps(m, indent=1))}</pre>"))
    return html_page("histosynth evaluation", sections)


def write_evaluation(evaluation: Evaluation, out: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``out/metrics.json`` and ``out/report.html`` atomically; return their paths."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise HistosynthError(f"{out}: exists and is not a folder")
    metrics_path, report_path = out / "metrics.json", out / "report.html"
    write_text(metrics_path, json.dumps(evaluation.metrics, indent=2) + "\n")
    write_text(report_path, evaluation_html(evaluation))
    return metrics_path, report_path
