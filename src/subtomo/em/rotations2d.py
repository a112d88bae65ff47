"""In-plane rotations of 2D references and data in Fourier space (the 2D client of the engine).

Convention (docs/conventions.md, RELION): an image is the reference rotated by
``A = Rz(psi)`` (2x2 block ``[[c, s], [-s, c]]``): ``image(r) = ref(A^T r)``, so
``IMAGE(k) = REF(A^T k)``. Frequencies ``k`` are (x, y) in index units of the box
(cycles per box), as in :mod:`subtomo.em.components`.

* ``project``: the rotated references are sampled at ``A^T k`` by bilinear interpolation
  on the rfft of the reference zero-padded ``pad`` times (RELION's padded projector), with
  the real-space gridding pre-correction (division by the Fourier transform of the bilinear
  kernel, sinc^2 per axis) so that interpolation does not damp high frequencies.
* ``back_rotate``: the M-step brings the per-angle weighted sums of the data back into the
  reference frame. Without a CTF the 2D weights are radial (sum of posteriors / sigma^2(r)),
  so only the data sums need rotating: each sum is turned into its padded rfft and sampled
  at ``A q`` for every reference component ``q`` ("pull" interpolation, the transpose-free
  counterpart of RELION's splatting; exact for psi = 0, 90, 180, 270 without gridding
  correction). The sums are linear, so the result of two batches is the sum of the results.
* Sampling: psi grid with RELION's step adjustment, random perturbation and adaptive
  oversampling (children at psi - d/2 + (i + 1/2) d / 2^o).
"""

from __future__ import annotations

import torch

from subtomo.fourier import fft_centered, ifft_centered

# ----------------------------------------------------------------------------- sampling


def psi_step_adjusted(step_deg: float) -> float:
    """RELION's psi step: the nearest step with an integer number of steps in 360 deg.

    Parameters
    ----------
    step_deg : float
        Wanted step [deg].

    Returns
    -------
    float
        360 / round(360 / step) [deg].
    """
    n = max(1, int(round(360.0 / step_deg)))
    return 360.0 / n


def psi_grid_deg(step_deg: float, perturb: float = 0.0, dtype=torch.float64, device=None) -> torch.Tensor:
    """Coarse in-plane angles 0, d, 2d, ... (+ perturb * d), d = :func:`psi_step_adjusted`.

    Parameters
    ----------
    step_deg : float
        Wanted step [deg].
    perturb : float
        Shift of the whole grid in units of the step.
    dtype : torch.dtype
        Of the result.
    device : torch.device or str, optional
        Where it lives.

    Returns
    -------
    torch.Tensor
        (J,) angles [deg].
    """
    d = psi_step_adjusted(step_deg)
    n = int(round(360.0 / d))
    return (torch.arange(n, dtype=dtype, device=device) + perturb) * d


def oversampled_psi_deg(psi_deg: torch.Tensor, step_deg: float, order: int = 1) -> torch.Tensor:
    """Children of each coarse angle at psi - d/2 + (i + 1/2) d / 2^order.

    Parameters
    ----------
    psi_deg : torch.Tensor
        (J,) coarse angles [deg].
    step_deg : float
        Coarse step d [deg].
    order : int
        Oversampling order.

    Returns
    -------
    torch.Tensor
        (J, 2^order) angles [deg].
    """
    n = 2 ** order
    i = torch.arange(n, dtype=psi_deg.dtype, device=psi_deg.device)
    return psi_deg[:, None] - step_deg / 2 + (i[None, :] + 0.5) * step_deg / n


def rotation_matrices_2d(psi_deg: torch.Tensor) -> torch.Tensor:
    """RELION's in-plane rotation A = Rz(psi) restricted to (x, y): [[c, s], [-s, c]].

    Parameters
    ----------
    psi_deg : torch.Tensor
        (J,) angles [deg].

    Returns
    -------
    torch.Tensor
        (J, 2, 2).
    """
    a = torch.deg2rad(psi_deg)
    c, s = torch.cos(a), torch.sin(a)
    return torch.stack([torch.stack([c, s], -1), torch.stack([-s, c], -1)], -2)


# ----------------------------------------------------------------------------- padded transforms


