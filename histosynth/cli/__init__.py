"""The ``histosynth`` command. Every subcommand is a thin call into pipelines/, train/, data/ or eval/.

Each command group lives in its own module of this package and registers itself on ``app``.
"""
from __future__ import annotations

import sys

import typer

from histosynth.cli.app import app  # noqa: F401 - the app, for ``histosynth.cli.app`` users
from histosynth.errors import HistosynthError



def _register_commands() -> None:
    # Imported for their side effect of adding commands to ``app``; order sets the order in --help.
    from histosynth.cli import prepare, train, sample, generate, seams, evaluate, benchmark  # noqa: F401
    from histosynth.cli import view, survey, demo, embed, vary, synthesize, evaluate_layouts  # noqa: F401


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


def os_error_line(error: OSError) -> str:
    """``<file>: <problem>`` of an operating-system error, naming the path the user gave where there is one."""
    import errno
    import os

    # A rename names the temporary file first and the user's path second: the user knows only the second.
    path = error.filename2 or error.filename
    if path is not None and os.path.basename(str(path)).startswith(".") and str(path).endswith(".tmp"):
        path = os.path.dirname(str(path)) or path
    problem = error.strerror or str(error) or type(error).__name__
    hint = {errno.ENOSPC: "; free some space or write elsewhere", errno.EROFS: "; write elsewhere",
            errno.EACCES: "; check its permissions or write elsewhere",
            errno.EISDIR: "; give a file name, not a folder"}.get(error.errno, "")
    line = f"{path}: {problem[:1].lower()}{problem[1:]}{hint}" if path is not None else f"{problem}{hint}"
    return " ".join(line.split())


def usage_error_line(error) -> str:
    """click's usage error as one line, with where to read about the command: ``Missing option '--size'. (see
    `histosynth generate --help`)``."""
    names, ctx = [], getattr(error, "ctx", None)
    while ctx is not None and ctx.parent is not None:  # the root's name is however Python was started
        names.insert(0, ctx.info_name)
        ctx = ctx.parent
    command = " ".join(["histosynth", *names])
    return f"{' '.join(error.format_message().split())} (see `{command} --help`)"


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
    except OSError as error:  # a read-only or full disk, a folder where a file goes, no permission, ...
        typer.echo(f"error: {os_error_line(error)}", err=True)
        sys.exit(2)
    except MemoryError:
        typer.echo("error: out of memory; try a smaller size or batch", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as error:
        # Usage errors (click's, or typer's vendored copy) carry their exit code; bare group commands show help.
        if hasattr(error, "show") and hasattr(error, "exit_code"):
            if type(error).__name__ == "NoArgsIsHelpError" or not hasattr(error, "format_message"):
                error.show()
            else:
                typer.echo(f"error: {usage_error_line(error)}", err=True)
            sys.exit(error.exit_code)
        if type(error).__name__ == "Abort":
            sys.exit(1)
        raise


_register_commands()
