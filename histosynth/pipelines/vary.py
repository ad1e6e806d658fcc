"""Variations of a reference image, and embedding grids from references (Graikos et al. 2024, §3).

A reference (a PNG/JPEG at the model's µm/px, or any slide, read at the model's µm/px) is cut into an R×C grid of
patch-sized crops centred on the cells of an R×C partition; their embeddings form the grid, which
``EmbeddingGrid`` stretches over the output canvas. For a reference of exactly one patch the variations are plain
patch samples; for a larger one every variation is a canvas of the reference's size.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

import histosynth
from histosynth.conditions.embedding import Encoder, EmbeddingGrid, embed_images, load_encoder, normalize_embeddings
from histosynth.data.slides import open_slide
from histosynth.errors import HistosynthError
from histosynth.checks import finite_number, one_of, require_finite, whole_number
from histosynth.io.atomic import atomic_files, atomic_path
from histosynth.io.paths import check_outputs
from histosynth.io.masks import write_png
from histosynth.models.autoencoder import decode_latents
from histosynth.models.bundle import Bundle, load_bundle
from histosynth.sampling.decode import decode_full
from histosynth.sampling.distributed import process_group

MAX_GRID_SIDE = 32  # reference grids are capped at 32×32 nodes: a whole slide is sampled, not tiled


def embedding_settings(model: Bundle) -> dict:
    """The embedding conditioning of an image model: width, encoder id and weights hash, normalisation."""
    conditioning = model.config.get("conditioning", {})
    dim = conditioning.get("global", {}).get("embedding")
    if dim is None:
        raise HistosynthError(f"{model.path}: this model has no embedding conditioning (train one with "
                              "`histosynth train image --embeddings ...`)")
    return {"dim": int(dim), "encoder": conditioning.get("embedding_encoder"),
            "weights_hash": conditioning.get("embedding_weights_hash"),
            "normalize": bool(conditioning.get("embedding_normalize", False))}


def model_encoder(model: Bundle, override: str | None = None, device: str = "cpu") -> Encoder:
    """The encoder the model was trained with (``override`` names a moved copy of it); its weights must match."""
    facts = embedding_settings(model)
    encoder_id = override or facts["encoder"]
    if not encoder_id:
        raise HistosynthError(f"{model.path}: the model does not record its embedding encoder; pass --encoder")
    encoder = load_encoder(encoder_id, device)
    if encoder.dim != facts["dim"]:
        raise HistosynthError(f"encoder '{encoder.id}' gives {encoder.dim}-wide embeddings; the model takes "
                              f"{facts['dim']}-wide ones")
    if facts["weights_hash"] and encoder.weights_hash != facts["weights_hash"]:
        raise HistosynthError(f"encoder '{encoder.id}' has other weights ({encoder.weights_hash[:12]}) than the one "
                              f"the model was trained with ({facts['weights_hash'][:12]})")
    return encoder


def condition_vector(model: Bundle, raw: torch.Tensor) -> torch.Tensor:
    """Raw embeddings (N, D) -> the model's condition vectors (its standardiser, when it has one)."""
    transform = model.components.get("embedding_encoder")
    if transform is None:
        return raw
    with torch.no_grad():
        return transform(raw.float()).float()


