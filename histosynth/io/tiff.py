"""Streaming pyramidal TIFF writers: generic tiled TIFF (levels as IFDs) and OME-TIFF (SubIFDs + OME-XML).

The producer hands over *rows of tiles*: an iterable of uint8 arrays ``(row_height, width, C)`` from top to bottom.
The full-resolution image never exists in memory:

* level 0 is streamed to the file tile by tile while each incoming band of ``tile`` rows is area-averaged by 2 into
  a buffer for level 1 (¼ of the level-0 pixels);
* tifffile writes one IFD after the other, so level 1 must be kept until level 0 is finished; it is then streamed
  the same way while level 2 is accumulated, and so on down to ≤ ``min_level_size`` px on the longer side.

Memory: one band of level 0 (``tile · width · C`` bytes) + tifffile's encoder queue (``_ENCODE_BUFFER``) + the
level being accumulated (¼ of the level before it). A level buffer larger than ``spool_bytes`` (64 MiB by default)
lives in an unnamed temporary file beside the output (``np.memmap``) instead of RAM, so even a 100k² px slide needs
only a few bands of RAM; its disk use is ⅓ of the raw level-0 size at most.

Metadata: µm/px as resolution tags (``ResolutionUnit`` = centimeter, ``XResolution`` = 10⁴ / mpp px/cm, per level),
which OpenSlide's generic-tiff reader exposes as ``openslide.mpp-x`` and tiffslide as ``tiffslide.mpp-x``; OME-TIFF
carries them also as ``PhysicalSizeX/Y`` (µm). Provenance (histosynth version, model hash, seed, settings,
``"synthetic": true``) goes into the ImageDescription of level 0 (generic TIFF: a ``histosynth synthetic image``
line followed by one line of JSON; OME-TIFF: a ``CommentAnnotation`` holding the same JSON). Files are
deterministic: no DateTime tag, a fixed Software tag, the OME UUID derived from a hash of the settings, so the same
pixels and settings always give the same bytes. Files appear atomically: written under a temporary name and renamed.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import uuid
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

import numpy as np
import tifffile

from histosynth import __version__
from histosynth.errors import HistosynthError
from histosynth.io.atomic import atomic_path

Compression = Literal["jpeg", "deflate", "none"]
Format = Literal["tiff", "ome-tiff"]
Resample = Literal["area", "mode"]

SOFTWARE = f"histosynth {__version__}"
DESCRIPTION_HEADER = "histosynth synthetic image"
OME_PROVENANCE_NAMESPACE = "histosynth:provenance"

# Bytes of tiles tifffile may queue for its compression threads; its default (512 MB) would hold whole levels.
_ENCODE_BUFFER = 4 * 2**20
# Classic TIFF offsets are 32-bit: switch to BigTIFF well before the raw pixel data could reach 4 GB.
_BIGTIFF_RAW_BYTES = 2 * 2**30


def pyramid_shapes(width: int, height: int, min_level_size: int = 256) -> list[tuple[int, int]]:
    """(width, height) of every level: each half the previous (rounded up) until the longer side is ≤ min_level_size."""
    shapes = [(int(width), int(height))]
    while max(shapes[-1]) > min_level_size:
        w, h = shapes[-1]
        shapes.append(((w + 1) // 2, (h + 1) // 2))
    return shapes


def needs_bigtiff(width: int, height: int, channels: int = 3) -> bool:
    """Whether a pyramid's raw pixels (all levels: 4/3 of level 0) could pass 2 GiB, past classic TIFF's safe range."""
    return width * height * channels * 4 // 3 > _BIGTIFF_RAW_BYTES


def iter_rows(image: np.ndarray, row_height: int = 256) -> Iterator[np.ndarray]:
    """Rows of an in-memory image, for writing small images through the streaming writers."""
    for y in range(0, image.shape[0], row_height):
        yield image[y : y + row_height]


def provenance_description(provenance: dict[str, Any] | None) -> str:
    """The ImageDescription text: a header line that says the image is synthetic, then the provenance as JSON."""
    return DESCRIPTION_HEADER + "\n" + _provenance_json(provenance)


def read_provenance(path: str | os.PathLike) -> dict[str, Any] | None:
    """Provenance dict written by ``write_pyramid`` (generic or OME-TIFF), or None if the file carries none."""
    with tifffile.TiffFile(path) as tif:
        description = tif.pages.first.description or ""
    if description.startswith(DESCRIPTION_HEADER + "\n"):
        return json.loads(description.split("\n", 1)[1])
    if description.lstrip().startswith("<?xml") or description.lstrip().startswith("<OME"):
        root = ElementTree.fromstring(description)
        for element in root.iter():
            if element.tag.endswith("CommentAnnotation") and element.get("Namespace") == OME_PROVENANCE_NAMESPACE:
                value = next((child for child in element if child.tag.endswith("Value")), None)
                if value is not None and value.text:
                    return json.loads(value.text)
    return None


def write_pyramid(
    path: str | os.PathLike,
    width: int,
    height: int,
    rows: Iterable[np.ndarray],
    *,
    mpp: float,
    tile: int = 256,
    compression: Compression = "jpeg",
    quality: int = 90,
    format: Format = "tiff",
    description: dict[str, Any] | None = None,
    channels: int = 3,
    resample: Resample = "area",
    min_level_size: int = 256,
    bigtiff: bool | None = None,
    spool_bytes: int = 64 * 2**20,
    maxworkers: int | None = None,
) -> Path:
    """Stream ``rows`` ((row_height, width, C) uint8, top to bottom) into a tiled pyramidal TIFF at ``path``.

    ``format="tiff"``: levels as top-level IFDs, level 0 first, lower levels marked reduced-resolution (OpenSlide
    "generic-tiff", tiffslide, QuPath). ``format="ome-tiff"``: lower levels as SubIFDs of level 0 with OME-XML
    (Bio-Formats, tiffslide). ``description`` is the provenance dict (JSON-serialisable). Row heights are free but
    multiples of ``tile`` avoid a copy. Returns the final path; nothing exists there unless writing succeeded.
    """
    path = Path(path)
    width, height, tile, channels = int(width), int(height), int(tile), int(channels)
    _check_arguments(width, height, mpp, tile, compression, quality, format, channels, resample, min_level_size)
    shapes = pyramid_shapes(width, height, min_level_size)
    if bigtiff is None:
        bigtiff = needs_bigtiff(width, height, channels)
    provenance_json = _provenance_json(description)
    is_ome = format == "ome-tiff"

    codec: dict[str, Any] = {"compression": None}
    if compression == "jpeg":
        codec = {"compression": "jpeg", "compressionargs": {"level": int(quality)}}
    elif compression == "deflate":
        codec = {"compression": "zlib", "predictor": True}  # horizontal differencing: smaller, still lossless

    with atomic_path(path) as tmp:
        spool_dir = tmp.parent
        with tifffile.TiffWriter(tmp, bigtiff=bigtiff, ome=is_ome) as writer:
            source: Iterable[np.ndarray] = _level0_bands(rows, width, height, channels, tile)
            for level, (level_w, level_h) in enumerate(shapes):
                next_buffer = None
                if level + 1 < len(shapes):
                    next_w, next_h = shapes[level + 1]
                    next_buffer = _allocate((next_h, next_w, channels), spool_dir, spool_bytes)
                tiles = _level_tiles(source, level_w, level_h, tile, next_buffer, resample)
                shape = (level_h, level_w, channels) if channels > 1 else (level_h, level_w)
                # px per cm of this level; x and y separately, as odd sizes round each axis its own way
                resolution = (1e4 * level_w / (mpp * width), 1e4 * level_h / (mpp * height))
                kwargs: dict[str, Any] = dict(
                    shape=shape,
                    dtype=np.uint8,
                    tile=(tile, tile),
                    photometric="rgb" if channels == 3 else "minisblack",
                    resolution=resolution,
                    resolutionunit="CENTIMETER",
                    maxworkers=maxworkers,
                    buffersize=_ENCODE_BUFFER,
                    **codec,
                )
                if level == 0:
                    kwargs["software"] = SOFTWARE
                    if is_ome:
                        kwargs["subifds"] = len(shapes) - 1
                        kwargs["metadata"] = _ome_metadata(shapes, mpp, channels, provenance_json, codec, tile)
                    else:
                        kwargs["description"] = provenance_description(description)
                        kwargs["metadata"] = None  # no tifffile "shaped" JSON: our description is the only one
                else:
                    kwargs["software"] = False
                    kwargs["subfiletype"] = 1  # reduced-resolution image
                    kwargs["metadata"] = None
                writer.write(tiles, **kwargs)
                source = _array_bands(next_buffer, tile) if next_buffer is not None else ()
    return path


def write_label_tiff(
    path: str | os.PathLike,
    width: int,
    height: int,
    rows: Iterable[np.ndarray],
    *,
    mpp: float,
    tile: int = 256,
    description: dict[str, Any] | None = None,
    classes: list[dict[str, Any]] | None = None,
    format: Format = "tiff",
    min_level_size: int = 256,
) -> Path:
    """Stream a uint8 class-id label image ((row_height, width) rows) into a lossless single-channel pyramid.

    Lower levels take the most frequent id of each 2×2 block (ties: top-left first), never an average, so every
    pixel of every level is a valid class id. ``classes`` (the class table) is stored with the provenance.
    """
    provenance = dict(description or {})
    if classes is not None:
        provenance["classes"] = classes
    return write_pyramid(
        path,
        width,
        height,
        rows,
        mpp=mpp,
        tile=tile,
        compression="deflate",
        format=format,
        description=provenance,
        channels=1,
        resample="mode",
        min_level_size=min_level_size,
    )


# --- internals -----------------------------------------------------------------------------------------------------


def _check_arguments(
    width: int, height: int, mpp: float, tile: int, compression: str, quality: int, format: str, channels: int,
    resample: str, min_level_size: int,
) -> None:
    """Raise HistosynthError for arguments that would otherwise fail deep inside tifffile."""
    if width < 1 or height < 1:
        raise HistosynthError(f"image size must be positive, got {width}x{height}")
    if not (isinstance(mpp, (int, float)) and math.isfinite(mpp) and mpp > 0):
        raise HistosynthError(f"mpp (µm per pixel) must be a positive number, got {mpp!r}")
    if tile < 16 or tile % 16:
        raise HistosynthError(f"tile size must be a positive multiple of 16, got {tile}")
    if compression not in ("jpeg", "deflate", "none"):
        raise HistosynthError(f"unknown compression {compression!r}: use jpeg, deflate or none")
    if compression == "jpeg" and not 1 <= int(quality) <= 100:
        raise HistosynthError(f"JPEG quality must be in 1..100, got {quality}")
    if format not in ("tiff", "ome-tiff"):
        raise HistosynthError(f"unknown format {format!r}: use tiff or ome-tiff")
    if channels not in (1, 3):
        raise HistosynthError(f"channels must be 1 (labels, grey) or 3 (RGB), got {channels}")
    if resample not in ("area", "mode"):
        raise HistosynthError(f"unknown resampling {resample!r}: use area or mode")
    if min_level_size < 1:
        raise HistosynthError(f"min_level_size must be ≥ 1, got {min_level_size}")


def _provenance_json(provenance: dict[str, Any] | None) -> str:
    """Canonical JSON of the provenance: sorted keys, ASCII only (TIFF text tags are 7-bit), always synthetic."""
    payload = {"histosynth_version": __version__, **(provenance or {}), "synthetic": True}
    try:
        return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise HistosynthError(f"provenance description is not JSON-serialisable: {error}") from None


def _ome_metadata(
    shapes: list[tuple[int, int]], mpp: float, channels: int, provenance_json: str, codec: dict[str, Any], tile: int
) -> dict[str, Any]:
    """OME-XML fields for tifffile; the UUID is a hash of everything that determines the file, never random."""
    key = json.dumps([shapes, mpp, channels, provenance_json, repr(sorted(codec.items())), tile, __version__])
    file_uuid = uuid.UUID(hashlib.sha256(key.encode()).hexdigest()[:32])
    return {
        "axes": "YXS" if channels > 1 else "YX",
        "UUID": f"urn:uuid:{file_uuid}",
        "Creator": SOFTWARE,
        "Name": "synthetic",
        "Description": "Synthetic image generated by histosynth; not a real specimen.",
        "PhysicalSizeX": float(mpp),
        "PhysicalSizeY": float(mpp),
        "CommentAnnotation": {"Namespace": OME_PROVENANCE_NAMESPACE, "Value": provenance_json},
    }


def _level0_bands(
    rows: Iterable[np.ndarray], width: int, height: int, channels: int, band_height: int
) -> Iterator[np.ndarray]:
    """Regroup the producer's rows into bands of exactly ``band_height`` rows (the last may be shorter), checked."""
    pending: list[np.ndarray] = []  # pieces of the band being assembled, (h_i, W, C)
    pending_h = 0
    seen = 0
    for index, row in enumerate(rows):
        row = _check_row(row, index, width, channels)
        seen += row.shape[0]
        if seen > height:
            raise HistosynthError(f"rows hold more than the declared height {height} px (row {index} ends at {seen})")
        start = 0
        if not pending:
            # Fast path: whole bands straight out of the producer's array, no copy.
            while row.shape[0] - start >= band_height:
                yield row[start : start + band_height]
                start += band_height
        while start < row.shape[0]:
            take = min(band_height - pending_h, row.shape[0] - start)
            pending.append(row[start : start + take])
            pending_h += take
            start += take
            if pending_h == band_height:
                yield np.concatenate(pending, axis=0)
                pending, pending_h = [], 0
    if seen != height:
        raise HistosynthError(f"rows hold {seen} px of the declared height {height} px")
    if pending:
        yield np.concatenate(pending, axis=0)


