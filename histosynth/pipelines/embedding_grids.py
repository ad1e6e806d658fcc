"""SSL-embedding grids for the image model (Graikos et al. 2024, §3): from a reference image or slide, cut into an R×C
grid of patch-sized crops centred on the cells of an R×C partition and embedded, or from the embedding prior for a
caption or a class (the prior they describe but never released), sampled as large as the output. ``EmbeddingGrid``
stretches a grid over the output canvas; ``embedding_conditions`` is what ``generate`` and ``text_to_slide`` ask.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from histosynth.conditions.embedding import EmbeddingGrid, normalize_embeddings
from histosynth.conditions.encoders import Encoder, embed_images, load_encoder
from histosynth.conditions.text import load_text_encoder
from histosynth.data.slides import open_slide
from histosynth.errors import HistosynthError
from histosynth.models.bundle import Bundle, load_bundle
from histosynth.models.prior import EmbeddingPrior
from histosynth.pixels import from_uint8
from histosynth.sampling.canvas import CanvasDenoiser, RandomOffsetGrid, canvas_noise
from histosynth.sampling.guidance import guided
from histosynth.sampling.patch import run_scheduler, sample_patch

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
    images = from_uint8(np.stack(crops))  # (R·C, 3, P, P)
    grid = embed_images(encoder, images, batch_size).reshape(rows, cols, -1)  # (R, C, D)
    check_grid_width(model, grid)
    return normalize_embeddings(grid) if embedding_settings(model)["normalize"] else grid


def prior_conditions(prior: Bundle, text_vector: torch.Tensor | None = None, class_name: str | None = None) -> dict:
    """The condition dict of one sample: a text embedding (1, T) or a class one-hot (1, n)."""
    config = prior.config
    conditions = {}
    if class_name is not None:
        classes = config.get("labels", [])
        if class_name not in classes:
            raise HistosynthError(f"unknown class '{class_name}' for this prior; it knows: {', '.join(classes)}")
        one_hot = torch.zeros(1, len(classes))
        one_hot[0, classes.index(class_name)] = 1
        conditions["class"] = one_hot
    if text_vector is not None:
        expected = int(config["text_dim"])
        if text_vector.shape[-1] != expected:
            raise HistosynthError(f"text embedding is {text_vector.shape[-1]}-wide; the prior takes {expected}")
        conditions["text"] = text_vector.reshape(1, -1).float()
    return conditions


def load_prior(path: str) -> Bundle:
    prior = load_bundle(path, kind="prior")
    return prior


def sample_grids(prior: Bundle, conditions: dict, n: int = 1, steps: int = 25, seed: int = 0,
                 guidance: float = 2.0, scheduler: str = "dpm++", device: str = "cpu") -> torch.Tensor:
    """``n`` raw embedding grids (n, k, k, D) from the prior, guided towards ``conditions`` at ``guidance``."""
    model: EmbeddingPrior = prior.components["prior"].to(device).eval()
    k, dim = int(model.config.grid), int(model.config.dim)
    conditions = {name: value.to(device).expand(n, -1) for name, value in conditions.items()}
    denoiser = guided(model, {name: guidance for name in conditions})
    standardized = sample_patch(denoiser, prior.sampling_scheduler(scheduler), (n, dim, k, k), steps, seed,
                                conditions, device)  # (n, D, k, k)
    with torch.no_grad():
        raw = model.unstandardize(standardized)
    return raw.permute(0, 2, 3, 1).float().cpu()  # (n, k, k, D)


def sample_large_grid(prior: Bundle, conditions: dict, shape: tuple[int, int], steps: int = 25, seed: int = 0,
                      guidance: float = 2.0, scheduler: str = "dpm++", device: str = "cpu") -> torch.Tensor:
    """One raw grid (R, C, D) of any size: the prior, trained on k×k blocks of adjacent patches, denoises the
    R×C grid as a canvas — k×k windows on a random-offset grid, fresh at every step (sampling/canvas.py) — so a
    grid is as large as the image it conditions, each node one patch, instead of a k×k layout stretched over it."""
    model: EmbeddingPrior = prior.components["prior"].to(device).eval()
    k, dim = int(model.config.grid), int(model.config.dim)
    if tuple(shape) == (k, k):
        return sample_grids(prior, conditions, 1, steps, seed, guidance, scheduler, device)[0]
    layout = RandomOffsetGrid(k, seed)
    denoiser = guided(model, {name: guidance for name in conditions})
    canvas = CanvasDenoiser(denoiser, layout, tuple(shape), {n: v.to(device) for n, v in conditions.items()})
    sampler = prior.sampling_scheduler(scheduler)
    sampler.set_timesteps(steps, device=device)
    generator = torch.Generator().manual_seed(seed)
    standardized = run_scheduler(canvas, canvas_noise(layout, dim, tuple(shape), generator, device), sampler,
                                 generator=generator)[:, :, :shape[0], :shape[1]]  # (1, D, R, C)
    with torch.no_grad():
        raw = model.unstandardize(standardized)
    return raw[0].permute(1, 2, 0).float().cpu()  # (R, C, D)


def prior_grid(prior: Bundle, text: str | None = None, class_name: str | None = None, seed: int = 0,
               steps: int = 25, guidance: float = 2.0, device: str = "cpu",
               shape: tuple[int, int] | None = None) -> torch.Tensor:
    """One raw grid for a caption or a class: (k, k, D), or (R, C, D) for ``shape`` = (R, C)."""
    if text is None and class_name is None:
        raise HistosynthError("the prior needs --text or --class")
    vector = load_text_encoder(prior.config["text_encoder"])([text]) if text is not None else None
    conditions = prior_conditions(prior, vector, class_name)
    if shape is not None:
        return sample_large_grid(prior, conditions, shape, steps, seed, guidance, device=device)
    return sample_grids(prior, conditions, 1, steps, seed, guidance, device=device)[0]


def grid_shape(model: Bundle, width: int, height: int) -> tuple[int, int]:
    """Grid nodes for a ``width``×``height`` px output: one per patch-sized cell (at least one)."""
    patch = int(model.config["patch_size"])
    return max(1, round(height / patch)), max(1, round(width / patch))


def embedding_conditions(model: Bundle, width: int, height: int, reference: str | None = None,
                         prior: str | None = None, text: str | None = None, class_name: str | None = None,
                         seed: int = 0, steps: int = 25, prior_guidance: float = 2.0, device: str = "cpu",
                         encoder: str | None = None) -> dict:
    """``{"embedding": EmbeddingGrid}`` for a ``width``×``height`` px output, from a reference image/slide
    (its layout scaled to the output) or from the prior (a caption or class); ``{}`` when neither is asked."""
    if reference is None and prior is None:
        if text is not None or class_name is not None:
            raise HistosynthError("--text and --class need --prior (an embedding prior: `histosynth train prior`)")
        return {}
    if reference is not None and prior is not None:
        raise HistosynthError("give either --reference or --prior, not both")
    facts = embedding_settings(model)
    if reference is not None:
        grid = reference_grid(model, model_encoder(model, encoder, device), reference)
    else:
        loaded = load_prior(prior)
        grid = prior_grid(loaded, text, class_name, seed, steps, prior_guidance, device,
                          shape=grid_shape(model, width, height))
        check_grid_width(model, grid, f"embedding grid of prior {prior}")
        if facts["encoder"] and loaded.config.get("embedding_encoder") != facts["encoder"]:
            raise HistosynthError(f"{prior}: the prior was trained on embeddings of '{loaded.config.get('embedding_encoder')}', "
                                  f"the model on those of '{facts['encoder']}'")
        if facts["normalize"]:
            grid = normalize_embeddings(grid)
    return {"embedding": embedding_grid(model, grid, width, height)}
