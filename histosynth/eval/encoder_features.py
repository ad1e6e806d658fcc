"""Encoder feature spaces for evaluation (``eval.features``): an SSL encoder's embeddings as FID/KID features."""
from __future__ import annotations

import os
from typing import Callable

import numpy as np

from histosynth.conditions.encoders import KNOWN_ENCODERS, load_encoder
from histosynth.errors import HistosynthError

FEATURE_SPACES = ("embedding", "uni", "phikon", "lunit-dino", "h-optimus-0")


def feature_extractor(name: str, device: str = "cpu", weights=None, **_) -> Callable[[np.ndarray], np.ndarray]:
    """The evaluation FeatureFn ``(B, H, W, 3) uint8 -> (B, D)`` of an encoder feature space (registered in
    ``eval.features``): ``embedding`` takes the encoder id or folder as ``weights`` (or from
    ``HISTOSYNTH_EMBEDDING_ENCODER``); a named hub encoder takes an optional local folder of it as ``weights``."""
    if name == "embedding":
        encoder_id = str(weights) if weights is not None else os.environ.get("HISTOSYNTH_EMBEDDING_ENCODER")
        if not encoder_id:
            raise HistosynthError("the 'embedding' feature space needs an encoder: pass its id or folder as the "
                                  "weights, or set HISTOSYNTH_EMBEDDING_ENCODER")
    else:
        encoder_id = str(weights) if weights is not None else KNOWN_ENCODERS[name].repo
    encoder = load_encoder(encoder_id, device)

    def features(batch: np.ndarray) -> np.ndarray:
        return encoder.embed_uint8(batch)  # (B, D)

    features.feature_names = [f"{name}_{i}" for i in range(encoder.dim)]  # type: ignore[attr-defined]
    return features
