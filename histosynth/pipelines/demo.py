"""``histosynth demo``: a synthetic slide from the bundled models, with pictures and the numbers that judge it.

Writes into OUT: the pyramidal TIFF and its mask files, PNG previews (slide, mask, overlay, a full-resolution crop),
a fixed-tiles vs random-offset-grid comparison with seam scores measured on lossless pixels, the per-class colour
check (ΔE*ab against real tissue under its weak labels), fidelity and privacy figures against the held-out part of
the bundled slide, and ``report.html`` that shows all of it.
"""
from __future__ import annotations

import base64
import html
import io
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import tiffslide
from PIL import Image
from skimage.color import rgb2lab

from histosynth.checks import finite_number, whole_number
from histosynth.data.labels import auto_label_thresholds, auto_labels, downsample_labels
from histosynth.data.prepare import LABELMAP_FACTOR
from histosynth.data.regions import cell_sums, fit_regions, region_classes, region_map, sample_regions
from histosynth.data.samples import svs_path
from histosynth.data.slides import open_slide
from histosynth.errors import HistosynthError
from histosynth.eval.seams import (
    periodicity_null,
    periodicity_reference,
    real_tissue_like,
    reference_score,
    stats_seam_score,
)
from histosynth.io.atomic import atomic_path
from histosynth.io.paths import check_outputs
from histosynth.io.masks import colorize, overlay, write_png
from histosynth.models.autoencoder import decode_latents
from histosynth.models.bundle import load_bundle
from histosynth.pipelines.generate_slide import GenerateSettings, SlideGenerator, generate_slide, peak_rss_mb
from histosynth.sampling.decode import decode_full

WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "demo"


def demo_models(weights: Path | None = None) -> tuple[Path, Path]:
    """The bundled image and mask models (or those in ``weights``/image and ``weights``/mask)."""
    weights = Path(weights) if weights else WEIGHTS
    image, mask = weights / "image", weights / "mask"
    for path in (image, mask):
        if not (path / "histosynth.json").exists():
            raise HistosynthError(f"{path}: bundled demo model missing (reinstall, or run `make demo-weights`)")
    return image, mask


def class_colours(rgb: np.ndarray, mask: np.ndarray, classes: list[dict]) -> dict[str, list[float]]:
    """Mean CIELAB colour of each class under a mask."""
    lab = rgb2lab(rgb)
    result = {}
    for entry in classes:
        hit = mask == entry["id"]
        if entry["id"] != 0 and hit.sum() > 100:
            result[entry["name"]] = lab[hit].mean(axis=0).round(2).tolist()
    return result


def real_labels(slide, mpp: float, classes: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """The bundled slide at ``mpp`` (H, W, 3) and its weak labels (H, W) of the kind the model's classes are:
    tissue compartments (data/regions.py) for region classes, per-pixel colour classes otherwise."""
    rgb = slide.thumbnail(mpp)
    thresholds = auto_label_thresholds(slide.thumbnail(mpp * 2))
    names = [c["name"] for c in classes if c["id"] != 0]
    if names != [c["name"] for c in region_classes(len(names))[1:]]:
        return rgb, auto_labels(rgb, thresholds)
    factor = LABELMAP_FACTOR
    height, width = (side - side % factor for side in rgb.shape[:2])
    sums = cell_sums(rgb[:height, :width], thresholds, factor)
    regions = region_map(sums, fit_regions([sums], len(names), mpp * factor, factor))
    labels = sample_regions(regions, (0, 0), (width, height), 1.0, float(factor), len(names))
    return rgb[:height, :width], labels


def real_class_colours_at(mpp: float, classes: list[dict], label_factors: tuple[int, ...]) -> dict[int, dict]:
    """Mean colour per weak-label class of the bundled real slide at the model's µm/px, for each label factor: labels
    taken per pixel (factor 1) or, as in the label maps the mask model learns from, as the majority class of
    factor² px blocks. The slide is read and labelled once."""
    rgb, labels = real_labels(open_slide(svs_path()), mpp, classes)  # (H, W, 3), (H, W)
    result = {}
    for factor in label_factors:
        if factor <= 1:
            result[factor] = class_colours(rgb, labels, classes)
            continue
        height, width = (side - side % factor for side in labels.shape)
        blocks = downsample_labels(labels[:height, :width], factor, max(c["id"] for c in classes))
        result[factor] = class_colours(rgb[:height, :width], np.repeat(np.repeat(blocks, factor, 0), factor, 1),
                                       classes)
    return result


def real_class_colours(mpp: float, classes: list[dict], label_factor: int = 1) -> dict[str, list[float]]:
    """``real_class_colours_at`` for one label factor."""
    return real_class_colours_at(mpp, classes, (label_factor,))[label_factor]


def delta_e(a: list[float], b: list[float]) -> float:
    """CIE76 colour difference ΔE*ab."""
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)))


