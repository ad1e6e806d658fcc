"""Serve a pyramidal TIFF to the browser as Deep Zoom tiles cut on demand, plus the viewer page.

Routes (all GET, HEAD too):

* ``/`` (``/index.html``), ``/viewer.js``, ``/viewer.css`` — the viewer, from ``histosynth/viewer/static``;
* ``/config.js`` — what the viewer needs to know about the slide (size, tiling, µm/px, overlay), as a script so the
  very same page also works from ``file://`` in a static export, where a browser refuses to ``fetch`` files;
* ``/slide.dzi`` and ``/slide_files/{level}/{col}_{row}.jpeg`` — the slide as a standard Deep Zoom image (any Deep
  Zoom client can read it too);
* ``/mask.dzi`` and ``/mask_files/{level}/{col}_{row}.png`` — when ``SLIDE.mask.tiff`` lies beside the slide: the
  class mask as RGBA tiles in the class colours, unknown (id 0) transparent.

Tiles are encoded once and kept in an LRU cache; anything else, including tiles outside a level's grid, is a 404.
"""
from __future__ import annotations

import colorsys
import contextlib
import io
import ipaddress
import json
import os
import re
import socket
import threading
import warnings
from collections import OrderedDict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

from histosynth.errors import HistosynthError
from histosynth.io.dzi import dzi_level_count, dzi_level_dimensions, dzi_tile, dzi_tile_grid, dzi_xml

STATIC_FILES = {"index.html": "text/html", "viewer.js": "text/javascript", "viewer.css": "text/css"}
_TILE_ROUTE = re.compile(r"^/(slide|mask)_files/(\d{1,3})/(\d{1,7})_(\d{1,7})\.(jpeg|png)$")
_MASK_ALPHA = 255


def mask_path_for(slide_path: str | os.PathLike) -> Path | None:
    """``NAME.mask.tiff`` beside ``NAME.tiff`` (``generate`` writes it so), or None if there is none."""
    slide_path = Path(slide_path)
    # Same rule as the generate pipeline's output names: every suffix goes (NAME.ome.tiff -> NAME.mask.tiff).
    stem = slide_path.name[: -len("".join(slide_path.suffixes))] if slide_path.suffixes else slide_path.name
    candidate = slide_path.parent / f"{stem}.mask.tiff"
    if candidate.is_file() and candidate.resolve() != slide_path.resolve():
        return candidate
    return None


def static_text(name: str) -> str:
    """Text of one of the viewer's static files, from the installed package."""
    return resources.files("histosynth.viewer").joinpath("static", name).read_text(encoding="utf-8")


def open_slide(path: str | os.PathLike) -> Any:
    """An open ``tiffslide.TiffSlide``, or a one-line HistosynthError for a missing file or a non-slide."""
    import tiffslide

    from histosynth.io.tiff import check_complete

    path = Path(path)
    if not path.is_file():
        raise HistosynthError(f"{path}: file not found")
    try:
        slide = tiffslide.TiffSlide(path)
        slide.dimensions  # noqa: B018 - some readers fail only when the first page is touched
    except Exception as error:  # tifffile and tiffslide raise many types for files they cannot read
        raise HistosynthError(f"{path}: not a slide (a tiled TIFF such as histosynth writes): {error}") from error
    try:
        check_complete(path)  # tiffslide would serve the missing tiles of a truncated file as black, silently
    except HistosynthError:
        slide.close()
        raise
    return slide


class _PaletteLevel:
    """One pyramid level of a label image seen through a lookup table: class ids in, colours out."""

    def __init__(self, array: Any, lut: np.ndarray):
        self.array, self.lut = array, lut

    def __getitem__(self, key: Any) -> np.ndarray:
        ids = np.asarray(self.array[key])
        if ids.ndim == 3:  # a label image stored with a channel axis
            ids = ids[..., 0]
        return self.lut[ids]


class _PaletteSlide:
    """A label slide that ``dzi_tile`` reads as colours, so tiles are resampled in colour space, never in ids."""

    def __init__(self, slide: Any, lut: np.ndarray):
        self.dimensions = slide.dimensions
        self.level_dimensions = slide.level_dimensions
        self.level_downsamples = slide.level_downsamples
        self.zarr_group = {str(i): _PaletteLevel(slide.zarr_group[str(i)], lut) for i in range(slide.level_count)}


