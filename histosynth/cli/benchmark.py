"""CLI commands: ``histosynth benchmark segmentation`` and ``benchmark classification`` (downstream value of
generated data).

Image sets are given as a folder of PNG/JPEG files, a dataset folder (design.md §5; the option's role picks the
split: --real-train → train, --real-test → test, --real-holdout → holdout; --generated → every patch), or
``DATASET:split`` to name a split explicitly.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from histosynth.cli.app import app, log, warnings_to_stderr

benchmark_app = typer.Typer(help="Benchmarks of generated data.", no_args_is_help=True)
app.add_typer(benchmark_app, name="benchmark")


@benchmark_app.command("segmentation")
def segmentation_command(
    data: Annotated[Path, typer.Option("--data", help="Real dataset folder with labelled train and test splits.")],
    synthetic: Annotated[Path, typer.Option("--synthetic", help="Synthetic dataset folder (images/, masks/,"
                                                                " dataset.json).")],
    out: Annotated[Path, typer.Option("--out", help="Report folder: segmentation.json and report.html.")],
    labelled: Annotated[int | None, typer.Option("--labelled", help="Real labelled patches to train on"
                                                                       " (default: all).")] = None,
    seeds: Annotated[int, typer.Option("--seeds", min=1)] = 3,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Training steps, identical for every arm.")] = 300,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 16,
    size: Annotated[str, typer.Option("--size", help="U-Net size: tiny, small or base.")] = "small",
    crop: Annotated[int | None, typer.Option("--crop", help="Training crop side in px.")] = None,
    lr: Annotated[float, typer.Option("--lr")] = 1e-3,
    encoder_weights: Annotated[str | None, typer.Option(
        "--encoder-weights", help="'imagenet' to start from pretrained encoder weights (downloads).")] = None,
    device: Annotated[str, typer.Option("--device")] = "cpu",
    synthetic_ratio: Annotated[float | None, typer.Option(
        "--synthetic-ratio", min=0.0, help="Synthetic pairs per real labelled patch in arms (b) and (c), drawn per"
                                          " seed (default: all of them).")] = None,
    allow_labelled_mismatch: Annotated[bool, typer.Option(
        "--allow-labelled-mismatch", help="Compare although the generator learnt from another number of labelled"
                                          " patches than --labelled (recorded in the report).")] = False,
) -> None:
    """Train a U-Net on real, real + synthetic, and synthetic pairs; compare Dice/IoU on the real test split."""
    from histosynth.eval.benchmark_reports import segmentation_text, write_segmentation_report
    from histosynth.eval.segmentation import TrainConfig, segmentation_benchmark

    config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, size=size, encoder_weights=encoder_weights,
                         crop=crop, device=device)
    with warnings_to_stderr():
        result = segmentation_benchmark(data, synthetic, labelled=labelled, seeds=seeds, config=config, log=log,
                                        synthetic_ratio=synthetic_ratio,
                                        allow_labelled_mismatch=allow_labelled_mismatch)
        json_path, report_path = write_segmentation_report(result, out)
    typer.echo(segmentation_text(result))
    typer.echo(f"wrote {json_path} and {report_path}")


@benchmark_app.command("classification")
def classification_command(
    data: Annotated[Path, typer.Option("--data", help="Real dataset folder with train and test splits.")],
    out: Annotated[Path, typer.Option("--out", help="Report folder: classification.json and report.html.")],
    variations: Annotated[Path | None, typer.Option(
        "--variations", help="Variations of the real training patches: `histosynth vary` output folders (one per "
                             "patch) or a folder with labels.csv.")] = None,
    synthetic: Annotated[Path | None, typer.Option(
        "--synthetic", help="Synthetic patches: a dataset folder (e.g. from `histosynth synthesize`) or a folder "
                            "with labels.csv.")] = None,
    target: Annotated[str, typer.Option("--target", help="What to predict: source, dominant-class or "
                                                         "slide-label.")] = "dominant-class",
    labelled: Annotated[int | None, typer.Option("--labelled", help="Real labelled patches to train on"
                                                                       " (default: all).")] = None,
    seeds: Annotated[int, typer.Option("--seeds", min=1)] = 3,
    external: Annotated[Path | None, typer.Option(
        "--external", help="Extra labelled test folder (labels.csv with image,label) or dataset.")] = None,
    backbone: Annotated[str, typer.Option("--backbone", help="timm model name.")] = "resnet18",
    pretrained: Annotated[bool, typer.Option("--pretrained", help="Start from the backbone's pretrained weights "
                                                                  "(downloads).")] = False,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Training steps, identical for every arm.")] = 300,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 32,
    crop: Annotated[int | None, typer.Option("--crop", help="Random training crop side in px.")] = None,
    lr: Annotated[float, typer.Option("--lr")] = 1e-3,
    device: Annotated[str, typer.Option("--device")] = "cpu",
) -> None:
    """Train a classifier on real, real + variations/synthetic, and variations/synthetic patches; compare balanced
    accuracy and macro-F1 on the real test split."""
    from histosynth.eval.classification import ClassifierConfig, classification_benchmark
    from histosynth.eval.benchmark_reports import classification_text, write_classification_report

    config = ClassifierConfig(steps=steps, batch_size=batch_size, lr=lr, backbone=backbone, pretrained=pretrained,
                              crop=crop, device=device)
    with warnings_to_stderr():
        result = classification_benchmark(data, variations=variations, synthetic=synthetic, labelled=labelled,
                                          seeds=seeds, target=target, config=config, external=external, log=log)
        json_path, report_path = write_classification_report(result, out)
    typer.echo(classification_text(result))
    typer.echo(f"wrote {json_path} and {report_path}")
