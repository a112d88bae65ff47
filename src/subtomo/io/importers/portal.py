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

Portal folders (``subtomo import --source portal``, :func:`find_portal_runs`): one folder per
run (or the run folder itself) holding, anywhere below it, the tomogram(s) as OME-Zarr
(``Reconstructions/VoxelSpacing<Å>/Tomograms/<id>/<run>.zarr``) and the point annotations
``*.ndjson``, whose voxel spacing is read from the ``VoxelSpacing<Å>`` folder above them (else
the finest level of the tomogram). The level nearest to the requested pixel size is chosen;
``Tomograms/<run>/<run>.zarr`` becomes an OME-Zarr group listing only that level, whose array
is a link to the portal's (nothing is copied). The portal's tomograms come without our tilt
series: the tilt angles and doses are given (``--tilt-range``, ``--dose-per-tilt``; images
taken in dose-symmetric order: by increasing |θ|, positive first), and the CTF is not
estimated (``prepare --skip-ctf``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from subtomo.errors import SubtomoError
from subtomo.io.importers._folders import item_folders
from subtomo.io.importers.omezarr import ome_zarr_levels, open_ome_zarr
from subtomo.io.importers.picks import Picks
from subtomo.io.text import write_text_rows

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


@dataclass
class PortalRun:
    """One Data Portal run, ready to become ``Tomograms/<name>/``.

    Attributes
    ----------
    name : str
        Tomogram (run) name.
    zarr : Path
        The portal's OME-Zarr tomogram.
    level : str
        The chosen level (array path in the group).
    pixel_size_A : float
        Its pixel size [Å].
    size_xyz : tuple of int
        Its size (x, y, z) [px].
    picks : Picks
        The annotations, positions at ``pixel_size_A``.
    notes : list of str
        What was found and chosen.
    """

    name: str
    zarr: Path
    level: str
    pixel_size_A: float
    size_xyz: tuple[int, int, int]
    picks: Picks
    notes: list[str] = field(default_factory=list)


def _spacing_of(path: Path) -> float | None:
    """The ``VoxelSpacing<Å>`` of the nearest folder above ``path`` (portal layout), else None."""
    for parent in path.parents:
        m = re.fullmatch(r"(?:Tomogram)?VoxelSpacing([0-9.]+)", parent.name)
        if m:
            return float(m.group(1))
    return None


def _read_run(folder: Path, name: str, pixel_size_A: float | None, annotation: str) -> PortalRun:
    zarrs = sorted(p for p in folder.rglob("*.zarr") if p.is_dir())
    if not zarrs:
        raise SubtomoError(f"{folder}: no OME-Zarr tomogram (*.zarr). Download the run's tomogram from the CryoET Data "
                           "Portal into this folder.")
    levels = [(z, lv, px) for z in zarrs for lv, px in ome_zarr_levels(z)]
    want = pixel_size_A if pixel_size_A is not None else min(px for _, _, px in levels)
    zarr, level, px = min(levels, key=lambda c: (abs(c[2] - want), str(c[0])))
    notes = [f"{zarr.relative_to(folder)}: level {level} at {px:.3f} A chosen (levels: "
             + ", ".join(f"{p:.3f}" for _, _, p in levels) + " A" + (f"; asked {pixel_size_A:.3f} A)" if pixel_size_A else ")")]
    files = sorted(folder.rglob(annotation))
    if len(files) != 1:
        found = ", ".join(str(f.relative_to(folder)) for f in files) or "none"
        raise SubtomoError(f"{folder}: {len(files)} annotation files match {annotation!r} ({found}). Give --annotation, a "
                           "file-name pattern that matches the one annotation of the particles to import.")
    spacing = _spacing_of(files[0]) or ome_zarr_levels(zarr)[0][1]
    picks = read_portal_ndjson(files[0], name).scaled(spacing / px, px)
    notes.append(f"{files[0].name}: {len(picks)} points at {spacing:.3f} A voxels"
                 + (", oriented" if picks.rotations is not None else ", no orientations"))
    with open_ome_zarr(zarr, px) as t:
        nz, ny, nx = (int(n) for n in t.data.shape)
    return PortalRun(name, zarr, level, px, (nx, ny, nz), picks, notes)


def find_portal_runs(root: Path, pixel_size_A: float | None = None, annotation: str = "*.ndjson") -> list[PortalRun]:
    """Read every CryoET Data Portal run folder under ``root``.

    Parameters
    ----------
    root : Path
        A run folder, or a folder holding one sub-folder per run (named after it).
    pixel_size_A : float, optional
        Wanted tomogram pixel size [Å]: the nearest level is chosen (default: the finest).
    annotation : str
        File-name pattern of the annotation to import (one file per run must match).

    Returns
    -------
    list of PortalRun
        Sorted by name.
    """
    folders = item_folders(root, "Data Portal runs", lambda d: any(p.suffix == ".zarr" for p in d.iterdir()),
                           lambda d: d.suffix == ".zarr")
    return [_read_run(d, d.name, pixel_size_A, annotation) for d in folders]


def dose_symmetric_tilts(tilt_range: list[float], dose_per_tilt: float) -> tuple[np.ndarray, np.ndarray]:
    """Tilt angles of a range and the dose before each, taken in dose-symmetric order.

    Parameters
    ----------
    tilt_range : list of float
        ``MIN, MAX, STEP`` [deg].
    dose_per_tilt : float
        Dose of each image [e⁻/Å²].

    Returns
    -------
    tilts_deg, pre_exposure : numpy.ndarray
        (n,) angles in increasing order and the dose received before each image (by increasing
        |θ|, positive before negative).
    """
    if len(tilt_range) != 3 or tilt_range[2] <= 0 or tilt_range[1] < tilt_range[0]:
        raise SubtomoError(f"--tilt-range {tilt_range}: give MIN,MAX,STEP [deg] with MIN <= MAX and STEP > 0.")
    lo, hi, step = tilt_range
    tilts = lo + step * np.arange(int(np.floor((hi - lo) / step + 1e-6)) + 1)
    order = np.lexsort((-tilts, np.abs(tilts)))
    pre = np.empty_like(tilts)
    pre[order] = dose_per_tilt * np.arange(len(tilts))
    return tilts, pre


def write_portal_layout(run: PortalRun, tomograms_dir: Path, tilts_deg: np.ndarray | None,
                        pre_exposure: np.ndarray | None) -> Path:
    """Make ``<tomograms_dir>/<name>/``: the chosen level as ``<name>.zarr`` (linked), ``.coords``, ``.tlt``, ``.order``.

    Parameters
    ----------
    run : PortalRun
        The run.
    tomograms_dir : Path
        The project's ``Tomograms`` folder.
    tilts_deg, pre_exposure : numpy.ndarray or None
        Tilt angles [deg] and the dose before each [e⁻/Å²]; None: no ``.tlt``/``.order``.

    Returns
    -------
    Path
        The new directory.
    """
    d = tomograms_dir / run.name
    group = d / f"{run.name}.zarr"
    group.mkdir(parents=True)
    os.symlink(os.path.relpath((run.zarr / run.level).resolve(), group), group / "0")
    scale = {"type": "scale", "scale": [run.pixel_size_A] * 3}
    ms = [{"version": "0.4", "axes": [{"name": a, "type": "space", "unit": "angstrom"} for a in "zyx"],
           "datasets": [{"path": "0", "coordinateTransformations": [scale]}]}]
    if (run.zarr / "zarr.json").is_file():  # zarr format 3
        meta = {"zarr_format": 3, "node_type": "group", "attributes": {"ome": {"version": "0.5", "multiscales": ms}}}
        (group / "zarr.json").write_text(json.dumps(meta))
    else:
        (group / ".zgroup").write_text(json.dumps({"zarr_format": 2}))
        (group / ".zattrs").write_text(json.dumps({"multiscales": ms}))
    write_text_rows(d / f"{run.name}.coords", run.picks.coords_px, fmt="%.3f")
    if tilts_deg is not None and pre_exposure is not None:
        write_text_rows(d / f"{run.name}.tlt", tilts_deg, fmt="%.3f")
        rank = np.argsort(pre_exposure, kind="stable")
        write_text_rows(d / f"{run.name}.order", np.stack([tilts_deg[rank], pre_exposure[rank]], 1), fmt="%.3f")
    return d
