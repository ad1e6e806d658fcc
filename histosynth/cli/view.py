"""CLI command: ``histosynth view`` — look at a slide in the browser, or export a static viewer of it."""
from __future__ import annotations

import webbrowser
from pathlib import Path
from typing import Annotated, Optional

import typer

from histosynth.cli.app import app


@app.command("view")
def view_command(
    slide: Annotated[Path, typer.Argument(help="Pyramidal TIFF; a SLIDE.mask.tiff beside it is shown as an overlay.")],
    host: Annotated[str, typer.Option("--host", help="Address to listen on; 127.0.0.1: this machine only.")] = (
        "127.0.0.1"),
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port; 0 picks a free one.")] = 8000,
    no_browser: Annotated[bool, typer.Option("--no-browser", help="Only print the URL.")] = False,
    export: Annotated[Optional[Path], typer.Option(
        "--export", help="Write a static viewer (index.html + Deep Zoom tiles) into this folder instead of"
                         " serving.")] = None,
    allowed_host: Annotated[Optional[list[str]], typer.Option(
        "--allowed-host", help="Another name browsers may reach the server by (repeatable); IP addresses,"
                               " localhost and this machine's name always work.")] = None,
) -> None:
    """Show a slide in the browser: Deep Zoom tiles cut from its pyramid on demand; Ctrl-C stops."""
    if export is not None:
        from histosynth.viewer.export import export_viewer

        index = export_viewer(slide, export)
        typer.echo(f"wrote {index} (open it in a browser, or put the folder on any static web host)")
        return

    from histosynth.viewer.server import make_server

    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"warning: listening on {host}: the viewer has no authentication; anyone who can reach this "
                   "machine can see the slide", err=True)
    server = make_server(slide, host, port, allowed_hosts=tuple(allowed_host or ()))
    try:
        typer.echo(f"serving {slide} at {server.url}" + (" with its mask overlay" if server.source.mask else ""))
        typer.echo("press Ctrl-C to stop", err=True)
        if not no_browser:
            _open_browser(server.url)
        server.serve_forever()
    except KeyboardInterrupt:
        typer.echo("stopped", err=True)
    finally:
        server.server_close()


def _open_browser(url: str) -> None:
    """Open the URL in the default browser; a machine without one (ssh, CI) just keeps the printed URL."""
    try:
        opened = webbrowser.open(url, new=2)
    except Exception:  # noqa: BLE001 - webbrowser raises various errors when no browser is usable
        opened = False
    if not opened:
        typer.echo(f"no browser to open here; open {url} yourself", err=True)