def class_palette(classes: list[dict[str, Any]] | None) -> tuple[np.ndarray, dict[int, str]]:
    """(256, 3) uint8 colours by class id and {id: name}: the class table's own, distinct hues for the rest."""
    from histosynth.io.masks import class_colors

    lut = np.zeros((256, 3), dtype=np.uint8)
    for index in range(1, 256):  # golden-angle hues keep neighbouring ids apart
        lut[index] = [round(255 * c) for c in colorsys.hsv_to_rgb((index * 0.618034) % 1.0, 0.75, 0.95)]
    names = {}
    if classes:
        table = class_colors(classes)
        for entry in classes:
            lut[int(entry["id"])] = table[int(entry["id"])]
            names[int(entry["id"])] = str(entry.get("name", entry["id"]))
    return lut, names


class SlideSource:
    """A slide (and the mask beside it, if any) cut into Deep Zoom tiles on request, with an LRU tile cache."""

    def __init__(
        self,
        slide_path: str | os.PathLike,
        *,
        mask_path: str | os.PathLike | None | bool = True,
        tile_size: int = 254,
        overlap: int = 1,
        quality: int = 90,
        cache_tiles: int = 1024,
    ):
        self.slide_path = Path(slide_path)
        self.slide = open_slide(self.slide_path)
        self.tile_size, self.overlap, self.quality = tile_size, overlap, quality
        self.width, self.height = self.slide.dimensions
        found = mask_path is True
        if found:
            mask_path = mask_path_for(self.slide_path)
        self.mask_path = Path(mask_path) if mask_path else None
        self.mask: Any = None
        self.classes: dict[int, str] = {}
        if self.mask_path is not None:
            try:
                self._open_mask(self.mask_path)
            except HistosynthError as error:
                if not found:
                    self.slide.close()
                    raise
                # A mask found by its name is a bonus: a broken one must not keep the slide from showing.
                warnings.warn(f"mask overlay left out: {error}", stacklevel=2)
                self.mask_path = None
        self._cache: OrderedDict[tuple, bytes] = OrderedDict()
        self._cache_size = cache_tiles
        self.cache_hits = 0
        # tiffslide shares one file handle between threads; reading under a lock keeps tiles intact.
        self._read_lock = threading.Lock()
        self._cache_lock = threading.Lock()

    def _open_mask(self, path: Path) -> None:
        from histosynth.io.tiff import read_provenance

        label = open_slide(path)
        provenance = read_provenance(path) or {}
        lut, self.classes = class_palette(provenance.get("classes"))
        self._lut = lut
        alpha = np.full((256, 3), _MASK_ALPHA, dtype=np.uint8)
        alpha[0] = 0  # id 0 = unknown: show the tissue through it
        self.mask = (label, _PaletteSlide(label, lut), _PaletteSlide(label, alpha))

    @property
    def mpp(self) -> float | None:
        """µm per px at full resolution, if the slide records it."""
        value = self.slide.properties.get("tiffslide.mpp-x")
        return float(value) if value else None

    def layer_size(self, layer: str) -> tuple[int, int]:
        """(width, height) of the slide or of its mask."""
        return tuple(self.mask[0].dimensions) if layer == "mask" else (self.width, self.height)

    def dzi(self, layer: str = "slide") -> str:
        """The ``.dzi`` descriptor of the slide or of its mask."""
        width, height = self.layer_size(layer)
        return dzi_xml(width, height, self.tile_size, self.overlap, "png" if layer == "mask" else "jpeg")

    def config(self) -> dict[str, Any]:
        """What the viewer page needs: sizes, tiling, µm/px, and the overlay when there is a mask."""
        config: dict[str, Any] = {
            "name": self.slide_path.name,
            "mpp": self.mpp,
            "slide": {"url": "slide_files/", "format": "jpeg", "width": self.width, "height": self.height,
                      "tileSize": self.tile_size, "overlap": self.overlap},
            "mask": None,
        }
        if self.mask is not None:
            width, height = self.layer_size("mask")
            config["mask"] = {"url": "mask_files/", "format": "png", "width": width, "height": height,
                              "tileSize": self.tile_size, "overlap": self.overlap, "name": self.mask_path.name,
                              "classes": [{"id": i, "name": n, "color": "#%02x%02x%02x" % tuple(self._lut[i])}
                                          for i, n in sorted(self.classes.items()) if i]}
        return config

    def config_script(self) -> str:
        """``config.js``: the config as a global the viewer reads (a script loads from file://, a fetch does not)."""
        return "window.HISTOSYNTH_VIEWER = " + json.dumps(self.config(), indent=1) + ";\n"

    def has_tile(self, layer: str, level: int, col: int, row: int) -> bool:
        """Whether (level, col, row) is a tile of the layer's Deep Zoom grid."""
        if layer == "mask" and self.mask is None:
            return False
        width, height = self.layer_size(layer)
        if not 0 <= level < dzi_level_count(width, height):
            return False
        cols, rows = dzi_tile_grid(width, height, level, self.tile_size)
        return 0 <= col < cols and 0 <= row < rows

    def tile_pixels(self, layer: str, level: int, col: int, row: int) -> np.ndarray:
        """(h, w, 3) RGB pixels of a slide tile, or (h, w, 4) RGBA of a mask tile."""
        args = dict(tile_size=self.tile_size, overlap=self.overlap)
        with self._read_lock:
            if layer == "slide":
                return dzi_tile(self.slide, level, col, row, **args)
            _, colours, alpha = self.mask
            rgb = dzi_tile(colours, level, col, row, **args)
            a = dzi_tile(alpha, level, col, row, **args)[..., :1]
        return np.concatenate([rgb, a], axis=2)

    def tile(self, layer: str, level: int, col: int, row: int) -> bytes | None:
        """Encoded tile (JPEG for the slide, PNG for the mask), or None if there is no such tile."""
        if not self.has_tile(layer, level, col, row):
            return None
        key = (layer, level, col, row)
        with self._cache_lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                self.cache_hits += 1
                return self._cache[key]
        data = encode_tile(self.tile_pixels(layer, level, col, row), layer, self.quality)
        with self._cache_lock:
            self._cache[key] = data
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return data

    def level_count(self, layer: str = "slide") -> int:
        """Number of Deep Zoom levels of the slide or mask."""
        return dzi_level_count(*self.layer_size(layer))

    def level_dimensions(self, layer: str = "slide") -> list[tuple[int, int]]:
        """(width, height) of every Deep Zoom level of the slide or mask."""
        return dzi_level_dimensions(*self.layer_size(layer))

    def close(self) -> None:
        """Close the slide files."""
        self.slide.close()
        if self.mask is not None:
            self.mask[0].close()


