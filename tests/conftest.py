import pytest
import torch

torch.set_num_threads(1)


def run_cli(args):
    """Run the histosynth command in-process; returns (exit code, stdout+stderr text)."""
    import contextlib
    import io

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
