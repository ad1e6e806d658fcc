"""Reader-study statistics against values worked out by hand or published with the method."""
import math

import numpy as np
import pytest

from histosynth.survey.report import (
    Judgement,
    agreement,
    binomial_p_value,
    clopper_pearson,
    fleiss_kappa,
    roc_auc,
    roc_curve,
    signed_score,
    summarize,
)


def test_fleiss_kappa_textbook_example():
    # Fleiss (1971) as reproduced in most textbooks: 10 subjects, 14 raters, 5 categories;
    # P-bar = 0.378, P-bar_e = 0.213, kappa = 0.210.
    table = np.array([
        [0, 0, 0, 0, 14],
        [0, 2, 6, 4, 2],
        [0, 0, 3, 5, 6],
        [0, 3, 9, 2, 0],
        [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0],
        [3, 2, 6, 3, 0],
        [2, 5, 3, 2, 2],
        [6, 5, 2, 1, 0],
        [0, 2, 2, 3, 7],
    ])
    assert fleiss_kappa(table) == pytest.approx(0.2099, abs=1e-4)


def test_fleiss_kappa_small_hand_case():
    # 3 items, 2 raters: agreement P_i = 1, 1, 0 -> P-bar = 2/3; shares (1/2, 1/2) -> P-bar_e = 1/2;
    # kappa = (2/3 - 1/2) / (1 - 1/2) = 1/3.
    assert fleiss_kappa([[2, 0], [0, 2], [1, 1]]) == pytest.approx(1 / 3)
    assert fleiss_kappa([[2, 0], [0, 2]]) == pytest.approx(1.0)
    assert math.isnan(fleiss_kappa([[2, 0], [2, 0]]))  # one category only: 0/0
    with pytest.raises(ValueError):
        fleiss_kappa([[2, 0], [1, 0]])  # unequal raters per item


def test_clopper_pearson_bounds():
    # k = 0 and k = n have closed forms: upper = 1 - (alpha/2)^(1/n), lower = (alpha/2)^(1/n).
    assert clopper_pearson(0, 10) == pytest.approx((0.0, 1 - 0.025 ** 0.1))
    assert clopper_pearson(10, 10) == pytest.approx((0.025 ** 0.1, 1.0))
    assert clopper_pearson(0, 10)[1] == pytest.approx(0.30850, abs=1e-5)
    # 5/10: the Beta(5, 6) 2.5 % and Beta(6, 5) 97.5 % quantiles, tabulated as 0.1871 and 0.8129.
    low, high = clopper_pearson(5, 10)
    assert low == pytest.approx(0.18709, abs=1e-5) and high == pytest.approx(0.81291, abs=1e-5)
    assert all(math.isnan(b) for b in clopper_pearson(0, 0))


def test_binomial_test_against_chance():
    # P(X >= 9) = (10 + 1) / 1024 under p = 1/2, doubled for two sides.
    assert binomial_p_value(9, 10) == pytest.approx(22 / 1024)
    assert binomial_p_value(5, 10) == pytest.approx(1.0)
    assert math.isnan(binomial_p_value(0, 0))


def test_auc_of_a_small_case():
    # Positives 3, 5, -1 against negatives -2, 1, 3: 3 beats -2 and 1 and ties 3 (2.5), 5 beats all (3),
    # -1 beats -2 (1): AUC = 6.5 / 9.
    scores = [3, 5, -1, -2, 1, 3]
    positive = [True, True, True, False, False, False]
    assert roc_auc(scores, positive) == pytest.approx(6.5 / 9)
    fpr, tpr, thresholds = roc_curve(scores, positive)
    assert np.trapezoid(tpr, fpr) == pytest.approx(6.5 / 9)  # the curve's area is the same number
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert list(thresholds[1:]) == [5, 3, 1, -1, -2]
    assert roc_auc([2, 1], [True, False]) == 1.0 and roc_auc([1, 2], [True, False]) == 0.0
    assert math.isnan(roc_auc([1, 2], [True, True]))


def test_summary_counts_and_rates():
    j = lambda truth, answer, conf: Judgement("a", f"{truth}{answer}{conf}", truth, answer, conf, "")  # noqa: E731
    judgements = [j("synthetic", "synthetic", 5), j("synthetic", "real", 2), j("real", "real", 4),
                  j("real", "real", 3), j("real", "synthetic", 1)]
    summary = summarize(judgements)
    assert summary["confusion"] == {"tp": 1, "fn": 1, "tn": 2, "fp": 1}
    assert summary["n_correct"] == 3 and summary["accuracy"]["rate"] == pytest.approx(0.6)
    assert summary["sensitivity"]["rate"] == pytest.approx(0.5)
    assert summary["specificity"]["rate"] == pytest.approx(2 / 3)
    # Signed scores: synthetic items 5, -2; real items -4, -3, 1 -> 5 beats all 3, -2 beats -4 and -3: 5/6.
    assert [signed_score(x.answer, x.confidence) for x in judgements] == [5, -2, -4, -3, 1]
    assert summary["auc"] == pytest.approx(5 / 6)


def test_agreement_uses_items_every_reader_answered():
    rows = [("a", "i1", "real"), ("b", "i1", "real"), ("a", "i2", "synthetic"), ("b", "i2", "real"),
            ("a", "i3", "synthetic")]  # b never answered i3: left out
    judgements = [Judgement(r, i, "real", ans, 3, "") for r, i, ans in rows]
    result = agreement(judgements, ["a", "b", "c"])  # c answered nothing: not counted
    assert result["n_items"] == 2 and result["n_readers"] == 2
    # Items [[2, 0], [1, 1]]: P-bar = 1/2, shares (3/4, 1/4) -> P-bar_e = 5/8; kappa = (1/2 - 5/8) / (3/8) = -1/3.
    assert result["fleiss_kappa"] == pytest.approx(-1 / 3)
