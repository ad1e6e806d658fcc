"""CLI command: ``histosynth synthesize`` (paired image/mask datasets for segmentation training)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from histosynth.cli.app import app


@app.command("synthesize")
def synthesize_cmd(model: Path = typer.Option(..., "--model", help="Image model folder."),
                   n: int = typer.Option(..., "--n", "-n", help="Number of image/mask pairs (-n under torchrun, "
                                         "whose own options --n would match)."),
                   out: Path = typer.Option(..., "--out", help="Dataset folder to write (images/, masks/, "
                                                               "dataset.json, manifest.json)."),
                   layouts: Optional[str] = typer.Option(None, "--layouts", help="Dataset whose real masks "
                                                         "(DATASET or DATASET:split) are flipped, rotated and "
                                                         "deformed into layouts."),
                   mask_model: Optional[Path] = typer.Option(None, "--mask-model", help="Mask model that samples "
                                                             "the layouts instead."),
                   styles: Optional[List[Path]] = typer.Option(None, "--styles", help="Style images: a folder, "
                                                               "image files or a slide (repeatable)."),
                   seed: int = typer.Option(0, help="Random seed; each pair depends only on it and its index."),
                   batch: int = typer.Option(8, help="Pairs per UNet call (same --batch, same bytes)."),
                   steps: int = typer.Option(25, help="Denoising steps."),
                   scheduler: str = typer.Option("dpm++sde", help="dpm++sde, dpm++, ddim, ddpm or euler."),
                   guidance: float = typer.Option(1.5, help="Classifier-free guidance scale of the mask."),
                   style_guidance: float = typer.Option(2.0, help="Style guidance scale (1: no extra pass)."),
                   elastic: float = typer.Option(0.03, help="Elastic deformation of real layouts (largest "
                                                            "displacement / patch side; 0: none)."),
                   device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda if available).")):
    """Synthesize a paired dataset: layouts (real or sampled) rendered in the given styles."""
    from histosynth.errors import HistosynthError
    from histosynth.pipelines.synthesize import SynthesizeSettings, synthesize_dataset

    if layouts is not None and mask_model is not None:
        raise HistosynthError("give either --layouts or --mask-model, not both")
    settings = SynthesizeSettings(n=n, seed=seed, batch=batch, steps=steps, scheduler=scheduler, guidance=guidance,
                                  style_guidance=style_guidance, elastic=elastic)
    summary = synthesize_dataset(model, out, settings, layouts, mask_model, list(styles or []), device)
    style = f", styles from {summary['style_images']} images in sets of {summary['style_set_size']}" \
        if summary["style_images"] else ""
    typer.echo(f"wrote {summary['pairs']} image/mask pairs to {out}{style}")
