"""Dynamo tables (``.tbl``).

Conventions of Dynamo (Castaño-Díez et al. 2012; the Dynamo wiki pages "Table" and
"Euler angles convention"):

* A table is plain text, one particle per line, whitespace-separated numbers; the columns
  used here (1-based, as Dynamo numbers them) are 1 ``tag``, 4–6 ``dx dy dz`` (shifts
  [px]), 7–9 ``tdrot tilt narot`` (Euler angles [deg]), 10 ``cc``, 20 ``tomo`` (tomogram
  number, the line of the volume list ``.vll``), 22 ``class``, 24–26 ``x y z``
  (position [px]), 36 ``apix`` (pixel size [Å], 0 when unset).
* Positions are MATLAB indices: the first voxel's centre is 1. The particle's centre is
  ``(x, y, z) + (dx, dy, dz)``. Ours = Dynamo's − 1.
* Angles: ``M = Rz(narot) Rx(tilt) Rz(tdrot)`` (counter-clockwise matrices; scipy's
  extrinsic ``"zxz"``) is the same matrix as RELION's ``Rz(psi) Ry(tilt) Rz(rot)`` built
  the scipy way (``from_euler("ZYZ")``), which is our ``Aᵀ``; so ``A = Mᵀ``. This is the
  relation of teamtomo's ``eulerangles``/``dynamo2relion`` (its test pair: Dynamo
  (−47.273, 1.1777, −132.3) = RELION (137.7, 1.1777, 42.727), checked in our tests).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from subtomo.errors import SubtomoError
from subtomo.io.importers._text import numeric_table
from subtomo.io.importers.picks import Picks, matrices_to_zxz, zxz_to_matrices

N_COLUMNS = 36  # up to apix
ORIGIN = 1.0  # the first voxel's centre in Dynamo's coordinates
FIX = "A Dynamo table has one particle per line with at least 26 numbers (dynamo_table_blank layout)."


def read_dynamo_table(path: str | Path, tomo_names: dict[int, str]) -> Picks:
    """Read a Dynamo table.

    Parameters
    ----------
    path : str or Path
        The ``.tbl`` file.
    tomo_names : dict of int to str
        Tomogram name for each tomogram number of column 20.

    Returns
    -------
    Picks
        Positions [px] in our convention (Dynamo's − 1, shifts added) and matrices A.
    """
    path = Path(path)
    t = numeric_table(path, 26, "a Dynamo table row", FIX)
    coords = t[:, 23:26] + t[:, 3:6] - ORIGIN
    rotations = zxz_to_matrices(t[:, 6], t[:, 7], t[:, 8]).transpose(0, 2, 1)
    tomo = np.array([_tomo_name(int(n), tomo_names, path) for n in t[:, 19]])
    apix = t[:, 35] if t.shape[1] > 35 else np.zeros(len(t))
    px = float(apix[0]) if np.isfinite(apix[0]) and apix[0] > 0 else None
    return Picks(tomo=tomo, coords_px=coords, rotations=rotations, scores=t[:, 9],
                 classes=t[:, 21].astype(int), pixel_size_A=px)


def write_dynamo_table(path: str | Path, picks: Picks, tomo_numbers: dict[str, int]) -> Path:
    """Write picks as a 36-column Dynamo table (shifts 0, the position in columns 24–26).

    Parameters
    ----------
    path : str or Path
        The ``.tbl`` file to write.
    picks : Picks
        Positions [px] in our convention; matrices A (identity when None).
    tomo_numbers : dict of str to int
        Tomogram number (column 20) of each tomogram name.

    Returns
    -------
    Path
    """
    n = len(picks)
    t = np.zeros((n, N_COLUMNS))
    t[:, 0] = np.arange(1, n + 1)
    t[:, 1:3] = 1
    rotations = picks.rotations_or_identity()
    t[:, 6:9] = matrices_to_zxz(np.asarray(rotations).transpose(0, 2, 1))
    t[:, 9] = picks.scores if picks.scores is not None else 0.0
    t[:, 19] = [tomo_numbers[str(name)] for name in picks.tomo]
    t[:, 21] = picks.classes if picks.classes is not None else 1
    t[:, 23:26] = picks.coords_px + ORIGIN
    t[:, 35] = picks.pixel_size_A or 0.0
    path = Path(path)
    path.write_text("".join(" ".join(_fmt(v) for v in row) + "\n" for row in t))
    return path


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.6f}"


def _tomo_name(number: int, names: dict[int, str], path: Path) -> str:
    if number in names:
        return names[number]
    raise SubtomoError(f"{path}: particles of tomogram number {number} (column 20), which has no name. "
                       "Give --tomo-names (name of tomogram 1, 2, ... in order) or --vll with Dynamo's volume list.")


def read_volume_list(path: str | Path) -> dict[int, str]:
    """Tomogram number → name from a Dynamo volume list (``.vll``: one tomogram path a line).

    Parameters
    ----------
    path : str or Path
        The ``.vll``; line i (1-based, ``*`` property lines skipped) is tomogram i.

    Returns
    -------
    dict of int to str
        Tomogram names (the file names without their extension).
    """
    path = Path(path)
    if not path.is_file():
        raise SubtomoError(f"{path}: volume list not found. Give the .vll the table was made with, or --tomo-names.")
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("*")]
    return {i: Path(ln).stem for i, ln in enumerate(lines, start=1)}
