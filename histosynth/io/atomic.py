"""Write files and folders under a temporary name and rename them into place, so no partial output survives.

Temporary names are ``.NAME.PID-RANDOM.tmp`` beside the output ``NAME``: hidden, and carrying the writer's process
id, so that a run killed outright (SIGKILL, power loss) leaves nothing that lasts — the next run writing the same
output removes the temporary files of writers that no longer exist.
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Mapping


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    return True


def remove_stale_temps(final: str | os.PathLike) -> list[Path]:
    """Delete the temporary files and folders that killed writers of ``final`` left beside it; returns them."""
    final = Path(final)
    removed = []
    prefix = f".{final.name}."
    for candidate in final.parent.glob(glob.escape(prefix) + "*.tmp"):
        pid = candidate.name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        if candidate.is_dir() and not candidate.is_symlink():
            shutil.rmtree(candidate, ignore_errors=True)
        else:
            candidate.unlink(missing_ok=True)
        removed.append(candidate)
    return removed


def _named(error: BaseException, final: Path, temporary: Path | None = None) -> BaseException:
    """An OSError about the output ``final`` named after it: one that names no file (a full disk while writing) or
    names the hidden temporary path (``temporary``, or a file inside it) the user never asked for."""
    if not isinstance(error, OSError) or error.errno is None:
        return error
    named = error.filename is None
    if temporary is not None and error.filename is not None:
        written = Path(str(error.filename))
        named = written == temporary or temporary in written.parents
    if not named:
        return error
    return type(error)(error.errno, error.strerror or str(error), str(final))


def _raise_named(error: BaseException, final: Path, temporary: Path | None = None):
    named = _named(error, final, temporary)
    if named is error:
        raise error
    raise named from error


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; returns those it created, deepest first."""
    created = [parent for parent in (folder, *folder.parents) if not parent.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    return created


def _remove_empty(created: list[Path]) -> None:
    """Undo ``_make_parents`` after a failure: the folders it made go, if nothing else was put in them."""
    for folder in created:
        try:
            folder.rmdir()
        except OSError:
            return


def _temp_prefix(final: Path) -> str:
    return f".{final.name}.{os.getpid()}-"


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary file path beside ``final``; rename it to ``final`` only if the block succeeds."""
    final, created = Path(final), []
    try:
        created = _make_parents(final.parent)
        remove_stale_temps(final)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(final), suffix=suffix + ".tmp", dir=final.parent)
        os.close(fd)
    except OSError as error:
        _remove_empty(created)
        _raise_named(error, final)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes files private; outputs are ordinary files
        os.replace(tmp_path, final)
    except BaseException as error:
        tmp_path.unlink(missing_ok=True)
        _remove_empty(created)
        _raise_named(error, final, tmp_path)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``final``; rename it to ``final`` only if the block succeeds."""
    final, created = Path(final), []
    try:
        created = _make_parents(final.parent)
        remove_stale_temps(final)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(final), suffix=".tmp", dir=final.parent))
    except OSError as error:
        _remove_empty(created)
        _raise_named(error, final)
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if final.exists():
            if not overwrite:
                raise FileExistsError(f"{final}: already exists")
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        _raise_named(error, final, tmp)


@contextlib.contextmanager
def atomic_files(finals: Mapping[str, str | os.PathLike]) -> Iterator[dict[str, Path]]:
    """All or nothing for outputs of several files: yield a temporary path for each (in a hidden folder beside it,
    under its own name); when the block succeeds, every file written there is renamed into place; otherwise none
    is, and the temporary folders go."""
    finals = {key: Path(path) for key, path in finals.items()}
    folders: dict[Path, Path] = {}  # output folder -> its temporary folder
    created: list[Path] = []
    current = next(iter(finals.values()), Path("."))  # the output being worked on, for error messages
    committed = False
    try:
        for current in finals.values():
            created += _make_parents(current.parent)
            remove_stale_temps(current)
            if current.parent not in folders:
                folders[current.parent] = Path(tempfile.mkdtemp(prefix=_temp_prefix(current), suffix=".tmp",
                                                                dir=current.parent))
        yield {key: folders[final.parent] / final.name for key, final in finals.items()}
        for current in finals.values():
            written = folders[current.parent] / current.name
            if written.exists():
                os.chmod(written, 0o666 & ~_umask())
                os.replace(written, current)
        committed = True
    except OSError as error:
        # Name the output the user asked for, not the hidden folder it was being written in.
        written = Path(str(error.filename)) if error.filename is not None else None
        for final in finals.values():
            tmp = folders.get(final.parent)
            if written is not None and tmp is not None and written in (tmp / final.name, tmp):
                current = final
                break
        _raise_named(error, current, folders.get(current.parent))
    finally:
        for tmp in folders.values():
            shutil.rmtree(tmp, ignore_errors=True)
        if not committed:
            _remove_empty(created)


@contextlib.contextmanager
def shared_atomic_dir(final: str | os.PathLike, group) -> Iterator[Path]:
    """``atomic_dir`` for several processes (``group``: rank role, ``broadcast_object``, ``barrier``): one temporary
    folder beside ``final`` on a shared file system; the main process renames it into place when the block succeeds,
    and the others return only once it has."""
    if group.world == 1:
        with atomic_dir(final) as tmp:
            yield tmp
        return
    if group.is_main:
        with atomic_dir(final) as tmp:
            group.broadcast_object(str(tmp))
            yield tmp
        group.barrier()
    else:
        yield Path(group.broadcast_object(None))
        group.barrier()
