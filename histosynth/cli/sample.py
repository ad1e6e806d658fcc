"""CLI command: ``histosynth sample`` (patches at the model's patch size)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from histosynth.cli.app import app


@app.command("sample")
def sample_cmd(model: Path = typer.Option(..., "--model", help="Image model folder."),
               out: Path = typer.Option(..., "--out", help="Output PNG (OUT-i.png for --n > 1)."),
               mask: Optional[Path] = typer.Option(None, "--mask", help="Mask PNG: class ids or class colours."),
               guidance: float = typer.Option(1.5, help="Classifier-free guidance scale of the mask."),
               steps: int = typer.Option(25, help="Denoising steps."),
               scheduler: str = typer.Option("dpm++sde", help="dpm++sde (stochastic DPM-Solver++), dpm++, ddim, ddpm or euler."),
               seed: int = typer.Option(0, help="Random seed."),
               n: int = typer.Option(1, "--n", help="Number of patches."),
               style: Optional[List[Path]] = typer.Option(None, "--style", help="Style images, a folder or a slide"
                                                          " (repeatable) for a model trained with --style."),
               style_guidance: float = typer.Option(2.0, help="Style guidance scale (1: no extra pass).")):
    """Sample patches at the model's patch size, optionally following a mask."""
    from histosynth.models.bundle import load_bundle
    from histosynth.pipelines.conditions import style_from_files
    from histosynth.pipelines.sample_patches import check_sample_options, sample_to_files

    check_sample_options(n, guidance, steps, scheduler, seed, style_guidance if style else None)
    check_sample_paths(out, n, {"--model": model, "--mask": mask, "--style": style})
    bundle = load_bundle(model, kind="image")
    paths = sample_to_files(bundle, str(out), str(mask) if mask else None, n=n, guidance=guidance,
                            steps=steps, scheduler=scheduler, seed=seed,
                            style=style_from_files(bundle, [str(s) for s in style] if style else None, seed),
                            style_guidance=style_guidance)
    typer.echo(f"wrote {len(paths)} image(s): {paths[0]}" + (" ..." if len(paths) > 1 else ""))


def check_sample_paths(out: Path, n: int, inputs: dict) -> None:
    """``sample`` writes OUT (or OUT-0, OUT-1, ...): none may be an input."""
    from histosynth.io.paths import check_outputs
    from histosynth.pipelines.sample_patches import sample_paths

    outputs = {("--out" if n == 1 else f"--out ({path.name})"): path for path in sample_paths(out, n)}
    check_outputs(outputs, inputs, sealed=["--model"])
