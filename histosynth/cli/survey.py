"""CLI commands: ``histosynth survey create | add-reader | readers | serve | report`` (the reader study)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from histosynth.cli.app import app

survey_app = typer.Typer(help="Reader study: can readers tell synthetic images from real ones?",
                         no_args_is_help=True)
app.add_typer(survey_app, name="survey")

DEFAULT_URL = "http://127.0.0.1:8000"


def _link(url: str, token: str) -> str:
    return f"{url.rstrip('/')}/r/{token}"


@survey_app.command("create")
def create_command(
    real: Annotated[Path, typer.Option("--real", help="Folder of real images (PNG/JPEG/TIFF/...).")],
    synthetic: Annotated[Path, typer.Option("--synthetic", help="Folder of synthetic images.")],
    out: Annotated[Path, typer.Option("--out", help="Study folder to create (must not exist).")],
    n: Annotated[int | None, typer.Option(
        "--n", help="Images of each kind (the study holds 2N items); default: all the smaller folder has.")] = None,
    seed: Annotated[int, typer.Option(
        "--seed", help="Seeds the selection, the shuffle, the ids and the readers' orders.")] = 0,
    size: Annotated[int, typer.Option("--size", min=1, help="Side in px: every image is centre-cropped square and"
                                                            " resized to it.")] = 512,
) -> None:
    """Build a balanced, shuffled, blinded study; the answer key stays in STUDY/key.json and is never served."""
    from histosynth.survey.study import create_study

    study = create_study(real, synthetic, out, n=n, seed=seed, size=size)
    typer.echo(f"wrote {study.root}: {len(study.items)} items of {study.size}×{study.size} px;"
               f" add readers with `histosynth survey add-reader {study.root} NAME`", err=True)


@survey_app.command("add-reader")
def add_reader_command(
    study: Annotated[Path, typer.Argument(help="Study folder.")],
    name: Annotated[str, typer.Argument(help="The reader's name (unique in the study).")],
    url: Annotated[str, typer.Option("--url", help="Address the study is served at.")] = DEFAULT_URL,
) -> None:
    """Register a reader and print their personal link (keep it secret: it is their login)."""
    from histosynth.survey.study import add_reader, open_study

    reader = add_reader(open_study(study), name)
    typer.echo(_link(url, reader.token))


@survey_app.command("readers")
def readers_command(
    study: Annotated[Path, typer.Argument(help="Study folder.")],
    url: Annotated[str, typer.Option("--url", help="Address the study is served at.")] = DEFAULT_URL,
) -> None:
    """List the readers, their progress and their links."""
    from histosynth.survey.study import all_answers, list_readers, open_study

    opened = open_study(study)
    counts: dict[str, int] = {}
    for answer in all_answers(opened):
        counts[answer.reader] = counts.get(answer.reader, 0) + 1
    readers = list_readers(opened)
    if not readers:
        typer.echo("no readers yet; add one with `histosynth survey add-reader`", err=True)
    for reader in readers:
        typer.echo(f"{reader.name}\t{counts.get(reader.name, 0)}/{len(opened.items)}\t{_link(url, reader.token)}")


@survey_app.command("serve")
def serve_command(
    study: Annotated[Path, typer.Argument(help="Study folder.")],
    host: Annotated[str, typer.Option("--host", help="Interface to listen on; anything but localhost exposes the"
                                                     " study to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535)] = 8000,
) -> None:
    """Serve the study to its readers until interrupted (Ctrl+C)."""
    from histosynth.errors import HistosynthError
    from histosynth.survey.app import LOCAL_HOSTS, make_study_server
    from histosynth.survey.study import list_readers, open_study

    opened = open_study(study)
    if host not in LOCAL_HOSTS:
        typer.echo(f"warning: listening on {host}: anyone who can reach it and holds a reader link can answer",
                   err=True)
    try:
        server = make_study_server(opened.root, host, port)
    except OSError as error:
        reason = error.strerror or error
        raise HistosynthError(f"cannot listen on {host}:{port} ({reason}); try another --port") from None
    if not list_readers(opened):
        typer.echo(f"warning: no readers yet; add one with `histosynth survey add-reader {opened.root} NAME`", err=True)
    typer.echo(f"serving {opened.root} at http://{host}:{server.port} (Ctrl+C stops);"
               f" reader links: `histosynth survey readers {opened.root}`", err=True)
    try:
        server.serve_forever()  # werkzeug's returns on Ctrl+C
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    typer.echo("stopped", err=True)


@survey_app.command("report")
def report_command(
    study: Annotated[Path, typer.Argument(help="Study folder.")],
    out: Annotated[Path | None, typer.Option("--out", help="Report folder (default: STUDY/report).")] = None,
) -> None:
    """Accuracy, sensitivity/specificity, agreement and ROC: report.json and a self-contained report.html."""
    from histosynth.survey.report import write_report

    folder = write_report(study, out)
    typer.echo(f"wrote {folder / 'report.json'} and {folder / 'report.html'}", err=True)