def gridding_correction(box: int, pad: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Real-space factor sinc^2(pi x / (pad N)) sinc^2(pi y / (pad N)) of bilinear interpolation.

    Parameters
    ----------
    box : int
        Image size N [px].
    pad : int
        Padding factor.
    device : torch.device or str, optional
        Where it lives.
    dtype : torch.dtype
        Of the result.

    Returns
    -------
    torch.Tensor
        (N, N).
    """
    x = (torch.arange(box, device=device, dtype=torch.float64) - box // 2) / (pad * box)
    s = torch.sinc(x) ** 2  # torch.sinc(x) = sin(pi x)/(pi x)
    return (s[:, None] * s[None, :]).to(dtype)


def padded_rfft2d(images: torch.Tensor, pad: int = 2, gridding: bool = True) -> torch.Tensor:
    """Rfft (centre phase origin) of images zero-padded to pad*N.

    Values at padded index ``pad * k`` equal the unpadded transform at ``k``; with
    ``gridding`` the images are first divided by :func:`gridding_correction`.

    Parameters
    ----------
    images : torch.Tensor
        (..., N, N) real images (grey values), centre at N//2.
    pad : int
        Padding factor p (1: no padding).
    gridding : bool
        Divide by the bilinear kernel's transform first (pre-correction for :func:`sample_rfft2d`).

    Returns
    -------
    torch.Tensor
        (..., pN, pN//2+1) complex (complex64 for float32 images), :func:`subtomo.fourier.fft_centered` layout.
    """
    n = images.shape[-1]
    if gridding:
        images = images / gridding_correction(n, pad, images.device, images.dtype)
    if pad == 1:
        return fft_centered(images, 2)
    p = pad * n
    out = torch.zeros(*images.shape[:-2], p, p, dtype=images.dtype, device=images.device)
    o = p // 2 - n // 2
    out[..., o:o + n, o:o + n] = images
    return fft_centered(out, 2)


def bilinear_plan(coords: torch.Tensor, p: int, h: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat indices and weights of the bilinear corners of ``coords`` on an rfft grid (p, h).

    A point with x < 0 is read through its Hermitian mate: its corners are those of -coords and
    the mask says to conjugate the sample. Rows (y) wrap modulo p; columns (x) are clamped to h - 1.

    Parameters
    ----------
    coords : torch.Tensor
        (..., 2) sample positions (x, y) in index units of the grid (cycles per padded box), float.
    p : int
        Number of rows (full axis y) of the grid.
    h : int
        Number of columns (half axis x), p//2 + 1.

    Returns
    -------
    idx : torch.Tensor
        (4, ...) int64 flat indices y * h + x of the corners (x0y0, x1y0, x0y1, x1y1).
    weights : torch.Tensor
        (4, ...) bilinear weights, dtype of ``coords``.
    neg : torch.Tensor
        (...) bool, the points read through their Hermitian mate (x < 0).
    """
    x, y = coords[..., 0], coords[..., 1]
    neg = x < 0
    x = torch.where(neg, -x, x)
    y = torch.where(neg, -y, y)
    x0f, y0f = torch.floor(x), torch.floor(y)
    fx, fy = x - x0f, y - y0f
    x0 = x0f.long().clamp(0, h - 1)
    x1 = (x0 + 1).clamp(max=h - 1)
    y0 = torch.remainder(y0f.long(), p)
    y1 = torch.remainder(y0 + 1, p)
    idx = torch.stack([y0 * h + x0, y0 * h + x1, y1 * h + x0, y1 * h + x1])
    w = torch.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy])
    return idx, w, neg


