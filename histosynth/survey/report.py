"""The reader-study report: accuracy, sensitivity/specificity, agreement and ROC, as report.json and report.html.

Synthetic is the positive class: sensitivity is the share of synthetic images called synthetic, specificity the share
of real images called real. Intervals are exact binomial (Clopper-Pearson) 95 % intervals; the binomial test asks
whether accuracy differs from chance (0.5, two-sided). The ROC curve ranks items by the signed confidence
(+confidence when answered synthetic, -confidence when answered real), so a 5-point scale gives 10 thresholds.
Pooled figures treat every answer as independent, which they are not (the same items are read by every reader): the
pooled interval and p-value are therefore optimistic, and the per-reader ones are the ones to quote.
"""
from __future__ import annotations

import base64
import io
import json
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import stats

from histosynth.errors import HistosynthError
from histosynth.io.atomic import atomic_dir
from histosynth.survey.study import Answer, Study, all_answers, list_readers, load_key, open_study

POSITIVE = "synthetic"
CATEGORIES = ("real", "synthetic")
MOST_MISJUDGED = 12
THUMBNAIL = 256


# --------------------------------------------------------------------------------------------------- statistics

def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact binomial confidence interval for k successes in n trials (Clopper & Pearson 1934); NaNs when n = 0."""
    if n == 0:
        return math.nan, math.nan
    interval = stats.binomtest(k, n).proportion_ci(confidence_level=confidence, method="exact")
    return float(interval.low), float(interval.high)


def binomial_p_value(k: int, n: int, chance: float = 0.5) -> float:
    """Two-sided exact binomial test of k successes in n trials against the chance rate; NaN when n = 0."""
    if n == 0:
        return math.nan
    return float(stats.binomtest(k, n, chance, alternative="two-sided").pvalue)


def fleiss_kappa(counts: np.ndarray) -> float:
    """Fleiss' κ (Fleiss 1971) of an (items, categories) table of how many raters put each item in each category.

    Every item must be rated by the same number m ≥ 2 of raters. P_i = (Σ_j n_ij² − m) / (m(m − 1)) is the
    agreement on item i, p_j = Σ_i n_ij / (N m) the share of category j; κ = (P̄ − P̄_e) / (1 − P̄_e) with
    P̄ the mean of P_i and P̄_e = Σ_j p_j². NaN when every rating falls in one category (κ is 0/0 there).
    """
    counts = np.asarray(counts, dtype=float)  # (N, k)
    if counts.ndim != 2 or counts.shape[0] == 0:
        raise ValueError("fleiss_kappa needs a non-empty (items, categories) table")
    raters = counts.sum(axis=1)  # (N,)
    m = raters[0]
    if not np.all(raters == m) or m < 2:
        raise ValueError("fleiss_kappa needs the same number (>= 2) of ratings for every item")
    agreement = ((counts ** 2).sum(axis=1) - m) / (m * (m - 1))  # (N,)
    shares = counts.sum(axis=0) / counts.sum()  # (k,)
    p_bar, p_expected = agreement.mean(), (shares ** 2).sum()
    if math.isclose(p_expected, 1.0):
        return math.nan
    return float((p_bar - p_expected) / (1 - p_expected))


def roc_curve(scores: Sequence[float], positive: Sequence[bool]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points (fpr, tpr, thresholds) calling "positive" every score ≥ threshold, from (0, 0) to (1, 1)."""
    scores, positive = np.asarray(scores, dtype=float), np.asarray(positive, dtype=bool)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    if n_pos == 0 or n_neg == 0:
        raise ValueError("an ROC curve needs both positive and negative cases")
    thresholds = np.unique(scores)[::-1]  # descending
    tpr = np.array([0.0] + [(positive & (scores >= t)).sum() / n_pos for t in thresholds])
    fpr = np.array([0.0] + [(~positive & (scores >= t)).sum() / n_neg for t in thresholds])
    return fpr, tpr, np.concatenate([[np.inf], thresholds])


