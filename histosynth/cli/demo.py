"""CLI command: ``histosynth demo`` (what ``make demo`` runs)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from histosynth.cli.app import app


@app.command("demo")
def demo_cmd(out: Path = typer.Option(Path("demo-output"), "--out", help="Folder for the slide, previews and report."),
             size: int = typer.Option(1536, help="Side of the square slide in px."),
             steps: int = typer.Option(20, help="Denoising steps (DPM-Solver++)."),
             guidance: float = typer.Option(1.5, help="Mask guidance scale."),
             seed: int = typer.Option(0, help="Random seed."),
             compare_size: int = typer.Option(512, help="Side of the tiles-vs-random comparison in px."),
             fidelity: bool = typer.Option(True, "--fidelity/--no-fidelity", help="Compute fidelity and privacy."),
             weights: Optional[Path] = typer.Option(None, hidden=True, help="Folder with image/ and mask/ models.")):
    """Generate a synthetic slide with the bundled models and write a report with pictures and measurements."""
    from histosynth.pipelines.demo import run_demo

    report = run_demo(out, size, steps, guidance, seed, compare_size, fidelity, weights, log=typer.echo)
    typer.echo(f"done: open {report.resolve()} in a browser, or `histosynth view {out / 'slide.tiff'}`")