def _lossless(model, mask_model, size: int, sampler: str, settings: dict, mask: np.ndarray | None):
    """Generate a size² image in memory (no JPEG) and return it with its stats and mask."""
    s = GenerateSettings(width=size, height=size, sampler=sampler, **settings)
    generator = SlideGenerator(model, s, mask=mask, mask_model=mask_model if mask is None else None, progress=True)
    mask = generator.prepare_mask()
    latents = generator.sample_latents()
    vae = model.autoencoder
    image = decode_full(lambda z: decode_latents(vae, z), latents, model.latent_factor)
    return image, generator.stats, mask


def _png_uri(image: np.ndarray, max_side: int = 1024) -> str:
    pil = Image.fromarray(image)
    if max(pil.size) > max_side:
        pil.thumbnail((max_side, max_side), Image.LANCZOS)
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def run_demo(out: str | Path, size: int = 1536, steps: int = 20, guidance: float = 1.5, seed: int = 0,
             compare_size: int = 512, evaluate_fidelity: bool = True, weights: Path | None = None,
             log=print) -> Path:
    """Everything ``histosynth demo`` does; returns the report path."""
    began = time.perf_counter()
    out = Path(out)
    whole_number("--size", size)
    whole_number("--steps", steps)
    finite_number("--guidance", guidance)
    whole_number("--seed", seed, 0)
    whole_number("--compare-size", compare_size)
    if out.exists() and not out.is_dir():
        raise HistosynthError(f"{out}: --out is a file; give a folder")
    image_path, mask_path = demo_models(weights)
    check_outputs({"--out": out}, {"the image model": image_path, "the mask model": mask_path}, folders=["--out"],
                  sealed=["the image model", "the mask model"])
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _run_demo(out, size, steps, guidance, seed, compare_size, evaluate_fidelity, image_path, mask_path,
                         log, began)
    except BaseException:
        if created:  # a failed first run leaves no folder behind, empty or half-filled
            shutil.rmtree(out, ignore_errors=True)
        raise


