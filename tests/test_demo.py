"""`histosynth demo` end to end with tiny models: files, report with embedded pictures, colour check."""
import json
import re

from cli_runner import cli  # noqa: F401  (fixture)
from tiny_models import tiny_image_model, tiny_mask_model


def test_demo_writes_slide_previews_and_self_contained_report(tmp_path, cli):
    weights = tmp_path / "weights"
    tiny_image_model(weights / "image", patch=32)
    tiny_mask_model(weights / "mask")
    out = tmp_path / "demo"
    code, text = cli(["demo", "--out", out, "--size", "256", "--steps", "2", "--compare-size", "128",
                      "--no-fidelity", "--weights", weights])
    assert code == 0, text
    assert text.strip().splitlines()[-1].startswith("done: open ")
    for name in ("slide.tiff", "slide.mask.tiff", "slide.mask.geojson", "slide.png", "mask.png", "overlay.png",
                 "crop.png", "compare_tiles.png", "compare_random.png", "summary.json", "report.html",
                 "viewer/index.html"):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["seams"]) == {"tiles", "random"}
    assert summary["seams"]["tiles"]["cost_per_pass"] == 1.0
    for sampler in ("tiles", "random"):  # 128 px hold four 32 px periods: the periodicity and its null's p
        assert 1 / 201 <= summary["seams"][sampler]["periodicity_p"] <= 1
    assert summary["mask_mpp"] == 4.0  # the tiny mask model draws at 8 × 0.5 µm/px
    for row in summary["colour"].values():
        assert row["delta_e"] >= 0 and len(row["generated_lab"]) == 3 and row["delta_e_pixels"] >= 0
    page = (out / "report.html").read_text()
    assert len(re.findall(r'<img src="data:image/png;base64,', page)) >= 6
    assert 'src="http' not in page
    assert f"(p = {summary['seams']['random']['periodicity_p']};" in page


def test_region_level_weak_labels_make_nuclei_regions_lighter_than_nuclei_pixels():
    """At the mask model's resolution a "nuclei" region also holds the stroma between nuclei."""
    from histosynth.data.labels import AUTO_CLASSES
    from histosynth.pipelines.demo import real_class_colours

    pixels = real_class_colours(2.0, AUTO_CLASSES)
    regions = real_class_colours(2.0, AUTO_CLASSES, label_factor=8)
    assert set(pixels) == set(regions) == {"background", "stroma", "nuclei"}
    assert regions["nuclei"][0] > pixels["nuclei"][0] + 2  # L*: lighter
    assert abs(regions["background"][0] - pixels["background"][0]) < 3
