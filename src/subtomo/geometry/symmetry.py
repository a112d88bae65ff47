"""Point-group symmetry operators C_n, D_n, T, O, I in RELION's orientations.

RELION's axis conventions (``src/symmetries.cpp``): C_n about z; D_n adds a 2-fold
about x; T has a 3-fold about z and a 2-fold about (0, 0.816497, 0.577350); O has a
4-fold about z and a 3-fold about (1, 1, 1)/sqrt 3; I (= RELION's I2, Crowther) has a
2-fold about z, a 5-fold about (0.525731, 0, 0.850651) and a 3-fold about
(0, 0.356822, 0.934172). The group is the closure of these generators.
"""

from __future__ import annotations

import re

import numpy as np

from subtomo.errors import SubtomoError


def axis_rotation(axis, angle_rad: float) -> np.ndarray:
    """Right-handed rotation about an axis (Rodrigues' formula).

    Parameters
    ----------
    axis : array_like
        (3,) axis direction (x, y, z); need not be normalised.
    angle_rad : float
        Angle [rad].

    Returns
    -------
    numpy.ndarray
        (3, 3) float64.
    """
    k = np.asarray(axis, dtype=np.float64)
    k = k / np.linalg.norm(k)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(angle_rad) * kx + (1 - np.cos(angle_rad)) * kx @ kx


def symmetry_generators(name: str) -> list[np.ndarray]:
    """Generators of a point group, in RELION's standard orientation.

    Parameters
    ----------
    name : str
        C<n>, D<n>, T, O or I (I2 orientation); case-insensitive.

    Returns
    -------
    list of numpy.ndarray
        (3, 3) rotation matrices whose closure is the group.

    Raises
    ------
    SubtomoError
        Unknown group name.
    """
    sym = name.strip().upper()
    m = re.fullmatch(r"([CD])(\d+)", sym)
    if m:
        n = int(m.group(2))
        if n < 1:
            raise SubtomoError(f"symmetry {name!r}: the order must be at least 1 (e.g. C1, C7, D7).")
        gens = [axis_rotation((0, 0, 1), 2 * np.pi / n)]
        if m.group(1) == "D":
            gens.append(axis_rotation((1, 0, 0), np.pi))
        return gens
    if sym == "T":
        return [axis_rotation((0, 0, 1), 2 * np.pi / 3), axis_rotation((0, 0.816496, 0.577350), np.pi)]
    if sym == "O":
        return [axis_rotation((0, 0, 1), np.pi / 2), axis_rotation((1, 1, 1), 2 * np.pi / 3)]
    if sym in ("I", "I2"):
        return [
            axis_rotation((0, 0, 1), np.pi),
            axis_rotation((0.525731114, 0, 0.850650807), 2 * np.pi / 5),
            axis_rotation((0, 0.356822076, 0.934172364), 2 * np.pi / 3),
        ]
    raise SubtomoError(f"symmetry {name!r} is not known. Use C<n>, D<n>, T, O or I (RELION's I2 orientation).")


def symmetry_matrices(name: str) -> np.ndarray:
    """All operators of a point group.

    Parameters
    ----------
    name : str
        As for :func:`symmetry_generators`.

    Returns
    -------
    numpy.ndarray
        (order, 3, 3) float64, the identity first.
    """
    gens = symmetry_generators(name)
    group = [np.eye(3)]
    frontier = [np.eye(3)]
    while frontier:
        new = []
        for g in frontier:
            for h in gens:
                cand = h @ g
                if not any(np.allclose(cand, e, atol=1e-5) for e in group):
                    group.append(cand)
                    new.append(cand)
        frontier = new
        if len(group) > 120:
            raise RuntimeError(f"symmetry {name}: generators do not close (bug)")
    return np.stack(group)