def _run_demo(out: Path, size: int, steps: int, guidance: float, seed: int, compare_size: int,
              evaluate_fidelity: bool, image_path: Path, mask_path: Path, log, began: float) -> Path:
    compare_size = min(compare_size, size)
    settings = dict(steps=steps, guidance=guidance, seed=seed, mask_steps=steps)
    log(f"1/5 generating a {size}×{size} px slide with the random-offset grid sampler")
    slide_file = out / "slide.tiff"
    stats = generate_slide(str(image_path), str(slide_file), GenerateSettings(width=size, height=size, **settings),
                           mask_model_path=str(mask_path), stats_path=str(out / "stats.json"))
    generation_seconds = stats["seconds"]
    model, mask_model = load_bundle(image_path, kind="image"), load_bundle(mask_path, kind="mask")
    classes = model.classes

    log("2/5 previews: slide, mask, overlay, full-resolution crop")
    with tiffslide.TiffSlide(str(slide_file)) as handle:
        level = min(handle.level_count - 1, max(0, int(np.log2(max(1, size // 1024)))))
        preview = np.asarray(handle.read_region((0, 0), level, handle.level_dimensions[level]).convert("RGB"))
        crop_side = min(512, size)
        corner = (size - crop_side) // 2
        crop = np.asarray(handle.read_region((corner, corner), 0, (crop_side, crop_side)).convert("RGB"))
    mask_full = np.asarray(Image.open(out / "slide.mask.tiff"))
    step = max(1, size // preview.shape[0])
    mask_small = mask_full[::step, ::step][: preview.shape[0], : preview.shape[1]]
    write_png(out / "slide.png", preview)
    write_png(out / "mask.png", colorize(mask_small, classes))
    write_png(out / "overlay.png", overlay(preview, mask_small, classes))
    write_png(out / "crop.png", crop)
    from histosynth.viewer.export import export_viewer

    export_viewer(slide_file, out / "viewer")  # Deep Zoom tiles + the viewer page the report links to

    log(f"3/5 seams: fixed tiles vs random-offset grid on {compare_size}×{compare_size} px, lossless")
    compare_mask = mask_full[:compare_size, :compare_size]
    patch_px = model.config["patch_size"]
    comparison = {}
    for sampler in ("tiles", "random"):
        image, sampler_stats, _ = _lossless(model, mask_model, compare_size, sampler, settings, compare_mask)
        score = stats_seam_score(image, sampler_stats)
        null = periodicity_null(image, patch_px, seed=seed) if compare_size >= 4 * patch_px else None
        comparison[sampler] = {"image": image, "seam_score": score,
                               "periodicity": None if null is None else null.score,
                               "periodicity_p": None if null is None else null.p_value,
                               "cost_per_pass": sampler_stats["cost_per_pass"],
                               "seconds": sampler_stats["denoise_seconds"]}
        write_png(out / f"compare_{sampler}.png", image)
    slide_pixels = open_slide(svs_path()).thumbnail(model.config["mpp"])
    reference = reference_score(real_tissue_like(slide_pixels, compare_size, compare_size), patch_px)
    periodic_reference = (periodicity_reference(slide_pixels, (compare_size, compare_size), patch_px)
                          if compare_size >= 4 * patch_px else None)

    log("4/5 colour per class against real tissue under its weak labels")
    generated_colours = class_colours(preview, mask_small, classes)
    # Generated masks come from the mask model at its coarser µm/px, so their classes are regions (a "nuclei"
    # region holds nuclei and the stroma between them). The like-for-like reference labels real tissue at that
    # resolution, as the mask model's label maps do; the per-pixel weak labels are shown beside it.
    mask_factor = max(1, round(float(mask_model.config.get("mask_mpp", model.config["mpp"])) / model.config["mpp"]))
    real = real_class_colours_at(model.config["mpp"], classes, (mask_factor, 1))
    real_regions, real_pixels = real[mask_factor], real[1]
    colour_rows = {name: {"generated_lab": generated_colours[name], "real_lab": real_regions[name],
                          "delta_e": round(delta_e(generated_colours[name], real_regions[name]), 2),
                          "real_lab_pixels": real_pixels.get(name),
                          "delta_e_pixels": round(delta_e(generated_colours[name], real_pixels[name]), 2)
                          if name in real_pixels else None}
                   for name in generated_colours if name in real_regions}

    metrics = None
    if evaluate_fidelity:
        log("5/5 fidelity and privacy against the held-out part of the bundled slide")
        metrics = _fidelity(slide_file, size, patch_px, model.config["mpp"], seed)
    summary = {
        "size": size, "steps": steps, "guidance": guidance, "seed": seed,
        "mask_mpp": round(mask_factor * model.config["mpp"], 3),
        "generation_seconds": generation_seconds, "peak_rss_mb": round(peak_rss_mb(), 1),
        "cost_per_pass": stats["cost_per_pass"],
        "unet_evals_per_output_latent_pixel_per_step": stats["unet_evals_per_output_latent_pixel_per_step"],
        "seams": {k: {"seam_score": round(v["seam_score"], 3), "cost_per_pass": v["cost_per_pass"],
                      "periodicity": None if v["periodicity"] is None else round(v["periodicity"], 2),
                      "periodicity_p": None if v["periodicity_p"] is None else round(v["periodicity_p"], 3),
                      "seconds": v["seconds"]} for k, v in comparison.items()},
        "seam_reference_p95": round(reference.p95, 3), "seam_reference_mean": round(reference.mean, 3),
        "periodicity_reference_p95": None if periodic_reference is None else round(periodic_reference.p95, 2),
        "colour": colour_rows, "metrics": metrics, "total_seconds": round(time.perf_counter() - began, 1),
    }
    with atomic_path(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    report = out / "report.html"
    with atomic_path(report) as tmp:
        tmp.write_text(_report_html(summary, preview, mask_small, crop, comparison, classes, stats))
    return report


def _fidelity(slide_file: Path, size: int, patch_px: int, mpp: float, seed: int) -> dict | None:
    """FID/KID/PRDC, authenticity and C_T of generated patches against the bundled slide's splits (the same
    recipe as the demo model's training data, so its holdout was never trained on)."""
    from histosynth.data.prepare import prepare_dataset
    from histosynth.eval.evaluation_report import evaluate

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "real"
        prepare_dataset([svs_path()], data, mpp, patch_px, stride=patch_px // 2, auto_labels_=True,
                        label_fraction=0.5, seed=0, progress=False)
        with tiffslide.TiffSlide(str(slide_file)) as handle:
            tiles = [np.asarray(handle.read_region((x, y), 0, (patch_px, patch_px)).convert("RGB"))
                     for y in range(0, size - patch_px + 1, patch_px) for x in range(0, size - patch_px + 1, patch_px)]
        holdout = f"{data}:holdout"
        n_holdout = sum(p["split"] == "holdout" for p in json.loads((data / "dataset.json").read_text())["patches"])
        # The bundled slide is small: C_T gets one cell, and is skipped when its holdout has fewer than the 20
        # samples a cell's z-score needs (the demo recipe holds out 10 patches).
        evaluation = evaluate(tiles, f"{data}:train", f"{data}:test", holdout, ct_k=1, kid_subsets=20, seed=seed)
        metrics = dict(evaluation.metrics)
        metrics["n_real_holdout"] = n_holdout
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()}


def _report_html(summary: dict, preview, mask_small, crop, comparison, classes, stats) -> str:
    """One self-contained page: every picture embedded, every number beside its reference."""
    esc = html.escape
    seams = summary["seams"]
    rows = "".join(f"<tr><td>{esc(name)}</td><td>{v['delta_e']}</td><td>{v['generated_lab']}</td>"
                   f"<td>{v['real_lab']}</td><td>{v['delta_e_pixels']}</td><td>{v['real_lab_pixels']}</td></tr>"
                   for name, v in summary["colour"].items())
    metric_rows = ""
    if summary["metrics"]:
        metric_rows = "".join(f"<tr><td>{esc(str(k))}</td><td>{esc(str(v))}</td></tr>"
                              for k, v in summary["metrics"].items())
    legend = " ".join(f"<span style='background:rgb{tuple(c['color'][:3])};padding:2px 8px;border-radius:3px'>"
                      f"{esc(c['name'])}</span>" for c in classes if c["id"] != 0)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>histosynth demo</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}}img{{max-width:100%}}
.row{{display:flex;gap:12px}}.row figure{{flex:1;margin:0}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}figcaption{{font-size:90%;color:#555}}</style></head>
<body><h1>histosynth demo — a synthetic H&amp;E slide</h1>
<p>{summary['size']}×{summary['size']} px at the bundled model's resolution, random-offset grid sampler,
stochastic DPM-Solver++ {summary['steps']} steps, mask guidance {summary['guidance']}, seed {summary['seed']}.
Generated in {summary['generation_seconds']} s on this machine (peak memory {summary['peak_rss_mb']} MB);
{summary['unet_evals_per_output_latent_pixel_per_step']} UNet evaluations per output latent pixel per step
({summary['cost_per_pass']} per guidance pass). Everything here is synthetic.</p>
<p>Zoom into the full slide: <a href="viewer/index.html">the static viewer</a> (or <code>histosynth view
slide.tiff</code>). Classes: {legend}</p>
<div class="row"><figure><img src="{_png_uri(preview)}"><figcaption>Generated slide</figcaption></figure>
<figure><img src="{_png_uri(colorize(mask_small, classes))}"><figcaption>Generated mask</figcaption></figure></div>
<div class="row"><figure><img src="{_png_uri(overlay(preview, mask_small, classes))}"><figcaption>Overlay</figcaption></figure>
<figure><img src="{_png_uri(crop)}"><figcaption>Centre crop at full resolution</figcaption></figure></div>
<h2>Seams: fixed tiles vs the random-offset grid</h2>
<p>Same model, mask and seed; seam score = gradient across the last step's cut lines ÷ gradient on control lines
that lie away from every recent step's cuts, on lossless pixels. Real tissue of the same size scores
{summary['seam_reference_mean']} on average; its 95th percentile over 20 random grids is
{summary['seam_reference_p95']}. The periodicity score needs no record of the cuts: energy of the gradient profiles
at the patch period and its harmonics over neighbouring frequencies (real tissue, 95th percentile of 20 crops:
{summary['periodicity_reference_p95']}); p is how often the image's own profiles, with any period taken out, score
as high (200 stationary surrogates): under 0.05, a period is there.</p>
<div class="row"><figure><img src="{_png_uri(comparison['tiles']['image'])}"><figcaption>Fixed tiles: seam score
{seams['tiles']['seam_score']}, periodicity {seams['tiles']['periodicity']} (p = {seams['tiles']['periodicity_p']};
cost {seams['tiles']['cost_per_pass']})</figcaption></figure>
<figure><img src="{_png_uri(comparison['random']['image'])}"><figcaption>Random-offset grid: seam score
{seams['random']['seam_score']}, periodicity {seams['random']['periodicity']}
(p = {seams['random']['periodicity_p']}; cost {seams['random']['cost_per_pass']})</figcaption></figure></div>
<h2>Colour per class</h2><p>Mean CIELAB colour of each class of the generated slide under its generated mask,
against real tissue of the bundled slide under its weak labels. The generated mask is drawn by the mask model at
{summary['mask_mpp']} µm/px, so its classes are regions; the reference labels real tissue the same way (the majority
weak label of each {summary['mask_mpp']} µm block, as in the label maps the mask model learned from). Per-pixel weak
labels make "nuclei" the darkest pixels only; that comparison is shown on the right.</p>
<table><tr><th>class</th><th>ΔE*ab (regions)</th><th>generated L*a*b*</th><th>real L*a*b* (regions)</th>
<th>ΔE*ab (per pixel)</th><th>real L*a*b* (per pixel)</th></tr>{rows}</table>
<h2>Fidelity and privacy</h2><p>Generated {comparison and ''}patches against the bundled slide's splits
(features named below; each number beside its real-vs-real reference).</p>
<table>{metric_rows or '<tr><td>not computed</td></tr>'}</table>
<p style="color:#777">histosynth — synthetic data, not patient data.</p></body></html>"""
