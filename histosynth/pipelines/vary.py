"""Variations of a reference image (Graikos et al. 2024, §3): new images of its size that follow the embedding grid
of the reference (pipelines/embedding_grids.py). For a reference of exactly one patch the variations are plain patch
samples; for a larger one every variation is a canvas of the reference's size.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from histosynth.checks import finite_number, one_of, require_finite, whole_number
from histosynth.io.atomic import atomic_files, atomic_path
from histosynth.io.paths import check_outputs
from histosynth.io.masks import write_png
from histosynth.models.autoencoder import decode_latents
from histosynth.models.bundle import load_bundle
from histosynth.pipelines.embedding_grids import (
    condition_vector,
    embedding_grid,
    embedding_settings,
    model_encoder,
    reference_grid,
    reference_size,
)
from histosynth.pipelines.generate_slide import GenerateSettings, SlideGenerator
from histosynth.pipelines.sample_patches import sample_images
from histosynth.sampling.decode import decode_full
from histosynth.sampling.distributed import process_group
from histosynth.version import __version__


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
                                   device=device, embedding=condition_vector(model, grid[0, 0][None]),
                                   embedding_guidance=guidance)
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
                                       embedding=condition)
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
    return {"software": "histosynth", "version": __version__, "synthetic": True,
            "model_hash": model.model_hash, "reference": str(image), "encoder": ref_encoder.id,
            "grid": list(grid.shape[:2]), "size": list(size), "seeds": seeds,
            "steps": steps, "scheduler": scheduler, "sampler": "patch" if single else sampler,
            "embedding_guidance": guidance, "normalized_embeddings": facts["normalize"],
            "files": [p.name for p in paths]}