def roc_auc(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """Area under the ROC curve as the Mann-Whitney probability that a positive outscores a negative (ties ½)."""
    scores, positive = np.asarray(scores, dtype=float), np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = stats.rankdata(scores)  # average ranks: a tie counts one half
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def signed_score(answer: str, confidence: int) -> int:
    """The rating as one number, higher meaning more surely synthetic: ±confidence by the answer given."""
    return confidence if answer == POSITIVE else -confidence


# ------------------------------------------------------------------------------------------------------ summary

@dataclass(frozen=True)
class Judgement:
    """One answer joined with the truth."""

    reader: str
    item: str
    truth: str
    answer: str
    confidence: int
    comment: str

    @property
    def correct(self) -> bool:
        return self.truth == self.answer


def _rate(k: int, n: int) -> dict[str, Any]:
    low, high = clopper_pearson(k, n)
    return {"k": k, "n": n, "rate": k / n if n else math.nan, "ci95": [low, high]}


def summarize(judgements: Sequence[Judgement]) -> dict[str, Any]:
    """Accuracy, sensitivity, specificity (with exact CIs), a binomial test against chance and the ROC of a set."""
    tp = sum(j.truth == POSITIVE and j.answer == POSITIVE for j in judgements)
    fn = sum(j.truth == POSITIVE and j.answer != POSITIVE for j in judgements)
    tn = sum(j.truth != POSITIVE and j.answer != POSITIVE for j in judgements)
    fp = sum(j.truth != POSITIVE and j.answer == POSITIVE for j in judgements)
    n = len(judgements)
    correct = tp + tn
    scores = [signed_score(j.answer, j.confidence) for j in judgements]
    positive = [j.truth == POSITIVE for j in judgements]
    summary: dict[str, Any] = {
        "n_answers": n, "n_correct": correct,
        "accuracy": _rate(correct, n), "p_value_vs_chance": binomial_p_value(correct, n),
        "sensitivity": _rate(tp, tp + fn), "specificity": _rate(tn, tn + fp),
        "confusion": {"tp": tp, "fn": fn, "tn": tn, "fp": fp},
        "mean_confidence": float(np.mean([j.confidence for j in judgements])) if n else math.nan,
        "auc": roc_auc(scores, positive), "roc": None,
    }
    if tp + fn and tn + fp:
        fpr, tpr, thresholds = roc_curve(scores, positive)
        summary["roc"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist(),
                          "thresholds": [None if math.isinf(t) else int(t) for t in thresholds]}
    return summary


def agreement(judgements: Sequence[Judgement], readers: Sequence[str]) -> dict[str, Any]:
    """Fleiss' κ over the items every reader with answers has answered (κ needs equal ratings per item)."""
    by_item: dict[str, dict[str, str]] = defaultdict(dict)
    for j in judgements:
        by_item[j.item][j.reader] = j.answer
    active = [r for r in readers if any(j.reader == r for j in judgements)]
    items = sorted(item for item, answers in by_item.items() if len(answers) == len(active))
    result: dict[str, Any] = {"fleiss_kappa": math.nan, "n_items": len(items), "n_readers": len(active)}
    if len(active) >= 2 and items:
        counts = np.array([[Counter(by_item[item].values())[c] for c in CATEGORIES] for item in items])
        result["fleiss_kappa"] = fleiss_kappa(counts)
    return result


def build_report(study: Study) -> dict[str, Any]:
    """Every figure of the report as plain data (what report.json holds)."""
    key = load_key(study)
    answers: list[Answer] = all_answers(study)
    if not answers:
        raise HistosynthError(f"{study.root}: no answers yet; nothing to report")
    judgements = [Judgement(a.reader, a.item, key[a.item], a.answer, a.confidence, a.comment)
                  for a in answers if a.item in key]
    readers = [r.name for r in list_readers(study)]
    per_reader = []
    for name in readers:
        own = [j for j in judgements if j.reader == name]
        per_reader.append({"reader": name, "complete": len(own) == len(study.items), **summarize(own)})

    items = []
    for item in sorted(key):
        on_item = [j for j in judgements if j.item == item]
        items.append({"item": item, "truth": key[item], "n_answers": len(on_item),
                      "n_wrong": sum(not j.correct for j in on_item),
                      "n_said_synthetic": sum(j.answer == POSITIVE for j in on_item),
                      "comments": [{"reader": j.reader, "comment": j.comment} for j in on_item if j.comment]})
    misjudged = sorted((i for i in items if i["n_wrong"]),
                       key=lambda i: (-i["n_wrong"], -i["n_wrong"] / i["n_answers"], i["item"]))
    return {
        "positive_class": POSITIVE,
        "n_items": len(key), "n_real": sum(t == "real" for t in key.values()),
        "n_synthetic": sum(t == "synthetic" for t in key.values()),
        "n_readers": len(readers),
        "readers": per_reader,
        "pooled": summarize(judgements),
        "agreement": agreement(judgements, readers),
        "most_misjudged": [i["item"] for i in misjudged[:MOST_MISJUDGED]],
        "items": items,
    }


# ------------------------------------------------------------------------------------------------------- output

def _json_safe(value: Any) -> Any:
    """NaN and infinities become null: JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _figure_uri(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    return _png_data_uri(buffer.getvalue())


def _roc_figure(report: dict[str, Any]) -> str | None:
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    curves = [(r["reader"], r["roc"], r["auc"], 1.2) for r in report["readers"] if r["roc"]]
    if report["pooled"]["roc"]:
        curves.append(("pooled", report["pooled"]["roc"], report["pooled"]["auc"], 2.5))
    if not curves:
        return None
    figure = Figure(figsize=(4.8, 4.4))
    axes = figure.add_subplot()
    axes.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1, label="chance")
    for label, roc, auc, width in curves:
        axes.plot(roc["fpr"], roc["tpr"], marker="o", markersize=3, linewidth=width, label=f"{label} (AUC {auc:.2f})")
    axes.set(xlabel="1 − specificity (real called synthetic)", ylabel="sensitivity (synthetic called synthetic)",
             xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), aspect="equal", title="ROC from signed confidence")
    axes.legend(fontsize=7, loc="lower right")
    return _figure_uri(figure)


def _accuracy_figure(report: dict[str, Any]) -> str:
    from matplotlib.figure import Figure

    rows = [(r["reader"], r["accuracy"]) for r in report["readers"] if r["n_answers"]]
    rows.append(("pooled", report["pooled"]["accuracy"]))
    figure = Figure(figsize=(5.2, 0.5 + 0.35 * len(rows)))
    axes = figure.add_subplot()
    ys = np.arange(len(rows))[::-1]
    for y, (_, acc) in zip(ys, rows):
        axes.plot(acc["ci95"], [y, y], color="C0", linewidth=2)
        axes.plot([acc["rate"]], [y], "o", color="C0")
    axes.axvline(0.5, color="0.6", linestyle="--", linewidth=1)
    axes.set(yticks=ys, yticklabels=[name for name, _ in rows], xlim=(0, 1), xlabel="accuracy (95 % CI)")
    return _figure_uri(figure)


def _thumbnail_uri(path: Path) -> str:
    with Image.open(path) as image:
        if max(image.size) <= THUMBNAIL:
            return _png_data_uri(path.read_bytes())
        image = image.convert("RGB")
        image.thumbnail((THUMBNAIL, THUMBNAIL), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return _png_data_uri(buffer.getvalue())


def render_html(study: Study, report: dict[str, Any]) -> str:
    """report.html as one self-contained page: figures and item pictures are inline data URIs."""
    import jinja2

    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
                                     autoescape=True, undefined=jinja2.StrictUndefined)
    items = {i["item"]: i for i in report["items"]}
    misjudged = [{**items[item], "image": _thumbnail_uri(study.image_path(item))} for item in report["most_misjudged"]]
    return environment.get_template("report.html").render(
        report=report, misjudged=misjudged, roc_figure=_roc_figure(report), accuracy_figure=_accuracy_figure(report),
        fmt=_fmt, pct=_pct)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _pct(rate: dict[str, Any]) -> str:
    if not rate["n"]:
        return "–"
    low, high = rate["ci95"]
    return f"{100 * rate['rate']:.1f} % ({rate['k']}/{rate['n']}; {100 * low:.1f}–{100 * high:.1f})"


def write_report(study_root: Path | str, out: Path | str | None = None) -> Path:
    """Compute the report of a study and write report.json and report.html to ``out`` (default STUDY/report)."""
    study = open_study(Path(study_root))
    out = Path(out) if out is not None else study.root / "report"
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "report.json").is_file())):
        # The folder is replaced as a whole: never do that to one that is not an earlier report.
        raise HistosynthError(f"{out}: exists and is not a survey report folder; choose another --out")
    report = build_report(study)
    page = render_html(study, report)
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "report.json").write_text(json.dumps(_json_safe(report), indent=1) + "\n")
        (tmp / "report.html").write_text(page)
    return out
