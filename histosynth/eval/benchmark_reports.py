"""The downstream benchmark reports: segmentation (eval/segmentation.py) and classification
(eval/classification.py), each as a plain-text (a)/(b)/(c) table for the terminal and a JSON + report.html folder."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from histosynth.errors import HistosynthError
from histosynth.eval.report_html import figure_html, finite, html_page, html_table, write_text


def _pm(pair: list[float | None]) -> str:
    mean, std = pair
    return "—" if mean is None else f"{mean:.3f} ± {std:.3f}"


def _text_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Lines of a plain-text table with left-aligned columns."""
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    return ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)) for row in [header] + rows]


def _benchmark_folder(out: str | os.PathLike) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise HistosynthError(f"{out}: exists and is not a folder")
    return out


def _write_benchmark(result, out: Path, json_name: str, page: str) -> tuple[Path, Path]:
    """``out/json_name`` (the result) and ``out/report.html``, each written atomically."""
    json_path, report_path = out / json_name, out / "report.html"
    write_text(json_path, json.dumps(result.as_dict(), indent=2, default=finite) + "\n")
    write_text(report_path, page)
    return json_path, report_path


def _settings_rows(settings: dict) -> list[list]:
    return [[key, value if not isinstance(value, (list, tuple, dict)) else str(value)]
            for key, value in settings.items()]


# ----------------------------------------------------------------------------------------------------------------
# Segmentation benchmark report


def segmentation_rows(result) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the (a)/(b)/(c) table: Dice per class, mean Dice and mean IoU, mean ± std over seeds."""
    classes = result.classes
    header = ["training data"] + [f"Dice {name}" for name in classes.values()] + ["mean Dice", "mean IoU"]
    rows = []
    for letter, (arm, data) in zip("abc", result.arms.items()):
        summary = data["summary"]
        rows.append([f"({letter}) {arm}"] + [_pm(summary["dice"][c]) for c in classes]
                    + [_pm(summary["mdice"]), _pm(summary["miou"])])
    return header, rows


def segmentation_text(result) -> str:
    """The (a)/(b)/(c) table as plain text."""
    lines = _text_table(*segmentation_rows(result))
    s = result.settings
    used = s.get("n_synthetic_used", s["n_synthetic"])
    lines.insert(0, f"seeds {s['seeds']}, {s['steps']} steps x batch {s['batch_size']}, U-Net {s['size']};"
                    f" real labelled {s['labelled']}, synthetic {used} of {s['n_synthetic']}, real test "
                    f"{s['n_real_test']}")
    if s.get("labelled_mismatch"):
        lines.insert(1, f"note: the generator learnt from {s['generator_labelled']} labelled patches, the real arms "
                        f"from {s['labelled']}: (b) and (c) carry labels (a) never saw")
    return "\n".join(lines)


def segmentation_figure(result):
    """Grouped bars: Dice per class for each training arm, error bars = std over seeds."""
    from matplotlib.figure import Figure

    classes = result.classes
    figure = Figure(figsize=(1.5 + 1.2 * len(classes), 3.2))
    axis = figure.subplots()
    width = 0.8 / len(result.arms)
    for offset, (arm, data) in enumerate(result.arms.items()):
        pairs = [data["summary"]["dice"][c] for c in classes]
        means = [p[0] if p[0] is not None else 0.0 for p in pairs]
        stds = [p[1] if p[1] is not None else 0.0 for p in pairs]
        axis.bar(np.arange(len(classes)) + offset * width, means, width, yerr=stds, capsize=3, label=arm)
    axis.set_xticks(np.arange(len(classes)) + width * (len(result.arms) - 1) / 2, list(classes.values()))
    axis.set_ylabel("Dice on real test")
    axis.set_ylim(0, 1)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def write_segmentation_report(result, out: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``out/segmentation.json`` and ``out/report.html`` (table, per-slide table, bar plot) atomically."""
    out = _benchmark_folder(out)
    header, rows = segmentation_rows(result)
    sources = sorted({s for data in result.arms.values() for s in data["summary"]["per_source"]})
    per_source = [[source] + [_pm(data["summary"]["per_source"].get(source, {}).get("mdice", [None, None]))
                              for data in result.arms.values()] for source in sources]
    page = html_page("histosynth downstream segmentation benchmark", [
        ("Dice per class on the real test split (mean ± std over seeds)", html_table(header, rows)),
        ("Mean Dice per source slide of the test split", html_table(["source"] + list(result.arms), per_source)),
        ("Dice per class", figure_html("Dice per class and training data; bars: std over seeds",
                                       segmentation_figure(result))),
        ("Settings", html_table(["setting", "value"], _settings_rows(result.settings))),
    ])
    return _write_benchmark(result, out, "segmentation.json", page)


