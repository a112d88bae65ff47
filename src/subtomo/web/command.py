"""``subtomo gui``: serve the web GUI on a project directory.

The web libraries are the optional ``gui`` extra: without them the rest of the command line
works and ``subtomo gui`` says what to install.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import click

from subtomo.web.security import is_loopback, new_token


def gui_url(host: str, port: int, token: str | None) -> str:
    """The URL to open: the token is part of it when one is required."""
    if host in ("0.0.0.0", "::", ""):  # all interfaces: name the machine
        host = socket.gethostname()
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"http://{shown}:{port}/" + (f"?token={token}" if token else "")


def _serve(project: Path, host: str, port: int) -> None:
    try:  # the optional `gui` extra, imported on use so that every other command starts fast
        import uvicorn

        from subtomo.web.app import create_app
    except ImportError as exc:  # pragma: no cover - depends on the installation
        click.secho(f"ERROR: the GUI needs the web libraries ({exc.name or exc} is missing). "
                    'Install them with: pip install "subtomo[gui]"', fg="red", err=True)
        sys.exit(1)
    token = None if is_loopback(host) else new_token()
    app = create_app(project, token=token, host=host)
    click.echo(f"subtomo GUI on {project}\n  open: {gui_url(host, port, token)}\n  (Ctrl-C stops the server; "
               "running jobs go on)")
    uvicorn.run(app, host=host, port=port, log_level="warning")


@click.command("gui", help="Start the web GUI on a project directory (default: the current one) and print its URL. "
               "Jobs started from it run as their own processes; stopping the server does not stop them. On an "
               "address other than 127.0.0.1 every request needs the printed token.")
@click.argument("project_dir", required=False, default=".", type=click.Path(file_okay=False, path_type=Path))
@click.option("--port", default=8765, show_default=True, type=click.IntRange(1, 65535), help="TCP port to listen on.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Anything but loopback requires the random token printed in the URL.")
def gui_command(project_dir: Path, port: int, host: str) -> None:
    """Check the project directory and serve the GUI on it."""
    project = project_dir.resolve()
    if not project.is_dir():
        click.secho(f"ERROR: {project_dir}: no such directory. Give a project directory (where default_pipeline.star "
                    "is, or an empty one to start in).", fg="red", err=True)
        sys.exit(1)
    _serve(project, host, port)
