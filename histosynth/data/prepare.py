"""``histosynth prepare``: slides -> the on-disk training dataset of design.md §5, written atomically."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from histosynth.data.dataset import INDEX, VERSION
from histosynth.data.labels import (
    AUTO_CLASSES,
    PALETTE,
    UNKNOWN,
    auto_label_thresholds,
    check_feature_classes,
    check_raster_classes,
    classes_from_geojson,
    downsample_labels,
    load_class_map,
    load_label_raster,
    rasterize_features,
    read_geojson,
    sample_label_raster,
)
from histosynth.data.labels import auto_labels as weak_labels
from histosynth.data.regions import MIN_REGION_UM2, cell_sums, fit_regions, region_map, sample_regions
from histosynth.data.regions import region_classes as region_classes_of
from histosynth.data.slides import Slide, open_slide
from histosynth.data.tiling import (
    Patch,
    assign_groups,
    band_regions,
    choose_holdout,
    drop_overlapping,
    inside,
    patch_grid,
    tissue_mask,
)
from histosynth.checks import finite_number, fraction, whole_number
from histosynth.errors import HistosynthError
from histosynth.io.atomic import atomic_dir
from histosynth.io.paths import check_outputs

LABELMAP_FACTOR = 8  # label maps are 8× coarser than patches: the mask model's resolution
AUTO_LABEL_KINDS = ("regions", "colour")
GEOJSON_SUFFIXES = (".geojson", ".json")
RASTER_SUFFIXES = (".png", ".tif", ".tiff")


def _label_files(option: str, path: str | Path, slides: list[Path], suffixes: tuple[str, ...]) -> list[Path]:
    """One label file per slide: ``path`` itself for a single slide, else ``path/<slide stem><suffix>``."""
    path = Path(path)
    if not path.exists():
        raise HistosynthError(f"{path}: file not found")
    if not path.is_dir():
        if len(slides) > 1:
            raise HistosynthError(f"{path}: one {option} file for {len(slides)} slides; pass a folder holding one "
                                  f"file per slide, named after it (e.g. {slides[0].stem}{suffixes[0]})")
        return [path]
    files = []
    for slide in slides:
        found = [path / f"{stem}{suffix}" for stem in (slide.stem, slide.name) for suffix in suffixes
                 if (path / f"{stem}{suffix}").is_file()]
        if not found:
            raise HistosynthError(f"{path}: no {option} file for slide '{slide.name}' "
                                  f"(expected {slide.stem}{suffixes[0]})")
        files.append(found[0])
    return files


def _read_cases(path: str | Path, slides: list[Path], what: str = "case") -> list[str]:
    """The second column of a two-column CSV for each slide, found by its file name, path or stem."""
    path = Path(path)
    try:
        with open(path, newline="") as handle:
            rows = {r[0].strip(): r[1].strip() for r in csv.reader(handle) if len(r) >= 2}
    except FileNotFoundError:
        raise HistosynthError(f"{path}: file not found") from None
    cases = []
    for slide in slides:
        case = rows.get(slide.name) or rows.get(str(slide)) or rows.get(slide.stem)
        if case is None:
            raise HistosynthError(f"{path}: no {what} for slide '{slide.name}'")
        cases.append(case)
    return cases


class _Labeller:
    """Masks for one slide at the dataset resolution, from the chosen label source: ``colour`` (per-pixel weak
    labels), ``regions`` (compartments, data/regions.py), ``geojson`` or ``raster``."""

    def __init__(self, slide: Slide, mpp: float, kind: str, classes: list[dict], features: list | None = None,
                 raster: np.ndarray | None = None, path: str | Path = ""):
        self.slide, self.mpp, self.kind, self.classes = slide, mpp, kind, classes
        self.features, self.path = features, path
        self.scale = slide.mpp / mpp  # output px per level-0 px
        if kind in ("colour", "regions"):
            self.thresholds = auto_label_thresholds(slide.thumbnail(mpp * 2))
        self.raster = raster  # (h, w) class ids at the raster's own resolution, sampled lazily per window
        self.regions: np.ndarray | None = None  # the slide's region map (label-map cells), set by the joint fit

    def _tiles(self, tile: int = 2048):
        """Level-0 origin, dataset-px offset and size of tiles covering the slide in whole label-map cells."""
        width, height = self.slide.size_at(self.mpp)
        for ty in range(0, height, tile):
            for tx in range(0, width, tile):
                w, h = min(tile, width - tx), min(tile, height - ty)
                w, h = w - w % LABELMAP_FACTOR, h - h % LABELMAP_FACTOR
                if w and h:
                    yield (int(tx / self.scale), int(ty / self.scale)), (tx, ty), (w, h)

    def region_sums(self) -> np.ndarray:
        """Per label-map cell sums of tissue, nuclei and colour over the whole slide (data/regions.py)."""
        width, height = self.slide.size_at(self.mpp)
        out = np.zeros((5, height // LABELMAP_FACTOR, width // LABELMAP_FACTOR), np.float32)
        for (x0, y0), (tx, ty), (w, h) in self._tiles():
            sums = cell_sums(self.slide.read_region(x0, y0, w, h, self.mpp), self.thresholds, LABELMAP_FACTOR)
            oy, ox = ty // LABELMAP_FACTOR, tx // LABELMAP_FACTOR
            out[:, oy:oy + sums.shape[1], ox:ox + sums.shape[2]] = sums
        return out

    def window(self, x: int, y: int, width: int, height: int, rgb: np.ndarray | None = None) -> np.ndarray:
        """Class ids (height, width) of the window at level-0 (x, y), at the dataset resolution."""
        if self.kind == "colour":
            rgb = rgb if rgb is not None else self.slide.read_region(x, y, width, height, self.mpp)
            return weak_labels(rgb, self.thresholds)
        if self.kind == "regions":
            return sample_regions(self.regions, (x, y), (width, height), self.scale, LABELMAP_FACTOR / self.scale,
                                  len(self.classes) - 1)
        if self.kind == "geojson":
            return rasterize_features(self.features, self.classes, (width, height), self.scale, self.path, (x, y))
        return sample_label_raster(self.raster, self.slide.dimensions, (x, y), (width, height), self.scale)

    def labelmap(self) -> np.ndarray:
        """The whole slide's class map at LABELMAP_FACTOR × the dataset's µm/px, built tile by tile."""
        if self.kind == "regions":
            return self.regions
        width, height = self.slide.size_at(self.mpp)
        num = max(c["id"] for c in self.classes)
        out = np.zeros((height // LABELMAP_FACTOR, width // LABELMAP_FACTOR), np.uint8)
        for (x0, y0), (tx, ty), (w, h) in self._tiles():
            small = downsample_labels(self.window(x0, y0, w, h), LABELMAP_FACTOR, num)
            oy, ox = ty // LABELMAP_FACTOR, tx // LABELMAP_FACTOR
            out[oy:oy + small.shape[0], ox:ox + small.shape[1]] = small
        return out


def prepare_dataset(slides: list[str | Path], out: str | Path, mpp: float, patch: int,
                    source_mpp: float | None = None, stride: int | None = None, annotations: str | Path | None = None,
                    labels: str | Path | None = None, auto_labels: bool | str = False, label_fraction: float = 1.0,
                    test_fraction: float = 0.2, val_fraction: float = 0.1, holdout_fraction: float = 0.1,
                    cases: str | Path | None = None, seed: int = 0, progress: bool = True, *,
                    classes: str | Path | None = None, min_tissue: float = 0.5,
                    auto_labels_: bool | str = False, classes_path: str | Path | None = None,
                    region_classes: int = 3, slide_labels: str | Path | None = None) -> dict:
    """Cut slides into patches with masks, split them, and write the dataset folder; returns a summary.

    ``annotations`` (QuPath GeoJSON) and ``labels`` (class-id rasters) are a file for one slide or a folder with
    one file per slide named after it; ``classes`` is a class map JSON (default: the names or ids found).
    ``slide_labels``: a CSV of slide file name -> label (a subtype, an organ): stored with each source, it can
    condition the mask model and be a classification target.
    ``auto_labels``: ``"regions"`` (or True: tissue compartments, ``region_classes`` classes including background;
    data/regions.py) or ``"colour"`` (per-pixel background / stroma / nuclei). ``auto_labels_`` and ``classes_path``
    are older spellings of ``auto_labels`` and ``classes``.
    """
    auto_labels = auto_labels or auto_labels_
    if auto_labels is True:
        auto_labels = "regions"
    if auto_labels and auto_labels not in AUTO_LABEL_KINDS:
        raise HistosynthError(f"unknown --auto-labels kind '{auto_labels}'; choose {' or '.join(AUTO_LABEL_KINDS)}")
    classes_path = classes if classes is not None else classes_path
    out = Path(out)
    if out.exists():
        raise HistosynthError(f"{out}: already exists; choose another --out or remove it")
    if sum(bool(v) for v in (annotations, labels, auto_labels)) > 1:
        raise HistosynthError("give at most one of --annotations, --labels, --auto-labels")
    for name, value in (("label-fraction", label_fraction), ("test-fraction", test_fraction),
                        ("val-fraction", val_fraction), ("holdout-fraction", holdout_fraction),
                        ("min-tissue", min_tissue)):
        fraction(f"--{name}", value)
    if test_fraction + val_fraction >= 1:
        raise HistosynthError(f"--test-fraction + --val-fraction must leave room for training, got "
                              f"{test_fraction} + {val_fraction}")
    finite_number("--mpp", mpp, above=0.0)
    if source_mpp is not None:
        finite_number("--source-mpp", source_mpp, above=0.0)
    whole_number("--patch", patch)
    if stride is not None:
        whole_number("--stride", stride)
    whole_number("--seed", seed, 0)
    if not slides:
        raise HistosynthError("no slides given")
    check_outputs({"--out": out}, {"SLIDES": list(slides), "--annotations": annotations, "--labels": labels,
                                   "--cases": cases, "--classes": classes_path, "--slide-labels": slide_labels},
                  folders=["--out"])
    stride = stride or patch
    rng = np.random.default_rng(seed)
    paths = [Path(p) for p in slides]
    opened = [open_slide(p, source_mpp) for p in paths]
    for slide in opened:
        w, h = slide.size_at(mpp)
        if w < patch or h < patch:
            raise HistosynthError(f"{slide.path}: patch of {patch} px at {mpp} µm/px is larger than the slide "
                                  f"({w}×{h} px at that resolution)")
    kind = None
    label_paths: list[Path | None] = [None] * len(paths)
    features: list[list | None] = [None] * len(paths)
    rasters: list[np.ndarray | None] = [None] * len(paths)
    class_map = [UNKNOWN]
    if auto_labels == "colour":
        kind, class_map = "colour", AUTO_CLASSES
    elif auto_labels == "regions":
        kind, class_map = "regions", region_classes_of(region_classes)
    elif annotations:
        kind = "geojson"
        label_paths = _label_files("annotation", annotations, paths, GEOJSON_SUFFIXES)
        features = [read_geojson(f) for f in label_paths]
        class_map = load_class_map(classes_path) if classes_path else \
            classes_from_geojson([feature for found in features for feature in found])
        for found, file in zip(features, label_paths):
            check_feature_classes(found, class_map, file)
    elif labels:
        kind = "raster"
        label_paths = _label_files("label", labels, paths, RASTER_SUFFIXES)
        rasters = [load_label_raster(f) for f in label_paths]
        if classes_path:
            class_map = load_class_map(classes_path)
        else:
            ids = sorted(set().union(*(np.unique(r).tolist() for r in rasters)) - {0})
            class_map = [UNKNOWN] + [{"id": int(i), "name": f"class {i}", "color": PALETTE[(int(i) - 1) % len(PALETTE)]}
                                     for i in ids]
        for raster, file in zip(rasters, label_paths):
            check_raster_classes(raster, class_map, file)
    classes = class_map
    labellers = [_Labeller(s, mpp, kind, classes, features[i], rasters[i], label_paths[i] or "") if kind else None
                 for i, s in enumerate(opened)]
    if kind == "regions":  # one clustering for all slides, so a class means the same compartment in each
        sums = [labeller.region_sums() for labeller in tqdm(labellers, desc="regions", disable=not progress)]
        model = fit_regions(sums, len(classes) - 1, mpp * LABELMAP_FACTOR, LABELMAP_FACTOR, seed)
        for labeller, slide_sums in zip(labellers, sums):
            labeller.regions = region_map(slide_sums, model)

    # Patches and splits -----------------------------------------------------------------------------------
    groups = _read_cases(cases, paths) if cases else [str(p) for p in paths]
    slide_label = _read_cases(slide_labels, paths, "label") if slide_labels else [None] * len(paths)
    group_split = assign_groups(groups, val_fraction, test_fraction, rng) if len(set(groups)) > 1 else None
    patches: list[Patch] = []
    regions = []
    thumbs = []
    for i, slide in enumerate(opened):
        thumb_mpp = mpp * LABELMAP_FACTOR
        thumb = slide.thumbnail(thumb_mpp)
        thumbs.append(thumb)
        tissue = tissue_mask(thumb)
        size0, stride0 = patch * mpp / slide.mpp, stride * mpp / slide.mpp
        grid = patch_grid(i, slide.dimensions, size0, stride0, tissue, slide.mpp / thumb_mpp, min_tissue)
        if group_split is not None:
            split = group_split[groups[i]]
            box = (0, 0, *slide.dimensions)
            regions.append({"source": i, "split": split, "box": list(box)})
            for p in grid:
                p.split = split
            patches += grid
        else:
            bands = band_regions(slide.dimensions, tissue, val_fraction, test_fraction, size0, stride0)
            for split, box in bands.items():
                regions.append({"source": i, "split": split, "box": list(box)})
                for p in grid:
                    if inside(p, box):
                        p.split = split
                        patches.append(p)
    train = [p for p in patches if p.split == "train"]
    # Overlapping patches: the fraction counts non-overlapping patch areas, so a holdout does not empty training.
    holdout = choose_holdout(train, holdout_fraction * min(1.0, stride / patch) ** 2, rng)
    patches = drop_overlapping(patches, holdout)
    if not patches:
        raise HistosynthError(f"{paths[0]}: no patch with enough tissue at {mpp} µm/px and {patch} px")
    labelled = set(rng.permutation(len(patches))[:int(round(len(patches) * label_fraction))].tolist()) \
        if kind else set()

    # Writing ------------------------------------------------------------------------------------------------
    counts = np.zeros(max(c["id"] for c in classes) + 1, np.int64)
    with atomic_dir(out) as tmp:
        for folder in ("images", "masks", "labelmaps"):
            (tmp / folder).mkdir()
        records = []
        for n, p in enumerate(tqdm(patches, desc="patches", disable=not progress, dynamic_ncols=True)):
            slide = opened[p.source]
            rgb = slide.read_region(p.x, p.y, patch, patch, mpp)
            name = f"{n:06d}.png"
            Image.fromarray(rgb).save(tmp / "images" / name)
            mask_name = None
            if n in labelled:
                mask = labellers[p.source].window(p.x, p.y, patch, patch, rgb)
                counts += np.bincount(mask.ravel(), minlength=len(counts))[:len(counts)]
                Image.fromarray(mask).save(tmp / "masks" / name)
                mask_name = f"masks/{name}"
            records.append({"image": f"images/{name}", "mask": mask_name, "source": p.source, "x": p.x, "y": p.y,
                            "split": p.split})
        sources = []
        for i, slide in enumerate(tqdm(opened, desc="label maps", disable=not progress, dynamic_ncols=True)):
            labelmap_name = None
            if labellers[i] is not None:
                labelmap_name = f"labelmaps/{i:03d}.png"
                Image.fromarray(labellers[i].labelmap()).save(tmp / labelmap_name)
            sources.append({"id": i, "path": str(slide.path.resolve()), "case": groups[i] if cases else None,
                            "source_mpp": slide.mpp, "width": slide.dimensions[0], "height": slide.dimensions[1],
                            "labelmap": labelmap_name, "labelmap_mpp": mpp * LABELMAP_FACTOR})
            if slide_label[i] is not None:
                sources[-1]["label"] = slide_label[i]
        index = {"version": VERSION, "classes": classes, "mpp": mpp, "patch_size": patch, "sources": sources,
                 "regions": regions, "patches": records}
        if kind == "regions":  # the rule its layouts keep: a mask model trained on them generates by it too
            index["labels"] = {"kind": "regions", "min_region_um2": MIN_REGION_UM2}
        (tmp / INDEX).write_text(json.dumps(index, indent=1))
    per_split = {s: sum(r["split"] == s for r in records) for s in ("train", "val", "test", "holdout")}
    total = counts.sum() or 1
    return {"out": str(out), "patches": len(records), "splits": per_split,
            "labelled": sum(r["mask"] is not None for r in records),
            "unlabelled": sum(r["mask"] is None for r in records),
            "class_fractions": {c["name"]: round(float(counts[c["id"]]) / total, 4) for c in classes}}
