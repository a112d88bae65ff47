"""Plain-text inputs of the protocol (Steps 3-6): ``.coords``, ``.tlt``, ``.order``.

Each reader returns numbers and raises :class:`SubtomoError` naming the file, the line,
the problem and the fix. Thousands separators (``2,034.0`` as printed in the protocol)
are accepted in coordinates.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment

from subtomo.errors import SubtomoError


def _numeric_rows(path: Path, ncols: int, what: str, fix: str, *, thousands: bool = False) -> np.ndarray:
    if not path.exists():
        raise SubtomoError(f"{path}: file not found. {fix}")
    rows: list[list[float]] = []
    problems: list[str] = []
    for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        fields = text.split()
        if thousands:
            fields = [f.replace(",", "") for f in fields]
        try:
            values = [float(f) for f in fields]
        except ValueError:
            problems.append(f"{path}:{lineno}: cannot parse {line.strip()!r} as {what}. {fix}")
            continue
        if len(values) < ncols:
            problems.append(f"{path}:{lineno}: expected {ncols} numbers ({what}), found {len(values)}. {fix}")
            continue
        rows.append(values[:ncols])
    if problems:
        raise SubtomoError(f"{path}: {len(problems)} unreadable line(s)", problems)
    return np.asarray(rows, dtype=np.float64).reshape(-1, ncols)


def read_coords(path: str | Path) -> np.ndarray:
    """Read particle centres from a ``.coords`` file.

    Blank lines and ``#`` comments are skipped, extra columns ignored, thousands separators
    (``2,034.0``) accepted.

    Parameters
    ----------
    path : str or Path
        The ``.coords`` file, one particle per line: x y z.

    Returns
    -------
    numpy.ndarray
        (n, 3) float64 x, y, z in tomogram pixels [px] (IMOD origin, lower left).

    Raises
    ------
    SubtomoError
        The file is missing, or lines cannot be read (every such line is listed in ``.problems``).
    """
    return _numeric_rows(
        Path(path), 3, "x y z in pixels",
        "Write three columns x y z per particle, e.g. from IMOD's model2point.", thousands=True,
    )


def read_tlt(path: str | Path) -> np.ndarray:
    """Read tilt angles from an IMOD ``.tlt`` file.

    Parameters
    ----------
    path : str or Path
        The ``.tlt`` file, one angle per line (blank lines and ``#`` comments skipped).

    Returns
    -------
    numpy.ndarray
        (n,) float64 tilt angles [deg], one per image of the aligned stack, in stack order.

    Raises
    ------
    SubtomoError
        The file is missing, or lines cannot be read (every such line is listed in ``.problems``).
    """
    return _numeric_rows(Path(path), 1, "a tilt angle in degrees",
                         "Write one tilt angle per line (IMOD .tlt).")[:, 0]


def read_order(path: str | Path) -> np.ndarray:
    """Read a ``.order`` file of tilt angle and accumulated dose.

    Parameters
    ----------
    path : str or Path
        The ``.order`` file, one image per line: tilt angle, accumulated dose (blank lines and ``#``
        comments skipped, extra columns ignored).

    Returns
    -------
    numpy.ndarray
        (n, 2) float64 rows of (nominal) tilt angle [deg] and accumulated dose before the image
        [e⁻/Å²], in file order.

    Raises
    ------
    SubtomoError
        The file is missing, or lines cannot be read (every such line is listed in ``.problems``).
    """
    return _numeric_rows(Path(path), 2, "tilt angle and accumulated dose",
                         "Write two columns: tilt angle (deg) and accumulated dose (e-/A^2).")


def match_order_to_tilts(tilts_deg: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Accumulated dose for each refined tilt from ``.order`` rows of (nominal) tilt, dose.

    As Step 6 says, nominal angles are assigned to the closest refined tilt. With one row per
    image (the valid case) the assignment is one-to-one (the pairing with the smallest total
    angle difference), so two images at nearly the same angle (a repeated 0° tilt) get their
    own rows; with another number of rows each tilt takes the nearest row (callers report the
    count mismatch).

    Parameters
    ----------
    tilts_deg : array_like
        (n,) refined tilt angles [deg], in stack order.
    order : numpy.ndarray
        (m, 2) rows of nominal tilt [deg] and accumulated dose [e⁻/Å²] (:func:`read_order`).

    Returns
    -------
    dose : numpy.ndarray
        (n,) float64 accumulated dose per tilt [e⁻/Å²].
    difference_deg : numpy.ndarray
        (n,) float64 absolute angle difference to the matched row [deg], so callers can report large
        mismatches.
    """
    tilts = np.asarray(tilts_deg, dtype=np.float64)
    diff = np.abs(tilts[:, None] - order[None, :, 0])
    if len(order) == len(tilts):
        _, nearest = linear_sum_assignment(diff)
    else:
        nearest = np.argmin(diff, axis=1)
    return order[nearest, 1].copy(), diff[np.arange(len(tilts)), nearest]


def write_text_rows(path: str | Path, rows: np.ndarray, fmt: str = "%.2f") -> None:
    """Write a numeric table as whitespace-separated text (used for .coords/.tlt/.order).

    Parameters
    ----------
    path : str or Path
        Output file (overwritten, not atomically).
    rows : array_like
        (n,) values, one per line, or (n, k) rows (units as the file type needs: px, deg, e⁻/Å²).
    fmt : str
        ``numpy.savetxt`` format of each value.

    Returns
    -------
    None
    """
    np.savetxt(Path(path), np.atleast_2d(np.asarray(rows)).reshape(len(rows), -1), fmt=fmt)
