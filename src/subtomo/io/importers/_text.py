"""Whitespace- or comma-separated numeric tables, with messages that name the file and line."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from subtomo.errors import SubtomoError


def numeric_table(path: Path, min_cols: int, what: str, fix: str) -> np.ndarray:
    """Rows of numbers of a text file (blank lines and ``#``/``%`` comments skipped).

    Parameters
    ----------
    path : Path
        The file.
    min_cols : int
        Columns every row must have.
    what : str
        What a row is (for messages).
    fix : str
        What the user should do when a row is bad.

    Returns
    -------
    numpy.ndarray
        (rows, columns) float64; rows shorter than the longest are padded with NaN.
    """
    if not path.is_file():
        raise SubtomoError(f"{path}: file not found. {fix}")
    rows: list[list[float]] = []
    for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        text = line.split("#", 1)[0].split("%", 1)[0].strip()
        if not text:
            continue
        try:
            values = [float(f) for f in text.replace(",", " ").split()]
        except ValueError:
            raise SubtomoError(f"{path}:{lineno}: cannot read {line.strip()[:60]!r} as {what}. {fix}") from None
        if len(values) < min_cols:
            raise SubtomoError(f"{path}:{lineno}: {len(values)} numbers; {what} needs at least {min_cols}. {fix}")
        rows.append(values)
    if not rows:
        raise SubtomoError(f"{path}: no {what} in this file. {fix}")
    width = max(len(r) for r in rows)
    return np.array([r + [np.nan] * (width - len(r)) for r in rows], dtype=np.float64)
