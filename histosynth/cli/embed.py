"""CLI command: ``histosynth embed`` (SSL embeddings of a dataset's patches, cached)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from histosynth.cli.app import app

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

    from histosynth.conditions.embedding_cache import embed_dataset
    from histosynth.conditions.encoders import load_encoder

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_encoder(encoder, device)
    bar = tqdm(desc="embedding", unit="patch", dynamic_ncols=True)
    path, computed = embed_dataset(data, loaded, batch_size, dihedral, force=force,
                                   progress=lambda done, total: (setattr(bar, "total", total), bar.update(done - bar.n)))
    bar.close()
    typer.echo(f"{'wrote' if computed else 'up to date:'} {path} ({loaded.dim}-d, encoder {loaded.id})")
