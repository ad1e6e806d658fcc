"""CLI commands: ``histosynth prepare``."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from histosynth.cli.app import app


@app.command("prepare")
def prepare_cmd(slides: List[Path] = typer.Argument(..., help="Slides (SVS/TIFF/NDPI/...) or PNG/JPEG images."),
                out: Path = typer.Option(..., "--out", help="Dataset folder to write."),
                mpp: float = typer.Option(..., "--mpp", help="Resolution patches are cut at (µm/px)."),
                patch: int = typer.Option(..., "--patch", help="Patch side in px at --mpp."),
                source_mpp: Optional[float] = typer.Option(None, help="Resolution of files that carry none (µm/px)."),
                stride: Optional[int] = typer.Option(None, help="Patch stride in px (default: the patch size)."),
                annotations: Optional[Path] = typer.Option(
                    None, help="QuPath GeoJSON export of annotations (a folder of <slide>.geojson for several slides)."),
                labels: Optional[Path] = typer.Option(
                    None, help="Raster of class ids registered to the slide (a folder of <slide>.png for several)."),
                auto_labels: Optional[str] = typer.Option(
                    None, "--auto-labels", help="Weak labels without annotation: 'regions' (the default when the "
                    "kind is left out: tissue compartments — background, stroma, cellular) or 'colour' (per pixel: "
                    "background, stroma, nuclei)."),
                classes: Optional[str] = typer.Option(
                    None, help="Class map JSON [{id, name, color}]; with --auto-labels regions, the number of "
                               "region classes including background (default 3)."),
                label_fraction: float = typer.Option(1.0, help="Keep masks for this fraction of patches."),
                test_fraction: float = typer.Option(0.2, help="Share of tissue (or cases/slides) for testing."),
                val_fraction: float = typer.Option(0.1, help="Share for validation."),
                holdout_fraction: float = typer.Option(0.1, help="i.i.d. share of training patches held out."),
                cases: Optional[Path] = typer.Option(None, help="CSV mapping slide file name -> case id."),
                slide_labels: Optional[Path] = typer.Option(
                    None, help="CSV mapping slide file name -> slide label (subtype, organ): a condition of the mask"
                               " model and a classification target."),
                min_tissue: float = typer.Option(0.5, help="Least tissue fraction of a kept patch."),
                seed: int = typer.Option(0, help="Random seed.")):
    """Turn slides into a training dataset: patches, masks, label maps and splits."""
    from histosynth.data.prepare import prepare_dataset
    from histosynth.errors import HistosynthError

    region_classes = 3
    if classes is not None and classes.strip().isdigit():
        if auto_labels != "regions":
            raise HistosynthError(f"--classes {classes}: a number of classes goes with --auto-labels regions; "
                                  "otherwise --classes is a class map JSON")
        region_classes, classes = int(classes), None
    summary = prepare_dataset(slides, out, mpp, patch, source_mpp=source_mpp, stride=stride, annotations=annotations,
                              labels=labels, auto_labels=auto_labels or False, label_fraction=label_fraction,
                              test_fraction=test_fraction, val_fraction=val_fraction,
                              holdout_fraction=holdout_fraction, cases=cases, seed=seed,
                              classes=Path(classes) if classes else None, min_tissue=min_tissue,
                              region_classes=region_classes, slide_labels=slide_labels)
    splits = ", ".join(f"{k} {v}" for k, v in summary["splits"].items())
    typer.echo(f"{summary['patches']} patches ({splits}); {summary['labelled']} labelled, "
               f"{summary['unlabelled']} unlabelled")
    if summary["labelled"]:
        typer.echo("class fractions: " + ", ".join(f"{k} {v:.1%}" for k, v in summary["class_fractions"].items()))
    typer.echo(f"wrote {out}")
