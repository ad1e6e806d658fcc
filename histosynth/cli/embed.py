"""CLI commands for SSL-embedding conditioning: ``histosynth embed``, ``histosynth vary``, ``histosynth train ssl``
and ``histosynth train prior``."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from histosynth.cli import app
from histosynth.cli.train import (
    DEFAULTS,
    BatchOpt,
    CkptOpt,
    ConfigOpt,
    DataOpt,
    LrOpt,
    OutOpt,
    PresetOpt,
    ResumeOpt,
    SeedOpt,
    StepsOpt,
    _require,
    _train_config,
    resolve,
    train_app,
)

EncoderHelp = ("Encoder: a folder from `histosynth train ssl` (the offline default), uni, phikon, lunit-dino, "
               "h-optimus-0, hf-hub:ORG/NAME (timm), ORG/NAME (transformers), or a folder with config.json + "
               "model.safetensors.")


@app.command("embed")
def embed_cmd(data: Path = typer.Option(..., "--data", help="Dataset folder written by `histosynth prepare`."),
              encoder: str = typer.Option(..., "--encoder", help=EncoderHelp),
              batch_size: int = typer.Option(64, help="Patches per encoder call."),
              dihedral: bool = typer.Option(False, "--dihedral", help="Also embed the 8 flips/rotations of each "
                                            "patch, so training conditions on the transform it sees."),
              device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda when available)."),
              force: bool = typer.Option(False, "--force", help="Recompute even when the cache is up to date.")):
    """Embed every patch of a dataset with an encoder and cache the result (keyed by encoder and weights)."""
    import torch
    from tqdm.auto import tqdm

    from histosynth.conditions.embedding import embed_dataset, load_encoder

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_encoder(encoder, device)
    bar = tqdm(desc="embedding", unit="patch", dynamic_ncols=True)
    path, computed = embed_dataset(data, loaded, batch_size, dihedral, force=force,
                                   progress=lambda done, total: (setattr(bar, "total", total), bar.update(done - bar.n)))
    bar.close()
    typer.echo(f"{'wrote' if computed else 'up to date:'} {path} ({loaded.dim}-d, encoder {loaded.id})")


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


@train_app.command("ssl")
def train_ssl_cmd(config: Optional[Path] = ConfigOpt, data: Optional[Path] = DataOpt,
                  out: Optional[Path] = OutOpt,
                  preset: Optional[str] = typer.Option(None, "--preset", help="Encoder size: tiny, demo, base "
                                                       "(ResNet-18) or timm:NAME."),
                  steps: Optional[int] = StepsOpt, batch_size: Optional[int] = BatchOpt,
                  learning_rate: Optional[float] = LrOpt, checkpoint_every: Optional[int] = CkptOpt,
                  seed: Optional[int] = SeedOpt, resume: bool = ResumeOpt,
                  image_size: Optional[int] = typer.Option(None, help="Encoder input size in px (default: the "
                                                           "patch size)."),
                  temperature: Optional[float] = typer.Option(None, help="NT-Xent temperature (0.2).")):
    """Train histosynth's own self-supervised encoder (SimCLR) on a dataset's training patches."""
    from histosynth.train.ssl import train_ssl

    values = resolve(config, dict(data=data, out=out, preset=preset, steps=steps, batch_size=batch_size,
                                  learning_rate=learning_rate, checkpoint_every=checkpoint_every, seed=seed,
                                  image_size=image_size, temperature=temperature),
                     DEFAULTS | {"learning_rate": 2e-3, "batch_size": 128, "ema_decay": 0.0, "temperature": 0.2,
                                 "image_size": None})
    _require(values, "data", "out")
    path = train_ssl(str(values["data"]), str(values["out"]), values["preset"], values.get("image_size"),
                     float(values["temperature"]), _train_config(values), resume)
    typer.echo(f"wrote encoder to {path}")


@train_app.command("prior")
def train_prior_cmd(config: Optional[Path] = ConfigOpt, data: Optional[Path] = DataOpt,
                    out: Optional[Path] = OutOpt, preset: Optional[str] = PresetOpt,
                    encoder: Optional[str] = typer.Option(None, "--encoder", help="Encoder whose cached embeddings "
                                                          "(`histosynth embed`) to model, or an embeddings file."),
                    grid: Optional[int] = typer.Option(None, "--grid", help="Grid side k in patches (4)."),
                    text_file: Optional[Path] = typer.Option(None, "--text-file", help="captions.csv with columns "
                                                             "source,text[,class] describing each slide."),
                    text_encoder: Optional[str] = typer.Option(None, help="minilm (default), hashing, or a "
                                                               "sentence-transformers folder."),
                    steps: Optional[int] = StepsOpt, batch_size: Optional[int] = BatchOpt,
                    learning_rate: Optional[float] = LrOpt, checkpoint_every: Optional[int] = CkptOpt,
                    seed: Optional[int] = SeedOpt, resume: bool = ResumeOpt):
    """Train the embedding prior: diffusion over k×k embedding grids conditioned on a caption or a class."""
    from histosynth.train.ssl import train_prior

    values = resolve(config, dict(data=data, out=out, preset=preset, encoder=encoder, grid=grid,
                                  text_file=text_file, text_encoder=text_encoder, steps=steps,
                                  batch_size=batch_size, learning_rate=learning_rate,
                                  checkpoint_every=checkpoint_every, seed=seed),
                     DEFAULTS | {"grid": 4, "text_encoder": "minilm", "text_file": None, "learning_rate": 5e-4})
    _require(values, "data", "out", "encoder")
    path = train_prior(str(values["data"]), str(values["out"]), str(values["encoder"]), int(values["grid"]),
                       str(values["text_file"]) if values.get("text_file") else None, values["text_encoder"],
                       values["preset"], _train_config(values), resume)
    typer.echo(f"wrote embedding prior to {path}")


def embedding_given(embeddings, dropout, normalize) -> dict:
    """``train image`` flags of the embedding condition (None = not given)."""
    return dict(embeddings=embeddings, embedding_dropout=dropout, normalize_embeddings=normalize or None)


EMBEDDING_DEFAULTS = {"embeddings": None, "embedding_dropout": 0.1, "normalize_embeddings": False}


def embedding_sources(values: dict) -> list:
    """The embedding condition source of ``train image --embeddings E`` (none without it)."""
    if not values.get("embeddings"):
        return []
    from histosynth.conditions.embedding import EmbeddingSource, resolve_embeddings

    cache = resolve_embeddings(str(values["data"]), str(values["embeddings"]))
    return [EmbeddingSource(cache, str(values["data"]), float(values["embedding_dropout"]),
                            bool(values["normalize_embeddings"]))]


def generate_embedding_conditions(model, settings, reference, prior, text, class_name, guidance: float) -> dict:
    """``generate --reference/--prior --text/--class``: the embedding grid condition, with its guidance scale
    added to ``settings.extra_guidance``; ``{}`` when none of these flags is given."""
    if reference is None and prior is None and text is None and class_name is None:
        return {}
    import torch

    from histosynth.models.bundle import load_bundle
    from histosynth.pipelines.text_to_slide import embedding_conditions

    device = "cuda" if torch.cuda.is_available() else "cpu"
    conditions = embedding_conditions(load_bundle(model, kind="image"), settings.width, settings.height,
                                      str(reference) if reference else None, str(prior) if prior else None,
                                      text, class_name, seed=settings.seed, steps=settings.steps, device=device)
    settings.extra_guidance = dict(settings.extra_guidance) | {"embedding": guidance}
    return conditions
