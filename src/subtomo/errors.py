"""The one exception type users see.

Every problem with user input is raised as :class:`SubtomoError` with a message that
names the file, the problem and the fix. The CLI prints these without a traceback.
"""

from __future__ import annotations


class SubtomoError(Exception):
    """A problem the user can fix (bad input, missing file, impossible option)."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        self.problems = list(problems or [])
        if self.problems:
            message = message + "\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(message)
