"""Wiener/MAP reconstruction, gold-standard FSC, tau^2 and resolution (any ndim).

Grids are the full, centred, unpadded Fourier grids of the sufficient statistics
(zero frequency at N//2). Formulas from relion-internals §3.1, §3.4, §3.5:

* V(k) = data(k) / (weight(k) + 1/(T tau^2(r)))  (MAP), or data/max(weight, floor) without prior;
* FSC between the unregularised halves data/weight; sigma^2_rec(r) = 1/mean weight(r);
  SSNR = f/(1-f) with f = clip(FSC, 0.001, 0.999) (joined halves: f <- sqrt(2f/(1+f)));
  tau^2 = SSNR sigma^2_rec (times T as in RELION >= 3.1 is not applied: T = 1 in refinement);
* classification: tau^2 = per-shell mean |V|^2 / 2 of the current reference,
  data_vs_prior(r) = mean over the shell of weight * T * tau^2.
"""

from __future__ import annotations

import operator
from functools import reduce

import torch

from subtomo.fourier import fft_centered


def full_shells(n: int, ndim: int, device=None) -> torch.Tensor:
    """Integer shell round(|q|) of every voxel of a full centred grid.

    Parameters
    ----------
    n : int
        Box size N [px].
    ndim : int
        2 or 3.
    device : torch.device or str, optional
        Where the grid lives.

    Returns
    -------
    torch.Tensor
        (N,)*ndim int64 shell indices [Fourier px].
    """
    ax = torch.arange(n, device=device, dtype=torch.float32) - n // 2
    grids = torch.meshgrid(*([ax] * ndim), indexing="ij")
    return torch.round(torch.sqrt(reduce(operator.add, (g ** 2 for g in grids)))).long()


def _mirror(a: torch.Tensor, ndim: int) -> torch.Tensor:
    """a(-q) on the centred grid (index i -> (N - i) mod N)."""
    dims = tuple(range(a.ndim - ndim, a.ndim))
    return torch.roll(torch.flip(a, dims), shifts=(1,) * ndim, dims=dims)


