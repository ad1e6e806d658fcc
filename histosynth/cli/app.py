"""The ``histosynth`` Typer app every command module registers on, and what those modules share."""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import typer

app = typer.Typer(
    name="histosynth",
    help="Synthesize histopathology images of any size with diffusion models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def log(message: str) -> None:
    typer.echo(message, err=True)


@contextmanager
def warnings_to_stderr() -> Iterator[None]:
    """Show library warnings as one ``warning: ...`` line each (once per message), not Python's two-line form."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            # Only histosynth's own warnings: dependencies' deprecation notices are not the user's business.
            ours = [w for w in caught if "histosynth" in str(w.filename)]
            for message in dict.fromkeys(str(w.message) for w in ours):
                typer.echo(f"warning: {message}", err=True)