def embedding_grid(model: Bundle, grid: torch.Tensor, width: int, height: int) -> EmbeddingGrid:
    """The per-patch condition of a ``width``×``height`` px canvas from a raw grid (R, C, D)."""
    factor = model.latent_factor
    return EmbeddingGrid(grid, (height // factor, width // factor),
                         transform=lambda raw: condition_vector(model, raw))


def check_grid_width(model: Bundle, grid: torch.Tensor, what: str = "embedding grid") -> None:
    dim = embedding_settings(model)["dim"]
    if grid.shape[-1] != dim:
        raise HistosynthError(f"the {what} is {grid.shape[-1]}-wide but the model takes {dim}-wide embeddings "
                              f"(encoder '{embedding_settings(model)['encoder']}')")


def reference_size(model: Bundle, reference: str | Path) -> tuple[int, int]:
    """(width, height) of the reference in px at the model's µm/px (a plain image is taken to be at it)."""
    return open_slide(reference, source_mpp=model.config["mpp"]).size_at(model.config["mpp"])


def reference_grid(model: Bundle, encoder: Encoder, reference: str | Path, max_side: int = MAX_GRID_SIDE,
                   batch_size: int = 32) -> torch.Tensor:
    """Embeddings (R, C, D) of patch-sized crops of ``reference`` centred on an R×C partition of it, R ≈ H/P."""
    mpp, patch = float(model.config["mpp"]), int(model.config["patch_size"])
    slide = open_slide(reference, source_mpp=mpp)
    width, height = slide.size_at(mpp)
    if width < patch or height < patch:
        raise HistosynthError(f"{reference}: {width}×{height} px at {mpp} µm/px is smaller than the model's "
                              f"{patch}×{patch} px patch")
    rows = min(max_side, max(1, round(height / patch)))
    cols = min(max_side, max(1, round(width / patch)))
    tops = [min(max(0, round((i + 0.5) * height / rows - patch / 2)), height - patch) for i in range(rows)]
    lefts = [min(max(0, round((j + 0.5) * width / cols - patch / 2)), width - patch) for j in range(cols)]
    to_level0 = mpp / slide.mpp
    crops = [slide.read_region(round(x * to_level0), round(y * to_level0), patch, patch, mpp)
             for y in tops for x in lefts]  # R·C × (P, P, 3) uint8
    images = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 127.5 - 1  # (R·C, 3, P, P)
    grid = embed_images(encoder, images, batch_size).reshape(rows, cols, -1)  # (R, C, D)
    check_grid_width(model, grid)
    return normalize_embeddings(grid) if embedding_settings(model)["normalize"] else grid


def check_vary_options(n: int, steps: int, seed: int, guidance: float, scheduler: str, sampler: str,
                       batch: int) -> None:
    """The options of ``vary``, refused up front when out of range."""
    from histosynth.models.denoiser import SCHEDULERS

    whole_number("--n", n)
    whole_number("--steps", steps)
    whole_number("--seed", seed, 0)
    finite_number("--guidance", guidance)
    one_of("--scheduler", scheduler, SCHEDULERS)
    one_of("--sampler", sampler, ("random", "tiles", "multidiffusion"))
    whole_number("--batch", batch)


def vary(model_path: str, image: str, out_dir: str, n: int = 8, steps: int = 25, seed: int = 0,
         guidance: float = 2.0, scheduler: str = "dpm++", sampler: str = "random", batch: int = 8,
         device: str | None = None, encoder: str | None = None, progress: bool = True) -> list[Path]:
    """``n`` images of the reference's size that follow its embeddings: ``OUT_DIR/variation-NN.png`` plus
    ``variations.json`` (provenance); nothing is written if sampling fails. Under torchrun the variations (or
    groups of ``batch`` of them, for one-patch references) are dealt round-robin to the processes."""
    from histosynth.pipelines.generate_slide import GenerateSettings, SlideGenerator
    from histosynth.pipelines.sample_patches import sample_images

    check_vary_options(n, steps, seed, guidance, scheduler, sampler, batch)
    check_outputs({"--out": out_dir}, {"--model": model_path, "IMAGE": image}, folders=["--out"], sealed=["--model"])
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_bundle(model_path, kind="image")
    facts = embedding_settings(model)
    ref_encoder = model_encoder(model, encoder, device)
    grid = reference_grid(model, ref_encoder, image)  # (R, C, D)
    width, height = reference_size(model, image)
    patch, factor = int(model.config["patch_size"]), model.latent_factor
    single = grid.shape[:2] == (1, 1) and (width, height) == (patch, patch)
    group = process_group()
    pictures: dict[int, np.ndarray] = {}
    if single:
        # Fixed groups of ``batch`` variations, each seeded by its first index: any split among processes gives the
        # same pictures.
        size = (patch, patch)
        seeds = [seed + i // batch * batch for i in range(n)]
        for start in list(range(0, n, batch))[group.rank::group.world]:
            count = min(batch, n - start)
            images = sample_images(model, None, n=count, steps=steps, scheduler=scheduler, seed=seed + start,
                                   device=device, extra_guidance={"embedding": guidance},
                                   global_conditions={"embedding": condition_vector(model, grid[0, 0][None])})
            pictures.update({start + j: picture for j, picture in enumerate(images)})
    else:
        size = (width // factor * factor, height // factor * factor)
        seeds = [seed + i for i in range(n)]
        vae = model.autoencoder.to(device)
        for i in list(range(n))[group.rank::group.world]:
            settings = GenerateSettings(width=size[0], height=size[1], sampler=sampler, guidance=1.0, steps=steps,
                                        seed=seeds[i], batch=batch, scheduler=scheduler,
                                        extra_guidance={"embedding": guidance})
            condition = embedding_grid(model, grid, *size)
            generator = SlideGenerator(model, settings, device=device, progress=progress and group.is_main,
                                       global_conditions={"embedding": condition})
            latents = generator.sample_latents()
            decode = lambda z: require_finite(decode_latents(vae, z), model.path, "the decoded pixels")  # noqa: E731
            pictures[i] = decode_full(decode, latents, factor)
    group.barrier()  # every process has sampled its share before any file is written
    out = Path(out_dir)
    paths = [out / f"variation-{i:02d}.png" for i in range(n)]
    if group.world == 1:  # one process holds every picture: all files appear together, or none
        with atomic_files({i: path for i, path in enumerate(paths)} | {"record": out / "variations.json"}) as tmp:
            for i, picture in pictures.items():
                write_png(tmp[i], picture)
            tmp["record"].write_text(json.dumps(_record(model, image, ref_encoder, grid, size, seeds, steps,
                                                        scheduler, single, sampler, guidance, facts, paths), indent=2))
        return paths
    for i, picture in pictures.items():
        write_png(paths[i], picture)
    group.barrier()
    if not group.is_main:
        return paths
    with atomic_path(out / "variations.json") as tmp:
        tmp.write_text(json.dumps(_record(model, image, ref_encoder, grid, size, seeds, steps, scheduler, single,
                                          sampler, guidance, facts, paths), indent=2))
    return paths


def _record(model, image, ref_encoder, grid, size, seeds, steps, scheduler, single, sampler, guidance, facts,
            paths) -> dict:
    """``variations.json``: what made the variations (provenance)."""
    return {"software": "histosynth", "version": histosynth.__version__, "synthetic": True,
            "model_hash": model.model_hash, "reference": str(image), "encoder": ref_encoder.id,
            "grid": list(grid.shape[:2]), "size": list(size), "seeds": seeds,
            "steps": steps, "scheduler": scheduler, "sampler": "patch" if single else sampler,
            "embedding_guidance": guidance, "normalized_embeddings": facts["normalize"],
            "files": [p.name for p in paths]}
