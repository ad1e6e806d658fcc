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
    from histosynth.cli import synthesize, evaluate_layouts  # noqa: F401


# Options whose value may be left out, with the value that then applies: typer has no optional option values, so the
# bare flag is completed here before parsing (`--auto-labels` alone means `--auto-labels regions`).
OPTIONAL_VALUES = {"--auto-labels": ("regions", ("regions", "colour"))}


def complete_optional_values(args: list[str]) -> list[str]:
    """``args`` with the default value inserted after each bare optional-value flag."""
    completed = []
    for i, arg in enumerate(args):
        completed.append(arg)
        if arg in OPTIONAL_VALUES:
            default, choices = OPTIONAL_VALUES[arg]
            following = args[i + 1] if i + 1 < len(args) else None
            if following not in choices:
                completed.append(default)
    return completed


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become one line on stderr and exit status 2."""
    _register_commands()
    argv = complete_optional_values(list(sys.argv[1:] if argv is None else argv))
    try:
        app(args=argv, standalone_mode=False)
        if "torch.distributed" in sys.modules:  # a run under torchrun/accelerate: leave its process group together
            from histosynth.sampling.distributed import end_process_group

            end_process_group()
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
