"""HEALPix directions in the NEST scheme (own implementation of the published formulas).

Górski et al. 2005 (ApJ 622:759): N_side = 2^order, 12 N_side^2 equal-area pixels; a NEST
index is face * N_side^2 + the bit-interleaved (x, y) position inside the base face. The
pixel centre follows from the ring index and the position along the ring. Children of a
pixel p at order o are 4p .. 4p+3 at order o+1 (the NEST property RELION's oversampling
uses). Directions are returned as (rot, tilt) = (phi, arccos z) in degrees, RELION's
``HealpixSampling::getDirectionFromHealPix``.
"""

from __future__ import annotations

import numpy as np

_JRLL = np.array([2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4])
_JPLL = np.array([1, 3, 5, 7, 0, 2, 4, 6, 1, 3, 5, 7])


def n_pixels(order: int) -> int:
    """Number of HEALPix pixels (directions) at ``order``.

    Parameters
    ----------
    order : int
        HEALPix order.

    Returns
    -------
    int
        12 * 4^order.
    """
    return 12 * 4 ** order


def angular_step_deg(order: int) -> float:
    """RELION's angular sampling of a HEALPix order.

    Parameters
    ----------
    order : int
        HEALPix order.

    Returns
    -------
    float
        360 / (6 * 2^order) [deg].
    """
    return 360.0 / (6 * 2 ** order)


def _deinterleave(v: np.ndarray) -> np.ndarray:
    """Bits 0, 2, 4, ... of v packed together."""
    out = np.zeros_like(v)
    for bit in range(20):
        out |= ((v >> (2 * bit)) & 1) << bit
    return out


def pix2vec_nest(order: int, pix: np.ndarray | None = None) -> np.ndarray:
    """Unit vectors of NEST pixel centres.

    Parameters
    ----------
    order : int
        HEALPix order.
    pix : numpy.ndarray, optional
        (n,) pixel indices; all pixels if None.

    Returns
    -------
    numpy.ndarray
        (n, 3) unit vectors (x, y, z).
    """
    nside = 2 ** order
    pix = np.arange(n_pixels(order), dtype=np.int64) if pix is None else np.asarray(pix, dtype=np.int64)
    npface = nside * nside
    face = pix // npface
    ipf = pix % npface
    ix = _deinterleave(ipf)
    iy = _deinterleave(ipf >> 1)
    jr = _JRLL[face] * nside - ix - iy - 1  # ring index 1 .. 4 nside - 1
    nr = np.where(jr < nside, jr, np.where(jr > 3 * nside, 4 * nside - jr, nside))
    z = np.where(jr < nside, 1.0 - nr ** 2 / (3.0 * npface),
                 np.where(jr > 3 * nside, -1.0 + nr ** 2 / (3.0 * npface), (2 * nside - jr) * 2.0 / (3.0 * nside)))
    kshift = np.where((jr >= nside) & (jr <= 3 * nside), (jr - nside) & 1, 0)
    jp = (_JPLL[face] * nr + ix - iy + 1 + kshift) // 2
    jp = np.where(jp > 4 * nside, jp - 4 * nside, jp)
    jp = np.where(jp < 1, jp + 4 * nside, jp)
    phi = (jp - (kshift + 1) * 0.5) * (np.pi / 2) / nr
    s = np.sqrt(np.clip(1.0 - z * z, 0.0, None))
    return np.stack([s * np.cos(phi), s * np.sin(phi), z], axis=-1)


def pix2ang_nest(order: int, pix: np.ndarray | None = None) -> np.ndarray:
    """RELION angles of NEST pixel centres: rot = phi, tilt = arccos(z).

    Parameters
    ----------
    order : int
        HEALPix order.
    pix : numpy.ndarray, optional
        (n,) pixel indices; all pixels if None.

    Returns
    -------
    numpy.ndarray
        (n, 2) (rot, tilt) [deg].
    """
    v = pix2vec_nest(order, pix)
    rot = np.rad2deg(np.arctan2(v[:, 1], v[:, 0]))
    tilt = np.rad2deg(np.arccos(np.clip(v[:, 2], -1, 1)))
    return np.stack([rot, tilt], axis=-1)


def children(pix: np.ndarray, levels: int = 1) -> np.ndarray:
    """NEST children of pixels ``levels`` orders finer.

    Parameters
    ----------
    pix : numpy.ndarray
        (n,) pixel indices.
    levels : int
        Orders finer.

    Returns
    -------
    numpy.ndarray
        (n, 4**levels) pixel indices.
    """
    pix = np.asarray(pix, dtype=np.int64)
    m = 4 ** levels
    return pix[:, None] * m + np.arange(m)[None, :]


def asymmetric_unit_mask(vectors: np.ndarray, sym_matrices: np.ndarray) -> np.ndarray:
    """Keep one direction per symmetry orbit (the Dirichlet domain of a generic point).

    Pose A and A g (g in the group) are equivalent, and the projection direction of A g is
    g^T A^T e_z, so directions d and g^T d are equivalent. A direction is kept when no
    equivalent g^T d lies closer to a fixed generic direction u (ties are kept).

    Parameters
    ----------
    vectors : numpy.ndarray
        (n, 3) unit direction vectors (x, y, z) (e.g. :func:`pix2vec_nest`).
    sym_matrices : numpy.ndarray
        (G, 3, 3) group operators, the identity first
        (:func:`subtomo.geometry.symmetry.symmetry_matrices`).

    Returns
    -------
    numpy.ndarray
        (n,) bool, True for the directions in the asymmetric unit; all True for G <= 1.
    """
    if len(sym_matrices) <= 1:
        return np.ones(len(vectors), dtype=bool)
    u = np.array([0.1234, 0.2345, 0.9641])
    u /= np.linalg.norm(u)
    # g^T d for all g: (G, n, 3)
    eq = np.einsum("gji,nj->gni", sym_matrices, vectors)
    dots = eq @ u  # (G, n)
    return dots[0] >= dots.max(axis=0) - 1e-9
