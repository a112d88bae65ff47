"""STOPGAP motive lists (``data_stopgap_motivelist`` STAR files).

Conventions of STOPGAP (Wan et al. 2024; the STOPGAP wiki, "Motivelist"), inherited from
TOM/AV3:

* One STAR block ``data_stopgap_motivelist`` with the columns ``motl_idx tomo_num object
  subtomo_num halfset orig_x orig_y orig_z score x_shift y_shift z_shift phi psi the
  class``; ``halfset`` is ``A`` or ``B``.
* Positions are MATLAB indices (first voxel's centre = 1) of the tomogram at the binning it
  was picked at [px]; the particle's centre is ``orig + shift``. Ours = STOPGAP's − 1.
* Angles [deg] are stored in the order ``phi psi the``; the rotation is
  ``R = Rz(psi) Rx(the) Rz(phi)`` (counter-clockwise matrices; TOM's ``tom_rotate`` order
  phi about z, the about x, psi about z), the rotation that takes the reference to the
  particle: our RELION matrix A directly (cryoCAT's ``RelionMotl`` conversion makes the
  same statement). The pixel size is not recorded in the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from subtomo.errors import SubtomoError
from subtomo.io.importers.picks import Picks, check_finite, matrices_to_zxz, require_columns, zxz_to_matrices
from subtomo.io.star import read_star, table_of, write_star

BLOCK = "stopgap_motivelist"
COLUMNS = ("motl_idx", "tomo_num", "object", "subtomo_num", "halfset", "orig_x", "orig_y", "orig_z", "score",
           "x_shift", "y_shift", "z_shift", "phi", "psi", "the", "class")
ORIGIN = 1.0
FIX = "A STOPGAP motive list is a STAR file with a data_stopgap_motivelist loop (sg_motl_initialize writes one)."


def read_stopgap_motl(path: str | Path, tomo_names: dict[int, str]) -> Picks:
    """Read a STOPGAP motive list.

    Parameters
    ----------
    path : str or Path
        The motive list (``.star``).
    tomo_names : dict of int to str
        Tomogram name for each ``tomo_num``.

    Returns
    -------
    Picks
        Positions [px] in our convention, matrices A, halves (A → 1, B → 2), classes, scores.
    """
    path = Path(path)
    blocks = read_star(path)
    block = blocks.get(BLOCK)
    if block is None:
        raise SubtomoError(f"{path}: no data_{BLOCK} block. {FIX}")
    t = table_of(block)
    require_columns(t, COLUMNS[1:2] + COLUMNS[5:15], path, FIX)
    pos = check_finite(t[["orig_x", "orig_y", "orig_z"]].to_numpy(np.float64), path, "position")
    shift = check_finite(t[["x_shift", "y_shift", "z_shift"]].to_numpy(np.float64), path, "shift")
    ang = check_finite(t[["phi", "psi", "the"]].to_numpy(np.float64), path, "angle")
    names = []
    for n in t["tomo_num"].astype(int):
        if n not in tomo_names:
            raise SubtomoError(f"{path}: particles of tomo_num {n}, which has no name. Give --tomo-names "
                               "(the name of tomogram 1, 2, ... in order).")
        names.append(tomo_names[n])
    halves = None
    if "halfset" in t.columns:
        halves = t["halfset"].astype(str).str.strip().str.upper().map({"A": 1, "B": 2}).fillna(0).astype(int).to_numpy()
    return Picks(tomo=np.array(names), coords_px=pos + shift - ORIGIN,
                 rotations=zxz_to_matrices(ang[:, 0], ang[:, 2], ang[:, 1]),
                 scores=t["score"].to_numpy(np.float64) if "score" in t.columns else None, halves=halves,
                 classes=t["class"].astype(int).to_numpy() if "class" in t.columns else None)


def write_stopgap_motl(path: str | Path, picks: Picks, tomo_numbers: dict[str, int]) -> Path:
    """Write picks as a STOPGAP motive list (shifts 0).

    Parameters
    ----------
    path : str or Path
        The ``.star`` to write.
    picks : Picks
        Positions [px] in our convention; matrices A (identity when None).
    tomo_numbers : dict of str to int
        ``tomo_num`` of each tomogram name.

    Returns
    -------
    Path
    """
    n = len(picks)
    rotations = picks.rotations_or_identity()
    zxz = matrices_to_zxz(rotations)
    pos = picks.coords_px + ORIGIN
    halves = picks.halves if picks.halves is not None else (np.arange(n) % 2) + 1
    table = pd.DataFrame({
        "motl_idx": np.arange(1, n + 1), "tomo_num": [tomo_numbers[str(t)] for t in picks.tomo],
        "object": 1, "subtomo_num": np.arange(1, n + 1), "halfset": np.where(halves == 2, "B", "A"),
        "orig_x": pos[:, 0], "orig_y": pos[:, 1], "orig_z": pos[:, 2],
        "score": picks.scores if picks.scores is not None else 0.0,
        "x_shift": 0.0, "y_shift": 0.0, "z_shift": 0.0,
        "phi": zxz[:, 0], "psi": zxz[:, 2], "the": zxz[:, 1],
        "class": picks.classes if picks.classes is not None else 1,
    })
    return write_star(path, {BLOCK: table})