def _check_row(row: Any, index: int, width: int, channels: int) -> np.ndarray:
    """A producer row as (h, width, channels) uint8, or a HistosynthError that says what was wrong with it."""
    if not isinstance(row, np.ndarray):
        raise HistosynthError(f"row {index} is a {type(row).__name__}, expected a numpy array")
    if row.ndim == 2 and channels == 1:
        row = row[:, :, None]
    if row.ndim != 3 or row.shape[1] != width or row.shape[2] != channels or row.shape[0] < 1:
        raise HistosynthError(
            f"row {index} has shape {tuple(row.shape)}, expected (row_height, {width}, {channels})"
        )
    if row.dtype != np.uint8:
        raise HistosynthError(f"row {index} has dtype {row.dtype}, expected uint8")
    return row


def _array_bands(array: np.ndarray, band_height: int) -> Iterator[np.ndarray]:
    """Bands of a buffered level (RAM or memmap), copied so a memmap page is read once."""
    for y in range(0, array.shape[0], band_height):
        yield np.array(array[y : y + band_height])


def _level_tiles(
    bands: Iterable[np.ndarray],
    width: int,
    height: int,
    tile: int,
    next_buffer: np.ndarray | None,
    resample: Resample,
) -> Iterator[np.ndarray]:
    """Tiles of one level in row-major order for tifffile; downsample each band into ``next_buffer`` on the way."""
    y = 0
    for band in bands:  # (h <= tile, W, C); every band but the last is exactly `tile` rows, so y stays even
        h = band.shape[0]
        if next_buffer is not None:
            small = _downsample(band, resample)  # (ceil(h/2), ceil(W/2), C)
            next_buffer[y // 2 : y // 2 + small.shape[0]] = small
        for x in range(0, width, tile):
            piece = band[:, x : x + tile]
            if piece.shape[0] != tile or piece.shape[1] != tile:
                # Pad edge tiles by replication, not tifffile's zeros: JPEG blocks straddling the border stay clean.
                piece = np.pad(piece, ((0, tile - piece.shape[0]), (0, tile - piece.shape[1]), (0, 0)), mode="edge")
            piece = np.ascontiguousarray(piece)  # a copy: a queued tile must not keep its whole band alive
            yield piece if piece.shape[2] > 1 else piece[:, :, 0]
        y += h
    if y != height:  # only reachable through a bug: level shapes and bands disagree
        raise RuntimeError(f"level of height {height} received {y} rows")


def _downsample(band: np.ndarray, resample: Resample) -> np.ndarray:
    """Halve a (h, w, C) uint8 band: 2×2 area mean (rounded) or 2×2 mode; odd edges replicate the last pixel."""
    h, w = band.shape[:2]
    if h % 2 or w % 2:
        band = np.pad(band, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    a = band[0::2, 0::2]
    b = band[0::2, 1::2]
    c = band[1::2, 0::2]
    d = band[1::2, 1::2]
    if resample == "area":
        total = a.astype(np.uint16) + b + c + d
        return ((total + 2) // 4).astype(np.uint8)
    # Mode of four: the candidate equal to most of the four wins; ties go to the earlier candidate (a, b, c, d).
    candidates = np.stack([a, b, c, d])  # (4, h/2, w/2, C)
    counts = (candidates[:, None] == candidates[None, :]).sum(axis=1)  # (4, h/2, w/2, C)
    winner = counts.argmax(axis=0)  # first maximum
    return np.take_along_axis(candidates, winner[None], axis=0)[0]


def _allocate(shape: tuple[int, int, int], spool_dir: Path, spool_bytes: int) -> np.ndarray:
    """A level buffer in RAM if it is small, else memory-mapped to an unnamed temporary file (freed when unmapped)."""
    if math.prod(shape) <= spool_bytes:
        return np.empty(shape, dtype=np.uint8)
    with tempfile.TemporaryFile(dir=spool_dir, prefix=".histosynth-level.") as handle:
        # The mapping keeps the (already unlinked) file alive after the handle closes.
        return np.memmap(handle, dtype=np.uint8, mode="w+", shape=shape)


# Files that are TIFFs inside (the pyramid formats tifffile reads and histosynth writes).
TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".btf")


def check_complete(path: str | os.PathLike) -> None:
    """Refuse a TIFF cut short (an interrupted copy or download): every tile and strip of every level must lie
    inside the file. tifffile and tiffslide open such files and read zeros or fail only at the missing tile,
    so a truncated slide would otherwise be shown, scored or trained on as if it were whole."""
    import logging

    path = Path(path)
    size = path.stat().st_size
    quiet = logging.getLogger("tifffile")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # its warnings about damaged IFDs become our one line below
    try:
        with tifffile.TiffFile(path) as tif:
            pages = [page for series in tif.series for level_ in series.levels for page in level_.pages]
            if not pages:
                raise HistosynthError(f"{path}: a TIFF without images")
            for page in pages:
                ends = [offset + count for offset, count in zip(page.dataoffsets, page.databytecounts) if count]
                if max(ends, default=0) > size:
                    raise HistosynthError(f"{path}: truncated: image data runs to byte {max(ends, default=0)}, the "
                                          f"file ends at byte {size}")
    except HistosynthError:
        raise
    except Exception as error:  # noqa: BLE001 - tifffile raises many types on damaged structure
        raise HistosynthError(f"{path}: not a readable TIFF ({type(error).__name__}: {error})") from None
    finally:
        quiet.setLevel(level)
