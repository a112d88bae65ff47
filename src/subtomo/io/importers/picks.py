"""Picks: positions and orientations from another program, in our conventions.

Every reader in :mod:`subtomo.io.importers` returns :class:`Picks`, and every writer takes
one, so the conventions of a format live in its own module only. Here, in ours:

* positions are tomogram pixels with voxel index ``k`` at coordinate ``k`` (array index
  ``[z, y, x]`` = coordinate ``(x, y, z)``, ``docs/conventions.md``), at ``pixel_size_A``;
* orientations are RELION matrices ``A`` (particle = reference rotated by ``A``), acting
  on ``(x, y, z)`` column vectors.

:meth:`Picks.to_particles` makes the :class:`~subtomo.io.particles.ParticleSet` that the
rest of subtomo reads: ``rlnTomoName``, ``rlnCoordinateX/Y/Z`` and, where orientations are
known, ``rlnAngleRot/Tilt/Psi`` together with the same values as priors
(``rlnAngle{Rot,Tilt,Psi}Prior``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
from scipy.spatial.transform import Rotation

from subtomo.errors import SubtomoError
from subtomo.geometry.euler import euler_to_matrix, matrix_to_euler
from subtomo.io.particles import ANGLE_COLUMNS, ORIGIN_A_COLUMNS, ParticleSet
from subtomo.io.relion import TOMOGRAM_PIXEL_SIZE

PRIOR_COLUMNS = ("rlnAngleRotPrior", "rlnAngleTiltPrior", "rlnAnglePsiPrior")
COORD_COLUMNS = ("rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ")
#: Columns of a particles STAR that ``prepare --particles`` carries onto its rows (orientations as priors).
CARRIED_COLUMNS = ANGLE_COLUMNS + PRIOR_COLUMNS + ("rlnRandomSubset", "rlnClassNumber", "rlnAutopickFigureOfMerit")


@dataclass(frozen=True)
class Picks:
    """Particle positions (and orientations) in our conventions.

    Attributes
    ----------
    tomo : numpy.ndarray
        Tomogram name of each pick, shape (n,), str.
    coords_px : numpy.ndarray
        Positions (x, y, z) [px], shape (n, 3), voxel index k at coordinate k.
    rotations : numpy.ndarray or None
        RELION matrices A, shape (n, 3, 3); None when the source has no orientations.
    scores : numpy.ndarray or None
        The source's score per pick (cross-correlation, LCC), shape (n,).
    halves : numpy.ndarray or None
        Gold-standard half-set (1 or 2) per pick, shape (n,).
    classes : numpy.ndarray or None
        Class number per pick, shape (n,).
    pixel_size_A : float or None
        Pixel size the positions are given at [Å], when the source records it.
    """

    tomo: np.ndarray
    coords_px: np.ndarray
    rotations: np.ndarray | None = None
    scores: np.ndarray | None = None
    halves: np.ndarray | None = None
    classes: np.ndarray | None = None
    pixel_size_A: float | None = None

    def __len__(self) -> int:
        return len(self.coords_px)

    def rotations_or_identity(self) -> np.ndarray:
        """The orientations, or identity matrices when the picks have none: (n, 3, 3) float64."""
        if self.rotations is not None:
            return np.asarray(self.rotations, dtype=np.float64)
        return np.broadcast_to(np.eye(3), (len(self), 3, 3))

    def scaled(self, factor: float, pixel_size_A: float | None) -> "Picks":
        """The picks with positions multiplied by ``factor`` (coordinates at another pixel size).

        Parameters
        ----------
        factor : float
            Old pixel size / new pixel size. Positions are multiplied, as RELION scales
            coordinates with binning (tomogram centres ``size / 2`` stay centres).
        pixel_size_A : float or None
            The new pixel size [Å].

        Returns
        -------
        Picks
        """
        return replace(self, coords_px=self.coords_px * factor, pixel_size_A=pixel_size_A)

    def to_particles(self, pixel_size_A: float | None = None) -> ParticleSet:
        """The picks as a particle set (one optics group; priors = the given angles).

        Parameters
        ----------
        pixel_size_A : float, optional
            Pixel size of the positions [Å]; default: the source's.

        Returns
        -------
        ParticleSet
        """
        table = pd.DataFrame({"rlnTomoName": self.tomo.astype(str)})
        for j, c in enumerate(COORD_COLUMNS):
            table[c] = self.coords_px[:, j]
        table["rlnTomoParticleId"] = np.arange(1, len(self) + 1)
        if self.rotations is not None:
            angles = matrix_to_euler(self.rotations)
            for j, (c, prior) in enumerate(zip(ANGLE_COLUMNS, PRIOR_COLUMNS)):
                table[c] = angles[:, j]
                table[prior] = angles[:, j]
        for label, values in (("rlnAutopickFigureOfMerit", self.scores), ("rlnRandomSubset", self.halves),
                              ("rlnClassNumber", self.classes)):
            if values is not None:
                table[label] = values
        table["rlnOpticsGroup"] = 1
        optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"]})
        px = pixel_size_A if pixel_size_A is not None else self.pixel_size_A
        if px is not None:
            optics["rlnImagePixelSize"] = float(px)
            optics["subtomoTomogramPixelSize"] = float(px)
        return ParticleSet.from_table(table, optics)


def picks_from_particles(particles: ParticleSet, default_tomo: str = "tomo") -> Picks:
    """Our particles as picks: position = coordinate − origin [px] (RELION's meaning of the origin).

    Parameters
    ----------
    particles : ParticleSet
        Rows with rlnCoordinateX/Y/Z [px]; rlnTomoName (else ``default_tomo``); angles optional.
    default_tomo : str
        Tomogram name for sets without rlnTomoName.

    Returns
    -------
    Picks
    """
    table = particles.table
    missing = [c for c in COORD_COLUMNS if c not in table.columns]
    if missing:
        raise SubtomoError(f"{particles.name}: no {', '.join(missing)} column(s); only particles with tomogram "
                           "coordinates can be exported. Give the particles STAR of prepare, extract or refine3d.")
    coords = table[list(COORD_COLUMNS)].to_numpy(np.float64) - particles.offsets_px()
    tomo = table["rlnTomoName"].astype(str).to_numpy() if "rlnTomoName" in table.columns \
        else np.full(len(table), default_tomo)
    px: float | None
    try:
        px = particles.pixel_size_A
    except SubtomoError:
        px = None
    halves = particles.halves()
    return Picks(tomo=tomo, coords_px=coords, rotations=particles.rotations(), halves=halves, pixel_size_A=px)


def relion_angles_to_matrices(rot: np.ndarray, tilt: np.ndarray, psi: np.ndarray) -> np.ndarray:
    """RELION Euler angles to matrices A.

    Parameters
    ----------
    rot, tilt, psi : numpy.ndarray
        Angles [deg], each shape (n,).

    Returns
    -------
    numpy.ndarray
        Matrices A, shape (n, 3, 3).
    """
    return euler_to_matrix(np.asarray(rot, np.float64), np.asarray(tilt, np.float64), np.asarray(psi, np.float64))


def require_columns(table: pd.DataFrame, columns: tuple[str, ...] | list[str], source: object, fix: str) -> None:
    """Raise SubtomoError naming ``source`` when a column of ``columns`` is missing from ``table``.

    Parameters
    ----------
    table : pandas.DataFrame
        The table read from ``source``.
    columns : sequence of str
        Required column names.
    source : object
        The file (for the message).
    fix : str
        What the user should do.
    """
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise SubtomoError(f"{source}: missing column(s) {', '.join(missing)}. {fix}")


def check_finite(values: np.ndarray, source: object, what: str) -> np.ndarray:
    """``values`` as float64, or SubtomoError naming the first row (1-based) with a non-number.

    Parameters
    ----------
    values : numpy.ndarray
        Shape (n, ...).
    source : object
        The file (for the message).
    what : str
        What the values are.

    Returns
    -------
    numpy.ndarray
        ``values`` as float64, same shape.
    """
    values = np.asarray(values, dtype=np.float64)
    bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0]) + 1
        raise SubtomoError(f"{source}: row {row} has a missing or non-numeric {what}. Fix or remove that row.")
    return values


def zxz_to_matrices(first_deg: np.ndarray, second_deg: np.ndarray, third_deg: np.ndarray) -> np.ndarray:
    """Rotation matrices ``Rz(third) Rx(second) Rz(first)`` (counter-clockwise ``R``).

    The Euler scheme of Dynamo (tdrot, tilt, narot) and of TOM/AV3/STOPGAP (phi, the, psi):
    rotate by ``first`` about z, then ``second`` about the fixed x, then ``third`` about the
    fixed z (scipy's extrinsic ``"zxz"``).

    Parameters
    ----------
    first_deg, second_deg, third_deg : numpy.ndarray
        Angles [deg], each shape (n,).

    Returns
    -------
    numpy.ndarray
        Shape (n, 3, 3), acting on (x, y, z) column vectors.
    """
    angles = np.stack([np.asarray(v, np.float64) for v in (first_deg, second_deg, third_deg)], axis=-1)
    return Rotation.from_euler("zxz", angles.reshape(-1, 3), degrees=True).as_matrix()


def matrices_to_zxz(matrices: np.ndarray) -> np.ndarray:
    """Invert :func:`zxz_to_matrices`.

    Parameters
    ----------
    matrices : numpy.ndarray
        Rotation matrices, shape (n, 3, 3).

    Returns
    -------
    numpy.ndarray
        (first, second, third) [deg], shape (n, 3), second in [0, 180].
    """
    return Rotation.from_matrix(np.asarray(matrices, np.float64).reshape(-1, 3, 3)).as_euler("zxz", degrees=True)


def matrices_to_relion(matrices: np.ndarray) -> np.ndarray:
    """RELION Euler angles of matrices A.

    Parameters
    ----------
    matrices : numpy.ndarray
        Matrices A, shape (n, 3, 3).

    Returns
    -------
    numpy.ndarray
        (rot, tilt, psi) [deg], shape (n, 3).
    """
    return matrix_to_euler(np.asarray(matrices, np.float64).reshape(-1, 3, 3))


def _coords_pixel_sizes(particles: ParticleSet) -> np.ndarray | None:
    """Per-particle pixel size of the coordinates [Å]: subtomoTomogramPixelSize, else the images' (None: unknown)."""
    merged = particles.merged()
    if TOMOGRAM_PIXEL_SIZE in merged.columns and merged[TOMOGRAM_PIXEL_SIZE].notna().all():
        return merged[TOMOGRAM_PIXEL_SIZE].to_numpy(np.float64)
    try:
        return particles.pixel_sizes_A()
    except SubtomoError:
        return None


def picks_per_tomogram(particles: ParticleSet, pixel_sizes_A: dict[str, float]
                       ) -> dict[str, tuple[np.ndarray, pd.DataFrame]]:
    """Positions and orientations of a particles STAR, split by tomogram (``prepare --particles``).

    Positions are ``rlnCoordinate − rlnOrigin`` rescaled to each tomogram's pixel size;
    angles become priors too (``rlnAngle*Prior`` = ``rlnAngle*`` where the file has no priors).

    Parameters
    ----------
    particles : ParticleSet
        E.g. ``particles.star`` of ``subtomo import-particles`` (rlnTomoName, rlnCoordinateX/Y/Z).
    pixel_sizes_A : dict
        Tomogram name → its pixel size [Å]: the tomograms the particles may belong to.

    Returns
    -------
    dict
        Tomogram name → ((n, 3) positions [px], (n, k) table of the :data:`CARRIED_COLUMNS` present),
        for every tomogram of ``pixel_sizes_A`` (empty where the file lists none).

    Raises
    ------
    SubtomoError
        Missing coordinates, no rlnTomoName with several tomograms, or names of no tomogram.
    """
    table = particles.table.reset_index(drop=True)
    fix = "Give the particles.star of subtomo import-particles (rlnTomoName, rlnCoordinateX/Y/Z)."
    require_columns(table, COORD_COLUMNS, particles.name, fix)
    if "rlnTomoName" in table.columns:
        names = table["rlnTomoName"].astype(str).to_numpy()
    elif len(pixel_sizes_A) == 1:
        names = np.full(len(table), next(iter(pixel_sizes_A)))
    else:
        raise SubtomoError(f"{particles.name}: no rlnTomoName column, and the tomogram table lists {len(pixel_sizes_A)} "
                           f"tomograms. {fix}")
    unknown = sorted(set(names.tolist()) - set(pixel_sizes_A))
    if unknown:
        raise SubtomoError(f"{particles.name}: rlnTomoName {', '.join(unknown)} is no tomogram of the input table "
                           f"(which has {', '.join(sorted(pixel_sizes_A))}). Use the tomograms' names "
                           "(import-particles --tomo-names) or give the matching tomogram table (--i).")
    coords = check_finite(table[list(COORD_COLUMNS)].to_numpy(), particles.name, "coordinate")
    extras = table[[c for c in CARRIED_COLUMNS if c in table.columns]].copy()
    for angle, prior in zip(ANGLE_COLUMNS, PRIOR_COLUMNS):
        if angle in extras.columns and prior not in extras.columns:
            extras[prior] = extras[angle]
    source_px = _coords_pixel_sizes(particles)
    out = {}
    for name, px in pixel_sizes_A.items():
        sel = names == name
        c = coords[sel] * (source_px[sel, None] / px if source_px is not None else 1.0)
        if all(o in table.columns for o in ORIGIN_A_COLUMNS):
            c = c - table.loc[sel, list(ORIGIN_A_COLUMNS)].to_numpy(np.float64) / px
        out[name] = (c, extras[sel].reset_index(drop=True))
    return out
