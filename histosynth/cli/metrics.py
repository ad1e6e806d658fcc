"""CLI commands: ``evaluate`` (fidelity and privacy of generated images), ``benchmark segmentation`` and
``benchmark classification``.

Image sets are given as a folder of PNG/JPEG files, a dataset folder (design.md §5; the option's role picks the
split: --real-train → train, --real-test → test, --real-holdout → holdout; --generated → every patch), or
``DATASET:split`` to name a split explicitly.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from histosynth.cli import app

benchmark_app = typer.Typer(help="Benchmarks of generated data.", no_args_is_help=True)
app.add_typer(benchmark_app, name="benchmark")


def _log(message: str) -> None:
    typer.echo(message, err=True)


@contextmanager
def _warnings_to_stderr() -> Iterator[None]:
    """Show library warnings as one ``warning: ...`` line each (once per message), not Python's two-line form."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            # Only histosynth's own warnings: dependencies' deprecation notices are not the user's business.
            ours = [w for w in caught if "histosynth" in str(w.filename)]
            for message in dict.fromkeys(str(w.message) for w in ours):
                typer.echo(f"warning: {message}", err=True)


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
    from histosynth.eval.report import evaluate, resolve_sources, summary_text, write_evaluation
    from histosynth.eval.segmentation import TrainConfig

    if encoder is not None and features != "embedding":
        raise HistosynthError(f"--encoder goes with --features embedding, not --features {features}")
    real_train, real_test, real_holdout = resolve_sources(real_train, real_test, real_holdout)
    with _warnings_to_stderr():
        evaluation = evaluate(generated, real_train, real_test, real_holdout, features=features, device=device,
                              weights=encoder if encoder is not None else inception_weights, batch_size=batch_size,
                              k=k, ct_k=ct_k, min_cell=min_cell,
                              seed=seed, adherence=TrainConfig(steps=adherence_steps, device=device) if adherence
                              else None, log=_log,
                              c2st=C2STConfig(folds=c2st_folds, steps=c2st_steps, seed=seed) if c2st else None)
        if style_set is not None:
            from histosynth.eval.style import style_fidelity, style_summary

            evaluation.metrics.update(style_fidelity(generated, style_set, real_train))
        metrics_path, report_path = write_evaluation(evaluation, out)
    typer.echo(summary_text(evaluation.metrics))
    if style_set is not None:
        typer.echo(style_summary(evaluation.metrics))
    typer.echo(f"wrote {metrics_path} and {report_path}")


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
    from histosynth.eval.report import segmentation_text, write_segmentation_report
    from histosynth.eval.segmentation import TrainConfig, segmentation_benchmark

    config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, size=size, encoder_weights=encoder_weights,
                         crop=crop, device=device)
    with _warnings_to_stderr():
        result = segmentation_benchmark(data, synthetic, labelled=labelled, seeds=seeds, config=config, log=_log,
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
    from histosynth.eval.report import classification_text, write_classification_report

    config = ClassifierConfig(steps=steps, batch_size=batch_size, lr=lr, backbone=backbone, pretrained=pretrained,
                              crop=crop, device=device)
    with _warnings_to_stderr():
        result = classification_benchmark(data, variations=variations, synthetic=synthetic, labelled=labelled,
                                          seeds=seeds, target=target, config=config, external=external, log=_log)
        json_path, report_path = write_classification_report(result, out)
    typer.echo(classification_text(result))
    typer.echo(f"wrote {json_path} and {report_path}")
