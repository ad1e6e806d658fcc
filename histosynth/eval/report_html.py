"""What every histosynth report page shares: one self-contained HTML page (inline CSS, figures as base64 PNG
``data:`` URIs, so a report opens offline and can be mailed as one file), its tables and number formatting, and
atomic writing of the files."""
from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

import numpy as np

from histosynth.io.atomic import atomic_path

_STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
          "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
          "th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%}"
          ".note{color:#555;font-size:90%}")


def format_value(value: Any) -> str:
    """A table cell: — where missing, 4 significant digits for floats, HTML-escaped text otherwise."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def finite(value: Any) -> Any:
    """JSON-safe number: NaN/inf become None, numpy scalars become Python numbers."""
    if value is None:
        return None
    if isinstance(value, (np.integer, int)) and not isinstance(value, bool):
        return int(value)
    value = float(value)
    return value if math.isfinite(value) else None


def html_table(header: list[str], rows: list[list[Any]]) -> str:
    """An HTML table of a header row and rows of cells (formatted by ``format_value``)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{format_value(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def html_page(title: str, sections: list[tuple[str, str]]) -> str:
    """A complete HTML document: inline CSS, no scripts, no external references."""
    body = "".join(f"<h2>{html.escape(heading)}</h2>{content}" for heading, content in sections)
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>\n")


def figure_data_uri(figure) -> str:
    """A matplotlib Figure as a ``data:image/png;base64`` URI."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def figure_html(caption: str, figure) -> str:
    """A matplotlib Figure embedded in the page, with its caption."""
    return (f"<figure><img alt=\"{html.escape(caption)}\" src=\"{figure_data_uri(figure)}\">"
            f"<figcaption class=\"note\">{html.escape(caption)}</figcaption></figure>")


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically (a temporary name renamed into place)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
        tmp.chmod(0o644)  # a temporary file is created owner-only; a report is meant to be shared
