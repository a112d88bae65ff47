"""Plain CSV or whitespace tables of positions (and RELION angles).

Our own simple format for picks from any other tool, stated here since no program defines it:

* Optional header line naming the columns; recognised (case-insensitive): ``x y z``,
  ``rot tilt psi`` (RELION ZYZ Euler angles [deg], our matrix A), ``tomo`` (tomogram name).
  Without a header the columns are ``x y z [rot tilt psi]``. Fields are separated by
  commas or white space; ``#`` starts a comment.
* Positions are in pixels of the tomogram the picks were made on; ``origin`` says where
  the first voxel's centre is (0 as in numpy, napari, IMOD point files and ours; 1 as in
  MATLAB programs). The pixel size is given by the user.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from subtomo.errors import SubtomoError
from subtomo.io.importers.picks import Picks, check_finite, matrices_to_relion, relion_angles_to_matrices

FIX = "Write one particle a line: x, y, z[, rot, tilt, psi] (optionally a header line naming the columns)."
ALIASES = {"x": "x", "y": "y", "z": "z", "rot": "rot", "tilt": "tilt", "psi": "psi", "tomo": "tomo",
           "rlncoordinatex": "x", "rlncoordinatey": "y", "rlncoordinatez": "z", "rlnanglerot": "rot",
           "rlnangletilt": "tilt", "rlnanglepsi": "psi", "rlntomoname": "tomo", "tomogram": "tomo"}


def _split(line: str) -> list[str]:
    return [f.strip() for f in line.replace(",", " ").split()]


def read_csv_points(path: str | Path, tomo: str, origin: float = 0.0) -> Picks:
    """Read a CSV (or whitespace) table of positions and optional angles.

    Parameters
    ----------
    path : str or Path
        The table.
    tomo : str
        Tomogram name for rows without a ``tomo`` column.
    origin : float
        Coordinate of the first voxel's centre in the file (0 or 1).

    Returns
    -------
    Picks
        Positions [px] in our convention (file − origin); matrices A when angles are given.
    """
    path = Path(path)
    if not path.is_file():
        raise SubtomoError(f"{path}: file not found. {FIX}")
    lines = [ln.split("#", 1)[0] for ln in path.read_text(errors="replace").splitlines()]
    lines = [ln for ln in lines if ln.strip()]
    if not lines:
        raise SubtomoError(f"{path}: no particles in this file. {FIX}")
    header = _split(lines[0])
    if all(_is_number(f) for f in header):
        names = ["x", "y", "z", "rot", "tilt", "psi"][:len(header)]
        body = lines
    else:
        names = [ALIASES.get(h.lower(), h) for h in header]
        body = lines[1:]
        if not {"x", "y", "z"} <= set(names):
            raise SubtomoError(f"{path}: the header {lines[0].strip()!r} has no x, y and z columns. {FIX}")
    rows = [_split(ln) for ln in body]
    for lineno, row in enumerate(rows, start=2 if body is not lines else 1):
        if len(row) < len(names):
            raise SubtomoError(f"{path}:{lineno}: {len(row)} fields for {len(names)} columns. {FIX}")
    col = {n: [r[i] for r in rows] for i, n in enumerate(names)}
    coords = check_finite(np.array([[_number(v, path) for v in col[a]] for a in "xyz"]).T, path, "coordinate")
    rotations = None
    if {"rot", "tilt", "psi"} <= set(names):
        angles = check_finite(np.array([[_number(v, path) for v in col[a]] for a in ("rot", "tilt", "psi")]).T,
                              path, "angle")
        rotations = relion_angles_to_matrices(*angles.T)
    tomos = np.array(col["tomo"]) if "tomo" in col else np.full(len(rows), tomo)
    return Picks(tomo=tomos, coords_px=coords - origin, rotations=rotations)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _number(text: str, path: Path) -> float:
    try:
        return float(text)
    except ValueError:
        raise SubtomoError(f"{path}: {text!r} is not a number. {FIX}") from None


def write_csv_points(path: str | Path, picks: Picks, origin: float = 0.0) -> Path:
    """Write picks as CSV with a header ``tomo,x,y,z[,rot,tilt,psi]``.

    Parameters
    ----------
    path : str or Path
        The CSV file to write.
    picks : Picks
        Positions [px] in our convention; angles written when present.
    origin : float
        Coordinate of the first voxel's centre in the file.

    Returns
    -------
    Path
    """
    pos = picks.coords_px + origin
    cols = ["tomo", "x", "y", "z"]
    angles = matrices_to_relion(picks.rotations) if picks.rotations is not None else None
    if angles is not None:
        cols += ["rot", "tilt", "psi"]
    lines = [",".join(cols)]
    for i in range(len(picks)):
        values = list(pos[i]) + (list(angles[i]) if angles is not None else [])
        lines.append(",".join([str(picks.tomo[i])] + [f"{v:.6f}" for v in values]))
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path
