"""Paired dataset synthesis: layouts (real masks, deformed, or sampled by the mask model) and styles in,
image/mask pairs out, written as a dataset folder (design.md §5) that ``PatchDataset`` reads.

Every item is a pure function of (seed, item index): its layout, its style set and its noise come from generators
seeded by those two numbers alone, so a multi-process run can split the items and write identical pairs. Items are
denoised in fixed groups of ``batch`` consecutive indices, the last one padded to full size: CPU kernels differ in the
last bits between batch shapes, so pairs are bit-identical for the same ``batch`` (design.md §2).

Under torchrun the groups are dealt round-robin to the processes, which write their pairs into one shared temporary
folder (a shared file system across nodes); the main process gathers the records, writes the index and manifest and
renames the folder into place.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from tqdm.auto import tqdm

from histosynth.checks import finite_number, one_of, require_finite, whole_number
from histosynth.data.dataset import INDEX, VERSION, load_dataset_index
from histosynth.dihedral import dihedral
from histosynth.errors import HistosynthError
from histosynth.io.atomic import shared_atomic_dir
from histosynth.io.paths import check_outputs
from histosynth.models.autoencoder import decode_latents
from histosynth.models.bundle import Bundle, load_bundle
from histosynth.models.denoiser import SCHEDULERS
from histosynth.pipelines.conditions import build_conditions, patch_tensors
from histosynth.pipelines.masks import sample_mask
from histosynth.pixels import from_uint8, to_uint8
from histosynth.sampling.distributed import ProcessGroup, process_group
from histosynth.sampling.guidance import guided
from histosynth.sampling.patch import initial_noise, run_scheduler
from histosynth.version import __version__

MANIFEST = "manifest.json"


@dataclass
class SynthesizeSettings:
    """Everything besides the inputs that determines the pairs; recorded in the manifest."""

    n: int
    seed: int = 0
    batch: int = 8
    steps: int = 25
    scheduler: str = "dpm++sde"
    guidance: float = 1.5  # mask guidance
    style_guidance: float = 2.0
    elastic: float = 0.03  # largest elastic displacement of real layouts, as a fraction of the patch side; 0: none
    mask_steps: int = 25

    def __post_init__(self):
        """Every value in range before anything is loaded or sampled."""
        whole_number("--n", self.n)
        whole_number("--seed", self.seed, 0)
        whole_number("--batch", self.batch)
        whole_number("--steps", self.steps)
        whole_number("--mask-steps", self.mask_steps)
        one_of("--scheduler", self.scheduler, SCHEDULERS)
        finite_number("--guidance", self.guidance)
        finite_number("--style-guidance", self.style_guidance)
        finite_number("--elastic", self.elastic, minimum=0.0, maximum=1.0)


# ----------------------------------------------------------------------------------------------------- layouts
def elastic_deform(mask: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth random displacement (Simard et al. 2003) of a class-id mask, nearest-neighbour so ids stay ids."""
    if strength <= 0:
        return mask
    h, w = mask.shape
    sigma = max(h, w) / 8
    fields = []
    for _ in range(2):
        field = ndimage.gaussian_filter(rng.standard_normal((h, w)), sigma, mode="wrap")  # (H, W)
        fields.append(field / (np.abs(field).max() + 1e-12) * strength * max(h, w))
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return ndimage.map_coordinates(mask, [yy + fields[0], xx + fields[1]], order=0, mode="reflect").astype(np.uint8)


