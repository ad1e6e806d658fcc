"""The slide viewer in headless Chromium: served and exported pages load tiles, zoom in, and show tissue."""
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from headless import chromium
from test_viewer import make_slide

from histosynth.viewer import export_viewer, serving

TIMEOUT_MS = 30_000  # a hang guard, not a speed target: a loaded CI machine may be slow
IDLE = "window.histosynthViewer && window.histosynthViewer.pending() === 0"


@pytest.fixture(scope="module")
def browser():
    with chromium() as launched:
        yield launched


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    return make_slide(tmp_path_factory.mktemp("viewer-browser"))


@pytest.fixture
def page(browser):
    page = browser.new_page(viewport={"width": 800, "height": 600})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.set_default_timeout(TIMEOUT_MS)
    yield page
    page.close()
    assert not errors, errors


def tissue_fraction(rgb: np.ndarray) -> float:
    """Share of H&E-coloured pixels: neither white nor black, red and blue above green (pink to purple)."""
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    tissue = (rgb.min(axis=2) < 225) & (rgb.max(axis=2) > 40) & (r - g > 20) & (b - g > 10)
    return float(tissue.mean())


def view_pixels(page) -> np.ndarray:
    """(h, w, 3) screenshot of the slide area of the page."""
    png = page.locator("#viewer").screenshot()
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def zoom_in_and_check(page) -> None:
    """Zoom to full resolution by keys and wheel, wait for the tiles, and check the view is all tissue."""
    page.wait_for_function(IDLE)
    viewer = page.evaluate("window.histosynthViewer.level()")
    page.keyboard.press("+")
    page.mouse.move(400, 300)
    page.mouse.wheel(0, -400)
    page.wait_for_function("window.histosynthViewer.level() === 10")
    page.wait_for_function(IDLE)
    assert viewer < 10 and page.evaluate("window.histosynthViewer.view.zoom") > 1
    pixels = view_pixels(page)
    assert tissue_fraction(pixels) > 0.9  # the zoomed view is covered by tiles, edge to edge
    assert pixels.std(axis=(0, 1)).max() > 15  # texture (nuclei), not one flat colour


def test_served_viewer_zooms_into_tissue_and_toggles_the_mask(page, slide):
    with serving(slide) as server:
        loaded: list[str] = []
        page.on("response", lambda r: loaded.append(r.url) if r.ok and "_files/" in r.url else None)
        page.goto(server.url)
        page.wait_for_function(IDLE)
        assert page.evaluate("window.histosynthViewer.overlayShown()")
        pixels = view_pixels(page)
        h, w, _ = pixels.shape
        # Fit view: left half of the slide tinted red by the tumour class, top-right (unknown) left untinted.
        left = pixels[h // 2 - 40 : h // 2 + 40, w // 2 - 120 : w // 2 - 40].reshape(-1, 3).mean(axis=0)
        top_right = pixels[h // 4 - 30 : h // 4 + 30, w // 2 + 40 : w // 2 + 120].reshape(-1, 3).mean(axis=0)
        assert left[1] < top_right[1] - 40 and tissue_fraction(pixels[h // 4 - 30 : h // 4 + 30, w // 2 + 40 :
                                                                       w // 2 + 120]) > 0.9
        page.keyboard.press("m")
        assert not page.evaluate("window.histosynthViewer.overlayShown()")
        zoom_in_and_check(page)
        assert any("/slide_files/10/" in url for url in loaded) and any("/mask_files/" in url for url in loaded)


def test_exported_viewer_works_from_file_url(page, slide, tmp_path):
    index = export_viewer(slide, tmp_path / "export", mask_path=None)
    page.goto(index.as_uri())
    page.wait_for_function(IDLE)
    assert page.locator("#overlay-controls").is_hidden()
    zoom_in_and_check(page)