def encode_tile(pixels: np.ndarray, layer: str, quality: int = 90) -> bytes:
    """JPEG bytes of a slide tile, PNG of a mask tile (it needs transparency and exact class colours)."""
    buffer = io.BytesIO()
    if layer == "mask":
        Image.fromarray(pixels, "RGBA").save(buffer, format="PNG", compress_level=1)
    else:
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


class _Handler(BaseHTTPRequestHandler):
    """Routes requests to the server's SlideSource."""

    server: ViewerServer
    protocol_version = "HTTP/1.1"  # keep-alive: a screenful of tiles on a few connections

    def setup(self) -> None:
        # A socket timeout: a connection that sends no request (or stalls in one) is dropped, not kept forever.
        self.timeout = self.server.request_timeout
        super().setup()

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._respond(send_body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._respond(send_body=False)

    def _respond(self, send_body: bool) -> None:
        if not self.server.host_allowed(self.headers.get("Host")):
            # DNS rebinding: a web page on another name that resolves to this machine must not read the slide.
            self.send_error(HTTPStatus.MISDIRECTED_REQUEST, "unknown host name")
            return
        path = urlsplit(self.path).path
        source = self.server.source
        body: bytes | None = None
        cache = "no-cache"
        if path in ("/", "/index.html"):
            body, kind = static_text("index.html").encode(), STATIC_FILES["index.html"]
        elif path.lstrip("/") in STATIC_FILES:
            name = path.lstrip("/")
            body, kind = static_text(name).encode(), STATIC_FILES[name]
        elif path == "/config.js":
            body, kind = source.config_script().encode(), "text/javascript"
        elif path == "/slide.dzi" or (path == "/mask.dzi" and source.mask is not None):
            body, kind = source.dzi(path[1:-4]).encode(), "application/xml"
        elif match := _TILE_ROUTE.match(path):
            layer, level, col, row, ext = match.groups()
            if ext == ("png" if layer == "mask" else "jpeg"):
                body = source.tile(layer, int(level), int(col), int(row))
            kind, cache = f"image/{ext}", "max-age=3600"  # tiles of one served file never change
        if body is None:
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", kind + ("; charset=utf-8" if kind.startswith("text") else ""))
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: a screenful of tiles would flood the terminal."""
        if self.server.verbose:
            super().log_message(format, *args)


LOOPBACK_NAMES = ("localhost",)


def host_name(header: str) -> str:
    """The name or address of a Host header, without its port and brackets, lower case."""
    header = header.strip().lower()
    if header.startswith("["):  # [IPv6]:port
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class ViewerServer(ThreadingHTTPServer):
    """An HTTP server for one slide; ``url`` is the viewer page.

    Requests must name this server in their Host header: an IP address, ``localhost``, the address it listens on,
    this machine's name, or one of ``allowed_hosts``. Anything else is a DNS-rebinding attempt (a page on
    evil.example whose name now resolves here) and gets 421. Connections idle for ``request_timeout`` s are closed.
    """

    daemon_threads = True  # Ctrl-C must not wait for browsers' idle keep-alive connections

    def __init__(self, source: SlideSource, host: str = "127.0.0.1", port: int = 8000, verbose: bool = False,
                 allowed_hosts: tuple[str, ...] = (), request_timeout: float = 60.0):
        self.source, self.verbose = source, verbose
        self.request_timeout = request_timeout
        self.allowed_names = {name.lower() for name in (*LOOPBACK_NAMES, host, *allowed_hosts)}
        with contextlib.suppress(OSError):
            self.allowed_names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
        if ":" in host:  # an IPv6 address such as ::1
            self.address_family = socket.AF_INET6
        try:
            super().__init__((host, port), _Handler)
        except OSError as error:
            raise HistosynthError(f"cannot listen on {host}:{port}: {error.strerror or error}"
                                  " (another port: --port N, or --port 0 for any free one)") from error

    def host_allowed(self, header: str | None) -> bool:
        """Whether a request's Host header names this server (no header: not a browser, nothing to rebind)."""
        if header is None:
            return True
        name = host_name(header)
        try:
            ipaddress.ip_address(name)
            return True  # rebinding needs a name to re-point; an address literal is what it is
        except ValueError:
            return name in self.allowed_names

    @property
    def url(self) -> str:
        """The viewer's address; a wildcard host is shown as loopback, which a local browser can open."""
        host, port = self.server_address[:2]
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"

    def server_close(self) -> None:
        """Stop listening and close the slide."""
        super().server_close()
        self.source.close()


def make_server(
    slide_path: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, **options: Any
) -> ViewerServer:
    """A ViewerServer for ``slide_path`` (port 0: any free port); call ``serve_forever()`` to run it."""
    verbose = options.pop("verbose", False)
    allowed_hosts = tuple(options.pop("allowed_hosts", ()))
    request_timeout = options.pop("request_timeout", 60.0)
    source = SlideSource(slide_path, **options)
    try:
        return ViewerServer(source, host, port, verbose=verbose, allowed_hosts=allowed_hosts,
                            request_timeout=request_timeout)
    except BaseException:
        source.close()
        raise


@contextlib.contextmanager
def serving(
    slide_path: str | os.PathLike, host: str = "127.0.0.1", port: int = 0, **options: Any
) -> Iterator[ViewerServer]:
    """Run a viewer server in a background thread for the block (tests, notebooks); yields the server."""
    server = make_server(slide_path, host, port, **options)
    # A short poll interval: shutdown() waits up to one interval for the loop to notice.
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="histosynth-viewer", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        thread.join()
        server.server_close()
