"""The bundled demo data: two small, permissively licensed H&E images (see ATTRIBUTION.md beside this file)."""
from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent
PNG_MPP = 0.25  # the PNG carries no resolution; judged from nuclear size


def svs_path() -> Path:
    """Aperio SVS whole-slide image, skin, 2220×2967 px at 0.499 µm/px."""
    return HERE / "cmu_small_region.svs"


def png_path() -> Path:
    """1000×1000 px tumour region, about 0.25 µm/px (no metadata: pass --source-mpp 0.25)."""
    return HERE / "he_tumour_region.png"
