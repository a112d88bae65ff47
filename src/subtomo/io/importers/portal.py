"""CryoET Data Portal point annotations (``.ndjson``).

Conventions of the CryoET Data Portal (Ermel et al. 2024; the portal's documentation of
annotation files):

* One JSON object per line. ``"type"`` is ``"point"`` or ``"orientedPoint"``;
  ``"location"`` is ``{"x", "y", "z"}`` in voxels of the tomogram at the annotation's voxel
  spacing (first voxel's centre = 0, as ours); oriented points carry
  ``"xyz_rotation_matrix"``, a 3 × 3 matrix (rows) acting on ``(x, y, z)`` column vectors
  that rotates the template into the particle's orientation: our matrix A directly.
* One file holds the annotations of one tomogram (run); its voxel spacing is in the
  annotation's metadata, not in the file, so the user gives it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from subtomo.errors import SubtomoError
from subtomo.io.importers.picks import Picks

FIX = "Give the annotation .ndjson downloaded from the CryoET Data Portal (one point object a line)."


def read_portal_ndjson(path: str | Path, tomo: str) -> Picks:
    """Read Data Portal point / oriented-point annotations.

    Parameters
    ----------
    path : str or Path
        The ``.ndjson`` file.
    tomo : str
        Name of the tomogram the annotations belong to.

    Returns
    -------
    Picks
        Positions [px] (the portal's voxels); matrices A when every point is oriented.
    """
    path = Path(path)
    if not path.is_file():
        raise SubtomoError(f"{path}: file not found. {FIX}")
    coords, rotations = [], []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            loc = obj["location"]
            coords.append([float(loc["x"]), float(loc["y"]), float(loc["z"])])
            matrix = obj.get("xyz_rotation_matrix")
            rotations.append(None if matrix is None else np.asarray(matrix, np.float64).reshape(3, 3))
        except (ValueError, KeyError, TypeError) as exc:
            raise SubtomoError(f"{path}:{lineno}: not a point annotation ({exc}). {FIX}") from None
    if not coords:
        raise SubtomoError(f"{path}: no annotations in this file. {FIX}")
    oriented = all(r is not None for r in rotations)
    rot = np.stack([r for r in rotations if r is not None]) if oriented else None
    if rot is not None and not np.allclose(np.einsum("nij,nkj->nik", rot, rot), np.eye(3), atol=1e-4):
        raise SubtomoError(f"{path}: an xyz_rotation_matrix is not a rotation (R Rᵀ ≠ I). {FIX}")
    return Picks(tomo=np.full(len(coords), tomo), coords_px=np.asarray(coords), rotations=rot)


def write_portal_ndjson(path: str | Path, picks: Picks) -> Path:
    """Write picks as Data Portal (oriented) point annotations.

    Parameters
    ----------
    path : str or Path
        The ``.ndjson`` file to write.
    picks : Picks
        Positions [px]; ``orientedPoint`` with matrices A when present, else ``point``.

    Returns
    -------
    Path
    """
    lines = []
    for i in range(len(picks)):
        x, y, z = (float(v) for v in picks.coords_px[i])
        obj: dict = {"type": "point", "location": {"x": x, "y": y, "z": z}}
        if picks.rotations is not None:
            obj["type"] = "orientedPoint"
            obj["xyz_rotation_matrix"] = picks.rotations[i].tolist()
        lines.append(json.dumps(obj))
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path
