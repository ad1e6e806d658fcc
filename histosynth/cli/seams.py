"""CLI command: ``histosynth seams`` (seam and periodicity scores of a generated image)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from histosynth.cli.app import app
from histosynth.errors import HistosynthError

# --- seams ---------------------------------------------------------------------------------------------------------

_TIFF_SUFFIXES = {".tif", ".tiff", ".svs", ".btf"}


_SEAMS_HELP = (
    "Seam score of IMAGE on its cut lines, beside the score of real tissue of the same size and patch size.\n\n"
    "Cut lines: a patch grid at --offset (fixed tiles), or the lines recorded in --stats (e.g. the random-offset "
    "grid's last step, with control lines away from every recent step's cuts). The reference crops the real "
    "slide's level 0 to the image's size (centred), mirroring it where the image is larger, and reports the 95th "
    "percentile over --n-offsets random grid offsets. The periodicity score needs no stats: energy of the row and "
    "column gradient profiles at the patch period and its harmonics over neighbouring frequencies, beside the same "
    "on --n-offsets random crops of the real slide, and beside its null: the same statistic on 200 stationary "
    "surrogates of the image's own profiles (no period), with the p-value of the image's score. Score lossless "
    "pixels: JPEG blocks add edges of their own."
)


@app.command("seams", help=_SEAMS_HELP)
def seams(
    image: Path = typer.Argument(..., help="Generated image (PNG or TIFF; lossless pixels give meaningful scores)."),
    patch: Optional[int] = typer.Option(None, "--patch", help="Patch size in image px (default: patch_px of --stats)."),
    offset: Optional[str] = typer.Option(
        None, "--offset", help="Grid offset 'x,y' of the cut lines in px (default 0,0)."
    ),
    stats: Optional[Path] = typer.Option(
        None, "--stats", help='A generation\'s stats JSON: {"seam_lines": {"y": [...], "x": [...]}, "patch_px": P}.'
    ),
    real: Optional[Path] = typer.Option(
        None, "--real", help="Real tissue slide or image for the reference (default: the bundled SVS)."
    ),
    n_offsets: int = typer.Option(20, "--n-offsets", help="Random grid offsets for the real-tissue reference."),
    seed: int = typer.Option(0, "--seed", help="Seed of the reference's offsets."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of text."),
) -> None:
    """Seam score of IMAGE on its cut lines beside real tissue's (design §7); see _SEAMS_HELP."""
    from histosynth.eval.seams import (
        grid_lines,
        periodicity_null,
        periodicity_reference,
        real_tissue_like,
        reference_score,
        seam_score,
    )

    if offset is not None and stats is not None:
        raise HistosynthError("give either --offset or --stats, not both")
    pixels, lossy = _read_image(image)
    height, width = pixels.shape[:2]

    if stats is not None:
        lines_y, lines_x, stats_patch, control, control_lines = _read_stats_lines(stats)
        patch = patch or stats_patch
        if patch is None:
            raise HistosynthError(f"{stats}: no patch_px; pass --patch")
    else:
        control, control_lines = None, None
        if patch is None:
            raise HistosynthError("--patch is required unless --stats gives patch_px")
        ox, oy = _parse_offset(offset) if offset is not None else (0, 0)
        lines_y, lines_x = grid_lines(height, patch, oy), grid_lines(width, patch, ox)
    if patch < 2:
        raise HistosynthError(f"--patch must be at least 2 px, got {patch}")
    # Half a patch, unless the generation blended two half-shifted grids: then a quarter (its stats say so).
    shift = None if control_lines is not None else int(control) if control else patch // 2
    score = seam_score(pixels, lines_y, lines_x, shift, control_lines)

    real_path = real or _bundled_real_slide()
    real_pixels, _ = _read_image(real_path)
    reference = reference_score(real_tissue_like(real_pixels, height, width), patch, n_offsets=n_offsets, seed=seed)
    periodic = min(height, width) >= 4 * patch and min(real_pixels.shape[:2]) >= 4 * patch
    null = periodicity_null(pixels, patch, seed=seed) if periodic else None
    periodicity = None if null is None else null.score
    periodic_reference = (periodicity_reference(real_pixels, (height, width), patch, n_crops=n_offsets, seed=seed)
                          if periodic else None)

    inside_y = [y for y in lines_y if 0 < y < height]
    inside_x = [x for x in lines_x if 0 < x < width]
    result: dict[str, Any] = {
        "image": str(image),
        "width": width,
        "height": height,
        "patch_px": patch,
        "control_shift_px": shift,
        "control_lines": None if control_lines is None else {"y": list(control_lines[0]), "x": list(control_lines[1])},
        "n_lines_y": len(inside_y),
        "n_lines_x": len(inside_x),
        "seam_score": score,
        "lossy_input": lossy,
        "reference": {"source": str(real_path), "n_offsets": n_offsets, "seed": seed, **reference.as_dict()},
        "above_reference": bool(score > reference.p95),
        "periodicity": periodicity,
        "periodicity_reference": None if periodic_reference is None else periodic_reference.as_dict(),
        "periodicity_above_reference": None if periodicity is None else bool(periodicity > periodic_reference.p95),
        "periodicity_null": None if null is None else null.as_dict(),
    }
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(
        f"seam score {score:.3f}  ({width}x{height} px, {len(inside_y)} horizontal + {len(inside_x)} vertical cut "
        + (f"lines, control shift {shift} px)" if shift is not None else
           f"lines, {len(control_lines[0]) + len(control_lines[1])} control lines from the stats)")
    )
    typer.echo(
        f"real tissue {reference.p95:.3f} (95th percentile; mean {reference.mean:.3f}, range "
        f"{reference.min:.3f}-{reference.max:.3f} over {n_offsets} offsets of a {patch} px grid on "
        f"{Path(real_path).name})"
    )
    typer.echo("seams: above real tissue" if score > reference.p95 else "seams: within real-tissue scatter")
    if periodicity is None:
        typer.echo(f"periodicity: not measured (the image or the real slide is under 4 patches of {patch} px)")
    else:
        typer.echo(f"periodicity {periodicity:.2f} at {patch} px (real tissue {periodic_reference.p95:.2f}, 95th "
                   f"percentile; range {periodic_reference.min:.2f}-{periodic_reference.max:.2f} over {n_offsets} "
                   "crops): " + ("above real tissue" if periodicity > periodic_reference.p95 else
                                 "within real-tissue scatter"))
        if periodic_reference.independent_crops < 4:
            typer.echo(f"note: {Path(real_path).name} holds {periodic_reference.independent_crops:.0f} crop(s) of this "
                       "size side by side; its crops overlap and score alike, so that band is one measurement, not a "
                       "spread")
        typer.echo(f"periodicity without a period (its null, {null.draws} stationary surrogates of this image's own "
                   f"profiles): 95th percentile {null.p95:.2f}, median {null.median:.2f}; p = {null.p_value:.3f} — "
                   + ("a grid of seams (p < 0.05)" if null.p_value < 0.05 else "no period found (p ≥ 0.05)"))
    if lossy:
        typer.echo("note: the image is JPEG-compressed; its 8x8 blocks add edges of their own", err=True)


