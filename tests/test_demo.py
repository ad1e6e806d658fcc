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
    for row in summary["colour"].values():
        assert row["delta_e"] >= 0 and len(row["generated_lab"]) == 3
    page = (out / "report.html").read_text()
    assert len(re.findall(r'<img src="data:image/png;base64,', page)) >= 6
    assert 'src="http' not in page
