"""Seam score (design §7): hand-computed values, grid lines, seamed vs seamless images, the `seams` command."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histosynth.data.samples import svs_path
from histosynth.errors import HistosynthError
from histosynth.eval.seams import (
    control_offsets,
    grid_lines,
    grid_seam_score,
    periodicity_null,
    periodicity_reference,
    periodicity_score,
    profile_periodicity,
    profiles_null,
    real_tissue_like,
    reference_score,
    seam_score,
    stationary_surrogate,
    stats_seam_score,
)

REAL_SVS = svs_path()  # bundled with the package: the test never depends on files outside the clone


@pytest.mark.parametrize(
    "size, patch, offset, expected",
    [
        (10, 4, 0, [4, 8]),
        (10, 4, 1, [1, 5, 9]),
        (10, 4, 3, [3, 7]),
        (8, 4, 0, [4]),  # 8 is the image's edge, not a boundary inside it
        (4, 4, 0, []),  # a single patch has no cut line
        (10, 4, 6, [2, 6]),  # offsets are taken mod patch
        (10, 4, -1, [3, 7]),
        (5, 1, 0, [1, 2, 3, 4]),
    ],
)
def test_grid_lines(size, patch, offset, expected):
    assert grid_lines(size, patch, offset) == expected


def test_hand_computed_score():
    # One channel, 4x4. Cut line y=2 (between rows 1 and 2), control y=3 (shift 1).
    image = np.array(
        [
            [0, 0, 0, 0],
            [1, 1, 1, 1],
            [5, 5, 9, 9],  # |row2 - row1| = 4, 4, 8, 8 -> mean 6
            [6, 6, 10, 7],  # |row3 - row2| = 1, 1, 1, 2 -> mean 1.25
        ],
        dtype=np.uint8,
    )
    assert seam_score(image, [2], [], control_shift=1) == pytest.approx(6 / 1.25)
    # Adding vertical cut x=1 (|col1 - col0| = 0,0,0,0) and its control x=2 (0,0,4,4): pooled pixel by pixel.
    assert seam_score(image, [2], [1], control_shift=1) == pytest.approx((24 + 0) / 8 / ((5 + 8) / 8))
    # Channels are averaged: a second identical channel changes nothing; float input works the same.
    stacked = np.stack([image, image], axis=-1).astype(np.float64)
    assert seam_score(stacked, [2], [], control_shift=1) == pytest.approx(6 / 1.25)


def test_control_lines_outside_or_on_cut_lines_are_skipped():
    image = np.arange(36, dtype=np.float32).reshape(6, 6) ** 2
    # Cuts 2 and 4, shift 2: controls 4 (a cut line: dropped) and 6 (outside: dropped) -> nothing left.
    with pytest.raises(HistosynthError, match="no control line"):
        seam_score(image, [2, 4], [], control_shift=2)
    # Cuts at 0 or at the far edge are not boundaries inside the image.
    with pytest.raises(HistosynthError, match="no cut line"):
        seam_score(image, [0, 6], [], control_shift=1)
    with pytest.raises(HistosynthError, match="control_shift"):
        seam_score(image, [2], [], control_shift=0)


def test_flat_control_lines_give_nan():
    assert np.isnan(seam_score(np.zeros((8, 8)), [4], [4], control_shift=2))


def textured(size: int, seed: int = 0) -> np.ndarray:
    """Smooth random texture without any grid."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    noise = rng.normal(size=(size, size, 3))
    return gaussian_filter(noise, sigma=(2, 2, 0)) * 400 + 128


def test_seamless_texture_scores_about_one():
    image = textured(512)
    for offset in [(0, 0), (17, 40), (63, 5)]:
        assert 0.9 < grid_seam_score(image, 64, offset) < 1.1
    white_noise = np.random.default_rng(1).integers(0, 256, size=(512, 512, 3), dtype=np.uint8)
    assert 0.95 < grid_seam_score(white_noise, 32) < 1.05