def _read_image(path: Path) -> tuple[Any, bool]:
    """(H, W, C) uint8 pixels of level 0 of an image or slide, and whether they were JPEG-compressed."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise HistosynthError(f"{path}: file not found")
    if path.suffix.lower() in _TIFF_SUFFIXES:
        import tiffslide

        from histosynth.io.tiff import check_complete

        check_complete(path)  # tiffslide reads the missing tiles of a truncated file as black, silently
        try:
            with tiffslide.TiffSlide(path) as slide:
                pixels = slide.read_region((0, 0), 0, slide.dimensions, as_array=True)
                compression = str(slide.ts_tifffile.series[0].levels[0].keyframe.compression.name)
        except (OSError, ValueError, KeyError) as error:
            raise HistosynthError(f"{path}: cannot read as a TIFF slide ({error})") from None
        return np.asarray(pixels), "JPEG" in compression.upper()
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            lossy = opened.format == "JPEG"
            pixels = np.asarray(opened.convert("RGB"))
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise HistosynthError(f"{path}: cannot read as an image ({error})") from None
    return pixels, lossy


def _read_stats_lines(path: Path) -> tuple[list[int], list[int], Optional[int], Optional[int], Optional[tuple]]:
    """Seam lines (y, x), patch size, control shift and control lines (y, x) from a generation's stats JSON."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        lines = data["seam_lines"]
        lines_y = [int(v) for v in lines.get("y", [])]
        lines_x = [int(v) for v in lines.get("x", [])]
        control = data.get("seam_control_lines")
        control_lines = None if control is None else ([int(v) for v in control.get("y", [])],
                                                      [int(v) for v in control.get("x", [])])
        shift = data.get("seam_control_px")
        shift = None if shift is None else int(shift)
    except FileNotFoundError:
        raise HistosynthError(f"{path}: file not found") from None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise HistosynthError(f'{path}: expected {{"seam_lines": {{"y": [...], "x": [...]}}, "patch_px": P}}') from None
    patch = data.get("patch_px")
    return lines_y, lines_x, int(patch) if patch is not None else None, shift, control_lines


def _parse_offset(text: str) -> tuple[int, int]:
    """'x,y' -> (x, y)."""
    try:
        x, y = (int(part) for part in text.split(","))
    except ValueError:
        raise HistosynthError(f"--offset must be 'x,y' in px, got {text!r}") from None
    return x, y


def _bundled_real_slide() -> Path:
    """The bundled real H&E slide (histosynth.data.samples), or a HistosynthError asking for --real."""
    try:
        from histosynth.data.samples import svs_path

        path = Path(svs_path())
    except (ImportError, AttributeError, FileNotFoundError, HistosynthError):
        raise HistosynthError("no bundled real tissue found; pass --real SLIDE") from None
    if not path.is_file():
        raise HistosynthError(f"bundled real tissue {path} is missing; pass --real SLIDE")
    return path


# --- evaluate ------------------------------------------------------------------------------------------------------