def hermitian_symmetrise(data: torch.Tensor, weight: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Add each voxel's Hermitian mate (only one member of each pair was inserted).

    Parameters
    ----------
    data : torch.Tensor
        (..., N^ndim) complex full centred grid (leading class dims allowed).
    weight : torch.Tensor
        Real grid of the same shape.
    ndim : int
        Grid dimensions.

    Returns
    -------
    data, weight : torch.Tensor
        The completed grids, same shapes.
    """
    return data + _mirror(data, ndim).conj(), weight + _mirror(weight, ndim)


def shell_mean(values: torch.Tensor, shells: torch.Tensor, n_shells: int) -> torch.Tensor:
    """Per-shell mean of a real grid.

    Parameters
    ----------
    values : torch.Tensor
        (..., N^ndim) real (leading class dims allowed).
    shells : torch.Tensor
        (N^ndim) int64 shell of each voxel (:func:`full_shells`).
    n_shells : int
        Shells 0..n_shells-1 are returned (higher ones are dropped).

    Returns
    -------
    torch.Tensor
        (..., n_shells) float64.
    """
    lead = values.shape[: values.ndim - shells.ndim]
    idx = shells.reshape(-1).clamp(max=n_shells)
    v = values.reshape(*lead, -1).double()
    sums = torch.zeros(*lead, n_shells + 1, dtype=torch.float64, device=values.device)
    sums.index_add_(-1, idx, v)
    counts = torch.bincount(idx, minlength=n_shells + 1).double()
    return (sums / counts.clamp(min=1))[..., :n_shells]


def map_from_fourier(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """Real map (origin at N//2) from its full centred Fourier grid.

    Parameters
    ----------
    v : torch.Tensor
        (..., N^ndim) complex, zero frequency at index N//2.
    ndim : int
        Grid dimensions.

    Returns
    -------
    torch.Tensor
        (..., N^ndim) real map.
    """
    dims = tuple(range(v.ndim - ndim, v.ndim))
    return torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(v, dim=dims), dim=dims), dim=dims).real


def fourier_from_map(vol: torch.Tensor, ndim: int) -> torch.Tensor:
    """Full centred Fourier grid of a real map (inverse of :func:`map_from_fourier`).

    Parameters
    ----------
    vol : torch.Tensor
        (..., N^ndim) real map, origin at N//2.
    ndim : int
        Grid dimensions.

    Returns
    -------
    torch.Tensor
        (..., N^ndim) complex, zero frequency at index N//2.
    """
    dims = tuple(range(vol.ndim - ndim, vol.ndim))
    return torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(vol, dim=dims), dim=dims), dim=dims)


def unregularised(data: torch.Tensor, weight: torch.Tensor, shells: torch.Tensor, floor_frac: float = 1e-3) -> torch.Tensor:
    """Data / max(weight, floor_frac * shell mean weight) (RELION --skip_gridding style floor).

    Parameters
    ----------
    data, weight : torch.Tensor
        (..., N^ndim) symmetrised complex data and real weight grids.
    shells : torch.Tensor
        (N^ndim) int64 shell of each voxel.
    floor_frac : float
        Floor of the weight as a fraction of its shell mean.

    Returns
    -------
    torch.Tensor
        (..., N^ndim) complex Fourier grid of the unregularised map.
    """
    n_shells = int(shells.max()) + 1
    mean_w = shell_mean(weight, shells, n_shells).float()
    floor = (floor_frac * mean_w)[..., shells].clamp(min=1e-30)
    return data / torch.maximum(weight, floor)


def reconstruct(data: torch.Tensor, weight: torch.Tensor, ndim: int, tau2: torch.Tensor | None = None,
                tau2_fudge: float = 1.0, max_shell: int | None = None) -> torch.Tensor:
    """MAP (with ``tau2``) or unregularised map from symmetrised grids; zero beyond ``max_shell``.

    V(k) = data(k) / (weight(k) + 1 / (T tau^2(r))); the mean (shell 0) is data / weight.

    Parameters
    ----------
    data, weight : torch.Tensor
        (N^ndim) complex data and real weight grids (Hermitian-completed, symmetrised).
    ndim : int
        Grid dimensions.
    tau2 : torch.Tensor, optional
        (n_shells,) signal power per shell; None: unregularised.
    tau2_fudge : float
        Regularisation parameter T.
    max_shell : int, optional
        Shells >= this are set to zero [Fourier px].

    Returns
    -------
    torch.Tensor
        (N^ndim) real map.
    """
    n = data.shape[-1]
    shells = full_shells(n, ndim, data.device)
    if tau2 is None:
        v = unregularised(data, weight, shells)
    else:
        t2 = tau2.to(data.device).float()
        nsh = t2.shape[-1]
        t2_grid = t2[..., shells.clamp(max=nsh - 1)]
        reg = torch.where(t2_grid > 0, 1.0 / (tau2_fudge * t2_grid.clamp(min=1e-30)), torch.full_like(t2_grid, 1e30))
        v = data / (weight + reg)
        v = torch.where(t2_grid > 0, v, torch.zeros_like(v))
    if max_shell is not None:
        v = torch.where(shells < max_shell, v, torch.zeros_like(v))
    v = torch.where(shells == 0, data / weight.clamp(min=1e-30), v)  # keep the mean
    return map_from_fourier(v, ndim)


def fsc_halves(d1: torch.Tensor, w1: torch.Tensor, d2: torch.Tensor, w2: torch.Tensor, ndim: int) -> torch.Tensor:
    """Gold-standard FSC of the unregularised half reconstructions (symmetrised grids); FSC(0) = 1.

    Parameters
    ----------
    d1, w1, d2, w2 : torch.Tensor
        (N^ndim) data and weight grids of half 1 and half 2.
    ndim : int
        Grid dimensions.

    Returns
    -------
    torch.Tensor
        (N//2 + 1,) float32.
    """
    n = d1.shape[-1]
    shells = full_shells(n, ndim, d1.device)
    n_shells = n // 2 + 1
    f1, f2 = unregularised(d1, w1, shells), unregularised(d2, w2, shells)
    num = shell_mean((f1 * f2.conj()).real, shells, n_shells)
    den = torch.sqrt(shell_mean(f1.abs() ** 2, shells, n_shells) * shell_mean(f2.abs() ** 2, shells, n_shells))
    out = num / den.clamp(min=1e-30)
    out[0] = 1.0
    return out.float()


def tau2_from_fsc(fsc: torch.Tensor, weight: torch.Tensor, ndim: int, joined: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Signal power, SSNR and reconstruction noise per shell from the half-map FSC.

    SSNR = f / (1 - f) with f = clip(FSC, 0.001, 0.999) (joined halves: f <- sqrt(2f / (1 + f)));
    sigma^2_rec = 1 / mean weight; tau^2 = SSNR sigma^2_rec.

    Parameters
    ----------
    fsc : torch.Tensor
        (n_shells,) FSC of the halves.
    weight : torch.Tensor
        (N^ndim) symmetrised weight grid.
    ndim : int
        Grid dimensions.
    joined : bool
        The FSC is that of two halves that are summed (final iteration).

    Returns
    -------
    tau2, ssnr, sigma2_rec : torch.Tensor
        (n_shells,) float32 each.
    """
    n = weight.shape[-1]
    shells = full_shells(n, ndim, weight.device)
    n_shells = fsc.shape[0]
    mean_w = shell_mean(weight, shells, n_shells)
    sigma2_rec = torch.where(mean_w > 0, 1.0 / mean_w.clamp(min=1e-300), torch.zeros_like(mean_w))
    f = fsc.double().clamp(min=0.001)
    if joined:
        f = torch.sqrt(2 * f / (1 + f))
    f = f.clamp(max=0.999)
    ssnr = f / (1 - f)
    tau2 = ssnr * sigma2_rec
    return tau2.float(), ssnr.float(), sigma2_rec.float()


def tau2_from_power(vol: torch.Tensor, ndim: int) -> torch.Tensor:
    """Classification prior: per-shell mean |V|^2 / 2 of a reference.

    Parameters
    ----------
    vol : torch.Tensor
        (N^ndim) real reference.
    ndim : int
        Grid dimensions.

    Returns
    -------
    torch.Tensor
        (N//2 + 1,) float32.
    """
    n = vol.shape[-1]
    shells = full_shells(n, ndim, vol.device)
    f = fourier_from_map(vol, ndim)
    return (shell_mean(f.abs() ** 2, shells, n // 2 + 1) / 2).float()


def data_vs_prior(weight: torch.Tensor, tau2: torch.Tensor, tau2_fudge: float, ndim: int) -> torch.Tensor:
    """Classification's data_vs_prior: mean over each shell of weight * T * tau^2.

    Parameters
    ----------
    weight : torch.Tensor
        (N^ndim) symmetrised weight grid of one class.
    tau2 : torch.Tensor
        (n_shells,) prior power of the class.
    tau2_fudge : float
        Regularisation parameter T.
    ndim : int
        Grid dimensions.

    Returns
    -------
    torch.Tensor
        (n_shells,) float32.
    """
    n = weight.shape[-1]
    shells = full_shells(n, ndim, weight.device)
    mean_w = shell_mean(weight, shells, tau2.shape[-1])
    return (mean_w * tau2_fudge * tau2.double()).float()


def resolution_shell(dvp: torch.Tensor, scan_from_top: bool = False, min_shell: int = 1) -> int:
    """RELION's current resolution shell: (first shell r >= 1 with data_vs_prior < 1) - 1.

    With ``scan_from_top`` (auto-refine) a shell with SSNR > 1 more than 3 shells higher is used instead.

    Parameters
    ----------
    dvp : torch.Tensor
        (n_shells,) data_vs_prior or SSNR per shell.
    scan_from_top : bool
        Accept an isolated higher shell with SSNR > 1.
    min_shell : int
        Smallest shell returned.

    Returns
    -------
    int
        Shell index [Fourier px].
    """
    v = dvp.detach().cpu()
    n = len(v)
    below = [r for r in range(1, n) if v[r] < 1]
    r = (below[0] - 1) if below else n - 1
    if scan_from_top:
        for top in range(n - 1, r + 3, -1):
            if v[top] > 1:
                r = top
                break
    return max(r, min_shell)


def resolution_A(shell: int, box: int, pixel_size_A: float) -> float:
    """Resolution of Fourier shell ``shell`` of an N = ``box`` px box: N * pixel size / shell.

    Parameters
    ----------
    shell : int
        Shell index r [Fourier px] (a float is accepted).
    box : int
        Box size N [px].
    pixel_size_A : float
        Pixel size [Å].

    Returns
    -------
    float
        Resolution [Å]; shell 0 gives a huge value (N * pixel size / 1e-9), not inf.
    """
    return box * pixel_size_A / max(shell, 1e-9)


def particle_transform(vol: torch.Tensor, ndim: int) -> torch.Tensor:
    """Rfft of particles in the engine's layout (:func:`subtomo.fourier.fft_centered`).

    Parameters
    ----------
    vol : torch.Tensor
        (..., N^ndim) real particles, origin at N//2.
    ndim : int
        Grid dimensions.

    Returns
    -------
    torch.Tensor
        (..., N, ..., N//2 + 1) complex.
    """
    return fft_centered(vol, ndim)