def apply_plan(flat: torch.Tensor, plan: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Samples of grids at a :func:`bilinear_plan`.

    Parameters
    ----------
    flat : torch.Tensor
        (..., P*H) flattened rfft grids.
    plan : tuple of torch.Tensor
        Indices (4, ...), weights (4, ...) and the Hermitian-mate mask (...).

    Returns
    -------
    torch.Tensor
        (..., *coords batch) complex samples.
    """
    idx, w, neg = plan
    lead = flat.shape[:-1]
    vals = flat[..., idx.reshape(-1)].reshape(*lead, *idx.shape)  # (..., 4, *q)
    v = (vals * w.to(flat.real.dtype)).sum(len(lead))
    return torch.where(neg, v.conj(), v)


def sample_rfft2d(f: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of rfft grids ``f`` at ``coords``.

    Points with x < 0 use the Hermitian mate (conj at -k). The batch dims of ``coords``
    (all but the last two) must broadcast against those of ``f`` (all but the last two).

    Parameters
    ----------
    f : torch.Tensor
        (..., P, P//2+1) complex rfft grids (e.g. :func:`padded_rfft2d`, P = pad N).
    coords : torch.Tensor
        (..., Q, 2) positions (x, y) in padded index units (pad times the unpadded index k).
        For a single grid ``f`` (P, P//2+1) any (..., 2) shape.

    Returns
    -------
    torch.Tensor
        (..., Q) complex of ``f.dtype`` (broadcast batch dims); for a single grid, ``coords.shape[:-1]``.
    """
    p, h = f.shape[-2], f.shape[-1]
    plan = bilinear_plan(coords, p, h)
    if f.ndim == 2:  # one grid: plain indexing
        return apply_plan(f.reshape(-1), plan)
    idx, w, neg = plan
    batch = torch.broadcast_shapes(f.shape[:-2], coords.shape[:-2])
    flat = f.expand(*batch, p, h).reshape(*batch, p * h)
    out = torch.zeros((), dtype=f.dtype, device=f.device)
    for c in range(4):
        ic = idx[c].expand(*batch, idx.shape[-1])
        out = out + w[c].to(f.real.dtype) * torch.gather(flat, -1, ic)
    return torch.where(neg.expand_as(out), out.conj(), out)


# ----------------------------------------------------------------------------- project / back-rotate


def project2d(refs_padded_ft: torch.Tensor, psi_deg: torch.Tensor, k: torch.Tensor, pad: int) -> torch.Tensor:
    """Rotated references at components ``k``: IMAGE_j(k) = REF(A_j^T k), A_j = Rz(psi_j).

    Parameters
    ----------
    refs_padded_ft : torch.Tensor
        (K, pN, pN//2+1) complex, :func:`padded_rfft2d` of the K references.
    psi_deg : torch.Tensor
        (J,) in-plane angles psi [deg].
    k : torch.Tensor
        (M, 2) float components (x, y) in index units of the N box (cycles per box).
    pad : int
        Padding factor p of ``refs_padded_ft``.

    Returns
    -------
    torch.Tensor
        (K, J, M) complex, dtype of ``refs_padded_ft``.
    """
    a = rotation_matrices_2d(psi_deg.to(torch.float64)).to(k.dtype).to(k.device)  # (J, 2, 2)
    q = torch.einsum("jba,mb->jma", a, k) * pad  # A^T k: q_a = sum_b A_ba k_b
    return sample_rfft2d(refs_padded_ft[:, None], q[None])


def components_to_rfft_grid(values: torch.Tensor, idx: torch.Tensor, k: torch.Tensor, size: int,
                            dc: torch.Tensor | None = None) -> torch.Tensor:
    """Put component values back on the rfft grid, with the Hermitian mates of the kx = 0 column.

    Components hold one member of each Hermitian pair; on the kx = 0 column the other member is
    the complex conjugate at -ky, which the inverse transform needs.

    Parameters
    ----------
    values : torch.Tensor
        (R, M) complex values at the components ``k``.
    idx : torch.Tensor
        (M,) int64 positions of the components in the flattened rfft grid of side ``size``
        (the same in the box grid and its crop to ``size``).
    k : torch.Tensor
        (M, 2) float components (x, y) in index units (cycles per box).
    size : int
        Grid side s [px], even.
    dc : torch.Tensor, optional
        (R,) values at the zero frequency (not among the components).

    Returns
    -------
    torch.Tensor
        (R, size, size//2+1) of ``values.dtype``, zero elsewhere.
    """
    hh = size // 2 + 1
    on_axis = torch.nonzero(k[:, 0] == 0).squeeze(1)
    mate_idx = torch.remainder(-k[on_axis, 1].round().long(), size) * hh
    grid = torch.zeros(values.shape[0], size * hh, dtype=values.dtype, device=values.device)
    grid[:, idx] = values
    grid[:, mate_idx] = values[:, on_axis].conj()
    if dc is not None:
        grid[:, 0] = dc
    return grid.reshape(-1, size, hh)


def back_rotate2d(sums: torch.Tensor, psi_deg: torch.Tensor, idx: torch.Tensor, k: torch.Tensor,
                  size: int, pad: int = 2, gridding: bool = True, dc: torch.Tensor | None = None,
                  chunk: int = 256) -> torch.Tensor:
    """Sum over angles of the data sums brought back into the reference frame.

    Each row's components are put back on the rfft grid of side ``size`` (with the Hermitian
    mates on the kx = 0 column), transformed to an image, padded, and sampled at A_j q ("pull"
    interpolation). Rows that are all zero are skipped.

    Parameters
    ----------
    sums : torch.Tensor
        (K, J, M) complex weighted data sums at the image components ``k``, one row per (class, angle).
    psi_deg : torch.Tensor
        (J,) in-plane angles psi_j [deg] of the rows.
    idx : torch.Tensor
        (M,) int64 positions of the components in the flattened rfft grid of side ``size``
        (``size * (size//2+1)`` entries).
    k : torch.Tensor
        (M, 2) float components (x, y) in index units of the box (cycles per box).
    size : int
        Current image size s [px], even.
    pad : int
        Padding factor of the interpolation.
    gridding : bool
        Apply the gridding pre-correction (:func:`padded_rfft2d`).
    dc : torch.Tensor, optional
        (K, J) complex, the sums' zero-frequency values (not among the components, but the
        interpolation of the lowest shells needs them; the data's mean is a good value).
    chunk : int
        Rows transformed per pass (memory bound).

    Returns
    -------
    torch.Tensor
        (K, M) of ``sums.dtype``: sum_j SUM_kj(A_j q) for the reference components q = k.
    """
    kk, jj, m = sums.shape
    out = torch.zeros(kk, m, dtype=sums.dtype, device=sums.device)
    flat = sums.reshape(kk * jj, m)
    live = torch.nonzero(flat.abs().sum(-1) > 0).squeeze(1)
    if live.numel() == 0:
        return out
    a = rotation_matrices_2d(psi_deg.to(torch.float64)).to(k.dtype).to(k.device)  # (J, 2, 2)
    for start in range(0, live.numel(), chunk):
        rows = live[start:start + chunk]
        grid = components_to_rfft_grid(flat[rows], idx, k, size, None if dc is None else dc.reshape(kk * jj)[rows])
        img = ifft_centered(grid, (size, size))
        fp = padded_rfft2d(img, pad, gridding)
        j = rows % jj
        coords = torch.einsum("rab,mb->rma", a[j], k) * pad  # A q (image frame), padded units
        vals = sample_rfft2d(fp, coords)  # (R, M)
        out.index_add_(0, rows // jj, vals)
    return out
