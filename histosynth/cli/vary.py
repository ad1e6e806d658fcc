"""CLI command: ``histosynth vary`` (variations of a reference image that follow its SSL embeddings)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from histosynth.cli.app import app


@app.command("vary")
def vary_cmd(image: Path = typer.Argument(..., help="Reference image (PNG/JPEG at the model's µm/px) or slide."),
             model: Path = typer.Option(..., "--model", help="Embedding-conditioned image model folder."),
             out: Path = typer.Option(..., "--out", help="Output folder for variation-NN.png."),
             n: int = typer.Option(8, "--n", "-n", help="Number of variations (-n under torchrun)."),
             guidance: float = typer.Option(2.0, help="Classifier-free guidance scale of the embedding."),
             steps: int = typer.Option(25, help="Denoising steps."),
             scheduler: str = typer.Option("dpm++", help="dpm++, ddim, ddpm or euler."),
             sampler: str = typer.Option("random", help="Canvas sampler for references larger than a patch: "
                                         "random, tiles or multidiffusion."),
             batch: int = typer.Option(8, help="Patches per UNet call; one-patch references: variations per group "
                                     "(same --batch, same pictures)."),
             seed: int = typer.Option(0, help="Random seed of the first variation (the others follow)."),
             encoder: Optional[str] = typer.Option(None, "--encoder", help="The model's encoder, if it moved "
                                                   "(its weights must be the same)."),
             device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda when available).")):
    """Variations of a reference image: new images of its size that follow its SSL embeddings."""
    from histosynth.pipelines.vary import vary

    paths = vary(str(model), str(image), str(out), n=n, steps=steps, seed=seed, guidance=guidance,
                 scheduler=scheduler, sampler=sampler, batch=batch, device=device, encoder=encoder)
    typer.echo(f"wrote {len(paths)} variation(s) to {out}")
