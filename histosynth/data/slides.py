"""Open any slide or plain image and read a region at a requested µm/px."""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from histosynth.errors import HistosynthError
from histosynth.io.tiff import TIFF_SUFFIXES, check_complete

PLAIN_SUFFIXES = {".png", ".jpg", ".jpeg"}
# Plain images of whole slides are legitimate here, but not without limit: a small PNG can claim billions of pixels
# (a decompression bomb) and take all memory while it is decoded. 2^30 px (3 GiB of RGB) is refused; pyramidal TIFFs,
# which are read region by region, have no such limit.
MAX_PLAIN_PIXELS = 2**30
Image.MAX_IMAGE_PIXELS = MAX_PLAIN_PIXELS // 2  # PIL refuses above twice this, for every image the package opens
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)  # below the limit is fine here
# TIFF resolution tags coarser than this are screen or print defaults (72-300 dpi = 85-350 µm/px), not a scanner's.
MAX_PLAUSIBLE_MPP = 50.0


def _plausible_mpp(value: object) -> float | None:
    """A µm/px value from metadata, or None when absent, unparsable, or a screen/print default."""
    try:
        mpp = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return mpp if 0 < mpp < MAX_PLAUSIBLE_MPP else None


class Slide:
    """A slide: a pyramid of levels (one level for plain images) and its level-0 resolution in µm/px."""

    def __init__(self, path: str | Path, source_mpp: float | None = None):
        self.path = Path(path)
        if not self.path.exists():
            raise HistosynthError(f"{self.path}: file not found")
        self._image: Image.Image | None = None
        self._handle = None
        metadata_mpp = None
        if self.path.suffix.lower() in PLAIN_SUFFIXES:
            self._image = _open_plain(self.path)
            self.level_dimensions = [self._image.size]
        else:
            self._handle = _open_pyramid(self.path)
            self.level_dimensions = [tuple(d) for d in self._handle.level_dimensions]
            value = self._handle.properties.get("tiffslide.mpp-x") or self._handle.properties.get("openslide.mpp-x")
            metadata_mpp = _plausible_mpp(value)
        self.level_downsamples = [self.level_dimensions[0][0] / d[0] for d in self.level_dimensions]
        mpp = metadata_mpp or source_mpp  # the file's own metadata wins; --source-mpp fills in where it has none
        if mpp is None:
            raise HistosynthError(f"{self.path}: no resolution in the file's metadata; pass --source-mpp")
        if not (math.isfinite(mpp) and mpp > 0):
            raise HistosynthError(f"{self.path}: resolution must be a positive number, got {mpp} µm/px")
        self.mpp = float(mpp)

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 size (width, height) in px."""
        return self.level_dimensions[0]

    def close(self) -> None:
        """Release the file handle (or the decoded plain image)."""
        if self._handle is not None:
            self._handle.close()
        self._image = None

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def size_at(self, mpp: float) -> tuple[int, int]:
        """Slide size in px at ``mpp``."""
        scale = self.mpp / mpp
        return int(self.dimensions[0] * scale), int(self.dimensions[1] * scale)

    def read_region(self, x: int, y: int, width: int, height: int, mpp: float) -> np.ndarray:
        """RGB uint8 (height, width, 3) whose top-left is level-0 (x, y), at ``mpp``: the finest level not finer
        than needed, then area resampling. Outside the slide is white."""
        downsample = mpp / self.mpp
        level = max((i for i, d in enumerate(self.level_downsamples) if d <= downsample * (1 + 1e-3)), default=0)
        level_ds = self.level_downsamples[level]
        span_w, span_h = width * downsample, height * downsample  # level-0 px
        read_w, read_h = max(1, round(span_w / level_ds)), max(1, round(span_h / level_ds))
        region = self._read(level, x, y, read_w, read_h)  # (read_h, read_w, 3)
        if (read_w, read_h) != (width, height):
            region = np.asarray(Image.fromarray(region).resize((width, height), Image.BOX))
        return region

    def _read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """(h, w, 3) RGB of one level, (x, y) in level-0 px; the part outside the slide is white.

        The libraries pad with black (tiffslide, PIL crops) or transparency (OpenSlide), so only the part inside
        the level is read and pasted onto white.
        """
        level_ds = self.level_downsamples[level]
        level_w, level_h = self.level_dimensions[level]
        lx, ly = int(x // level_ds), int(y // level_ds)  # top-left in level px
        x0, y0 = max(lx, 0), max(ly, 0)
        x1, y1 = min(lx + w, level_w), min(ly + h, level_h)
        canvas = np.full((h, w, 3), 255, np.uint8)  # (h, w, 3)
        if x1 <= x0 or y1 <= y0:
            return canvas
        if self._image is not None:
            inside = np.asarray(self._image.crop((x0, y0, x1, y1)))  # (y1-y0, x1-x0, 3)
        else:
            try:
                region = self._handle.read_region((round(x0 * level_ds), round(y0 * level_ds)), level,
                                                  (x1 - x0, y1 - y0))
            except Exception as error:
                raise HistosynthError(f"{self.path}: cannot read region ({type(error).__name__}: {error})") from error
            region = np.asarray(region)
            if region.shape[-1] == 4:  # RGBA: transparent where the scanner stored nothing -> white
                alpha = region[..., 3:4].astype(np.float32) / 255
                region = (region[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
            inside = region[..., :3]
        canvas[y0 - ly:y1 - ly, x0 - lx:x1 - lx] = inside
        return canvas

    def thumbnail(self, mpp: float) -> np.ndarray:
        """The whole slide at ``mpp`` (low resolution) as RGB uint8."""
        w, h = self.size_at(mpp)
        return self.read_region(0, 0, max(1, w), max(1, h), mpp)


def too_many_pixels(path: str | Path, error: Image.DecompressionBombError) -> HistosynthError:
    """The one-line refusal of an image that claims more pixels than may be decoded at once."""
    return HistosynthError(f"{path}: an image of more than {MAX_PLAIN_PIXELS:,} px (a decompression bomb, or a "
                           "whole slide: save it as a pyramidal TIFF instead)")


def _open_plain(path: Path) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
        return image.convert("RGB")
    except Image.DecompressionBombError as error:
        raise too_many_pixels(path, error) from None
    except Exception as error:
        raise HistosynthError(f"{path}: not a readable image ({type(error).__name__})") from error


def _open_pyramid(path: Path):
    errors = []
    if path.suffix.lower() in TIFF_SUFFIXES:
        check_complete(path)  # a truncated level 0 would otherwise read as white or black tissue
    try:
        import tiffslide

        handle = tiffslide.TiffSlide(str(path))
        handle.read_region((0, 0), handle.level_count - 1, (1, 1))  # a truncated file fails here, not later
        return handle
    except Exception as error:
        errors.append(f"{type(error).__name__}")
    try:
        import openslide

        return openslide.OpenSlide(str(path))
    except Exception as error:
        errors.append(f"{type(error).__name__}")
    raise HistosynthError(f"{path}: not a readable slide or image (truncated or unsupported format)")


def open_image(path: str | Path, kind: str = "image") -> Image.Image:
    """A fully loaded PIL image, or a one-line error naming the file (missing, unreadable)."""
    path = Path(path)
    try:
        image = Image.open(path)
        image.load()
        return image
    except FileNotFoundError:
        raise HistosynthError(f"{path}: file not found") from None
    except Image.DecompressionBombError as error:
        raise too_many_pixels(path, error) from None
    except Exception as error:
        raise HistosynthError(f"{path}: not a readable {kind} ({type(error).__name__})") from error


def open_slide(path: str | Path, source_mpp: float | None = None) -> Slide:
    """Open an SVS/TIFF/NDPI/... slide (tiffslide, else openslide) or a PNG/JPEG as a one-level slide."""
    return Slide(path, source_mpp)
