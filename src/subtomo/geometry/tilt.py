"""Single-axis tilt geometry (IMOD convention: tilt axis = y), see docs/conventions.md.

A tomogram voxel coordinate ``c`` (pixels, IMOD origin) sits at ``r_t = (c - size/2) * p``
Å from the tomogram centre. In the image at tilt θ it appears at
``x_img = x_t cosθ + z_t sinθ``, ``y_img = y_t`` and lies at height ``h = -x_t sinθ + z_t cosθ``
along the beam (the beam travels towards +h).
"""

from __future__ import annotations

import numpy as np


def specimen_coordinates_A(coords_px, tomo_size_xyz, pixel_size_A: float) -> np.ndarray:
    """(n, 3) tomogram coordinates (x, y, z px) -> Å relative to the tomogram centre."""
    coords = np.asarray(coords_px, dtype=np.float64).reshape(-1, 3)
    return (coords - np.asarray(tomo_size_xyz, dtype=np.float64) / 2.0) * pixel_size_A


def project_to_tilt(r_t_A, tilt_deg) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image position (x_img, y_img) and beam height h (Å) of points ``r_t_A`` (n, 3) at tilts (t,).

    Returns three (n, t) arrays.
    """
    r = np.asarray(r_t_A, dtype=np.float64).reshape(-1, 3)
    theta = np.deg2rad(np.atleast_1d(np.asarray(tilt_deg, dtype=np.float64)))
    c, s = np.cos(theta)[None, :], np.sin(theta)[None, :]
    x, y, z = r[:, 0:1], r[:, 1:2], r[:, 2:3]
    x_img = x * c + z * s
    h = -x * s + z * c
    return x_img, np.broadcast_to(y, x_img.shape).copy(), h


def beam_direction(tilt_deg) -> np.ndarray:
    """Unit beam direction n_θ = (-sinθ, 0, cosθ) in tomogram (x, y, z) for each tilt: (t, 3)."""
    theta = np.deg2rad(np.atleast_1d(np.asarray(tilt_deg, dtype=np.float64)))
    return np.stack([-np.sin(theta), np.zeros_like(theta), np.cos(theta)], axis=-1)