# ----------------------------------------------------------------------------------------------------------------
# Classification benchmark report


def classification_rows(result) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the (a)/(b)/(c) table: balanced accuracy and macro-F1 per test set, mean ± std."""
    tests = list(next(iter(result.arms.values()))["summary"])
    header = ["training data"] + [f"{metric} {test}" for test in tests for metric in ("bal. acc.", "macro-F1")]
    rows = []
    for letter, (arm, data) in zip("abc", result.arms.items()):
        summary = data["summary"]
        rows.append([f"({letter}) {arm}"] + [_pm(summary[test][metric]) for test in tests
                                             for metric in ("balanced_accuracy", "macro_f1")])
    return header, rows


def classification_text(result) -> str:
    """The (a)/(b)/(c) table as plain text."""
    lines = _text_table(*classification_rows(result))
    s = result.settings
    lines.insert(0, f"target {s['target']} ({len(result.classes)} classes, chance {1 / len(result.classes):.3f}); "
                    f"seeds {s['seeds']}, {s['steps']} steps x batch {s['batch_size']}, {s['backbone']}; real "
                    f"labelled {s['labelled']}, {s['extra']} {s['n_extra']}, real test {s['n_real_test']}")
    return "\n".join(lines)


def classification_figure(result):
    """Bars: balanced accuracy on the real test split per training arm, error bars = std over seeds."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.5, 3.2))
    axis = figure.subplots()
    arms = list(result.arms)
    pairs = [result.arms[arm]["summary"]["real_test"]["balanced_accuracy"] for arm in arms]
    axis.bar(range(len(arms)), [p[0] for p in pairs], yerr=[p[1] for p in pairs], capsize=3,
             color=["#4477aa", "#66ccee", "#ccbb44"])
    axis.axhline(1 / len(result.classes), color="grey", linestyle="--", linewidth=1, label="chance")
    axis.set_xticks(range(len(arms)), arms)
    axis.set_ylabel("balanced accuracy, real test")
    axis.set_ylim(0, 1)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def write_classification_report(result, out: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``out/classification.json`` and ``out/report.html`` (table, per-slide table, bar plot) atomically."""
    out = _benchmark_folder(out)
    header, rows = classification_rows(result)
    summaries = {arm: data["summary"]["real_test"]["per_source"] for arm, data in result.arms.items()}
    sources = sorted({s for per_source in summaries.values() for s in per_source})
    per_source = [[source] + [_pm(summaries[arm].get(source, [None, None])) for arm in result.arms]
                  for source in sources]
    page = html_page("histosynth downstream classification benchmark", [
        ("Balanced accuracy and macro-F1 (mean ± std over seeds)", html_table(header, rows)),
        ("Balanced accuracy per source slide of the real test split",
         html_table(["source"] + list(result.arms), per_source)),
        ("Balanced accuracy", figure_html("Balanced accuracy on the real test split; bars: std over seeds",
                                          classification_figure(result))),
        ("Settings (identical for every arm)", html_table(["setting", "value"], _settings_rows(result.settings))),
    ])
    return _write_benchmark(result, out, "classification.json", page)
