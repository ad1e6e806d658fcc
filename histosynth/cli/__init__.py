"""The ``histosynth`` command. Every subcommand is a thin call into pipelines/, train/, data/ or eval/.

Each command group lives in its own module of this package and registers itself on ``app``.
"""
from __future__ import annotations

import sys

import typer

from histosynth.errors import HistosynthError

app = typer.Typer(
    name="histosynth",
    help="Synthesize histopathology images of any size with diffusion models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register_commands() -> None:
    # Imported for their side effect of adding commands to ``app``; order sets the order in --help.
    from histosynth.cli import data, train, generate, evaluate, metrics, view, survey, demo, embed  # noqa: F401
    from histosynth.cli import synthesize  # noqa: F401


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become one line on stderr and exit status 2."""
    _register_commands()
    try:
        app(args=argv, standalone_mode=False)
    except HistosynthError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(2)
    except FileNotFoundError as error:
        typer.echo(f"error: {error.filename or error}: file not found", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as error:
        # Usage errors (click's, or typer's vendored copy) print themselves and carry their exit code.
        if hasattr(error, "show") and hasattr(error, "exit_code"):
            error.show()
            sys.exit(error.exit_code)
        if type(error).__name__ == "Abort":
            sys.exit(1)
        raise


_register_commands()
