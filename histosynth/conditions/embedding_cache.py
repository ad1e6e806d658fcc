"""Batched SSL embeddings of every patch of a dataset, cached beside it and keyed by encoder id + weights hash."""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from histosynth.conditions.encoders import Encoder, load_encoder
from histosynth.dihedral import dihedral
from histosynth.errors import HistosynthError
from histosynth.pixels import from_uint8

CACHE_DIR = "embeddings"
CACHE_VERSION = 1


@dataclass
class EmbeddingCache:
    """Embeddings of every patch of a dataset: ``embeddings`` (N, V, D), V = 1 (original) or 8 (every dihedral
    transform k, in ``train.tasks.dihedral`` order), rows in the order of ``images``."""

    path: Path
    embeddings: torch.Tensor
    images: list[str]
    encoder: str
    weights_hash: str

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[-1])

    @property
    def views(self) -> int:
        return int(self.embeddings.shape[1])

    def rows(self, images: list[str]) -> torch.Tensor:
        """Row indices of the given image paths; a path the cache lacks is an error (the dataset changed)."""
        where = {name: i for i, name in enumerate(self.images)}
        missing = [name for name in images if name not in where]
        if missing:
            raise HistosynthError(f"{self.path}: no embedding for {missing[0]} (the dataset changed since "
                                  "`histosynth embed`; run it again)")
        return torch.tensor([where[name] for name in images], dtype=torch.long)

    def check_encoder(self, encoder_id: str, weights_hash: str | None = None) -> None:
        """Refuse a cache made by another encoder (id or weights)."""
        if encoder_id != self.encoder or (weights_hash is not None and weights_hash != self.weights_hash):
            raise HistosynthError(f"{self.path}: these embeddings were made by encoder '{self.encoder}' "
                                  f"(weights {self.weights_hash[:12]}), not '{encoder_id}'"
                                  + (f" (weights {weights_hash[:12]})" if weights_hash else "")
                                  + "; run `histosynth embed` with this encoder")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text.removeprefix("hf-hub:")).strip("-")[-48:] or "encoder"


def cache_path(data: str | Path, encoder: Encoder) -> Path:
    """Where ``histosynth embed`` keeps a dataset's embeddings: keyed by encoder id and weights hash."""
    key = hashlib.sha256(f"{encoder.id}\n{encoder.weights_hash}".encode()).hexdigest()[:16]
    return Path(data) / CACHE_DIR / f"{_slug(Path(encoder.id).name if Path(encoder.id).is_absolute() else encoder.id)}-{key}.safetensors"


def load_cache(path: str | Path) -> EmbeddingCache:
    """Read an embeddings file written by ``histosynth embed``."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise HistosynthError(f"{path}: embeddings file not found (write it with `histosynth embed`)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            embeddings = handle.get_tensor("embeddings")
    except Exception as error:
        raise HistosynthError(f"{path}: not a readable embeddings file ({type(error).__name__})") from None
    if meta.get("format") != "histosynth-embeddings":
        raise HistosynthError(f"{path}: not a histosynth embeddings file")
    return EmbeddingCache(path, embeddings, json.loads(meta["images"]), meta["encoder"], meta["weights_hash"])


def embed_dataset(data: str | Path, encoder: Encoder, batch_size: int = 64, dihedral_views: bool = False,
                  progress: Callable[[int, int], None] | None = None, force: bool = False) -> tuple[Path, bool]:
    """Embed every patch of a dataset (all splits) and cache the result; returns (path, computed).

    An existing cache of the same encoder id and weights, covering the same patches (and views), is reused.
    """
    from safetensors.torch import save_file

    from histosynth.data.dataset import load_dataset_index
    from histosynth.data.dataset import _read_png  # one PNG reader for the whole project
    from histosynth.io.atomic import atomic_path

    index = load_dataset_index(data)
    images = [p["image"] for p in index["patches"]]
    if not images:
        raise HistosynthError(f"{data}: the dataset has no patches")
    views = 8 if dihedral_views else 1
    path = cache_path(data, encoder)
    if path.exists() and not force:
        try:
            cached = load_cache(path)
            cached.check_encoder(encoder.id, encoder.weights_hash)
            if cached.images == images and cached.views >= views:
                return path, False
        except HistosynthError:
            pass
    rows = []
    for start in range(0, len(images), batch_size):
        names = images[start:start + batch_size]
        batch = from_uint8(np.stack([_read_png(Path(data) / name)[..., :3] for name in names]))  # (B, 3, H, W)
        per_view = [encoder(dihedral(batch, k)) for k in range(views)]  # [(B, D)]
        rows.append(torch.stack(per_view, dim=1))  # (B, V, D)
        if progress is not None:
            progress(min(start + batch_size, len(images)), len(images))
    embeddings = torch.cat(rows).contiguous()  # (N, V, D)
    meta = {"format": "histosynth-embeddings", "version": str(CACHE_VERSION), "encoder": encoder.id,
            "weights_hash": encoder.weights_hash, "dim": str(encoder.dim), "views": str(views),
            "images": json.dumps(images)}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file({"embeddings": embeddings}, str(tmp), metadata=meta)
    return path, True


def resolve_embeddings(data: str | Path, spec: str, device: str = "cpu") -> EmbeddingCache:
    """``--embeddings``: an embeddings file, or an encoder id whose cache in ``data`` is used (never another
    encoder's)."""
    path = Path(spec)
    if path.is_file():
        return load_cache(path)
    encoder = load_encoder(spec, device)
    found = cache_path(data, encoder)
    if not found.exists():
        raise HistosynthError(f"{data}: no embeddings of encoder '{encoder.id}' yet; run "
                              f"`histosynth embed --data {data} --encoder {spec}` first")
    cache = load_cache(found)
    cache.check_encoder(encoder.id, encoder.weights_hash)
    return cache
