"""CLI command: ``histosynth evaluate-layouts`` — the mask model's layouts beside real label maps."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from histosynth.cli.app import app


@app.command("evaluate-layouts")
def evaluate_layouts_command(
    mask_model: Path = typer.Option(..., "--mask-model", help="Mask model folder (`histosynth train mask`)."),
    data: Path = typer.Option(..., "--data", help="Dataset whose label maps are the real layouts."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for layouts.json and layouts.png."),
    n: int = typer.Option(32, "--n", "-n", min=10, help="Crops of each set (at least 10: five folds of two)."),
    crop: Optional[int] = typer.Option(None, "--crop", min=8, help="Crop side in mask px (default: the model's)."),
    split: str = typer.Option("train", "--split", help="Regions of the label maps the real crops come from."),
    steps: int = typer.Option(25, "--steps", min=1, help="Mask-model sampling steps."),
    context: int = typer.Option(0, "--context", help="Mask px of canvas each patch is sampled with on every side "
                                "(generate --mask-context)."),
    c2st_steps: int = typer.Option(300, "--c2st-steps", min=1, help="Training steps of each two-sample classifier."),
    seed: int = typer.Option(0, "--seed", help="Seed of the crops, the sampler and the classifier."),
    real_draws: int = typer.Option(5, "--real-draws", min=1, help="Other draws of real crops that show how far "
                                   "real layouts stray from their own reference."),
    single_patches: bool = typer.Option(False, "--single-patches", help="Draw each generated crop as one patch of "
                                        "its own, no canvas: what the model draws without what the canvas adds."),
) -> None:
    """Class fractions, region sizes, boundary length per area and a two-sample classifier: generated layouts
    against real label-map crops at the mask model's scale (within 25 % is the target)."""
    from histosynth.eval.c2st import C2STConfig
    from histosynth.pipelines.evaluate_layouts import evaluate_layouts, layouts_text

    result = evaluate_layouts(mask_model, data, out, n=n, crop=crop, split=split, steps=steps, seed=seed, context=context,
                              c2st=C2STConfig(steps=c2st_steps, seed=seed), real_draws=real_draws,
                              single_patches=single_patches)
    typer.echo(layouts_text(result))
    if out is not None:
        typer.echo(f"wrote {out / 'layouts.json'} and {out / 'layouts.png'}")
