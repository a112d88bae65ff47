"""3D-specific pieces: sample a reference's Fourier transform at A^T k, insert data back.

Projection (``Projector3D``): the real map, pre-divided by the trilinear-interpolation
kernel's transform sinc^2(r/(p N)) per axis, is zero-padded to p*N and transformed; its
full, centred complex grid is sampled trilinearly (``grid_sample``) at p * A^T k for every
component k of the current set and every rotation A of a batch. ``particle(k) = V(A^T k)``
(docs/conventions.md).

Insertion (``insert3d``): weighted particle values at A^T k are splatted with trilinear
weights (index_add_) into a full, centred, *unpadded* N^3 grid - data and weight arrays of
the sufficient statistics; only one member of each Hermitian pair is inserted and the
reconstruction symmetrises (``reconstruct.hermitian_symmetrise``). With the identity pose
a component lands exactly on its voxel, so a delta posterior returns the particle.
"""

from __future__ import annotations

import math
import os
import warnings

import torch
import torch.nn.functional as F

# Projection dominates the E-step on CPU (bench/bench_engine.py): ``grid_sample``'s 3D kernel
# takes 60-300 ns per sample. The same trilinear interpolation written as gathers from an
# interleaved [Re, Im] table and fused by ``torch.compile`` takes 20-40 ns (box 64) and
# 2x less at box 128. Opt-in (SUBTOMO_COMPILE_PROJECTOR=1 or ``compiled=True``): the first
# call compiles (about a minute, then cached on disk) and needs a C++ compiler (CPU) or Triton.
_COMPILED = None


def _trilinear(table: torch.Tensor, q: torch.Tensor, width: int) -> torch.Tensor:
    """Trilinear samples of an interleaved (W^3, 2) table at index coordinates q (c, M, 3) x, y, z -> (c, 2M)."""
    f = torch.floor(q)
    t = q - f
    i = f.to(torch.int64)
    lin = (i[..., 2] * width + i[..., 1]) * width + i[..., 0]
    tx, ty, tz = t.unbind(-1)
    re = torch.zeros_like(tx)
    im = torch.zeros_like(tx)
    for dz in (0, 1):
        for dy in (0, 1):
            wzy = (tz if dz else 1 - tz) * (ty if dy else 1 - ty)
            for dx in (0, 1):
                w = wzy * (tx if dx else 1 - tx)
                idx = lin + (dz * width * width + dy * width + dx)
                re = re + table[idx, 0] * w
                im = im + table[idx, 1] * w
    return torch.cat([re, im], -1)


def _compiled_trilinear():
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(_trilinear, dynamic=True)
    return _COMPILED


def _sinc2_correction(n: int, pad: int, device) -> torch.Tensor:
    x = (torch.arange(n, device=device, dtype=torch.float32) - n // 2) / (pad * n)
    safe = torch.where(x == 0, torch.ones_like(x), x)
    s = torch.where(x == 0, torch.ones_like(x), torch.sin(math.pi * safe) / (math.pi * safe))
    s2 = s ** 2
    return s2[:, None, None] * s2[None, :, None] * s2[None, None, :]


def centred_full_fft(volume: torch.Tensor) -> torch.Tensor:
    """Full complex Fourier transform of a centred real cube, zero frequency at index N//2.

    Parameters
    ----------
    volume : torch.Tensor
        (N, N, N) real.

    Returns
    -------
    torch.Tensor
        (N, N, N) complex.
    """
    dims = (-3, -2, -1)
    return torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(volume, dim=dims), dim=dims), dim=dims)


