"""Single-axis tilt geometry (IMOD convention: tilt axis = y), see docs/conventions.md.

A tomogram voxel coordinate ``c`` (pixels, IMOD origin) sits at ``r_t = (c - size/2) * p``
Å from the tomogram centre. In the image at tilt θ it appears at
``x_img = x_t cosθ + z_t sinθ``, ``y_img = y_t`` and lies at height ``h = -x_t sinθ + z_t cosθ``
along the beam (the beam travels towards +h).
"""

from __future__ import annotations

import numpy as np


def specimen_coordinates_A(coords_px, tomo_size_xyz, pixel_size_A: float) -> np.ndarray:
    """Tomogram voxel coordinates as positions relative to the tomogram centre.

    Parameters
    ----------
    coords_px : array_like
        (n, 3) (x, y, z) [px], IMOD origin.
    tomo_size_xyz : array_like
        (3,) tomogram size (x, y, z) [px].
    pixel_size_A : float
        Tomogram pixel size [Å].

    Returns
    -------
    numpy.ndarray
        (n, 3) float64 [Å].
    """
    coords = np.asarray(coords_px, dtype=np.float64).reshape(-1, 3)
    return (coords - np.asarray(tomo_size_xyz, dtype=np.float64) / 2.0) * pixel_size_A


def project_to_tilt(r_t_A, tilt_deg) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where specimen points appear in each tilt image, and their height along the beam.

    Parameters
    ----------
    r_t_A : array_like
        (n, 3) positions relative to the tomogram centre [Å].
    tilt_deg : array_like
        (t,) tilt angles [deg].

    Returns
    -------
    x_img, y_img, h : numpy.ndarray
        Each (n, t) [Å]: image position and height along the beam (the beam travels towards +h).
    """
    r = np.asarray(r_t_A, dtype=np.float64).reshape(-1, 3)
    theta = np.deg2rad(np.atleast_1d(np.asarray(tilt_deg, dtype=np.float64)))
    c, s = np.cos(theta)[None, :], np.sin(theta)[None, :]
    x, y, z = r[:, 0:1], r[:, 1:2], r[:, 2:3]
    x_img = x * c + z * s
    h = -x * s + z * c
    return x_img, np.broadcast_to(y, x_img.shape).copy(), h


def beam_direction(tilt_deg) -> np.ndarray:
    """Unit beam direction n_θ = (-sinθ, 0, cosθ) in tomogram coordinates.

    Parameters
    ----------
    tilt_deg : array_like
        (t,) tilt angles [deg].

    Returns
    -------
    numpy.ndarray
        (t, 3) float64 (x, y, z) directions.
    """
    theta = np.deg2rad(np.atleast_1d(np.asarray(tilt_deg, dtype=np.float64)))
    return np.stack([-np.sin(theta), np.zeros_like(theta), np.cos(theta)], axis=-1)
