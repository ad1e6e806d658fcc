"""CLI command: ``histosynth evaluate`` (fidelity and privacy of generated images).

Image sets are given as a folder of PNG/JPEG files, a dataset folder (design.md §5; the option's role picks the
split: --real-train → train, --real-test → test, --real-holdout → holdout; --generated → every patch), or
``DATASET:split`` to name a split explicitly.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from histosynth.cli.app import app, log, warnings_to_stderr


@app.command("evaluate")
def evaluate_command(
    generated: Annotated[str, typer.Option("--generated", help="Generated images: folder, dataset or DATASET:split.")],
    real_train: Annotated[str, typer.Option("--real-train", help="Real training images the model saw.")],
    out: Annotated[Path, typer.Option("--out", help="Report folder: metrics.json and report.html.")],
    real_test: Annotated[str | None, typer.Option(
        "--real-test", help="Real test images (default: the 'test' split of a --real-train dataset).")] = None,
    real_holdout: Annotated[str | None, typer.Option(
        "--real-holdout", help="Real i.i.d. holdout for authenticity's reference and C_T (default: the"
                               " 'holdout' split of a --real-train dataset, if any).")] = None,
    features: Annotated[str, typer.Option(
        "--features", help="Feature space: stain-texture (offline default), inception, pixels, embedding (the SSL"
                           " encoder given by --encoder), or a registered name.")] = "stain-texture",
    encoder: Annotated[str | None, typer.Option(
        "--encoder", help="With --features embedding: the encoder (a `train ssl` folder or an encoder id), e.g."
                          " one trained on the real data.")] = None,
    inception_weights: Annotated[Path | None, typer.Option(
        "--inception-weights", help="Path to torch-fidelity's Inception-v3 FID weights (never downloaded).")] = None,
    device: Annotated[str, typer.Option("--device")] = "cpu",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 32,
    k: Annotated[int, typer.Option("--k", min=1, help="Neighbours for precision/recall/density/coverage.")] = 5,
    ct_k: Annotated[int, typer.Option("--ct-k", min=1, help="k-means cells of the C_T test.")] = 5,
    min_cell: Annotated[int, typer.Option("--ct-min-cell", min=20, help="Fewest holdout and generated samples"
                                                                       " for a C_T cell to count.")] = 20,
    adherence: Annotated[bool, typer.Option("--adherence", help="Also score mask adherence: trains a U-Net on the"
                                                                " real training masks (dataset folders).")] = False,
    adherence_steps: Annotated[int, typer.Option("--adherence-steps", min=1)] = 300,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    style_set: Annotated[str | None, typer.Option(
        "--style-set", help="Style images the generated set was made with: adds the HED stain distance to them"
                            " beside the distance to --real-train's stains (style_distance, style_ratio).")] = None,
    c2st: Annotated[bool, typer.Option(
        "--c2st/--no-c2st", help="Classifier two-sample test: a small CNN trained to tell generated from real-test"
                                 " (k-fold accuracy; 0.5 = indistinguishable), beside real-train vs real-test.")] = True,
    c2st_steps: Annotated[int, typer.Option("--c2st-steps", min=1, help="Training steps per fold.")] = 300,
    c2st_folds: Annotated[int, typer.Option("--c2st-folds", min=2, help="Folds of the two-sample test.")] = 5,
) -> None:
    """Measure fidelity, diversity and memorisation of generated images; write metrics.json and report.html."""
    from histosynth.errors import HistosynthError
    from histosynth.eval.c2st import C2STConfig
    from histosynth.eval.evaluation_report import evaluate, resolve_sources, summary_text, write_evaluation
    from histosynth.eval.segmentation import TrainConfig

    if encoder is not None and features != "embedding":
        raise HistosynthError(f"--encoder goes with --features embedding, not --features {features}")
    real_train, real_test, real_holdout = resolve_sources(real_train, real_test, real_holdout)
    with warnings_to_stderr():
        evaluation = evaluate(generated, real_train, real_test, real_holdout, features=features, device=device,
                              weights=encoder if encoder is not None else inception_weights, batch_size=batch_size,
                              k=k, ct_k=ct_k, min_cell=min_cell,
                              seed=seed, adherence=TrainConfig(steps=adherence_steps, device=device) if adherence
                              else None, log=log,
                              c2st=C2STConfig(folds=c2st_folds, steps=c2st_steps, seed=seed) if c2st else None)
        if style_set is not None:
            from histosynth.eval.style import style_fidelity, style_summary

            evaluation.metrics.update(style_fidelity(generated, style_set, real_train))
        metrics_path, report_path = write_evaluation(evaluation, out)
    typer.echo(summary_text(evaluation.metrics))
    if style_set is not None:
        typer.echo(style_summary(evaluation.metrics))
    typer.echo(f"wrote {metrics_path} and {report_path}")
