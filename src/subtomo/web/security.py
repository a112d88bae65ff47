"""The GUI's security rules: which files may be served and which requests are accepted.

* **Files**: only regular files inside the project directory. A requested path that is
  absolute, holds a ``..`` part (also after URL decoding), or resolves (symlinks followed)
  to a place outside the project is refused; the app answers 404, so nothing about the
  rest of the file system leaks.
* **Token**: a server bound to anything but the loopback interface requires a random token
  on every request (``?token=`` once, then an HTTP-only cookie), as Jupyter does.
* **Host / Origin**: on loopback the ``Host`` header must name a loopback address (DNS
  rebinding), and a request that changes something (POST) must come from the GUI's own
  origin and carry JSON, so another web page open in the same browser cannot start jobs.
"""

from __future__ import annotations

import hmac
import secrets
from pathlib import Path, PurePosixPath

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
TOKEN_COOKIE = "subtomo_gui_token"


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (no token needed)."""
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def host_name(host_header: str) -> str:
    """The host part of a ``Host`` header (``[::1]:8000`` -> ``[::1]``, ``localhost:80`` -> ``localhost``)."""
    if host_header.startswith("["):
        return host_header.split("]")[0] + "]"
    return host_header.rsplit(":", 1)[0]


def new_token() -> str:
    """A fresh random access token (URL-safe, 192 bits)."""
    return secrets.token_urlsafe(24)


def project_file(project: Path, relative: str, *, must_exist: bool = True) -> Path | None:
    """The file ``relative`` inside ``project``, or None if the path is not allowed.

    Refused: empty or absolute paths, Windows drive or backslash forms, any ``..`` part, and
    paths that resolve (following symlinks) outside the project directory.
    """
    if not relative or "\x00" in relative or "\\" in relative:
        return None
    parts = PurePosixPath(relative).parts
    if PurePosixPath(relative).is_absolute() or any(p == ".." for p in parts) or (parts and ":" in parts[0]):
        return None
    root = project.resolve()
    candidate = (root / relative).resolve()
    if candidate != root and root not in candidate.parents:
        return None
    if must_exist and not candidate.is_file():
        return None
    return candidate


def token_matches(given: str, token: str) -> bool:
    """Constant-time comparison of a presented token with the server's."""
    return hmac.compare_digest(given.encode(), token.encode())


def relative_to_project(project: Path, path: Path) -> str:
    """``path`` relative to the project directory, with forward slashes."""
    return path.resolve().relative_to(project.resolve()).as_posix()