def test_steps_at_tile_borders_score_far_above_one():
    image = textured(512)
    rng = np.random.default_rng(2)
    for y in range(0, 512, 64):
        for x in range(0, 512, 64):
            image[y : y + 64, x : x + 64] += rng.normal(0, 60)  # each tile gets its own brightness
    assert grid_seam_score(image, 64) > 3
    assert 0.9 < grid_seam_score(image, 64, (16, 16)) < 1.1  # a grid (and controls) off the tile borders: no seam
    assert grid_seam_score(image, 64, (32, 32)) < 0.5  # its control lines land on the seams instead


def test_given_control_lines_hand_checked():
    image = np.zeros((4, 4))
    image[2:, :] = 4.0  # |row1 - row2| = 4 on y = 2
    image[:, 3] += 1.0  # |col2 - col3| = 1 on x = 3 (and 0 elsewhere across columns)
    # Cut y = 2 (mean 4), controls y = 1 (0) and x = 3 (1): pooled 4 px + 4 px -> mean 0.5.
    assert seam_score(image, [2], [], control_lines=([1, 2], [3])) == pytest.approx(4 / 0.5)  # y = 2 is a cut: skipped
    with pytest.raises(HistosynthError, match="every given control line"):
        seam_score(image, [2], [], control_lines=([2, 9], []))
    with pytest.raises(HistosynthError, match="either control_shift or control_lines"):
        seam_score(image, [2], [], 1, ([1], []))


def test_control_offsets_keep_their_distance_from_every_recent_line():
    assert control_offsets(16, [0, 8], 3, count=8) == [3, 4, 5, 11, 12, 13]
    assert control_offsets(16, [0, 4, 8, 12], 3) == []  # lines every 4 px leave nothing 3 px from all of them
    picked = control_offsets(128, [5, 70, 100], 8, count=4, seed=1)
    assert len(picked) == 4 and picked == control_offsets(128, [5, 70, 100], 8, count=4, seed=1)
    assert all(min((o - a) % 128, (a - o) % 128) >= 8 for o in picked for a in (5, 70, 100))
    assert picked != control_offsets(128, [5, 70, 100], 8, count=4, seed=2)


def test_stats_seam_score_uses_recorded_control_lines():
    image = textured(256)
    image[:, 128:] += 60  # one seam at x = 128
    image[:, 192:] += 60  # and one at x = 192, where a half-patch control would land
    stats = {"seam_lines": {"y": [], "x": [128]}, "patch_px": 128, "seam_control_px": 64}
    assert stats_seam_score(image, stats) < 1.5  # the control line sits on the other seam and hides this one
    stats["seam_control_lines"] = {"y": [], "x": [100, 160]}
    assert stats_seam_score(image, stats) > 3


def test_periodicity_score_finds_a_grid_wherever_it_lies():
    image = textured(1024, seed=4)
    plain = periodicity_score(image, 128)
    assert 0.3 < plain < 3  # no period: energy at 1/P like its neighbours'
    for offset in (0, 37, 90):
        seamed = image.copy()
        rng = np.random.default_rng(offset)
        for y in range(offset - 128, 1024, 128):
            for x in range(offset - 128, 1024, 128):
                seamed[max(y, 0):y + 128, max(x, 0):x + 128] += rng.normal(0, 40)  # tiles of their own brightness
        assert periodicity_score(seamed, 128) > 10 * plain, offset
    with pytest.raises(HistosynthError, match="300×300 px image is too small"):
        periodicity_score(image[:300, :300], 128)
    assert periodicity_score(image[:512, :512], 128) > 0  # exactly four periods are enough


def test_periodicity_reference_statistics():
    image = textured(768, seed=5)
    reference = periodicity_reference(image, (512, 512), 64, n_crops=6, seed=0)
    assert len(reference.scores) == 6 and reference.min <= reference.p95 <= reference.max
    assert all(0 <= y <= 256 and 0 <= x <= 256 for y, x in reference.offsets)
    assert reference == periodicity_reference(image, (512, 512), 64, n_crops=6, seed=0)