class DatasetLayouts:
    """Real masks of a dataset folder (``DATASET`` or ``DATASET:split``, default train), randomly cropped to the
    patch size, flipped/rotated and elastically deformed."""

    def __init__(self, spec: str | Path, size: int, mpp: float, num_classes: int, strength: float):
        text = str(spec)
        root, split = Path(text), "train"
        if not root.exists() and ":" in text:
            head, tail = text.rsplit(":", 1)
            root, split = Path(head), tail
        index = load_dataset_index(root)
        if abs(float(index["mpp"]) - mpp) > 1e-6 * mpp:
            raise HistosynthError(f"{root}: layouts at {index['mpp']} µm/px, but the model works at {mpp} µm/px")
        if int(index["patch_size"]) < size:
            raise HistosynthError(f"{root}: masks of {index['patch_size']} px are smaller than the model's "
                                  f"patch size {size} px")
        self.root, self.split, self.size, self.strength = root, split, size, strength
        self.masks = [p["mask"] for p in index["patches"] if p["split"] == split and p.get("mask")]
        if not self.masks:
            raise HistosynthError(f"{root}: no labelled patches in split '{split}' to take layouts from")
        self.num_classes = num_classes

    def __call__(self, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
        name = self.masks[int(rng.integers(len(self.masks)))]
        path = self.root / name
        try:
            with Image.open(path) as image:
                mask = np.asarray(image).astype(np.uint8)
        except FileNotFoundError:
            raise HistosynthError(f"{path}: file not found (dataset incomplete)") from None
        if mask.ndim != 2 or int(mask.max()) > self.num_classes:
            raise HistosynthError(f"{path}: not a class-id mask the model knows (ids 0..{self.num_classes})")
        y = int(rng.integers(mask.shape[0] - self.size + 1))
        x = int(rng.integers(mask.shape[1] - self.size + 1))
        k = int(rng.integers(8))
        mask = np.ascontiguousarray(dihedral(mask[y:y + self.size, x:x + self.size], k))
        mask = elastic_deform(mask, self.strength, rng)
        record = {"kind": "dataset", "dataset": str(self.root), "split": self.split, "mask": name, "crop": [x, y],
                  "dihedral": k, "elastic": self.strength}
        return mask, record


class ModelLayouts:
    """Layouts sampled by a mask model at the patch size."""

    def __init__(self, path: str | Path, model: Bundle, size: int, settings: SynthesizeSettings, device: str):
        self.path, self.model, self.size, self.settings, self.device = str(path), model, size, settings, device

    def __call__(self, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
        seed = int(rng.integers(2**31))
        s = self.settings
        mask, _ = sample_mask(self.model, self.size, self.size, "random", s.mask_steps, seed, 8, s.scheduler,
                              device=self.device)
        return mask, {"kind": "mask-model", "model": self.path, "seed": seed, "steps": s.mask_steps}


# ------------------------------------------------------------------------------------------------------- items
@dataclass
class Item:
    index: int
    mask: np.ndarray  # (P, P) uint8 class ids
    layout: dict
    style: list[int]  # indices into the style pool
    noise_seed: int


def style_origins(labels: list[str]) -> list[list[int]]:
    """Pool indices grouped by the style image or slide they come from (a slide's crops are labelled PATH#cropN)."""
    groups: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(label.split("#crop")[0], []).append(i)
    return list(groups.values())


def plan_item(seed: int, index: int, layouts: Callable, origins: list[list[int]], set_size: int) -> Item:
    """Layout, style set and noise seed of item ``index``: a pure function of (seed, index).

    As in STEDM, a pair's style set comes from one style image or slide (drawn at random): a set mixing several
    labs' stains would describe none of them. A source with fewer images than the set size repeats them.
    """
    rng = np.random.default_rng([seed, index])
    noise_seed = int(rng.integers(2**62))
    style = []
    if origins:
        members = origins[int(rng.integers(len(origins)))]
        style = sorted(rng.choice(members, set_size, replace=len(members) < set_size).tolist())
    mask, layout = layouts(rng)
    return Item(index, mask, layout, style, noise_seed)


def _style_setup(model: Bundle, styles, settings: SynthesizeSettings, device: str):
    """(style pool images, their labels, set size, encoder) or empties when no style is given."""
    if not styles:
        return [], [], 0, None
    from histosynth.data.crops import load_style_images
    from histosynth.pipelines.conditions import style_crops_per_slide, style_encoder_of

    encoder = style_encoder_of(model).to(device).eval()
    size, mpp = int(model.config["patch_size"]), float(model.config["mpp"])
    pool, labels = load_style_images(styles, size, mpp, style_crops_per_slide(model), settings.seed)
    set_size = int(encoder.config.set_size)
    if encoder.config.aggregation == "mlp" and len(pool) < set_size:
        raise HistosynthError(f"{len(pool)} style images, but the model's MLP aggregator takes sets of {set_size}")
    return pool, labels, set_size, encoder


@torch.no_grad()
def _denoise(model: Bundle, items: list[Item], pool_tensor, encoder, settings: SynthesizeSettings,
             device: str) -> np.ndarray:
    """RGB (B, P, P, 3) uint8 of a group of items, each with its own noise generator."""
    factor, size = model.latent_factor, int(model.config["patch_size"])
    channels = model.unet.config.out_channels
    generators = [torch.Generator().manual_seed(item.noise_seed) for item in items]
    latents = torch.cat([initial_noise((1, channels, size // factor, size // factor), g, device)
                         for g in generators])  # (B, C, h, w)
    masks = torch.from_numpy(np.stack([item.mask for item in items])).long()  # (B, P, P)
    style = None
    if encoder is not None:  # one batch through the encoder: per-item calls would differ in the last bits
        sets = torch.stack([pool_tensor[item.style] for item in items]).to(device)  # (B, S, 3, P, P)
        style = encoder(sets).float()  # (B, D)
    conditions, scales = build_conditions(model, (size // factor, size // factor), mask=masks,
                                          guidance=settings.guidance, style=style,
                                          style_guidance=settings.style_guidance, device=device)
    conditions = patch_tensors(conditions, len(items))
    denoiser = guided(model.denoiser().to(device), scales)
    scheduler = model.sampling_scheduler(settings.scheduler)
    scheduler.set_timesteps(settings.steps, device=device)
    latents = run_scheduler(denoiser, latents, scheduler, conditions, generator=generators)
    require_finite(latents, model.path, "the denoised latents")
    images = require_finite(decode_latents(model.autoencoder.to(device), latents), model.path, "the decoded pixels")
    return to_uint8(images)


def _render_share(model: Bundle, layout_source, pool_tensor, labels: list, encoder, set_size: int,
                  settings: SynthesizeSettings, device: str, tmp: Path, final: Path, group: ProcessGroup,
                  progress: bool) -> list[tuple[dict, dict, dict]]:
    """Denoise and write this process's groups of items; their (source, patch record, manifest item) rows."""
    starts = list(range(0, settings.n, settings.batch))[group.rank::group.world]
    mpp, size = float(model.config["mpp"]), int(model.config["patch_size"])
    rows = []
    with tqdm(total=settings.n, desc="synthesizing", disable=not (progress and group.is_main),
              dynamic_ncols=True) as bar:  # closed on failure too: the error gets a line of its own
        for start in starts:
            items = [plan_item(settings.seed, i, layout_source,
                               style_origins(labels) if pool_tensor is not None else [], set_size)
                     for i in range(start, min(start + settings.batch, settings.n))]
            padded = items + [items[-1]] * (settings.batch - len(items))  # one fixed shape for every group
            images = _denoise(model, padded, pool_tensor, encoder, settings, device)[:len(items)]
            for item, rgb in zip(items, images):
                name = f"{item.index:06d}.png"
                Image.fromarray(rgb).save(tmp / "images" / name)
                Image.fromarray(item.mask).save(tmp / "masks" / name)
                style = [labels[j] for j in item.style]
                rows.append(({"id": item.index, "path": str(final / "images" / name), "case": None, "source_mpp": mpp,
                              "width": size, "height": size, "synthetic": True, "layout": item.layout,
                              "style": style},
                             {"image": f"images/{name}", "mask": f"masks/{name}", "source": item.index, "x": 0, "y": 0,
                              "split": "train"},
                             {"index": item.index, "image": f"images/{name}", "mask": f"masks/{name}",
                              "seed": item.noise_seed, "layout": item.layout, "style": style}))
            bar.update(min(len(items) * group.world, bar.total - bar.n))  # the others advance in step
    return rows


def synthesize_dataset(model_path: str | Path, out: str | Path, settings: SynthesizeSettings,
                       layouts: str | Path | None = None, mask_model_path: str | Path | None = None,
                       styles: list[str | Path] | None = None, device: str | None = None,
                       progress: bool = True) -> dict:
    """Write ``settings.n`` image/mask pairs to the dataset folder ``out`` atomically; returns a summary."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(out)
    if out.exists():
        raise HistosynthError(f"{out}: already exists; choose another --out or remove it")
    layouts_folder = str(layouts).rsplit(":", 1)[0] if layouts is not None and not Path(layouts).exists() else layouts
    check_outputs({"--out": out}, {"--model": model_path, "--layouts": layouts_folder, "--mask-model": mask_model_path,
                                   "--styles": styles}, folders=["--out"], sealed=["--model", "--mask-model"])
    if settings.n < 1:
        raise HistosynthError(f"--n must be at least 1, got {settings.n}")
    if settings.batch < 1:
        raise HistosynthError(f"--batch must be at least 1, got {settings.batch}")
    if (layouts is None) == (mask_model_path is None):
        raise HistosynthError("give either --layouts DATASET or --mask-model MODEL (the masks of the pairs)")
    model = load_bundle(model_path, kind="image")
    if not model.num_classes:
        raise HistosynthError(f"{model_path}: the model has no classes, so its images have no masks to pair with")
    size, mpp = int(model.config["patch_size"]), float(model.config["mpp"])
    if layouts is not None:
        layout_source = DatasetLayouts(layouts, size, mpp, model.num_classes, settings.elastic)
    else:
        mask_model = load_bundle(mask_model_path, kind="mask")
        if mask_model.num_classes != model.num_classes:
            raise HistosynthError(f"{mask_model_path}: mask model has {mask_model.num_classes} classes, "
                                  f"the image model {model.num_classes}")
        if abs(float(mask_model.config.get("mpp", mpp)) - mpp) > 1e-6 * mpp:
            raise HistosynthError(f"{mask_model_path}: mask model at {mask_model.config['mpp']} µm/px, the image "
                                  f"model at {mpp} µm/px")
        if size % mask_model.latent_factor:
            raise HistosynthError(f"{mask_model_path}: patch size {size} px is not a multiple of the mask model's "
                                  f"{mask_model.latent_factor} px")
        layout_source = ModelLayouts(mask_model_path, mask_model, size, settings, device)
    pool, labels, set_size, encoder = _style_setup(model, styles, settings, device)
    pool_tensor = from_uint8(np.stack(pool)) if pool else None

    group = process_group()
    final = out.resolve()
    with shared_atomic_dir(out, group) as tmp:
        if group.is_main:
            (tmp / "images").mkdir()
            (tmp / "masks").mkdir()
        group.barrier()
        rows = _render_share(model, layout_source, pool_tensor, labels, encoder, set_size, settings, device, tmp,
                             final, group, progress)
        rows = sorted(group.gather_objects(rows), key=lambda row: row[0]["id"])
        if group.is_main:
            size, mpp = int(model.config["patch_size"]), float(model.config["mpp"])
            index = {"version": VERSION, "classes": model.classes, "mpp": mpp, "patch_size": size,
                     "synthetic": True, "sources": [r[0] for r in rows], "patches": [r[1] for r in rows]}
            (tmp / INDEX).write_text(json.dumps(index, indent=1))
            manifest = {"software": "histosynth", "version": __version__, "synthetic": True,
                        "model": str(model_path), "model_hash": model.model_hash,
                        "layouts": str(layouts) if layouts is not None else None,
                        "mask_model": str(mask_model_path) if mask_model_path is not None else None,
                        "styles": [str(s) for s in styles or []], "style_set_size": set_size,
                        "settings": asdict(settings), "items": [r[2] for r in rows]}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return {"out": str(out), "pairs": settings.n, "style_images": len(pool), "style_set_size": set_size}
