"""Per-particle 3D CTF models (RELION >= 3.1 "data/weight" definition, padding 1).

Each tilt image j fills the central Fourier plane with normal ``n_j = (−sin θ_j, 0, cos θ_j)``
and in-plane axes ``u_x = (cos θ_j, 0, sin θ_j)``, ``u_y = (0, 1, 0)`` (docs/conventions.md).
At a Fourier voxel k (integer indices of the box grid, components x, y, z)

    CTF3D(k) = Σ_j w_j(k) CTF_j(k·u_x, k·u_y) / Σ_j w_j(k),    w_j(k) = max(0, 1 − |k·n_j|),

with CTF_j the tilt image's CTF at the particle's position-dependent defocus, multiplied
by its scale factor and B envelope exp(−B s²/4); 0 where no plane passes within one voxel
(the missing wedge, gaps between tilts) and for |k| > box/2. Frequencies are
``index / (box · pixel_size)``. The result uses the internal rfft layout of
:mod:`subtomo.fourier` (unshifted, half axis x) cropped to a "current size" exactly like
:func:`subtomo.fourier.crop_rfft`.

This is the default ``tent`` kernel. ``kernel="relion"`` builds RELION's own volume instead
(:func:`relion_ctf_cube`: each tilt's 2D CTF samples splatted trilinearly); the two are
compared in docs/conventions.md.

The weight of a tilt does not depend on ky, so for every distinct tilt angle only the
(kz, kx) pairs within one voxel of its plane are visited (about 2·size/cos θ of them),
times all ky: the cost is proportional to (particles × tilts × size²), not × size³.

Models are stored as compact per-tilt parameters (``Prepare/jobNNN/CtfModels/<t>_ctf.star``,
referenced by ``subtomoCtfModel``) and built on the fly by :class:`ParticleCtfModels`.
RELION-style centred N³ volumes for ``rlnCtfImage`` are produced by :func:`to_relion_cube`
and read back by :func:`from_relion_cube`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from subtomo.ctf.model import chi, ctf_2d
from subtomo.errors import SubtomoError
from subtomo.fourier import crop_rfft
from subtomo.io.mrc import read_mrc, read_mrc_header
from subtomo.io.particles import ParticleSet
from subtomo.io.relion import tomogram_pixel_size_label
from subtomo.io.star import read_star

# Entries (pairs × voxels) evaluated at once; bounds temporary memory (~10 float32 arrays).
_CHUNK_ENTRIES = 4_000_000

#: The interpolation kernel of the 3D CTF models built on the fly (:func:`ctf3d_from_tilts`).
CTF_KERNEL = "tent"
CTF_TABLE_BLOCK = "ctf_models"
CTF_GENERAL_BLOCK = "general"


def _as_2d(x, name: str, device, dtype=torch.float32) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.tensor(np.asarray(x, dtype=np.float64))
    t = t.to(device=device, dtype=dtype)
    if t.ndim == 1:
        t = t[None, :]
    if t.ndim != 2:
        raise ValueError(f"{name}: expected (particles, tilts), got shape {tuple(t.shape)}")
    return t


def grid_indices(size: int, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer frequency indices (as float32) of the cropped rfft grid.

    Parameters
    ----------
    size : int
        Current size (even).
    device : torch.device or str, optional
        Where the tensors live.

    Returns
    -------
    tuple of torch.Tensor
        kz (size,), ky (size,), kx (size//2+1,).
    """
    full = torch.fft.fftfreq(size, d=1.0 / size, device=device, dtype=torch.float32)
    half = torch.arange(size // 2 + 1, device=device, dtype=torch.float32)
    return full, full.clone(), half


@dataclass
class _TiltParams:
    """Per-(particle, tilt) inputs of :func:`ctf3d_from_tilts` on the device, each (B, T)."""

    tilt: torch.Tensor  # float64 [deg], NaN = absent
    def_u: torch.Tensor  # [Å]
    bfac: torch.Tensor  # [Å²]
    scl: torch.Tensor
    def_v: torch.Tensor | None  # [Å]; None: no astigmatism
    ang: torch.Tensor | None  # [deg]
    skip_ctf: bool


def _tilt_params(defocus_A, tilt_deg, bfactor_A2, scale, device, skip_ctf: bool, defocus_v_A,
                 astig_angle_deg) -> _TiltParams:
    tilt = _as_2d(tilt_deg, "tilt_deg", device, torch.float64)
    shape2 = tuple(tilt.shape)
    def_u = _as_2d(defocus_A, "defocus_A", device).expand(shape2)
    bfac = _as_2d(bfactor_A2, "bfactor_A2", device).expand(shape2)
    scl = _as_2d(scale, "scale", device).expand(shape2)
    def_v = ang = None
    if defocus_v_A is not None and not skip_ctf:
        def_v = _as_2d(defocus_v_A, "defocus_v_A", device).expand(shape2)
        ang = _as_2d(astig_angle_deg if astig_angle_deg is not None else torch.zeros(shape2),
                     "astig_angle_deg", device).expand(shape2)
        if not bool(torch.any(def_u != def_v)):
            def_v = ang = None
    return _TiltParams(tilt, def_u, bfac, scl, def_v, ang, skip_ctf)


@dataclass
class _PlaneEntries:
    """The Fourier voxels within one voxel of a tilt's central plane (E entries)."""

    flat: torch.Tensor  # (E,) index into the (size, size, size//2+1) grid
    weight: torch.Tensor  # (E,) 1 - |k·n|
    s2: torch.Tensor  # (E,) in-plane squared frequency [1/Å²]
    cos2: torch.Tensor | None  # (E,) cos 2φ of the in-plane direction (astigmatism only)
    sin2: torch.Tensor | None
    value_weight: torch.Tensor | None = None  # (E,) weight of the values when it differs (RELION's DC sample: 0)
    sample: torch.Tensor | None = None  # (E,) index into s2/cos2/sin2 when those are per 2D sample (RELION)


def _plane_entries(tilt_deg: float, size: int, inv_len2: float, astig: bool, device) -> _PlaneEntries | None:
    """Voxels near the central plane of tilt ``tilt_deg`` (None if there are none)."""
    kz, ky, kx = grid_indices(size, device)
    nx = size // 2 + 1
    theta = math.radians(tilt_deg)
    c, s = math.cos(theta), math.sin(theta)
    d = kz[:, None] * c - kx[None, :] * s  # k·n on the (kz, kx) grid
    zsel, xsel = torch.nonzero(d.abs() < 1.0, as_tuple=True)
    if zsel.numel() == 0:
        return None
    w = (1.0 - d[zsel, xsel].abs())[:, None].expand(-1, size).reshape(-1)  # (E,)
    kxp = (kx[xsel] * c + kz[zsel] * s)[:, None]  # in-plane x index
    kyp = ky[None, :]
    r2 = (kxp ** 2 + kyp ** 2).reshape(-1)
    yi = torch.arange(size, device=device)
    flat = ((zsel[:, None] * size + yi[None, :]) * nx + xsel[:, None]).reshape(-1)
    cos2 = sin2 = None
    if astig:
        rr = r2.clamp(min=1e-12)
        cos2 = ((kxp ** 2 - kyp ** 2).reshape(-1) / rr)
        sin2 = ((2 * kxp * kyp).reshape(-1) / rr)
    return _PlaneEntries(flat, w, r2 * inv_len2, cos2, sin2)


def _relion_plane_entries(tilt_deg: float, box: int, size: int, inv_len2: float, astig: bool, device) -> _PlaneEntries:
    """RELION's splat of one tilt's 2D half-grid samples (trilinear, :func:`relion_ctf_cube`) as plane entries.

    Entries are (sample, corner) pairs on the box grid, kept where they fall inside the
    current size; those on kx = 0 are repeated at their Friedel mate (RELION symmetrises
    that plane). The DC sample adds weight but no value. The geometry is cached per tilt.
    """
    return _relion_plane_cached(round(float(tilt_deg), 6), int(box), int(size), float(inv_len2), bool(astig), str(device))


@lru_cache(maxsize=256)
def _relion_plane_cached(tilt_deg: float, box: int, size: int, inv_len2: float, astig: bool, device: str) -> _PlaneEntries:
    n = int(box)
    x, y = (torch.as_tensor(a, device=device) for a in _relion_half_samples(n))
    t = math.radians(tilt_deg)
    q = torch.stack([x * math.cos(t), y, x * math.sin(t)])  # RELION's (0, −θ, 0) for our θ
    q = torch.where(q[0] < 0, -q, q)  # Friedel mate (|θ| > 90° only)
    i0 = torch.floor(q)
    f = q - i0
    corners = torch.tensor(list(np.ndindex(2, 2, 2)), device=device, dtype=q.dtype)  # (8, 3): dx, dy, dz
    w = torch.prod(torch.where(corners[:, :, None] > 0, f[None], 1 - f[None]), dim=1).reshape(-1)  # (8·S,)
    k = (i0[None] + corners[:, :, None]).long()  # (8, 3, S)
    kx, ky, kz = k[:, 0].reshape(-1), k[:, 1].reshape(-1) % n, k[:, 2].reshape(-1) % n
    sample = torch.arange(len(x), device=device).repeat(8)
    on0 = kx == 0  # RELION adds the x = 0 plane's Friedel mates
    kx, ky, kz = torch.cat([kx, kx[on0]]), torch.cat([ky, (-ky[on0]) % n]), torch.cat([kz, (-kz[on0]) % n])
    w, sample = torch.cat([w, w[on0]]), torch.cat([sample, sample[on0]])
    sy, sz = torch.where(ky >= n // 2, ky - n, ky), torch.where(kz >= n // 2, kz - n, kz)
    keep = (kx <= size // 2) & (sy >= -(size // 2)) & (sy < size // 2) & (sz >= -(size // 2)) & (sz < size // 2)
    flat = ((sz[keep] % size) * size + sy[keep] % size) * (size // 2 + 1) + kx[keep]
    sample, w = sample[keep], w[keep].float()
    r2 = x ** 2 + y ** 2  # per 2D sample: its CTF is evaluated once, then spread to its corners
    cos2 = sin2 = None
    if astig:
        rr = r2.clamp(min=1e-12)
        cos2, sin2 = ((x ** 2 - y ** 2) / rr).float(), (2 * x * y / rr).float()
    return _PlaneEntries(flat, w, (r2 * inv_len2).float(), cos2, sin2, torch.where(r2[sample] > 0, w, torch.zeros_like(w)),
                         sample)


def _plane_values(p: _TiltParams, pb: torch.Tensor, pt: torch.Tensor, plane: _PlaneEntries, voltage_kV: float,
                  cs_mm: float, phase_k: float) -> torch.Tensor:
    """Weighted CTF x envelope of (particle, tilt) pairs on a plane's entries: (len(pb), E)."""
    s2 = plane.s2
    env = p.scl[pb, pt][:, None] * torch.exp(-p.bfac[pb, pt][:, None] * (s2 / 4)[None, :])
    if p.skip_ctf:
        val = env
    else:
        if p.def_v is not None and p.ang is not None and plane.cos2 is not None and plane.sin2 is not None:
            du, dv = p.def_u[pb, pt][:, None], p.def_v[pb, pt][:, None]
            a2 = torch.deg2rad(p.ang[pb, pt])[:, None] * 2
            dfoc = (du + dv) / 2 + (du - dv) / 2 * (plane.cos2[None, :] * torch.cos(a2) + plane.sin2[None, :] * torch.sin(a2))
        else:
            dfoc = p.def_u[pb, pt][:, None]
        phase = chi(s2[None, :], dfoc, voltage_kV, cs_mm)
        val = torch.sin(phase - phase_k).mul_(env).neg_()
    if plane.sample is not None:
        val = val[:, plane.sample]
    return val.mul_((plane.weight if plane.value_weight is None else plane.value_weight)[None, :])


def _insert_plane(num: torch.Tensor, den: torch.Tensor, p: _TiltParams, gb: torch.Tensor, gt: torch.Tensor,
                  plane: _PlaneEntries, sig_of: torch.Tensor, per_sig: torch.Tensor,
                  microscope: tuple[float, float, float]) -> None:
    """Add the plane of the (particle gb, tilt gt) pairs sharing one tilt angle to num (B, V) and den (S, V)."""
    n_e = plane.flat.numel()
    sg, sg_count = torch.unique(sig_of[gb], return_counts=True)
    mult = sg_count.float() / per_sig[sg]  # how often each particle of the signature has this angle
    den.index_put_((sg[:, None].expand(-1, n_e), plane.flat[None, :].expand(len(sg), -1)),
                   mult[:, None] * plane.weight[None, :], accumulate=True)
    step = max(1, _CHUNK_ENTRIES // n_e)
    for start in range(0, len(gb), step):
        pb, pt = gb[start:start + step], gt[start:start + step]
        num.index_put_((pb[:, None].expand(-1, n_e), plane.flat[None, :].expand(len(pb), -1)),
                       _plane_values(p, pb, pt, plane, *microscope), accumulate=True)


def _insert_planes(num: torch.Tensor, den: torch.Tensor, p: _TiltParams, keys_bt: torch.Tensor, sig_of: torch.Tensor,
                   per_sig: torch.Tensor, grid: tuple, microscope: tuple[float, float, float]) -> None:
    """Insert every (particle, tilt) pair, grouped by tilt angle (one plane geometry per angle)."""
    kernel, box, size, inv_len2, device = grid
    b_idx, t_idx = torch.nonzero(~torch.isnan(p.tilt), as_tuple=True)
    if not b_idx.numel():
        return
    uniq, inverse = torch.unique(keys_bt[b_idx, t_idx].long(), return_inverse=True)
    for g in torch.split(torch.argsort(inverse), torch.bincount(inverse, minlength=len(uniq)).tolist()):
        gb, gt = b_idx[g], t_idx[g]
        tilt, astig = float(p.tilt[gb[0], gt[0]]), p.def_v is not None
        plane = (_plane_entries(tilt, size, inv_len2, astig, device) if kernel == "tent"
                 else _relion_plane_entries(tilt, box, size, inv_len2, astig, device))
        if plane is not None:
            _insert_plane(num, den, p, gb, gt, plane, sig_of, per_sig, microscope)


def _device_and_size(defocus_A, device, box: int, size: int | None) -> tuple[torch.device, int]:
    """The device (given, else that of a tensor ``defocus_A``, else the CPU) and the checked current size."""
    if device is None:
        device = defocus_A.device if isinstance(defocus_A, torch.Tensor) else torch.device("cpu")
    size = int(box if size is None else size)
    if box % 2 or size % 2 or size > box or size <= 0:
        raise ValueError(f"box {box} and size {size} must be even with 0 < size <= box")
    return torch.device(device), size


def _signatures(tilt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rounded tilt keys (B, T) and the set of tilts of each particle (signature id (B,), count per signature)."""
    valid = ~torch.isnan(tilt)
    keys_bt = torch.where(valid, torch.round(tilt * 1e4), torch.full_like(tilt, float("inf")))
    # particles sharing the same set of tilt angles share the denominator Σ_j w_j(k)
    sigs, sig_of = torch.unique(torch.sort(keys_bt, dim=1).values, dim=0, return_inverse=True)
    return keys_bt, sig_of, torch.bincount(sig_of, minlength=len(sigs)).float()


def ctf3d_from_tilts(defocus_A, tilt_deg, bfactor_A2, scale, box: int, pixel_size_A: float,
                     voltage_kV: float, cs_mm: float, amplitude_contrast: float, size: int | None = None,
                     skip_ctf: bool = False, device=None, defocus_v_A=None, astig_angle_deg=None,
                     kernel: str = "tent") -> torch.Tensor:
    """3D CTF models of a batch of particles (module docstring: the data/weight definition).

    Parameters
    ----------
    defocus_A : array_like or torch.Tensor
        (B, T) defocus U per particle and tilt [Å] (the mean defocus without astigmatism).
    tilt_deg : array_like or torch.Tensor
        (B, T) tilt angles [deg]; NaN marks an absent tilt (particles with different numbers
        of tilts can share a batch).
    bfactor_A2, scale : array_like or torch.Tensor
        (B, T) dose B-factor [Å²] and scale factor.
    box : int
        Particle box [px], even.
    pixel_size_A : float
        Particle pixel size [Å].
    voltage_kV, cs_mm, amplitude_contrast : float
        Microscope [kV], [mm], Q0.
    size : int, optional
        Current size of the cropped rfft grid (even, <= box; default ``box``).
    skip_ctf : bool
        Each tilt's CTF is 1 (only scale and B envelope remain: wedge-only model).
    device : torch.device or str, optional
        Default: that of ``defocus_A`` if it is a tensor, else the CPU.
    defocus_v_A, astig_angle_deg : array_like, optional
        (B, T) defocus V [Å] and angle of U from image x to y [deg] (astigmatism).
    kernel : str
        ``tent`` (weights 1 − distance to each plane) or ``relion`` (RELION's trilinear splat
        of 2D samples, :func:`relion_ctf_cube`; docs/conventions.md compares them).

    Returns
    -------
    torch.Tensor
        (B, size, size, size//2+1) float32, internal rfft layout.
    """
    if kernel not in ("tent", "relion"):
        raise ValueError(f"kernel {kernel!r}: tent or relion")
    device, size = _device_and_size(defocus_A, device, box, size)
    p = _tilt_params(defocus_A, tilt_deg, bfactor_A2, scale, device, skip_ctf, defocus_v_A, astig_angle_deg)
    nb = p.tilt.shape[0]
    nx = size // 2 + 1
    nvox = size * size * nx
    num = torch.zeros(nb, nvox, device=device, dtype=torch.float32)
    inv_len2 = 1.0 / (box * pixel_size_A) ** 2
    phase_k = math.asin(max(-1.0, min(1.0, float(amplitude_contrast))))  # -(sqrt(1-Q0²) sin χ - Q0 cos χ) = -sin(χ - asin Q0)
    keys_bt, sig_of, per_sig = _signatures(p.tilt)
    den = torch.zeros(len(per_sig), nvox, device=device, dtype=torch.float32)
    _insert_planes(num, den, p, keys_bt, sig_of, per_sig, (kernel, box, size, inv_len2, device), (voltage_kV, cs_mm, phase_k))
    # num is 0 wherever den is 0, so a clamped division leaves those voxels at 0
    den.clamp_(min=1e-30)
    num.div_(den if len(per_sig) == 1 else den.index_select(0, sig_of))
    kz, ky, kx = grid_indices(size, device)
    sphere = (kz[:, None, None] ** 2 + ky[None, :, None] ** 2 + kx[None, None, :] ** 2) <= (box / 2) ** 2
    return num.view(nb, size, size, nx).mul_(sphere)


# ----------------------------------------------------------------------------------------
# RELION volumes: centred N³ cubes (DC at N/2), Friedel-symmetric, real values.


def to_relion_cube(half: torch.Tensor) -> torch.Tensor:
    """Internal half layout -> RELION's centred full cube, DC at N/2.

    value(k) for kx < 0 is taken from the Friedel mate −k (the model is real and even).

    Parameters
    ----------
    half : torch.Tensor
        (..., N, N, N//2+1).

    Returns
    -------
    torch.Tensor
        (..., N, N, N).
    """
    n = half.shape[-2]
    full = torch.zeros(*half.shape[:-1], n, dtype=half.dtype, device=half.device)
    full[..., : n // 2] = half[..., : n // 2]
    neg = torch.arange(n // 2, n, device=half.device)  # x indices holding kx = idx - n (<0)
    mate = (-torch.arange(n, device=half.device)) % n
    src = half[..., n - neg]  # kx' = n - idx = -kx  (...,N,N,len(neg))
    src = src.index_select(-3, mate).index_select(-2, mate)
    full[..., n // 2:] = src
    return torch.fft.fftshift(full, dim=(-3, -2, -1))


def from_relion_cube(cube: torch.Tensor) -> torch.Tensor:
    """RELION's centred N³ cube (DC at N/2) -> internal half layout, as RELION reads it (``Fctf(k) = cube(−k)``).

    Equal to cube(k) for Friedel-symmetric files.

    Parameters
    ----------
    cube : torch.Tensor
        (N, N, N), N even.

    Returns
    -------
    torch.Tensor
        (N, N, N//2+1).
    """
    n = cube.shape[-1]
    if cube.shape[-3:] != (n, n, n) or n % 2:
        raise SubtomoError(f"3D CTF volume of shape {tuple(cube.shape)}: expected an even cube N×N×N (centred RELION layout).")
    k = torch.fft.fftfreq(n, d=1.0 / n).long()
    zi = (n // 2 - k) % n  # cube index of -k
    xi = n // 2 - torch.arange(n // 2 + 1)
    return cube.index_select(-3, zi).index_select(-2, zi).index_select(-1, xi)


def _relion_half_samples(box: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) Fourier indices of the 2D half grid that RELION inserts (|k| <= N/2, no x = 0, y < 0)."""
    h = box // 2
    y, x = np.meshgrid(np.arange(-h, h), np.arange(0, h + 1), indexing="ij")
    keep = (x * x + y * y <= h * h) & ~((x == 0) & (y < 0))
    return x[keep].astype(np.float64), y[keep].astype(np.float64)


def _splat_plane(data: np.ndarray, weight: np.ndarray, values: np.ndarray, x: np.ndarray, y: np.ndarray,
                 tilt_deg: float, shape: tuple[int, int, int]) -> None:
    """Add one tilt's central section (values at half-grid samples x, y) trilinearly into flat ``data``/``weight``.

    The plane is placed at RELION's Euler angles (0, -θ, 0); samples with x < 0 after rotation
    go to their Friedel mates.
    """
    n = shape[0]
    t = math.radians(-tilt_deg)  # RELION's tilt for our θ
    q = np.stack([x * math.cos(t), y, -x * math.sin(t)])
    q = np.where(q[0] < 0, -q, q)  # Friedel mate
    i0 = np.floor(q).astype(np.int64)
    f = q - i0
    for d in np.ndindex(2, 2, 2):
        w = np.prod([f[a] if d[a] else 1 - f[a] for a in range(3)], axis=0)
        flat = np.ravel_multi_index(((i0[2] + d[2]) % n, (i0[1] + d[1]) % n, i0[0] + d[0]), shape)
        data += np.bincount(flat, w * values, len(data))
        weight += np.bincount(flat, w, len(weight))


def relion_ctf_cube(defocus_u_A, defocus_v_A, astig_angle_deg, tilt_deg, bfactor_A2, scale, box: int,
                    pixel_size_A: float, voltage_kV: float, cs_mm: float, amplitude_contrast: float,
                    skip_ctf: bool = False) -> np.ndarray:
    """One particle's 3D CTF exactly as ``relion_reconstruct --reconstruct_ctf`` (RELION >= 3.1) makes it.

    Each tilt's 2D CTF, sampled on the half grid (x >= 0, |k| <= N/2; its DC sample is 0),
    is placed at RELION's Euler angles (0, −θ, 0) (our tilt θ, docs/conventions.md) and
    splatted trilinearly into data and weight arrays (Friedel mates for x < 0); the volume
    is data / weight where the weight is positive, the x = 0 plane Hermitian-symmetrised.
    Measured against RELION 3.1.3: equal inside |k| < N/2 − 1 (tests/test_relion.py).
    :func:`ctf3d_from_tilts` with ``kernel="relion"`` gives the same volume in the engine's
    layout; its default kernel weights by distance to each plane instead.

    Parameters
    ----------
    defocus_u_A, defocus_v_A, astig_angle_deg, tilt_deg, bfactor_A2, scale : array_like
        (T,) per-tilt defocus U, V [Å], astigmatism angle [deg], tilt θ [deg], B-factor [Å²], scale.
    box : int
        N [px], even.
    pixel_size_A : float
        Pixel size [Å].
    voltage_kV, cs_mm, amplitude_contrast : float
        Microscope; ``skip_ctf`` uses Cs 0 and Q0 1 (CTF 1: wedge, dose and scale only).
    skip_ctf : bool
        Wedge-only model.

    Returns
    -------
    numpy.ndarray
        (N, N, N) float32 centred cube (DC at N/2), RELION's ``rlnCtfImage`` layout.
    """
    n, h = int(box), int(box) // 2
    x, y = _relion_half_samples(n)
    freq = torch.as_tensor(np.stack([x, y], -1) / (n * pixel_size_A), dtype=torch.float64)
    cs, q0 = (0.0, 1.0) if skip_ctf else (cs_mm, amplitude_contrast)
    shape = (n, n, h + 2)
    data, weight = np.zeros(int(np.prod(shape))), np.zeros(int(np.prod(shape)))
    per_tilt = zip(*(np.broadcast_to(np.asarray(a, dtype=np.float64), np.shape(tilt_deg)) for a in
                     (defocus_u_A, defocus_v_A, astig_angle_deg, tilt_deg, bfactor_A2, scale)))
    for du, dv, ang, th, b, sc in per_tilt:
        c = ctf_2d(freq, 0.0 if skip_ctf else du, 0.0 if skip_ctf else dv, ang, voltage_kV, cs, q0, b, sc).numpy()
        _splat_plane(data, weight, np.where((x == 0) & (y == 0), 0.0, c), x, y, th, shape)
    data, weight = data.reshape(shape), weight.reshape(shape)
    mate = (-np.arange(n)) % n
    data[:, :, 0] += data[mate][:, mate, 0]
    weight[:, :, 0] += weight[mate][:, mate, 0]
    half = np.where(weight > 0, data / np.where(weight > 0, weight, 1.0), 0.0)[:, :, : h + 1]
    kz, ky, kx = np.meshgrid(*(np.arange(-h, h),) * 3, indexing="ij")
    sign = np.where(kx < 0, -1, 1)
    cube = half[(sign * kz) % n, (sign * ky) % n, sign * kx]
    cube[kx * kx + ky * ky + kz * kz > h * h] = 0.0
    return cube.astype(np.float32)


# ----------------------------------------------------------------------------------------
# Per-particle models referenced by subtomoCtfModel (compact) or rlnCtfImage (RELION volumes).


def _read_ctf_table(path: Path) -> tuple[dict, dict[int, pd.DataFrame]]:
    """(general block, rows per rlnTomoParticleId) of a compact CTF table (:mod:`subtomo.tomo.ctf_models`)."""
    blocks = read_star(path)
    gen = blocks.get(CTF_GENERAL_BLOCK)
    table = blocks.get(CTF_TABLE_BLOCK)
    if table is None:
        table = next((v for k, v in blocks.items() if isinstance(v, pd.DataFrame) and k != CTF_GENERAL_BLOCK), None)
    if not isinstance(gen, dict) or not isinstance(table, pd.DataFrame) or "rlnTomoParticleId" not in table.columns:
        raise SubtomoError(f"{path}: not a subtomo CTF model table (needs a data_{CTF_GENERAL_BLOCK} block and a loop "
                           "with rlnTomoParticleId). Re-run subtomo prepare.")
    ids = table["rlnTomoParticleId"].to_numpy().astype(np.int64)
    order = np.argsort(ids, kind="stable")  # keeps each particle's rows in file order
    uniq, starts = np.unique(ids[order], return_index=True)
    return gen, {int(pid): table.iloc[rows] for pid, rows in zip(uniq, np.split(order, starts[1:]))}


def _tilt_arrays(per: list[pd.DataFrame | None]) -> list[np.ndarray]:
    """(tilt, U, V, angle, B, scale) arrays (P, T) from each particle's CTF rows (NaN tilt where absent)."""
    n = len(per)
    nt = max([len(p) for p in per if p is not None], default=1)
    columns = (("rlnTomoNominalStageTiltAngle", np.nan), ("rlnDefocusU", 0.0), ("rlnDefocusV", None),
               ("rlnDefocusAngle", 0.0), ("rlnCtfBfactor", 0.0), ("rlnCtfScalefactor", 1.0))
    arrays = [np.full((n, nt), np.nan if c == "rlnTomoNominalStageTiltAngle" else 0.0) for c, _ in columns]
    for i, p in enumerate(per):
        if p is None:
            continue
        m = len(p)
        for a, (c, default) in zip(arrays, columns):
            if c in p:
                a[i, :m] = p[c].to_numpy(float)
            else:
                a[i, :m] = arrays[1][i, :m] if default is None else default  # V defaults to U
    return arrays


def _microscope_arrays(general: list[dict], per: list[pd.DataFrame | None]) -> tuple[np.ndarray, ...]:
    """Per-particle (voltage, Cs, Q0, skip CTF) arrays (P,) from the CTF tables' general blocks."""
    keys = (("rlnVoltage", 300.0), ("rlnSphericalAberration", 2.7), ("rlnAmplitudeContrast", 0.07), ("subtomoSkipCtf", 0))
    arrays = [np.zeros(len(general)) for _ in keys]
    for i, (g, p) in enumerate(zip(general, per)):
        if p is not None:
            for a, (k, default) in zip(arrays, keys):
                a[i] = float(g.get(k, default))
    return arrays[0], arrays[1], arrays[2], arrays[3] > 0


def check_ctf_volumes(particles: ParticleSet, box: int | None = None, pixel_size_A: float | None = None) -> None:
    """Check that every RELION CTF volume (``rlnCtfImage = <file>.mrc``) fits its particle.

    A 3D CTF volume is sampled at ``index / (N · pixel size)``: it only describes particles
    of the same box N, pixel size and dimensionality (relion-internals §2.4). Compact
    models (``subtomoCtfModel = NNNNNN@…_ctf.star``) are built at any box and pixel size and
    need no check.

    Parameters
    ----------
    particles : ParticleSet
        Particles (those without 3D CTFs pass).
    box : int, optional
        The particles' box [px] (default: :attr:`ParticleSet.box_px`, when known).
    pixel_size_A : float, optional
        Their pixel size [Å] (default: the set's, when known).

    Raises
    ------
    SubtomoError
        Naming the CTF file, the particle file and the fix, for each mismatch.
    """
    if not particles.has_ctf():
        return
    refs = {r.path for r in particles.ctf_refs() if r.index is None}
    if not refs:
        return
    box = box if box is not None else particles.box_px
    if pixel_size_A is None:
        try:
            pixel_size_A = particles.pixel_size_A
        except SubtomoError:
            pixel_size_A = None
    where = particles.path or (particles.image_paths()[0] if particles.has("rlnImageName") else particles.name)
    problems = []
    for path in sorted(refs):
        if not path.exists():
            problems.append(f"{path}: CTF volume not found (rlnCtfImage in {where}).")
            continue
        shape, px = read_mrc_header(path)
        what = []
        if len(set(shape)) != 1 or shape[0] == 1:
            what.append(f"it is {'x'.join(map(str, shape[::-1]))}, not a 3D cube (the particles are 3D subtomograms)")
        elif box is not None and shape[0] != box:
            what.append(f"its box is {shape[0]} px but the particles' box is {box} px")
        if pixel_size_A is not None and px > 0 and abs(px - pixel_size_A) > 1e-3 * pixel_size_A:
            what.append(f"its pixel size is {px:.4f} A but the particles' is {pixel_size_A:.4f} A")
        if what:
            problems.append(f"{path}: CTF volume does not match the particles of {where}: {'; '.join(what)}. Fix: make "
                            "the CTF volumes at the particles' box and pixel size (subtomo export-relion, or prepare "
                            "--export-relion BOX with extract --box BOX and no --rescale), or use the compact models "
                            "(subtomoCtfModel = NNNNNN@CtfModels/<t>_ctf.star of subtomo prepare).")
    if problems:
        raise SubtomoError(f"{where}: particles and their 3D CTF volumes disagree", problems)


@dataclass
class ParticleCtfModels:
    """Compact 3D CTF parameters of a particle set, built into volumes on demand.

    Particles whose ``rlnCtfImage`` is a RELION ``.mrc`` volume keep that volume (internal
    half layout) in ``volumes_half``; the others are built from their compact model
    (``subtomoCtfModel``).

    Attributes
    ----------
    tilt_deg : numpy.ndarray
        (P, T) tilt angles [deg], NaN where a particle has fewer tilts.
    defocus_u_A, defocus_v_A, astig_angle_deg : numpy.ndarray
        (P, T) position-dependent defocus [Å] and astigmatism angle [deg].
    bfactor_A2, scale : numpy.ndarray
        (P, T) dose B-factor [Å²] and scale factor.
    voltage_kV, cs_mm, amplitude_contrast : numpy.ndarray
        (P,) microscope [kV], [mm], Q0.
    pixel_size_A : numpy.ndarray
        (P,) particle pixel size [Å].
    skip_ctf : numpy.ndarray
        (P,) bool, wedge-only model.
    volumes_half : dict of int to torch.Tensor
        Row -> (N, N, N//2+1) volume read from a RELION file.
    kernel : str
        How compact models are built (:func:`ctf3d_from_tilts`).
    """

    tilt_deg: np.ndarray
    defocus_u_A: np.ndarray
    defocus_v_A: np.ndarray
    astig_angle_deg: np.ndarray
    bfactor_A2: np.ndarray
    scale: np.ndarray
    voltage_kV: np.ndarray
    cs_mm: np.ndarray
    amplitude_contrast: np.ndarray
    pixel_size_A: np.ndarray
    skip_ctf: np.ndarray
    volumes_half: dict[int, torch.Tensor] = field(default_factory=dict)
    kernel: str = CTF_KERNEL

    def __len__(self) -> int:
        return len(self.pixel_size_A)

    @classmethod
    def from_particles(cls, particles: pd.DataFrame, project_dir: str | Path = ".") -> "ParticleCtfModels":
        """:meth:`from_particle_set` of a particle table whose paths are relative to ``project_dir``."""
        return cls.from_particle_set(ParticleSet.from_table(particles, None, Path(project_dir)))

    @classmethod
    def from_particle_set(cls, particles: ParticleSet) -> "ParticleCtfModels":
        """Read every particle's 3D CTF reference once (:meth:`ParticleSet.ctf_refs`).

        Accepted references: ``subtomoCtfModel = NNNNNN@<path>_ctf.star`` (rows of the compact
        CTF table with ``rlnTomoParticleId`` = NNNNNN; older files: in ``rlnCtfImage``) and
        RELION volumes ``rlnCtfImage = <path>.mrc`` (centred cube).

        Parameters
        ----------
        particles : ParticleSet
            P particles with ``subtomoCtfModel`` or ``rlnCtfImage``.

        Returns
        -------
        ParticleCtfModels
            (P, T) arrays, T the largest number of tilts. The particle pixel size [Å] is
            the particle set's (:data:`subtomo.io.particles.PIXEL_SIZE_RULE`, e.g. after a
            rescaled extraction); particles that do not have one yet (not extracted) take
            the pixel size of their CTF table (the tomogram's) or RELION volume.
        """
        refs = particles.ctf_refs()  # names the file when there is no CTF column
        check_ctf_volumes(particles)
        n = len(particles)
        tables: dict[Path, tuple[dict, dict[int, pd.DataFrame]]] = {}
        per: list[pd.DataFrame | None] = [None] * n
        general: list[dict] = [{}] * n
        volumes: dict[int, torch.Tensor] = {}
        px = np.full(n, np.nan)
        for i, image in enumerate(refs):
            if image.index is None:
                vol, px[i] = read_mrc(image.path)
                volumes[i] = from_relion_cube(torch.from_numpy(vol))
                continue
            if image.path not in tables:
                tables[image.path] = _read_ctf_table(image.path)
            general[i], groups = tables[image.path]
            if image.index not in groups:
                raise SubtomoError(f"{particles.name}: row {i + 1}: {image.path} has no CTF rows with rlnTomoParticleId "
                                   f"{image.index}. Re-run subtomo prepare.")
            per[i] = groups[image.index]
            label = tomogram_pixel_size_label(general[i].keys())
            px[i] = float(general[i][label]) if label else np.nan
        try:
            px = particles.pixel_sizes_A()
        except SubtomoError:
            pass  # not extracted yet: the CTF tables' (tomogram) pixel size
        tilt, du, dv, ang, bfac, scale = _tilt_arrays(per)
        kv, cs, q0, skip = _microscope_arrays(general, per)
        return cls(tilt, du, dv, ang, bfac, scale, kv, cs, q0, px, skip, volumes)

    def volumes(self, rows, box: int, size: int | None = None, device=None,
                pixel_size_A: float | None = None) -> torch.Tensor:
        """3D CTFs of some particles.

        Parameters
        ----------
        rows : array_like
            (B,) positions in the table.
        box : int
            Particle box [px] at the particle pixel size.
        size : int, optional
            Current size (default ``box``).
        device : torch.device or str, optional
            Where to build them.
        pixel_size_A : float, optional
            Overrides the per-particle pixel size [Å].

        Returns
        -------
        torch.Tensor
            (B, size, size, size//2+1) float32.
        """
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        size = int(box if size is None else size)
        device = torch.device(device) if device is not None else torch.device("cpu")
        out = torch.zeros(len(rows), size, size, size // 2 + 1, device=device)
        is_vol = np.array([int(r) in self.volumes_half for r in rows], dtype=bool)
        for j in np.nonzero(is_vol)[0]:
            v = self.volumes_half[int(rows[j])]
            if v.shape[-2] < size:
                raise SubtomoError(f"3D CTF volume of size {v.shape[-2]} is smaller than the current size {size}; "
                                   f"make the CTF volumes at the subtomogram box size.")
            out[j] = crop_rfft(v, size, 3).to(device)
        pos = np.nonzero(~is_vol)[0]
        if len(pos):
            px = np.full(len(rows), float(pixel_size_A)) if pixel_size_A is not None else self.pixel_size_A[rows]
            keys = np.stack([self.voltage_kV[rows], self.cs_mm[rows], self.amplitude_contrast[rows], px,
                             self.skip_ctf[rows].astype(float)], axis=1)[pos]
            uniq, inv = np.unique(keys, axis=0, return_inverse=True)
            inv = inv.reshape(-1)
            for u, key in enumerate(uniq):
                sel = pos[inv == u]
                r = rows[sel]
                if not np.isfinite(key[3]) or key[3] <= 0:
                    raise SubtomoError("a particle's 3D CTF has no pixel size (rlnImagePixelSize or the CTF table's subtomoTomogramPixelSize).")
                vol = ctf3d_from_tilts(
                    self.defocus_u_A[r], self.tilt_deg[r], self.bfactor_A2[r], self.scale[r], box, float(key[3]),
                    float(key[0]), float(key[1]), float(key[2]), size=size, skip_ctf=bool(key[4]), device=device,
                    defocus_v_A=self.defocus_v_A[r], astig_angle_deg=self.astig_angle_deg[r], kernel=self.kernel)
                out[torch.as_tensor(sel, device=device)] = vol
        return out