def test_periodicity_reference_counts_the_crops_the_real_image_holds_side_by_side():
    image = textured(768, seed=5)
    assert periodicity_reference(image, (512, 512), 64, n_crops=3).independent_crops == 1
    assert periodicity_reference(image, (256, 256), 64, n_crops=3).independent_crops == 9
    assert periodicity_reference(image, (256, 512), 64, n_crops=3).independent_crops == 3


def seamed_texture(size: int, patch: int, seed: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """A smooth texture, and the same with tiles of their own brightness on a ``patch`` px grid."""
    image = textured(size, seed=seed)
    seamed = image.copy()
    rng = np.random.default_rng(seed)
    for y in range(0, size, patch):
        for x in range(0, size, patch):
            seamed[y:y + patch, x:x + patch] += rng.normal(0, 40)
    return image, seamed


def test_periodicity_null_finds_a_grid_and_keeps_its_own_null_clean():
    plain, seamed = seamed_texture(1024, 128)
    without, grid = periodicity_null(plain, 128, draws=100), periodicity_null(seamed, 128, draws=100)
    assert without.score == periodicity_score(plain, 128) and grid.score == periodicity_score(seamed, 128)
    assert without.p_value > 0.05 and without.draws == 100
    assert grid.p_value == pytest.approx(1 / 101)  # no surrogate scores as high as the grid
    # The surrogates take the seams' peaks out of the spectrum: the grid's null is a texture's null, not a grid's.
    assert grid.p95 < 3 < 10 < grid.score
    assert periodicity_null(seamed, 128, draws=100) == grid  # seeded
    with pytest.raises(HistosynthError, match="at least 1 draw"):
        periodicity_null(plain, 128, draws=0)
    with pytest.raises(HistosynthError, match="300×300 px image is too small"):
        periodicity_null(plain[:300, :300], 128)


def test_profiles_null_holds_its_false_positive_rate_on_profiles_without_a_period():
    rng = np.random.default_rng(0)
    p_values = [profiles_null(*rng.standard_normal((2, 511)), 32, draws=60, seed=i).p_value for i in range(60)]
    assert 0 < np.mean(np.asarray(p_values) < 0.05) < 0.15  # 5 % expected; 60 profiles scatter


def test_stationary_surrogate_keeps_the_spectral_shape_and_drops_the_period():
    rng = np.random.default_rng(1)
    smooth = np.convolve(rng.standard_normal(1100), np.ones(9) / 9, mode="valid")[:1023]  # low-pass
    periodic = smooth + 0.3 * np.sin(2 * np.pi * np.arange(1023) / 32)
    surrogate = stationary_surrogate(periodic, rng)
    assert surrogate.shape == periodic.shape

    def lag_one(x):
        return np.corrcoef(x[:-1], x[1:])[0, 1]

    assert lag_one(surrogate) == pytest.approx(lag_one(smooth), abs=0.1)  # as smooth as the profile
    assert profile_periodicity(periodic, 32) > 10 > 5 > profile_periodicity(surrogate, 32)


def test_periodicity_reference_for_an_output_larger_than_the_real_image():
    image = textured(768, seed=5)[:, :640]
    reference = periodicity_reference(image, (4096, 600), 64, n_crops=8, seed=0)
    # The long side's crops are the image's less two patches (768 - 128), so they still move and differ; the side
    # that fits keeps its length.
    assert all(0 <= y <= 128 and 0 <= x <= 40 for y, x in reference.offsets)
    assert len(set(reference.offsets)) > 1 and reference.max > reference.min
    assert reference.scores[0] == periodicity_score(image[reference.offsets[0][0]:][:640, reference.offsets[0][1]:][:, :600], 64)
    with pytest.raises(HistosynthError, match="200×768 px real image is too small for a periodicity reference"):
        periodicity_reference(image[:, :200], (1024, 1024), 64)


def test_reference_score_statistics():
    image = textured(384, seed=3)
    reference = reference_score(image, 64, n_offsets=20, seed=0)
    assert len(reference.scores) == len(reference.offsets) == 20
    assert reference.min <= reference.mean <= reference.max
    assert reference.min <= reference.p95 <= reference.max
    assert reference.p95 == pytest.approx(np.percentile(reference.scores, 95))
    assert all(0 <= oy < 64 and 0 <= ox < 64 for oy, ox in reference.offsets)
    assert reference_score(image, 64, n_offsets=20, seed=0) == reference  # seeded
    assert 0.85 < reference.mean < 1.15
    assert json.dumps(reference.as_dict())


def test_real_tissue_like_crops_and_mirrors():
    real = np.arange(12).reshape(3, 4)
    np.testing.assert_array_equal(real_tissue_like(real, 1, 2), [[5, 6]])  # centred crop
    larger = real_tissue_like(real, 5, 6)
    assert larger.shape == (5, 6)
    np.testing.assert_array_equal(larger[1:4, 1:5], real)  # the original in the middle, mirrored around it
    np.testing.assert_array_equal(larger[0, 1:5], real[0])


def test_seams_command(tmp_path: Path, capsys):
    from histosynth.cli import main

    image = textured(256).clip(0, 255).astype(np.uint8)
    image[:, 128:] = (image[:, 128:].astype(int) + 60).clip(0, 255)  # one seam at x = 128
    Image.fromarray(image).save(tmp_path / "generated.png")
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"seam_lines": {"y": [], "x": [128]}, "patch_px": 128}))

    main(["seams", str(tmp_path / "generated.png"), "--stats", str(stats), "--real", str(REAL_SVS), "--json",
          "--n-offsets", "5"])
    result = json.loads(capsys.readouterr().out)
    assert result["seam_score"] > 3 and result["above_reference"] is True
    assert result["n_lines_x"] == 1 and result["control_shift_px"] == 64
    assert len(result["reference"]["scores"]) == 5
    assert result["periodicity"] is None  # 256 px hold only two 128 px periods

    stats.write_text(json.dumps({"seam_lines": {"y": [], "x": [128]}, "patch_px": 128,
                                 "seam_control_lines": {"y": [], "x": [40, 200]}}))
    main(["seams", str(tmp_path / "generated.png"), "--stats", str(stats), "--real", str(REAL_SVS), "--json",
          "--n-offsets", "5"])
    result = json.loads(capsys.readouterr().out)
    assert result["control_lines"] == {"y": [], "x": [40, 200]} and result["control_shift_px"] is None

    main(["seams", str(tmp_path / "generated.png"), "--patch", "128", "--offset", "64,64", "--real", str(REAL_SVS),
          "--n-offsets", "5"])
    out = capsys.readouterr().out
    assert out.startswith("seam score ") and "real tissue" in out

    with pytest.raises(SystemExit) as exit_info:
        main(["seams", str(tmp_path / "generated.png"), "--patch", "128", "--offset", "1"])
    assert exit_info.value.code == 2
    assert "--offset must be 'x,y'" in capsys.readouterr().err


def test_seams_command_reports_the_periodicity_null_and_a_band_of_one_crop(tmp_path: Path, capsys):
    from histosynth.cli import main

    plain, seamed = seamed_texture(512, 128, seed=6)
    Image.fromarray(seamed.clip(0, 255).astype(np.uint8)).save(tmp_path / "generated.png")
    Image.fromarray(textured(600, seed=7).clip(0, 255).astype(np.uint8)).save(tmp_path / "real.png")

    generated, real = str(tmp_path / "generated.png"), str(tmp_path / "real.png")
    main(["seams", generated, "--patch", "128", "--real", real, "--json", "--n-offsets", "5"])
    result = json.loads(capsys.readouterr().out)
    assert result["periodicity_null"]["score"] == result["periodicity"]
    assert result["periodicity_null"]["draws"] == 200 and result["periodicity_null"]["p_value"] < 0.05
    assert result["periodicity_reference"]["independent_crops"] == 1

    main(["seams", generated, "--patch", "128", "--real", real, "--n-offsets", "5"])
    out = capsys.readouterr().out
    assert "real.png holds 1 crop(s) of this size side by side" in out
    assert "periodicity without a period" in out and "a grid of seams (p < 0.05)" in out
