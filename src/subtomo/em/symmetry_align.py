"""Align a map's symmetry axes with the standard frame of its point group (like relion_align_symmetry).

Used by the symmetric de novo route of refine3d: refine in C1 from random orientations, put
the C1 map's symmetry axes along the group's standard axes, then refine with the symmetry
imposed from that map.

Convention. The group's operators are those of :func:`subtomo.geometry.symmetry.symmetry_matrices`
(RELION's orientations: C_n/D_n n-fold along z, D_n 2-fold along x, T/O/I as defined there).
The result (R, shift) moves the input map V so that

    aligned(r) = V(R^T r - shift)        (r in px about the box centre N//2, (x, y, z))

i.e. the content is first translated by ``shift`` (the symmetry centre lands on the box
centre) and then rotated by R in the particle convention (``subtomo.em.refine.rotate_map``:
out(r) = vol(A^T r)). Then aligned(g r) = aligned(r) for every group operator g. Any g R
(g in the group; for D_n also a rotation by 180/n deg about z) is an equally valid answer.
A particle with pose A and origin o relative to V has pose A R^T and origin o + A shift
relative to the aligned map.

Method. The map's contrast is protein-positive (as refine3d writes it). The map is low-passed
(``lowpass_A``) and Fourier-cropped to a small box with Nyquist = lowpass / 2 (at most
``search_box``, 32); the search starts from the centre of mass of its positive density. A
candidate (R, c) (c = the symmetry centre in V, = -shift) is scored from trilinear samples
(``grid_sample``, all candidates of a chunk in one call) of V at R^T g r + c, r in a sphere:
in the search the mean over the group's generators g of NCC(V(R^T r + c), V(R^T g r + c))
(a map invariant under the generators is invariant under the group; 2-3 samplings per point
instead of |G|). The coarse grid covers: for C_n the n-fold axis direction (HEALPix half
sphere at ~``angular_step_deg``; the angle about the axis does not matter); for D_n the axis
direction x the angle of the 2-fold about it in [0, 180/n) deg; for T/O/I RELION's pose grid
restricted to the asymmetric unit (R ~ g R). The best ``n_refine`` distinct maxima are
refined by Nelder-Mead over a small rotation and the centre (6 parameters); for C_n the
centre along the axis (not fixed by the symmetry) stays at the centre of mass. The reported
score is the NCC, in the sphere, of the low-passed aligned map with its average over the
whole group (1 = symmetric). Cost on one CPU thread: ~3-5 s for D7 (1600 coarse candidates
on a 32^3 search box), whatever the input box.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import minimize

from subtomo.em import healpix
from subtomo.em.maps import rotate_map
from subtomo.em.sampling import global_rotations
from subtomo.errors import SubtomoError
from subtomo.fourier import fft_centered, fourier_resize, ifft_centered, lowpass, phase_shift
from subtomo.geometry.euler import angular_distance_deg, euler_to_matrix
from subtomo.geometry.symmetry import axis_rotation, symmetry_generators, symmetry_matrices


@dataclass
class SymmetryAlignment:
    """R (3x3): rotation applied after ``shift_px``; aligned(r) = volume(R^T r - shift_px)."""

    rotation: np.ndarray
    shift_px: np.ndarray  # (x, y, z) translation of the content before the rotation [px]
    score: float  # normalised correlation (low-passed, in the sphere) of the aligned map with its symmetrised self
    volume: torch.Tensor  # the aligned map (full resolution, as the input)
    lowpass_A: float
    coarse_candidates: int = 0

    @property
    def centre_px(self) -> np.ndarray:
        """Symmetry centre in the input map (x, y, z) [px from the box centre]."""
        return -self.shift_px


def _group_kind(sym: str) -> tuple[str, int]:
    s = sym.strip().upper()
    if s[0] in "CD" and s[1:].isdigit():
        return s[0], int(s[1:])
    return s, 0


def _sphere_points(size: int, radius_px: float, device) -> torch.Tensor:
    ax = torch.arange(size, dtype=torch.float32, device=device) - size // 2
    z, y, x = torch.meshgrid(ax, ax, ax, indexing="ij")
    r = torch.stack([x, y, z], -1).reshape(-1, 3)
    return r[r.norm(dim=1) <= radius_px]


def _sample(vol: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """Trilinear samples of ``vol`` (N,N,N) at points (..., 3) (x, y, z px about N//2); 0 outside."""
    n = vol.shape[-1]
    shape = pts.shape[:-1]
    g = ((pts.reshape(1, -1, 1, 1, 3) + n // 2) * (2.0 / (n - 1)) - 1.0).to(vol.dtype)
    out = torch.nn.functional.grid_sample(vol[None, None], g, mode="bilinear", padding_mode="zeros",
                                          align_corners=True)
    return out.reshape(shape)


def _ncc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-12)


def symmetry_scores(vol: torch.Tensor, rotations: torch.Tensor, centres: torch.Tensor, ops: torch.Tensor,
                    points: torch.Tensor, pairwise: bool = False, chunk_samples: int = 2_000_000) -> torch.Tensor:
    """Score of each candidate (R_b, c_b) from the samples V(R^T g r + c), g in ``ops`` (identity first).

    ``pairwise`` False: NCC of V(R^T r + c) with its average over ``ops`` (the symmetrised map when
    ``ops`` is the group); True: mean over the non-identity ops of NCC(V(R^T r + c), V(R^T g r + c))
    (used with the group's generators in the search: same optimum, a fraction of the cost).

    Parameters
    ----------
    vol : torch.Tensor
        (N, N, N) real map V (trilinear samples, 0 outside the box).
    rotations : torch.Tensor
        (B, 3, 3) candidate rotations R (acting on (x, y, z)).
    centres : torch.Tensor
        (B, 3) candidate symmetry centres c (x, y, z) [px from the box centre N//2].
    ops : torch.Tensor
        (G, 3, 3) group operators or generators, the identity first.
    points : torch.Tensor
        (M, 3) sample points r (x, y, z) [px from the box centre], e.g. a sphere.
    pairwise : bool
        Score by pairwise NCC with each non-identity op instead of NCC with the average.
    chunk_samples : int
        Most samples (candidates x G x M) per interpolation call (memory bound).

    Returns
    -------
    torch.Tensor
        (B,) normalised cross-correlation scores in [-1, 1], dtype of ``vol``.
    """
    out = []
    g = ops.shape[0]
    m = points.shape[0]
    step = max(1, chunk_samples // (g * m))
    pg = torch.einsum("mi,gji->gmj", points, ops)  # (G, M, 3): g r as rows
    for s in range(0, rotations.shape[0], step):
        rot = rotations[s:s + step]
        c = centres[s:s + step]
        p = torch.einsum("gmj,bjk->bgmk", pg, rot) + c[:, None, None, :]  # (B, G, M, 3): R^T g r + c
        v = _sample(vol, p)  # (B, G, M)
        if pairwise:
            out.append(_ncc(v[:, :1], v[:, 1:]).mean(1))
        else:
            out.append(_ncc(v[:, 0], v.mean(1)))
    return torch.cat(out)


def _search_ops(sym: str) -> np.ndarray:
    """Identity + the group's generators (a map invariant under the generators is invariant under the group)."""
    return np.stack([np.eye(3), *symmetry_generators(sym)])


def _coarse_candidates(sym: str, step_deg: float) -> np.ndarray:
    """Rotations R (K,3,3) covering the search space of the group (see the module docstring)."""
    kind, n = _group_kind(sym)
    order = int(min(range(0, 6), key=lambda o: abs(healpix.angular_step_deg(o) - step_deg)))
    if kind in ("C", "D"):
        dirs = healpix.pix2ang_nest(order)
        dirs = dirs[dirs[:, 1] <= 90.0 + 1e-6]  # the axis is a line: half sphere
        if kind == "C":
            psi = np.zeros(1)
        else:
            period = 180.0 / n
            k = max(1, int(math.ceil(period / step_deg)))
            psi = np.arange(k) * period / k
        rot = np.repeat(dirs[:, 0], len(psi))
        tilt = np.repeat(dirs[:, 1], len(psi))
        return euler_to_matrix(rot, tilt, np.tile(psi, len(dirs)))  # R^T e_z = axis direction (rot, tilt)
    # R ~ g R: A = R^T ~ A g^T, the equivalence of RELION's pose grids restricted to the asymmetric unit
    a = global_rotations(order, sym, rng=None, perturb=0.0).matrices.numpy().astype(np.float64)
    return np.transpose(a, (0, 2, 1))


def _rotvec_matrix(w: np.ndarray) -> np.ndarray:
    ang = float(np.linalg.norm(w))
    return np.eye(3) if ang < 1e-12 else axis_rotation(w / ang, ang)


def centre_of_mass_px(vol: torch.Tensor) -> np.ndarray:
    """Centre of mass of the positive density, about the box centre N//2.

    Parameters
    ----------
    vol : torch.Tensor
        (N, N, N) map.

    Returns
    -------
    numpy.ndarray
        (3,) (x, y, z) [px].
    """
    n = vol.shape[-1]
    w = vol.clamp_min(0).double()
    tot = float(w.sum())
    if tot <= 0:
        return np.zeros(3)
    ax = torch.arange(n, dtype=torch.float64, device=vol.device) - n // 2
    cz = float((w.sum((1, 2)) * ax).sum()) / tot
    cy = float((w.sum((0, 2)) * ax).sum()) / tot
    cx = float((w.sum((0, 1)) * ax).sum()) / tot
    return np.array([cx, cy, cz])


def _candidate_scores(vs: torch.Tensor, cands: np.ndarray, c0: np.ndarray, ops: torch.Tensor,
                      pts: torch.Tensor) -> np.ndarray:
    """Pairwise symmetry score (K,) of every coarse candidate rotation about the centre of mass ``c0``."""
    rt = torch.as_tensor(cands, dtype=torch.float32, device=vs.device)
    cen = torch.as_tensor(np.broadcast_to(c0, (len(cands), 3)).copy(), dtype=torch.float32, device=vs.device)
    with torch.no_grad():
        return symmetry_scores(vs, rt, cen, ops, pts, pairwise=True).cpu().numpy()


def _axial_centre(rot: np.ndarray, centre: np.ndarray, c0: np.ndarray) -> np.ndarray:
    """The centre moved along the symmetry axis (R^T e_z) to the centre of mass ``c0``'s height."""
    axis = rot.T @ np.array([0.0, 0.0, 1.0])
    return centre + float((c0 - centre) @ axis) * axis


def _distinct_maxima(scores: np.ndarray, cands: np.ndarray, ops_np: np.ndarray, n_refine: int,
                     step_deg: float) -> list[int]:
    """Indices of the best ``n_refine`` candidates that are not within 2 steps of a better one modulo the group."""
    starts: list[int] = []
    for i in np.argsort(-scores):
        if len(starts) >= n_refine:
            break
        # angle of g R_j R_i^T
        if all(angular_distance_deg(ops_np @ cands[j], cands[i]).min() >= 2 * step_deg for j in starts):
            starts.append(int(i))
    return starts


def _refine_locally(vs: torch.Tensor, cands: np.ndarray, starts: list[int], c0: np.ndarray, ops: torch.Tensor,
                    pts: torch.Tensor, step_deg: float, scores: np.ndarray, log) -> tuple[float, np.ndarray, np.ndarray]:
    """Nelder-Mead over (rotation vector, centre) from each start; the best (-score, R, centre)."""
    device = vs.device

    def score_of(x: np.ndarray, r0: np.ndarray) -> float:
        r = _rotvec_matrix(x[:3]) @ r0
        with torch.no_grad():
            s = symmetry_scores(vs, torch.as_tensor(r[None], dtype=torch.float32, device=device),
                                torch.as_tensor(x[None, 3:], dtype=torch.float32, device=device), ops, pts,
                                pairwise=True)
        return -float(s[0])

    best: tuple[float, np.ndarray, np.ndarray] | None = None
    step = math.radians(step_deg)
    for i in starts:
        r0 = cands[i]
        x0 = np.concatenate([np.zeros(3), c0])
        simplex = np.stack([x0] + [x0 + d for d in np.diag([step / 2] * 3 + [0.5] * 3)])
        res = minimize(score_of, x0, args=(r0,), method="Nelder-Mead",
                       options={"initial_simplex": simplex, "xatol": 1e-3, "fatol": 1e-5, "maxfev": 400})
        if best is None or res.fun < best[0]:
            best = (res.fun, _rotvec_matrix(res.x[:3]) @ r0, res.x[3:].copy())
        if log is not None:
            log(f"  local refinement from coarse score {scores[i]:.3f}: {-res.fun:.3f}")
    assert best is not None
    return best


def align_symmetry(volume: torch.Tensor, sym: str, pixel_size_A: float, lowpass_A: float | None = None,
                   search_box: int = 32, angular_step_deg: float = 7.5, radius_px: float | None = None,
                   n_refine: int = 4, log=None) -> SymmetryAlignment:
    """Find (R, shift) putting the symmetry axes of ``volume`` along the group's standard axes (module docstring).

    Parameters
    ----------
    volume : torch.Tensor
        (N, N, N) map, protein positive.
    sym : str
        Point group (C<n>, D<n>, T, O, I).
    pixel_size_A : float
        Pixel size [Å].
    lowpass_A : float, optional
        Low-pass of the map for the search and the score [Å]; default max(3 px, 20 Å).
    search_box : int
        Largest Fourier-cropped box of the search [px].
    angular_step_deg : float
        Step of the coarse grid [deg].
    radius_px : float, optional
        Radius of the scored sphere [input px]; default 0.45 N.
    n_refine : int
        Coarse maxima refined locally.
    log : callable, optional
        Receives a line per local refinement.

    Returns
    -------
    SymmetryAlignment
        Rotation (3, 3), shift (3,) [px], score, the aligned (N, N, N) map, the low-pass [Å].
    """
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise SubtomoError(f"align_symmetry: the map must be a cubic 3D array (got shape {tuple(volume.shape)}).")
    ops_np = symmetry_matrices(sym)
    vol = volume.detach().float()
    device = vol.device
    n = vol.shape[-1]
    lp = float(lowpass_A) if lowpass_A else max(3.0 * pixel_size_A, 20.0)
    if len(ops_np) == 1:
        return SymmetryAlignment(np.eye(3), np.zeros(3), 1.0, vol.clone(), lp)
    filt = lowpass(vol, lp, pixel_size_A)
    small = min(n, search_box, 2 * int(math.ceil(n * pixel_size_A / lp)))
    small += small % 2
    scale = n / small  # input px per search px
    vs = fourier_resize(filt, small) if small < n else filt
    c0 = centre_of_mass_px(vs)
    rad = (radius_px if radius_px else 0.45 * n) / scale
    pts = _sphere_points(small, rad, device)
    ops = torch.as_tensor(_search_ops(sym), dtype=torch.float32, device=device)
    cands = _coarse_candidates(sym, angular_step_deg)
    scores = _candidate_scores(vs, cands, c0, ops, pts)
    starts = _distinct_maxima(scores, cands, ops_np, n_refine, angular_step_deg)
    _, rot, centre_small = _refine_locally(vs, cands, starts, c0, ops, pts, angular_step_deg, scores, log)
    if _group_kind(sym)[0] == "C":  # C_n leaves the centre along the axis free: keep the centre of mass there
        centre_small = _axial_centre(rot, centre_small, c0)
    shift = -centre_small * scale
    aligned = _apply(vol, rot, shift)
    full = torch.as_tensor(ops_np, dtype=torch.float32, device=device)
    score = float(_symmetrised_ncc(lowpass(aligned, lp, pixel_size_A), full, radius_px if radius_px else 0.45 * n))
    return SymmetryAlignment(rot, shift, score, aligned, lp, len(cands))


def _apply(vol: torch.Tensor, rot: np.ndarray, shift_px: np.ndarray) -> torch.Tensor:
    """aligned(r) = vol(R^T r - shift): Fourier shift, then rotate_map (band-limited, full resolution)."""
    shape = tuple(vol.shape)
    moved = ifft_centered(phase_shift(fft_centered(vol, 3), torch.as_tensor(shift_px, dtype=torch.float32,
                                                                             device=vol.device), shape), shape)
    return rotate_map(moved, rot)


def _symmetrised_ncc(vol: torch.Tensor, ops: torch.Tensor, radius_px: float) -> float:
    """NCC, inside the sphere, of ``vol`` with its average over the operators (about the box centre)."""
    n = vol.shape[-1]
    pts = _sphere_points(n, radius_px, vol.device)
    eye = torch.eye(3, dtype=torch.float32, device=vol.device)[None]
    with torch.no_grad():
        return float(symmetry_scores(vol.float(), eye, torch.zeros(1, 3, device=vol.device), ops, pts)[0])


def symmetry_score(volume: torch.Tensor, sym: str, pixel_size_A: float, lowpass_A: float | None = None,
                   radius_px: float | None = None) -> float:
    """How symmetric ``volume`` already is in the standard frame (the score of :func:`align_symmetry`).

    Parameters
    ----------
    volume : torch.Tensor
        (N, N, N) map, protein positive.
    sym : str
        Point group (C<n>, D<n>, T, O, I).
    pixel_size_A : float
        Pixel size [Å].
    lowpass_A : float, optional
        Low-pass before scoring [Å]; default max(3 px, 20 Å).
    radius_px : float, optional
        Radius of the scored sphere [px]; default 0.45 N.

    Returns
    -------
    float
        Normalised correlation of the map with its symmetrised copy (1 = symmetric).
    """
    lp = float(lowpass_A) if lowpass_A else max(3.0 * pixel_size_A, 20.0)
    n = volume.shape[-1]
    ops = torch.as_tensor(symmetry_matrices(sym), dtype=torch.float32, device=volume.device)
    return _symmetrised_ncc(lowpass(volume.detach().float(), lp, pixel_size_A), ops, radius_px or 0.45 * n)
