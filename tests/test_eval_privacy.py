"""Authenticity, the C_T data-copying test and the dihedral nearest-neighbour search."""
import numpy as np
import pytest

from histosynth.errors import HistosynthError
from histosynth.eval.privacy import DIHEDRAL_NAMES, authenticity, ct_test, nearest_neighbours, neighbour_figure


@pytest.fixture(scope="module")
def gaussian_sets():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(1000, 16))  # (T, D)
    holdout = rng.normal(size=(500, 16))  # i.i.d. with train
    fresh = rng.normal(size=(500, 16))  # a generator that does not copy
    return train, holdout, fresh


def test_copies_of_training_samples_are_flagged(gaussian_sets):
    train, holdout, _ = gaussian_sets
    copies = train[np.random.default_rng(1).choice(len(train), 200, replace=False)]  # 200 exact copies
    assert authenticity(copies, train) < 0.1
    result = ct_test(copies, holdout[:200], train, k=5)
    assert result["ct"] < -5
    assert len(result["cells"]) == 5 and all(cell["z"] < 0 for cell in result["cells"] if cell["z"] is not None)


def test_fresh_samples_score_like_the_holdout(gaussian_sets):
    train, holdout, fresh = gaussian_sets
    reference = authenticity(holdout, train)
    assert abs(authenticity(fresh, train) - reference) < 0.1
    assert abs(ct_test(fresh, holdout, train, k=5)["ct"]) < 2


def test_ct_cell_rule_drops_small_cells_and_reports_needed_counts(gaussian_sets):
    train, holdout, fresh = gaussian_sets
    result = ct_test(fresh[:100], holdout[:100], train, k=5, min_cell=18)
    for cell in result["cells"]:
        large_enough = cell["n_holdout"] >= 18 and cell["n_generated"] >= 18
        assert (cell["z"] is not None) == large_enough
    assert sum(cell["n_holdout"] for cell in result["cells"]) == 100
    with pytest.raises(HistosynthError, match="at least 20 samples, got 10"):
        ct_test(fresh[:10], holdout, train, k=5)


def test_authenticity_needs_two_training_samples():
    with pytest.raises(HistosynthError, match="at least 2 samples, got 1"):
        authenticity(np.zeros((3, 2)), np.zeros((1, 2)))


def test_nearest_neighbours_finds_rotated_and_flipped_copies():
    rng = np.random.default_rng(2)
    train = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(30)]
    copies = [np.rot90(train[3], 1), np.flip(train[7], axis=1), np.rot90(np.flip(train[11], axis=1), 2), train[20]]
    fresh = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(4)]
    pairs = nearest_neighbours(copies + fresh, train)
    assert [p.distance for p in pairs] == sorted(p.distance for p in pairs)
    found = {p.generated: p for p in pairs[:4]}
    assert set(found) == {0, 1, 2, 3}  # the copies are the four closest pairs
    assert [found[i].train for i in range(4)] == [3, 7, 11, 20]
    assert all(found[i].distance < 1e-4 for i in range(4))  # float64 round-off only
    assert pairs[4].distance > 1.0  # noise images are far from everything
    assert DIHEDRAL_NAMES[found[3].transform] == "identity"
    figure = neighbour_figure(pairs, copies + fresh, train, top=4)
    assert len(figure.axes) == 8
