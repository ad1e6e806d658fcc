"""Text or class -> embedding grid (the prior) -> slide of any size: Graikos et al. 2024's large-image pipeline, with
the prior they describe but never released (pipelines/embedding_grids.py)."""
from __future__ import annotations

from histosynth.pipelines.generate_slide import generate_slide


def text_to_slide(model_path: str, prior_path: str, out: str, settings, text: str | None = None,
                  class_name: str | None = None, embedding_guidance: float = 2.0, prior_guidance: float = 2.0,
                  device: str | None = None, **kwargs) -> dict:
    """Sample a grid for ``text`` or ``class_name`` from the prior and generate a slide that follows it."""
    return generate_slide(model_path, out, settings, device=device, prior=prior_path, text=text,
                          class_name=class_name, embedding_guidance=embedding_guidance,
                          prior_guidance=prior_guidance, **kwargs)
