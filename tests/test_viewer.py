"""The slide viewer without a browser: tile routes, the LRU cache, the mask overlay, static export, the CLI."""
import io
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_runner import cli  # noqa: F401  (fixture)

from histosynth.errors import HistosynthError
from histosynth.io.dzi import DZI_NAMESPACE, dzi_tile, dzi_tile_grid
from histosynth.io.tiff import iter_rows, write_label_tiff, write_pyramid
from histosynth.viewer import SlideSource, export_viewer, serving
from histosynth.viewer.server import mask_path_for

SIZE = 1024
CLASSES = [{"id": 0, "name": "unknown", "color": "#000000"}, {"id": 1, "name": "tumor", "color": "#ff0000"},
           {"id": 2, "name": "stroma", "color": "#00ff00"}]


def make_slide(folder: Path, size: int = SIZE, mask: bool = True) -> Path:
    """An H&E-looking pyramidal TIFF (pink stroma, purple nuclei blobs) and, optionally, a 3-region mask beside it."""
    rng = np.random.default_rng(0)
    # Blobs: smooth noise (a bicubic upsampling of coarse noise) above a threshold.
    coarse = Image.fromarray((rng.random((size // 16, size // 16)) * 255).astype(np.uint8))
    smooth = np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC)).astype(np.float32)
    image = np.empty((size, size, 3), np.float32)
    image[:] = (236, 178, 212)
    image[smooth > 200] = (122, 62, 160)
    image += rng.normal(0, 6, (size, size, 1))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "slide.tiff"
    write_pyramid(path, size, size, iter_rows(np.clip(image, 0, 255).astype(np.uint8)), mpp=0.5)
    if mask:
        labels = np.zeros((size, size), np.uint8)
        labels[:, : size // 2] = 1  # left half tumour; bottom-right stroma; top-right unknown (transparent)
        labels[size // 2 :, size // 2 :] = 2
        write_label_tiff(folder / "slide.mask.tiff", size, size, iter_rows(labels), mpp=0.5, classes=CLASSES)
    return path


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    return make_slide(tmp_path_factory.mktemp("viewer"))


@pytest.fixture(scope="module")
def server(slide):
    with serving(slide) as httpd:
        yield httpd


def get(url: str, method: str = "GET") -> tuple[int, bytes, str]:
    """(status, body, content type) of a request; HTTP errors are returned, not raised."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=60) as response:
            return response.status, response.read(), response.headers["Content-Type"]
    except urllib.error.HTTPError as error:
        return error.code, b"", ""


# Hand-computed: tile (col, row) covers [col·254 − 1, (col+1)·254 + 1) clipped to the level (1024 px at level 10).
TILE_SIZES = [
    (10, 0, 0, (255, 255)),  # first tile: overlap on the right and bottom only
    (10, 1, 1, (256, 256)),  # inner tile: overlap on all four sides
    (10, 4, 4, (9, 9)),  # last tile: 1015..1024
    (10, 4, 0, (9, 255)),
    (9, 2, 0, (5, 255)),  # level 9 is 512 px: 507..512
    (8, 1, 1, (3, 3)),  # level 8 is 256 px: 253..256
    (1, 0, 0, (2, 2)),
    (0, 0, 0, (1, 1)),
]


@pytest.mark.parametrize("level, col, row, size", TILE_SIZES)
def test_slide_tiles_have_the_deep_zoom_sizes(server, level, col, row, size):
    status, body, kind = get(f"{server.url}slide_files/{level}/{col}_{row}.jpeg")
    assert (status, kind) == (200, "image/jpeg")
    assert Image.open(io.BytesIO(body)).size == size


def test_tile_pixels_match_dzi_tile(server, slide):
    import tiffslide

    _, body, _ = get(f"{server.url}slide_files/9/1_1.jpeg")
    served = np.asarray(Image.open(io.BytesIO(body)).convert("RGB")).astype(int)
    with tiffslide.TiffSlide(slide) as handle:
        expected = dzi_tile(handle, 9, 1, 1).astype(int)
    assert served.shape == expected.shape
    assert np.abs(served - expected).mean() < 4  # JPEG at quality 90


@pytest.mark.parametrize("path", [
    "slide_files/10/5_0.jpeg", "slide_files/10/0_5.jpeg", "slide_files/9/3_0.jpeg", "slide_files/11/0_0.jpeg",
    "slide_files/10/0_0.png", "slide_files/-1/0_0.jpeg", "slide_files/x/0_0.jpeg", "mask_files/10/0_0.jpeg",
    "mask_files/10/5_0.png", "nothing", "static/viewer.js", "../pyproject.toml", "%2e%2e/pyproject.toml",
])
def test_anything_else_is_404(server, path):
    assert get(server.url + path)[0] == 404


def test_page_descriptor_and_config(server):
    status, body, kind = get(server.url)
    assert status == 200 and kind.startswith("text/html")
    assert b"viewer.js" in body and b"config.js" in body
    for name in ("viewer.js", "viewer.css"):
        assert get(server.url + name)[0] == 200
    status, body, kind = get(server.url + "slide.dzi")
    assert (status, kind) == (200, "application/xml")
    root = ElementTree.fromstring(body)
    assert root.tag == f"{{{DZI_NAMESPACE}}}Image"
    assert (root.get("TileSize"), root.get("Overlap"), root.get("Format")) == ("254", "1", "jpeg")
    size = root.find(f"{{{DZI_NAMESPACE}}}Size")
    assert (size.get("Width"), size.get("Height")) == ("1024", "1024")
    config = _config(get(server.url + "config.js")[1].decode())
    assert config["slide"]["width"] == SIZE and config["mpp"] == pytest.approx(0.5)
    assert [c["name"] for c in config["mask"]["classes"]] == ["tumor", "stroma"]
    assert config["mask"]["classes"][0]["color"] == "#ff0000"


def test_head_and_cache(server):
    url = f"{server.url}slide_files/10/2_2.jpeg"
    status, body, _ = get(url, method="HEAD")
    assert status == 200 and body == b""
    hits = server.source.cache_hits
    first, second = get(url)[1], get(url)[1]
    assert first == second and server.source.cache_hits >= hits + 2


def test_mask_tiles_are_class_colours_with_unknown_transparent(server):
    _, body, kind = get(f"{server.url}mask_files/10/0_0.png")
    assert kind == "image/png"
    tumour = np.asarray(Image.open(io.BytesIO(body)))
    assert tumour.shape == (255, 255, 4) and (tumour == [255, 0, 0, 255]).all()
    unknown = np.asarray(Image.open(io.BytesIO(get(f"{server.url}mask_files/10/3_0.png")[1])))
    assert (unknown[..., 3] == 0).all()
    stroma = np.asarray(Image.open(io.BytesIO(get(f"{server.url}mask_files/10/3_3.png")[1])))
    assert (stroma == [0, 255, 0, 255]).all()


def test_lru_cache_keeps_the_most_recent_tiles(slide):
    source = SlideSource(slide, cache_tiles=2)
    try:
        for col in range(4):
            source.tile("slide", 10, col, 0)
        assert list(source._cache) == [("slide", 10, 2, 0), ("slide", 10, 3, 0)]
        assert source.tile("slide", 10, 9, 0) is None
    finally:
        source.close()


@pytest.mark.parametrize("name, mask_name, found", [
    ("a.tiff", "a.mask.tiff", True), ("a.ome.tiff", "a.mask.tiff", True), ("a.tiff", "b.mask.tiff", False),
    ("a.mask.tiff", "a.mask.tiff", False),  # a mask viewed on its own has no mask of its own
])
def test_mask_beside_slide(tmp_path, name, mask_name, found):
    (tmp_path / name).touch()
    (tmp_path / mask_name).touch()
    assert mask_path_for(tmp_path / name) == (tmp_path / mask_name if found else None)


def test_broken_mask_beside_slide_is_left_out_with_a_warning(tmp_path, slide):
    copy = tmp_path / "copy.tiff"
    copy.write_bytes(slide.read_bytes())
    (tmp_path / "copy.mask.tiff").write_text("not a tiff")
    with pytest.warns(UserWarning, match="mask overlay left out"):
        source = SlideSource(copy)
    assert source.mask is None and source.config()["mask"] is None
    source.close()


def test_static_export(tmp_path, slide):
    out = tmp_path / "export"
    index = export_viewer(slide, out)
    assert index == out / "index.html"
    for name in ("index.html", "viewer.js", "viewer.css", "config.js", "slide.dzi", "mask.dzi"):
        assert (out / name).is_file(), name
    root = ElementTree.fromstring((out / "slide.dzi").read_text())
    assert root.tag == f"{{{DZI_NAMESPACE}}}Image" and root.get("Format") == "jpeg"
    for level in range(11):
        cols, rows = dzi_tile_grid(SIZE, SIZE, level)
        assert len(list((out / "slide_files" / str(level)).glob("*.jpeg"))) == cols * rows
        assert len(list((out / "mask_files" / str(level)).glob("*.png"))) == cols * rows
    assert Image.open(out / "slide_files/10/4_4.jpeg").size == (9, 9)
    config = _config((out / "config.js").read_text())
    assert config["slide"]["url"] == "slide_files/" and config["mask"]["url"] == "mask_files/"
    # Exporting again without the overlay leaves no stale mask behind.
    export_viewer(slide, out, mask_path=None)
    assert not (out / "mask_files").exists() and _config((out / "config.js").read_text())["mask"] is None


def test_cli_export(tmp_path, slide, cli):
    code, out = cli(["view", slide, "--export", tmp_path / "v"])
    assert code == 0, out
    assert (tmp_path / "v" / "index.html").is_file() and (tmp_path / "v" / "slide_files" / "10").is_dir()


def test_cli_bad_input_is_one_line(tmp_path, cli):
    (tmp_path / "text.tiff").write_text("hello")
    for path, message in [(tmp_path / "missing.tiff", "file not found"), (tmp_path / "text.tiff", "not a slide")]:
        code, out = cli(["view", path, "--no-browser"])
        assert code == 2 and out.count("\n") == 1 and message in out, out
    with pytest.raises(HistosynthError, match="not a slide"):
        export_viewer(tmp_path / "text.tiff", tmp_path / "out")


def test_cli_port_in_use_is_one_line(slide, cli):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code, out = cli(["view", slide, "--no-browser", "--port", taken.getsockname()[1]])
    assert code == 2 and out.count("\n") == 1 and "--port" in out, out


def test_cli_serves_until_ctrl_c(slide):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # As from a terminal: a test run started in the background (`make test &`, nohup, some CI shells) ignores SIGINT,
    # and a child inherits that; Python then never turns Ctrl-C into KeyboardInterrupt.
    process = subprocess.Popen([sys.executable, "-m", "histosynth", "view", str(slide), "--no-browser", "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = process.stdout.readline()
        assert " at http://127.0.0.1:" in line and "mask overlay" in line, line
        url = line.split(" at ")[1].split()[0]
        assert get(url + "slide_files/0/0_0.jpeg")[0] == 200
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0 and "stopped" in err and "Traceback" not in err, err


def _config(script: str) -> dict:
    """The JSON object of ``config.js``."""
    prefix = "window.HISTOSYNTH_VIEWER = "
    assert script.startswith(prefix)
    return json.loads(script[len(prefix):].rstrip().rstrip(";"))


def _status_for_host(port: int, host: str | None) -> int:
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.putrequest("GET", "/config.js", skip_host=True)
        if host is not None:
            connection.putheader("Host", host)
        connection.endheaders()
        return connection.getresponse().status
    finally:
        connection.close()


def test_requests_must_name_this_server_in_their_host_header(slide):
    """DNS rebinding: a page on evil.example whose name is made to resolve to this machine reaches the server
    with ``Host: evil.example``; it gets 421, while addresses, localhost, this machine's name and --allowed-host
    work."""
    with serving(slide, allowed_hosts=("slides.lab",)) as httpd:
        port = httpd.server_address[1]
        assert _status_for_host(port, "evil.example") == 421
        assert _status_for_host(port, f"evil.example:{port}") == 421
        assert _status_for_host(port, "localhost.evil.example") == 421
        for good in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", f"[::1]:{port}", "10.1.2.3",
                     f"slides.lab:{port}", socket.gethostname(), None):
            assert _status_for_host(port, good) == 200, good


def test_a_connection_that_sends_no_request_is_closed(slide):
    with serving(slide, request_timeout=0.2) as httpd:
        with socket.create_connection(("127.0.0.1", httpd.server_address[1])) as idle:
            idle.settimeout(60)  # only a hang guard: the server closes long before
            assert idle.recv(1024) == b""  # closed by the server, no response
        with socket.create_connection(("127.0.0.1", httpd.server_address[1])) as stalled:
            stalled.settimeout(60)
            stalled.sendall(b"GET /config.js HTTP/1.1\r\nHost: localhost\r\n")  # never finished
            assert stalled.recv(1024) == b""


def test_cli_on_all_interfaces_warns_there_is_no_authentication(slide, cli):
    with socket.socket() as taken:  # a port in use: the command warns, then stops with one error line
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        code, out = cli(["view", slide, "--no-browser", "--host", "0.0.0.0", "--port", taken.getsockname()[1]])
    lines = out.splitlines()
    assert code == 2 and len(lines) == 2, out
    assert lines[0].startswith("warning: listening on 0.0.0.0") and "no authentication" in lines[0]
    assert lines[1].startswith("error: ")
