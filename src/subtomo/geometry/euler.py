"""RELION's ZYZ Euler angles and rotation matrices.

Convention (RELION ``Euler_angles2matrix``; written down in docs/conventions.md):
angles (rot, tilt, psi) in degrees give

    A = Rz(psi) @ Ry(tilt) @ Rz(rot),
    Rz(a) = [[cos a, sin a, 0], [-sin a, cos a, 0], [0, 0, 1]],
    Ry(a) = [[cos a, 0, -sin a], [0, 1, 0], [sin a, 0, cos a]].

A particle is the reference rotated by A: particle(r) = reference(A^T r) for r = (x, y, z)
column vectors about the box centre; in Fourier space the particle's transform at k is
the reference's transform at A^T k. The projection direction in reference coordinates is
A^T e_z. Matrices act on (x, y, z) vectors even though arrays are stored (z, y, x).
"""

from __future__ import annotations

import numpy as np
import torch


def euler_to_matrix(rot_deg, tilt_deg, psi_deg) -> np.ndarray:
    """RELION's rotation matrix A for ZYZ Euler angles.

    Parameters
    ----------
    rot_deg, tilt_deg, psi_deg : array_like
        Angles [deg]; broadcast against each other to a shape (...).

    Returns
    -------
    numpy.ndarray
        (..., 3, 3) float64, A = Rz(psi) Ry(tilt) Rz(rot) (module docstring).
    """
    a, b, g = (np.deg2rad(np.asarray(v, dtype=np.float64)) for v in (rot_deg, tilt_deg, psi_deg))
    a, b, g = np.broadcast_arrays(a, b, g)
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    m = np.empty(a.shape + (3, 3))
    m[..., 0, 0] = cg * cb * ca - sg * sa
    m[..., 0, 1] = cg * cb * sa + sg * ca
    m[..., 0, 2] = -cg * sb
    m[..., 1, 0] = -sg * cb * ca - cg * sa
    m[..., 1, 1] = -sg * cb * sa + cg * ca
    m[..., 1, 2] = sg * sb
    m[..., 2, 0] = sb * ca
    m[..., 2, 1] = sb * sa
    m[..., 2, 2] = cb
    return m


def matrix_to_euler(matrix) -> np.ndarray:
    """Invert :func:`euler_to_matrix`.

    Parameters
    ----------
    matrix : array_like
        (..., 3, 3) rotation matrices.

    Returns
    -------
    numpy.ndarray
        (..., 3) float64 (rot, tilt, psi) [deg]; tilt in [0, 180]. At tilt 0 or 180 all
        in-plane rotation goes to psi (rot = 0), as RELION's ``Euler_matrix2angles`` does.
    """
    m = np.asarray(matrix, dtype=np.float64)
    sin_tilt = np.sqrt(m[..., 0, 2] ** 2 + m[..., 1, 2] ** 2)
    tilt = np.arctan2(sin_tilt, m[..., 2, 2])
    regular = sin_tilt > 1e-6
    rot = np.where(regular, np.arctan2(m[..., 2, 1], m[..., 2, 0]), 0.0)
    psi = np.where(regular, np.arctan2(m[..., 1, 2], -m[..., 0, 2]),
                   np.arctan2(-m[..., 1, 0], m[..., 0, 0] * np.sign(np.where(m[..., 2, 2] == 0, 1, m[..., 2, 2]))))
    # tilt = 180: A = Rz(psi) Ry(180) -> A00 = -cos psi, A10 = sin psi
    flipped = (~regular) & (m[..., 2, 2] < 0)
    psi = np.where(flipped, np.arctan2(m[..., 1, 0], -m[..., 0, 0]), psi)
    return np.rad2deg(np.stack([rot, tilt, psi], axis=-1))


def euler_to_matrix_torch(angles_deg: torch.Tensor) -> torch.Tensor:
    """Batched torch version of :func:`euler_to_matrix`.

    Parameters
    ----------
    angles_deg : torch.Tensor
        (..., 3) (rot, tilt, psi) [deg], any device and float dtype.

    Returns
    -------
    torch.Tensor
        (..., 3, 3) matrices on the same device and dtype.
    """
    a, b, g = torch.deg2rad(angles_deg).unbind(-1)
    ca, sa, cb, sb, cg, sg = a.cos(), a.sin(), b.cos(), b.sin(), g.cos(), g.sin()
    rows = [
        cg * cb * ca - sg * sa, cg * cb * sa + sg * ca, -cg * sb,
        -sg * cb * ca - cg * sa, -sg * cb * sa + cg * ca, sg * sb,
        sb * ca, sb * sa, cb,
    ]
    return torch.stack(rows, dim=-1).reshape(*angles_deg.shape[:-1], 3, 3)


def angular_distance_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angle of the rotation that takes ``b`` to ``a``.

    Parameters
    ----------
    a, b : numpy.ndarray
        (..., 3, 3) rotation matrices (broadcast).

    Returns
    -------
    numpy.ndarray
        (...) rotation angle of a b^T [deg], in [0, 180].
    """
    r = np.einsum("...ij,...kj->...ik", a, b)
    cos = (np.trace(r, axis1=-2, axis2=-1) - 1.0) / 2.0
    return np.rad2deg(np.arccos(np.clip(cos, -1.0, 1.0)))


def random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """Draw rotation matrices uniformly on SO(3) (from uniform unit quaternions).

    Parameters
    ----------
    n : int
        How many.
    rng : numpy.random.Generator
        Source of randomness (reproducible with a seeded generator).

    Returns
    -------
    numpy.ndarray
        (n, 3, 3) float64.
    """
    q = rng.normal(size=(n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], axis=-2)
