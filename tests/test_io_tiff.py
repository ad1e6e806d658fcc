"""Streaming pyramidal TIFF writers: readable by OpenSlide and tiffslide, deterministic, atomic, bounded memory."""
from __future__ import annotations

import gc
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile
import tiffslide

from histosynth.errors import HistosynthError
from histosynth.io.tiff import (
    _downsample,
    iter_rows,
    needs_bigtiff,
    pyramid_shapes,
    read_provenance,
    write_label_tiff,
    write_pyramid,
)

MPP = 0.5
PROVENANCE = {"model_hash": "sha256:abc", "seed": 7, "settings": {"sampler": "random-offset", "steps": 25}}


def pattern_rows(width: int, height: int, row_height: int = 256, channels: int = 3):
    """Rows of a smooth deterministic RGB pattern, generated lazily: the whole image never exists."""
    x = np.arange(width, dtype=np.float32)[None, :]
    for top in range(0, height, row_height):
        y = np.arange(top, min(top + row_height, height), dtype=np.float32)[:, None]
        red = 128 + 90 * np.sin(x / 53.0) * np.cos(y / 41.0)
        green = 128 + 60 * np.cos((x + y) / 97.0)
        blue = np.broadcast_to(200 - 0.02 * (x + y) % 50, red.shape)
        row = np.stack([red, green, blue], axis=-1).astype(np.uint8)  # (h, W, 3)
        yield row if channels == 3 else row[:, :, 0]


def pattern_image(width: int, height: int) -> np.ndarray:
    """The whole pattern, for comparisons on small images."""
    return np.concatenate(list(pattern_rows(width, height)), axis=0)


def test_pyramid_shapes_halve_down_to_256():
    assert pyramid_shapes(2048, 2048) == [(2048, 2048), (1024, 1024), (512, 512), (256, 256)]
    assert pyramid_shapes(1000, 300) == [(1000, 300), (500, 150), (250, 75)]
    assert pyramid_shapes(200, 100) == [(200, 100)]
    assert pyramid_shapes(513, 3) == [(513, 3), (257, 2), (129, 1)]


def test_downsample_area_mean_and_label_mode():
    band = np.array([[10, 20, 7], [30, 41, 9]], dtype=np.uint8)[:, :, None]  # (2, 3, 1), odd width
    # (10+20+30+41)/4 = 25.25 -> 25; odd column replicated: (7+7+9+9)/4 = 8
    assert _downsample(band, "area")[:, :, 0].tolist() == [[25, 8]]
    labels = np.array([[1, 2, 3, 3], [2, 2, 4, 5]], dtype=np.uint8)[:, :, None]
    # block 1: {1,2,2,2} -> 2; block 2: {3,3,4,5} -> 3
    assert _downsample(labels, "mode")[:, :, 0].tolist() == [[2, 3]]
    ties = np.array([[4, 9], [9, 4]], dtype=np.uint8)[:, :, None]
    assert _downsample(ties, "mode")[:, :, 0].tolist() == [[4]]  # tie: top-left wins


def test_generic_tiff_opens_in_openslide_and_tiffslide(tmp_path: Path):
    openslide = pytest.importorskip("openslide")
    path = write_pyramid(tmp_path / "slide.tif", 2048, 2048, pattern_rows(2048, 2048), mpp=MPP, description=PROVENANCE)
    expected_dims = ((2048, 2048), (1024, 1024), (512, 512), (256, 256))

    with openslide.OpenSlide(path) as slide:
        assert slide.properties["openslide.vendor"] == "generic-tiff"
        assert slide.level_count >= 4
        assert slide.level_dimensions == expected_dims
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(MPP)
        assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(MPP)
        assert "synthetic" in slide.properties["openslide.comment"]
        region = np.asarray(slide.read_region((512, 768), 0, (256, 256)))[:, :, :3]
    reference = pattern_image(2048, 2048)[768:1024, 512:768].astype(int)
    assert np.abs(region.astype(int) - reference).mean() < 3  # JPEG quality 90

    with tiffslide.TiffSlide(path) as slide:
        assert slide.level_count >= 4
        assert slide.level_dimensions == expected_dims
        assert slide.properties["tiffslide.mpp-x"] == pytest.approx(MPP)
        assert slide.properties["tiffslide.mpp-y"] == pytest.approx(MPP)
        assert slide.level_downsamples == pytest.approx((1.0, 2.0, 4.0, 8.0))
        low = slide.read_region((0, 0), 3, (256, 256), as_array=True)
    full = pattern_image(2048, 2048).astype(np.float64)
    expected_low = full.reshape(256, 8, 256, 8, 3).mean(axis=(1, 3))  # three 2x area means = one 8x area mean
    assert np.abs(low - expected_low).mean() < 3

    provenance = read_provenance(path)
    assert provenance["synthetic"] is True and provenance["seed"] == 7 and "histosynth_version" in provenance
    with tifffile.TiffFile(path) as tif:
        first = tif.pages.first
        assert first.is_tiled and first.tilewidth == 256
        assert "DateTime" not in first.tags
        assert first.tags["Software"].value.startswith("histosynth")
        assert not tif.is_bigtiff