class Projector3D:
    """Samples V(A^T k) of one reference map (N^3 real) on a ``pad``-times oversampled grid."""

    def __init__(self, volume: torch.Tensor, pad: int = 2, max_points: int = 2_000_000,
                 compiled: bool | None = None) -> None:
        n = volume.shape[-1]
        self.n = n
        self.pad = pad
        self.max_points = max_points
        vol = volume.float() / _sinc2_correction(n, pad, volume.device)
        big = pad * n
        padded = torch.zeros((big,) * 3, dtype=torch.float32, device=volume.device)
        lo = big // 2 - n // 2
        padded[lo:lo + n, lo:lo + n, lo:lo + n] = vol
        f = centred_full_fft(padded)
        self.grid = torch.stack([f.real, f.imag])[None].contiguous()  # (1, 2, D, H, W)
        self.big = big
        if compiled is None:
            compiled = os.environ.get("SUBTOMO_COMPILE_PROJECTOR", "") == "1"
        self.table: torch.Tensor | None = None
        if compiled:  # (W^3, 2) [Re, Im] interleaved, 2 zero voxels on each side: no corner out of range
            w = big + 4
            tab = torch.zeros(w, w, w, 2, dtype=torch.float32, device=volume.device)
            tab[2:-2, 2:-2, 2:-2] = self.grid[0].permute(1, 2, 3, 0)
            self.table = tab.reshape(-1, 2)

    def _samples(self, rotations: torch.Tensor, k: torch.Tensor):
        """Yield (start, end, (2, c, M) real/imaginary samples) over chunks of the rotations (n, 3, 3)."""
        rot = rotations.to(self.grid.dtype)
        nrot, m = rot.shape[0], k.shape[0]
        scale = self.pad * 2.0 / (self.big - 1)
        off = (self.big // 2) * 2.0 / (self.big - 1) - 1.0
        chunk = max(1, self.max_points // max(m, 1))
        for s in range(0, nrot, chunk):
            q = torch.matmul(k[None], rot[s:s + chunk])  # (c, M, 3) = (A^T k)^T
            if self.table is not None:
                v = self._table_samples(q)
                if v is not None:
                    yield s, min(nrot, s + chunk), v
                    continue
            g = (q * scale + off)[None, :, :, None, :]  # (1, c, M, 1, 3) in (x, y, z)
            v = F.grid_sample(self.grid, g, mode="bilinear", padding_mode="zeros", align_corners=True)
            yield s, min(nrot, s + chunk), v[0, :, :, :, 0]

    def _table_samples(self, q: torch.Tensor) -> torch.Tensor | None:
        """(2, c, M) samples at A^T k = q (c, M, 3) by the compiled kernel; None (and grid_sample from now) if it fails."""
        assert self.table is not None
        try:
            v = _compiled_trilinear()(self.table, q * self.pad + (self.big // 2 + 2), self.big + 4)
        except Exception as exc:  # no compiler: the same interpolation by grid_sample
            warnings.warn(f"compiled projector unavailable ({type(exc).__name__}: {exc}); using grid_sample", stacklevel=2)
            self.table = None
            return None
        m = q.shape[1]
        return torch.stack([v[:, :m], v[:, m:]])

    def project(self, rotations: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Rotations (..., 3, 3), k (M, 3) index units of the N box -> (..., M) complex."""
        lead, m = rotations.shape[:-2], k.shape[0]
        rot = rotations.reshape(-1, 3, 3)
        out = torch.empty(rot.shape[0], m, dtype=torch.complex64, device=self.grid.device)
        for s, e, v in self._samples(rot, k):
            out[s:e] = torch.complex(v[0], v[1])
        return out.reshape(*lead, m)

    def project_stacked(self, rotations: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """As :meth:`project`, as real [Re | Im] (..., 2M): the scoring GEMM's layout, no complex copy."""
        lead, m = rotations.shape[:-2], k.shape[0]
        rot = rotations.reshape(-1, 3, 3)
        out = torch.empty(rot.shape[0], 2 * m, dtype=torch.float32, device=self.grid.device)
        for s, e, v in self._samples(rot, k):
            out[s:e, :m] = v[0]
            out[s:e, m:] = v[1]
        return out.reshape(*lead, 2 * m)


def insert3d(data: torch.Tensor, weight: torch.Tensor, rotations: torch.Tensor, k: torch.Tensor,
             values: torch.Tensor, weights: torch.Tensor) -> None:
    """Splat complex values and real weights at A^T k into one class's grids (trilinear, in place).

    Parameters
    ----------
    data : torch.Tensor
        (N, N, N) complex full centred grid (zero frequency at N//2).
    weight : torch.Tensor
        (N, N, N) real grid.
    rotations : torch.Tensor
        (n, 3, 3) rotation matrices A.
    k : torch.Tensor
        (M, 3) component frequencies (x, y, z) in index units.
    values : torch.Tensor
        (n, M) complex.
    weights : torch.Tensor
        (n, M) real.
    """
    n = data.shape[-1]
    c = n // 2
    q = (torch.matmul(k[None], rotations.to(k.dtype)) + c).reshape(-1, 3)  # (P, 3) x, y, z index
    base = torch.floor(q)
    frac = q - base
    base = base.long()
    # data (Re, Im) and weight splatted together: one (P, 3) source per corner, into a grid
    # padded by 2 on each side so that no corner of a component (|k| < N/2 + 1/2) is out of range
    src = torch.cat([torch.view_as_real(values.reshape(-1).to(torch.complex64)),
                     weights.reshape(-1, 1).to(torch.float32)], dim=1)
    m = n + 4
    acc = torch.zeros(m * m * m, 3, dtype=torch.float32, device=data.device)
    fx, fy, fz = frac.unbind(1)
    base = (base + 2).clamp(0, m - 2)
    lin0 = (base[:, 2] * m + base[:, 1]) * m + base[:, 0]
    wx, wy, wz = (1 - fx, fx), (1 - fy, fy), (1 - fz, fz)
    for dz in (0, 1):
        for dy in (0, 1):
            w_zy = wz[dz] * wy[dy]
            lin_zy = lin0 + (dz * m + dy) * m
            for dx in (0, 1):
                acc.index_add_(0, lin_zy + dx, src * (w_zy * wx[dx])[:, None])
    acc = acc.reshape(m, m, m, 3)[2:n + 2, 2:n + 2, 2:n + 2]
    torch.view_as_real(data).add_(acc[..., :2])
    weight.add_(acc[..., 2])


def symmetrise3d(data: torch.Tensor, weight: torch.Tensor, matrices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the grids sampled at g q for every point-group operator g (identity included).

    Parameters
    ----------
    data : torch.Tensor
        (N, N, N) complex full centred grid.
    weight : torch.Tensor
        (N, N, N) real grid.
    matrices : torch.Tensor
        (G, 3, 3) float32 operators (identity first or anywhere).

    Returns
    -------
    data, weight : torch.Tensor
        (N, N, N) symmetrised grids.
    """
    if matrices.shape[0] <= 1:
        return data, weight
    n = data.shape[-1]
    ax = torch.arange(n, device=data.device, dtype=torch.float32) - n // 2
    z, y, x = torch.meshgrid(ax, ax, ax, indexing="ij")
    q = torch.stack([x, y, z], -1).reshape(-1, 3)
    src = torch.stack([data.real, data.imag, weight])[None]  # (1, 3, N, N, N)
    out = torch.zeros_like(src)
    for g in matrices.to(data.device).float():
        gq = q @ g.T  # g q
        grid = ((gq + n // 2) * 2.0 / (n - 1) - 1.0).reshape(1, n, n, n, 3)
        out += F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    out = out[0]
    return torch.complex(out[0], out[1]), out[2]
