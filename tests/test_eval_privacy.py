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
    result = ct_test(fresh[:100], holdout[:100], train, k=5, min_cell=20)
    for cell in result["cells"]:
        large_enough = cell["n_holdout"] >= 20 and cell["n_generated"] >= 20
        assert (cell["z"] is not None) == large_enough
    assert sum(cell["n_holdout"] for cell in result["cells"]) == 100
    assert any(cell["z"] is None for cell in result["cells"]) and any(cell["z"] is not None for cell in result["cells"])
    with pytest.raises(HistosynthError, match="at least 20 samples, got 10"):
        ct_test(fresh[:10], holdout, train, k=5)
    with pytest.raises(HistosynthError, match="needs at least 20 holdout and generated samples"):
        ct_test(fresh, holdout, train, k=5, min_cell=18)


def test_ct_distances_run_to_the_cells_own_training_points():
    """Meehan et al.'s definition, by hand: k-means cells on train; in each, the holdout's and the generated set's
    distances to the nearest training point of that cell, then Mann-Whitney. Distances to the nearest training
    point anywhere give another value on these overlapping clusters, so the test can tell the two apart."""
    from scipy.stats import mannwhitneyu
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(4)
    centres = np.array([[0.0, 0.0], [1.5, 0.0], [0.0, 1.5]])
    draw = lambda n, spread: centres[rng.integers(0, 3, n)] + rng.normal(0, spread, (n, 2))
    train, holdout, generated = draw(300, 0.8), draw(120, 0.8), draw(120, 0.6)
    cells = KMeans(n_clusters=3, n_init=10, random_state=0).fit(train)
    by_hand, by_global, total = 0.0, 0.0, 0.0
    for cell in range(3):
        own = train[cells.labels_ == cell]
        h, g = holdout[cells.predict(holdout) == cell], generated[cells.predict(generated) == cell]
        m, n = len(h), len(g)
        if min(m, n) < 20:
            continue
        distances = lambda x, pool: np.sqrt(((x[:, None] - pool[None]) ** 2).sum(-1)).min(1)
        z = lambda dg, dh: (mannwhitneyu(dg, dh).statistic - m * n / 2) / np.sqrt(m * n * (m + n + 1) / 12)
        weight = m / len(holdout)
        by_hand += weight * z(distances(g, own), distances(h, own))
        by_global += weight * z(distances(g, train), distances(h, train))
        total += weight
    result = ct_test(generated, holdout, train, k=3, min_cell=20)
    assert result["ct"] == pytest.approx(by_hand / total, abs=1e-9)
    assert abs(by_hand - by_global) / total > 0.01  # 0.035 here: the definitions differ measurably


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