def test_ome_tiff_opens_in_tiffslide(tmp_path: Path):
    path = write_pyramid(
        tmp_path / "slide.ome.tif", 2048, 2048, pattern_rows(2048, 2048), mpp=MPP, format="ome-tiff",
        description=PROVENANCE,
    )
    with tiffslide.TiffSlide(path) as slide:
        assert slide.level_count >= 4
        assert slide.level_dimensions == ((2048, 2048), (1024, 1024), (512, 512), (256, 256))
        assert slide.properties["tiffslide.mpp-x"] == pytest.approx(MPP)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome
        assert len(tif.pages) == 1  # lower levels live in SubIFDs
        assert len(tif.series[0].levels) == 4
        xml = tif.ome_metadata
    assert 'PhysicalSizeX="0.5"' in xml and 'PhysicalSizeY="0.5"' in xml
    assert read_provenance(path)["model_hash"] == "sha256:abc"


@pytest.mark.parametrize("fmt", ["tiff", "ome-tiff"])
def test_writing_twice_gives_identical_bytes(tmp_path: Path, fmt: str):
    def write(name: str, provenance: dict) -> Path:
        return write_pyramid(tmp_path / name, 700, 530, pattern_rows(700, 530), mpp=MPP, format=fmt,
                             description=provenance)

    first, second = write("a.tif", PROVENANCE), write("b.tif", PROVENANCE)
    assert first.read_bytes() == second.read_bytes()
    other = write("c.tif", {**PROVENANCE, "seed": 8})
    assert other.read_bytes() != first.read_bytes()  # provenance (and the OME UUID) follow the settings


def test_spooled_levels_give_the_same_file(tmp_path: Path):
    in_ram = write_pyramid(tmp_path / "ram.tif", 1100, 900, pattern_rows(1100, 900), mpp=MPP)
    spooled = write_pyramid(tmp_path / "disk.tif", 1100, 900, pattern_rows(1100, 900), mpp=MPP, spool_bytes=0)
    assert in_ram.read_bytes() == spooled.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.tif", "ram.tif"]  # spool files are gone


def test_lossless_odd_sizes_and_free_row_heights(tmp_path: Path):
    width, height = 1000, 777
    image = pattern_image(width, height)
    path = write_pyramid(tmp_path / "odd.tif", width, height, iter_rows(image, 100), mpp=0.25, compression="deflate",
                         tile=128)
    with tiffslide.TiffSlide(path) as slide:
        assert slide.level_dimensions == tuple(pyramid_shapes(width, height))
        assert slide.properties["tiffslide.mpp-x"] == pytest.approx(0.25)
        np.testing.assert_array_equal(slide.read_region((0, 0), 0, (width, height), as_array=True), image)
        level1 = slide.read_region((0, 0), 1, slide.level_dimensions[1], as_array=True)
    padded = np.pad(image, ((0, 1), (0, 0), (0, 0)), mode="edge").astype(np.uint16)  # odd height: edge replicated
    expected = (padded[0::2, 0::2] + padded[0::2, 1::2] + padded[1::2, 0::2] + padded[1::2, 1::2] + 2) // 4
    np.testing.assert_array_equal(level1, expected)


def test_bigtiff(tmp_path: Path):
    assert not needs_bigtiff(20_000, 20_000) and needs_bigtiff(40_000, 40_000)  # 1.6 GB vs 6.4 GB of pixels
    openslide = pytest.importorskip("openslide")
    path = write_pyramid(tmp_path / "big.tif", 600, 300, pattern_rows(600, 300), mpp=MPP, bigtiff=True)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_bigtiff
    with openslide.OpenSlide(path) as slide:
        assert slide.level_dimensions == ((600, 300), (300, 150), (150, 75))
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(MPP)


def test_failing_generator_leaves_no_file(tmp_path: Path):
    def rows():
        yield from pattern_rows(1024, 512)
        raise RuntimeError("sampler died")

    final = tmp_path / "out.tif"
    with pytest.raises(RuntimeError, match="sampler died"):
        write_pyramid(final, 1024, 1024, rows(), mpp=MPP)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "rows, message",
    [
        ([np.zeros((256, 500, 3), np.uint8)], "expected \\(row_height, 512, 3\\)"),
        ([np.zeros((256, 512, 3), np.float32)], "dtype float32"),
        ([np.zeros((256, 512, 3), np.uint8)], "256 px of the declared height 512"),
        ([np.zeros((300, 512, 3), np.uint8)] * 2, "more than the declared height"),
        (["not an array"], "numpy array"),
    ],
)
def test_bad_rows_are_clear_errors(tmp_path: Path, rows, message):
    with pytest.raises(HistosynthError, match=message):
        write_pyramid(tmp_path / "bad.tif", 512, 512, iter(rows), mpp=MPP)
    assert not (tmp_path / "bad.tif").exists()


