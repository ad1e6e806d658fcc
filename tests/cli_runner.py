"""Run the histosynth command in-process, as a user would from a shell."""
import contextlib
import io

import pytest


def run_cli(args):
    """Return (exit code, stdout+stderr text) of ``histosynth ARGS``; user errors exit 2 with one line."""
    from histosynth.cli import main

    buffer = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        try:
            main([str(a) for a in args])
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    return code, buffer.getvalue()


@pytest.fixture
def cli():
    return run_cli
