"""Output paths checked against the inputs and against each other before any work starts.

Every command that writes calls ``check_outputs`` first: an output that would land on one of its inputs (``--out``
equal to ``--mask``, a mask named like the slide's own ``NAME.mask.png``), on another output (``--stats`` equal
to ``--out``), inside a model folder, or on an existing folder where a file goes, is refused with one line and
nothing is touched. Paths are compared after resolving symbolic links and ``..``; existing files also by inode,
so a hard link to an input counts as the input.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping, Union

from histosynth.errors import HistosynthError

PathLike = Union[str, os.PathLike]


def _resolved(path: PathLike) -> Path:
    return Path(path).expanduser().resolve()


def _same(a: Path, b: Path) -> bool:
    if a == b:
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _inside(path: Path, folder: Path) -> bool:
    return path != folder and folder in path.parents


def _flatten(inputs: Mapping[str, PathLike | Iterable[PathLike] | None]) -> list[tuple[str, Path, Path]]:
    """(label, path as given, resolved path) of every input; a label may hold several paths (repeatable options)."""
    flat = []
    for label, value in inputs.items():
        if value is None:
            continue
        values = [value] if isinstance(value, (str, os.PathLike)) else list(value)
        flat += [(label, Path(v), _resolved(v)) for v in values]
    return flat


def check_outputs(outputs: Mapping[str, PathLike | None], inputs: Mapping[str, PathLike | Iterable[PathLike] | None],
                  folders: Iterable[str] = (), sealed: Iterable[str] = ()) -> None:
    """Refuse outputs that collide: with an input, with each other, with an existing folder, or inside a sealed
    input folder.

    ``outputs`` and ``inputs`` map a label that the user recognises (``--out``, ``--mask``, ``the mask preview``)
    to a path (None: not given). ``folders``: labels of outputs that are folders (the rest are files).
    ``sealed``: labels of input folders nothing may be written into (model folders).
    """
    folders, sealed = set(folders), set(sealed)
    given = [(label, Path(path), _resolved(path)) for label, path in outputs.items() if path is not None]
    sources = _flatten(inputs)
    for label, path, resolved in given:
        if label not in folders and resolved.is_dir():
            raise HistosynthError(f"{path}: {label} is an existing folder; give a file name")
        blocking = next((parent for parent in resolved.parents if parent.exists() and not parent.is_dir()), None)
        if blocking is not None:
            raise HistosynthError(f"{path}: {label} cannot go there: {blocking} is a file, not a folder")
        for source_label, source, source_resolved in sources:
            if _same(resolved, source_resolved):
                raise HistosynthError(f"{path}: {label} would overwrite the input {source_label}; choose another "
                                      "name")
            if label in folders and _inside(source_resolved, resolved):
                raise HistosynthError(f"{path}: {label} would replace the folder holding the input {source_label} "
                                      f"({source}); choose another folder")
            if source_label in sealed and _inside(resolved, source_resolved):
                raise HistosynthError(f"{path}: {label} lies inside the {source_label} folder {source}; write it "
                                      "elsewhere")
    for i, (label, path, resolved) in enumerate(given):
        for other_label, _, other in given[i + 1:]:
            if _same(resolved, other) or (label in folders and _inside(other, resolved)) or (
                    other_label in folders and _inside(resolved, other)):
                raise HistosynthError(f"{path}: {label} and {other_label} would be the same file; give them "
                                      "different names")
