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
    """RELION's A for angles in degrees; broadcasts, returns (..., 3, 3) float64."""
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
    """Inverse of :func:`euler_to_matrix`: (..., 3, 3) -> (..., 3) of (rot, tilt, psi) degrees.

    tilt is in [0, 180]; at tilt = 0 or 180 all in-plane rotation goes to psi (rot = 0),
    as RELION's ``Euler_matrix2angles`` does.
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
    """Batched torch version of :func:`euler_to_matrix`: (..., 3) degrees -> (..., 3, 3)."""
    a, b, g = torch.deg2rad(angles_deg).unbind(-1)
    ca, sa, cb, sb, cg, sg = a.cos(), a.sin(), b.cos(), b.sin(), g.cos(), g.sin()
    rows = [
        cg * cb * ca - sg * sa, cg * cb * sa + sg * ca, -cg * sb,
        -sg * cb * ca - cg * sa, -sg * cb * sa + cg * ca, sg * sb,
        sb * ca, sb * sa, cb,
    ]
    return torch.stack(rows, dim=-1).reshape(*angles_deg.shape[:-1], 3, 3)


def angular_distance_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Rotation angle (degrees) of a @ b^T for (..., 3, 3) matrices."""
    r = np.einsum("...ij,...kj->...ik", a, b)
    cos = (np.trace(r, axis1=-2, axis2=-1) - 1.0) / 2.0
    return np.rad2deg(np.arccos(np.clip(cos, -1.0, 1.0)))


def random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """n rotation matrices uniform on SO(3) (from uniform unit quaternions)."""
    q = rng.normal(size=(n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], axis=-2)
