"""pytom-match-pick candidate lists (``pytom_extract_candidates.py`` STAR files).

Conventions of pytom-match-pick (Chaillet et al. 2025; its ``docs/Developers.md``):

* One STAR loop with RELION labels ``rlnCoordinateX/Y/Z`` (voxel indices of the
  template-matched tomogram, first voxel = 0: the same as ours), ``rlnAngleRot/Tilt/Psi``
  (already converted to RELION's ZYZ convention, so our matrix A), ``rlnLCCmax`` (the
  score), ``rlnCutOff``, ``rlnSearchStd``, ``rlnDetectorPixelSize`` (the tomogram's pixel
  size [Å]) and ``rlnMicrographName`` (the tomogram file; its stem names the tomogram).
* With ``--relion5-compat`` the positions are ``rlnCenteredCoordinate{X,Y,Z}Angst``: [Å]
  from the tomogram centre (``size / 2`` voxels), and the tomogram is ``rlnTomoName``;
  converting them back needs each tomogram's size (from our tomogram's header, or the
  physical extent in RELION 5's ``tomograms.star``: :func:`relion5_tomogram_extents_A`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from subtomo.errors import SubtomoError
from subtomo.io.importers.picks import (
    COORD_COLUMNS,
    Picks,
    check_finite,
    matrices_to_relion,
    relion_angles_to_matrices,
    require_columns,
)
from subtomo.io.particles import ANGLE_COLUMNS
from subtomo.io.star import read_star, table_of, write_star

CENTRED_COLUMNS = ("rlnCenteredCoordinateXAngst", "rlnCenteredCoordinateYAngst", "rlnCenteredCoordinateZAngst")
FIX = "Give the *_particles.star that pytom_extract_candidates.py wrote."


def read_pytom_candidates(path: str | Path, tomo_sizes: dict[str, tuple[int, int, int]] | None = None,
                          default_size: tuple[int, int, int] | None = None,
                          tomo_extents_A: dict[str, tuple[float, float, float]] | None = None) -> Picks:
    """Read a pytom-match-pick particle STAR (plain or RELION-5 compatible).

    Parameters
    ----------
    path : str or Path
        The STAR file.
    tomo_sizes : dict of str to (nx, ny, nz), optional
        Tomogram sizes (nx, ny, nz) [px] by name, needed only for centred (RELION-5
        compatible) coordinates.
    default_size : (nx, ny, nz), optional
        Size [px] of tomograms not in ``tomo_sizes``.
    tomo_extents_A : dict of str to (Lx, Ly, Lz), optional
        Physical tomogram sizes [Å] (:func:`relion5_tomogram_extents_A`), used for names
        not in ``tomo_sizes``.

    Returns
    -------
    Picks
        Positions [px] in our convention, matrices A, scores (rlnLCCmax), pixel size.
    """
    path = Path(path)
    blocks = read_star(path)
    loops = [b for b in blocks.values() if isinstance(b, pd.DataFrame)]
    if not loops:
        raise SubtomoError(f"{path}: no particle loop. {FIX}")
    t = table_of(loops[0])
    require_columns(t, ANGLE_COLUMNS + ("rlnDetectorPixelSize",), path, FIX)
    px = float(t["rlnDetectorPixelSize"].iloc[0])
    if all(c in t.columns for c in COORD_COLUMNS):
        require_columns(t, ("rlnMicrographName",), path, FIX)
        names = np.array([Path(str(m)).name.split(".")[0] for m in t["rlnMicrographName"]])
        coords = check_finite(t[list(COORD_COLUMNS)].to_numpy(np.float64), path, "coordinate")
    else:
        require_columns(t, CENTRED_COLUMNS + ("rlnTomoName",), path, FIX)
        names = t["rlnTomoName"].astype(str).to_numpy()
        centred = check_finite(t[list(CENTRED_COLUMNS)].to_numpy(np.float64), path, "coordinate")
        sizes = dict(tomo_sizes or {})
        for name, extent in (tomo_extents_A or {}).items():
            sizes.setdefault(name, tuple(e / px for e in extent))  # type: ignore[arg-type]
        tomo_sizes = sizes
        coords = centred / px + np.array([_half_size(n, tomo_sizes, default_size, path) for n in names])
    angles = check_finite(t[list(ANGLE_COLUMNS)].to_numpy(np.float64), path, "angle")
    scores = t["rlnLCCmax"].to_numpy(np.float64) if "rlnLCCmax" in t.columns else None
    return Picks(tomo=names, coords_px=coords, rotations=relion_angles_to_matrices(*angles.T), scores=scores,
                 pixel_size_A=px)


def relion5_tomogram_extents_A(path: str | Path) -> dict[str, tuple[float, float, float]]:
    """Physical tomogram sizes from a RELION-5 ``tomograms.star`` (as pytom-match-pick projects have).

    RELION 5 records the unbinned size ``rlnTomoSize{X,Y,Z}`` [px of the tilt series] and
    ``rlnTomoTiltSeriesPixelSize`` [Å]; centred coordinates are measured from the centre of
    that extent, whatever the binning of the tomogram that was searched.

    Parameters
    ----------
    path : str or Path
        The ``tomograms.star``.

    Returns
    -------
    dict of str to (float, float, float)
        (Lx, Ly, Lz) [Å] per ``rlnTomoName``.
    """
    path = Path(path)
    blocks = read_star(path)
    loops = [table_of(b) for b in blocks.values() if isinstance(b, pd.DataFrame)]
    cols = ("rlnTomoName", "rlnTomoSizeX", "rlnTomoSizeY", "rlnTomoSizeZ", "rlnTomoTiltSeriesPixelSize")
    if not loops:
        raise SubtomoError(f"{path}: no tomogram table. Give RELION 5's tomograms.star.")
    t = loops[0]
    require_columns(t, cols, path, "Give RELION 5's tomograms.star (Tomograms/jobNNN/tomograms.star).")
    px = t["rlnTomoTiltSeriesPixelSize"].to_numpy(np.float64)
    return {str(n): (float(x * p), float(y * p), float(z * p)) for n, x, y, z, p in
            zip(t["rlnTomoName"], t["rlnTomoSizeX"], t["rlnTomoSizeY"], t["rlnTomoSizeZ"], px)}


def _half_size(name: str, sizes: dict[str, tuple[int, int, int]] | None, default: tuple[int, int, int] | None,
               path: Path) -> np.ndarray:
    size = (sizes or {}).get(name, default)
    if size is None:
        raise SubtomoError(f"{path}: centred coordinates (RELION-5 mode) of tomogram {name!r}, whose size is unknown. "
                           f"Put Tomograms/{name}/{name}.mrc in the project (its header gives the size) or give "
                           "--tomo-size NX,NY,NZ.")
    return np.asarray(size, np.float64) / 2.0


def write_pytom_candidates(path: str | Path, picks: Picks, pixel_size_A: float) -> Path:
    """Write picks as pytom-match-pick's plain particle STAR.

    Parameters
    ----------
    path : str or Path
        The STAR file to write.
    picks : Picks
        Positions [px] (ours = pytom's), matrices A (identity when None).
    pixel_size_A : float
        Tomogram pixel size [Å] (``rlnDetectorPixelSize``).

    Returns
    -------
    Path
    """
    rotations = picks.rotations_or_identity()
    angles = matrices_to_relion(rotations)
    table = pd.DataFrame({c: picks.coords_px[:, j] for j, c in enumerate(COORD_COLUMNS)})
    for j, c in enumerate(ANGLE_COLUMNS):
        table[c] = angles[:, j]
    table["rlnLCCmax"] = picks.scores if picks.scores is not None else 0.0
    table["rlnCutOff"] = 0.0
    table["rlnSearchStd"] = 0.0
    table["rlnDetectorPixelSize"] = pixel_size_A
    table["rlnMicrographName"] = [f"{t}.mrc" for t in picks.tomo]
    return write_star(path, {"": table})
