"""CSV tables users hand to histosynth (captions, labels): rows as dicts, or a one-line error naming the file."""
from __future__ import annotations

import csv
from pathlib import Path


def read_csv_rows(path: str | Path, required: set[str], expected: str) -> list[dict[str, str]]:
    """Rows of a CSV with a header holding the ``required`` columns (``expected`` describes them in errors); values
    stripped of surrounding spaces."""
    from histosynth.errors import HistosynthError

    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except FileNotFoundError:
        raise HistosynthError(f"{path}: file not found") from None
    except (UnicodeDecodeError, csv.Error) as error:
        raise HistosynthError(f"{path}: not a readable CSV file ({error})") from None
    if not rows or not required <= set(rows[0]):
        raise HistosynthError(f"{path}: expected a CSV header with the columns {expected} and at least one row")
    return [{key: (value or "").strip() for key, value in row.items() if key is not None} for row in rows]
