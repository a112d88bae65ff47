"""Serve the GUI from a background thread (tests, benchmarks, screenshot scripts).

``subtomo gui`` runs the server in the foreground; this helper runs the same app on a free
loopback port inside the calling process and stops it on exit.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from types import TracebackType

import uvicorn

from subtomo.web.app import create_app


def free_port() -> int:
    """A TCP port that is free on the loopback interface now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerThread:
    """The GUI of ``project`` on ``http://127.0.0.1:<port>/`` while the ``with`` block runs.

    ``token`` and ``bound_host`` are passed to :func:`create_app` (e.g. ``bound_host="0.0.0.0"``
    to test the token rule while listening on loopback only).
    """

    def __init__(self, project: Path, token: str | None = None, bound_host: str = "127.0.0.1") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = create_app(project, token=token, host=bound_host)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="subtomo-gui", daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the GUI server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
