"""Text or class -> embedding grid (the prior) -> slide of any size (Graikos et al. 2024's large-image pipeline with
the prior they describe but never released), and the ``--reference`` / ``--prior`` conditions of ``generate``."""
from __future__ import annotations

import torch

from histosynth.conditions.embedding import normalize_embeddings
from histosynth.conditions.text import load_text_encoder
from histosynth.errors import HistosynthError
from histosynth.models.bundle import Bundle, load_bundle
from histosynth.models.prior import EmbeddingPrior, prior_conditions
from histosynth.pipelines.vary import check_grid_width, embedding_grid, embedding_settings, model_encoder, reference_grid
from histosynth.sampling.canvas import CanvasDenoiser, RandomOffsetGrid, canvas_noise
from histosynth.sampling.guidance import guided
from histosynth.sampling.patch import run_scheduler, sample_patch


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


def text_to_slide(model_path: str, prior_path: str, out: str, settings, text: str | None = None,
                  class_name: str | None = None, embedding_guidance: float = 2.0, prior_guidance: float = 2.0,
                  device: str | None = None, **kwargs) -> dict:
    """Sample a grid for ``text`` or ``class_name`` from the prior and generate a slide that follows it."""
    from histosynth.pipelines.generate_slide import generate_slide

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_bundle(model_path, kind="image")
    conditions = embedding_conditions(model, settings.width, settings.height, prior=prior_path, text=text,
                                      class_name=class_name, seed=settings.seed, steps=settings.steps,
                                      prior_guidance=prior_guidance, device=device)
    settings.extra_guidance = dict(settings.extra_guidance) | {"embedding": embedding_guidance}
    return generate_slide(model_path, out, settings, device=device, global_conditions=conditions, **kwargs)
