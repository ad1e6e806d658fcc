"""FID, KID and precision/recall/density/coverage on constructed features."""
import numpy as np
import pytest

from histosynth.errors import HistosynthError
from histosynth.eval.fidelity import fid, kid, prdc


def test_fid_of_identical_sets_is_zero():
    x = np.random.default_rng(0).normal(size=(300, 16))  # (N, D)
    assert abs(fid(x, x)) < 1e-3
    assert abs(fid(x, x.copy())) < 1e-3


def test_fid_hand_computed_1d():
    # means 1 and 4, variances 2 and 2: 3² + 2 + 2 − 2·sqrt(2·2) = 9
    assert fid(np.array([[0.0], [2.0]]), np.array([[3.0], [5.0]])) == pytest.approx(9.0)


def test_fid_grows_strictly_with_mean_shift():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    values = [fid(a, b + shift) for shift in (0.0, 0.1, 0.2, 0.4, 0.8, 1.6)]
    assert all(x < y for x, y in zip(values, values[1:])), values


def test_fid_is_real_for_singular_covariances_and_warns_below_d_samples():
    rng = np.random.default_rng(2)
    basis = rng.normal(size=(3, 10))
    a = rng.normal(size=(50, 3)) @ basis  # rank 3 in 10 dimensions
    b = rng.normal(size=(50, 3)) @ basis
    value = fid(a, b)
    assert np.isfinite(value) and value >= 0
    with pytest.warns(UserWarning, match="use at least 10 samples"):
        fid(a[:5], b[:5])


def test_fid_needs_two_samples_and_says_so():
    with pytest.raises(HistosynthError, match="at least 2 samples, got 1"):
        fid(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(HistosynthError, match="feature widths differ"):
        fid(np.zeros((5, 3)), np.zeros((5, 4)))


def test_kid_near_zero_for_same_distribution_and_positive_when_shifted():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(200, 8)), rng.normal(size=(200, 8))
    same, same_std = kid(a, b, subsets=20, subset_size=100)
    shifted, _ = kid(a, b + 1.0, subsets=20, subset_size=100)
    assert abs(same) < 3 * same_std + 1e-2
    assert shifted > 10 * abs(same)


def test_prdc_hand_computed_2d():
    # k = 1. Real radii: A 1, B 1, C 2, D 20. Fake radii: P, Q sqrt(8.5) ≈ 2.92, R ≈ 7.16.
    real = np.array([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [-20.0, 0.0]])  # A, B, C, D
    fake = np.array([[0.5, 0.0], [3.0, 1.5], [10.0, 0.0]])  # P, Q, R
    result = prdc(real, fake, k=1)
    assert result["precision"] == pytest.approx(2 / 3)  # P in A's ball, Q in C's, R in none
    assert result["recall"] == pytest.approx(3 / 4)  # A, B, C within P's ball; D in none
    assert result["density"] == pytest.approx(1.0)  # P in 2 balls, Q in 1, R in 0: mean 1, / k
    assert result["coverage"] == pytest.approx(3 / 4)  # D's nearest fake (20.5) is outside its radius 20


def test_prdc_needs_more_than_k_samples():
    with pytest.raises(HistosynthError, match="at least 6 samples, got 5"):
        prdc(np.zeros((5, 2)), np.ones((10, 2)), k=5)