def test_bad_arguments_are_clear_errors(tmp_path: Path):
    with pytest.raises(HistosynthError, match="mpp"):
        write_pyramid(tmp_path / "x.tif", 64, 64, [], mpp=0)
    with pytest.raises(HistosynthError, match="compression"):
        write_pyramid(tmp_path / "x.tif", 64, 64, [], mpp=1, compression="lzw")
    with pytest.raises(HistosynthError, match="JSON"):
        write_pyramid(tmp_path / "x.tif", 64, 64, [], mpp=1, description={"seed": object()})


def test_label_tiff_keeps_class_ids_on_every_level(tmp_path: Path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.repeat(rng.integers(0, 4, size=(40, 48)), 16, axis=0), 16, axis=1).astype(np.uint8)
    labels[::7, ::5] = 9  # isolated pixels an average would smear into ids that do not exist
    classes = [{"id": i, "name": f"c{i}", "color": [i * 20, 0, 0]} for i in (0, 1, 2, 3, 9)]
    path = write_label_tiff(tmp_path / "labels.tif", 768, 640, iter_rows(labels, 64), mpp=2.0, classes=classes)
    with tiffslide.TiffSlide(path) as slide:
        assert slide.level_count == 3
        assert slide.properties["tiffslide.mpp-x"] == pytest.approx(2.0)
        np.testing.assert_array_equal(slide.read_region((0, 0), 0, (768, 640), as_array=True).squeeze(), labels)
        for level in range(1, slide.level_count):
            pixels = slide.read_region((0, 0), level, slide.level_dimensions[level], as_array=True)
            assert set(np.unique(pixels)) <= {0, 1, 2, 3, 9}
    assert read_provenance(path)["classes"][4]["id"] == 9


def gradient_rows(width: int, height: int, row_height: int = 256):
    """Cheap lazily generated rows (uint8 arithmetic only), so the producer adds little to the measured memory."""
    x = (np.arange(width) % 256).astype(np.uint8)[None, :]
    for top in range(0, height, row_height):
        y = ((np.arange(top, min(top + row_height, height)) * 3) % 256).astype(np.uint8)[:, None]
        row = np.empty((y.shape[0], width, 3), dtype=np.uint8)  # (h, W, 3)
        row[..., 0] = x
        row[..., 1] = y
        row[..., 2] = x ^ y
        yield row


@pytest.mark.parametrize("spool_bytes, bound", [(64 * 2**20, 0.6), (0, 0.25)])
def test_writing_memory_is_bounded(tmp_path: Path, spool_bytes: int, bound: float):
    size = 4096  # the full image would be 4096 * 4096 * 3 = 48 MiB
    gc.collect()
    tracemalloc.start()
    try:
        write_pyramid(tmp_path / "big.tif", size, size, gradient_rows(size, size), mpp=MPP, spool_bytes=spool_bytes)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # In RAM: level 1 (a quarter of level 0) and level 2 while it fills, a band, the encoder queue. Spooled to disk
    # (what large slides get): only bands and the queue.
    assert peak < bound * size * size * 3, f"peak {peak / 2**20:.1f} MiB"
    with tiffslide.TiffSlide(tmp_path / "big.tif") as slide:
        assert slide.level_dimensions[0] == (size, size) and slide.level_count == 5


@pytest.mark.parametrize("format", ["tiff", "ome-tiff"])
def test_a_truncated_pyramid_is_refused_a_whole_one_is_not(tmp_path, format):
    """A copy cut short opens in tifffile and tiffslide (missing tiles read as zeros): check_complete finds every
    cut, from inside the first level to the last few bytes of the smallest one."""
    from histosynth.io.tiff import check_complete

    pixels = np.random.default_rng(0).integers(0, 255, (600, 700, 3), dtype=np.uint8)
    whole = write_pyramid(tmp_path / f"whole.{format}", 700, 600, [pixels], mpp=0.5, format=format,
                          compression="deflate")
    check_complete(whole)
    data = whole.read_bytes()
    for keep in (0.3, 0.7, 0.9, 0.999):
        cut = tmp_path / f"cut.{format}"
        cut.write_bytes(data[: int(len(data) * keep)])
        with pytest.raises(HistosynthError, match="truncated"):
            check_complete(cut)
    (tmp_path / "text.tiff").write_text("not a tiff")
    with pytest.raises(HistosynthError, match="not a readable TIFF"):
        check_complete(tmp_path / "text.tiff")
