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

import math

import torch

from subtomo.fourier import fft_centered


def full_shells(n: int, ndim: int, device=None) -> torch.Tensor:
    """round(|q|) for the full centred grid (N^ndim) as long."""
    ax = torch.arange(n, device=device, dtype=torch.float32) - n // 2
    grids = torch.meshgrid(*([ax] * ndim), indexing="ij")
    return torch.round(torch.sqrt(sum(g ** 2 for g in grids))).long()


def _mirror(a: torch.Tensor, ndim: int) -> torch.Tensor:
    """a(-q) on the centred grid (index i -> (N - i) mod N)."""
    dims = tuple(range(a.ndim - ndim, a.ndim))
    return torch.roll(torch.flip(a, dims), shifts=(1,) * ndim, dims=dims)


def hermitian_symmetrise(data: torch.Tensor, weight: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Add each voxel's Hermitian mate (only one member of each pair was inserted)."""
    return data + _mirror(data, ndim).conj(), weight + _mirror(weight, ndim)


def shell_mean(values: torch.Tensor, shells: torch.Tensor, n_shells: int) -> torch.Tensor:
    """Per-shell mean (n_shells,) of a real grid (leading class dims allowed)."""
    lead = values.shape[: values.ndim - shells.ndim]
    idx = shells.reshape(-1).clamp(max=n_shells)
    v = values.reshape(*lead, -1).double()
    sums = torch.zeros(*lead, n_shells + 1, dtype=torch.float64, device=values.device)
    sums.index_add_(-1, idx, v)
    counts = torch.bincount(idx, minlength=n_shells + 1).double()
    return (sums / counts.clamp(min=1))[..., :n_shells]


def map_from_fourier(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """Real map (N^ndim, origin at N//2) from its full centred Fourier grid."""
    dims = tuple(range(v.ndim - ndim, v.ndim))
    return torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(v, dim=dims), dim=dims), dim=dims).real


def fourier_from_map(vol: torch.Tensor, ndim: int) -> torch.Tensor:
    """Full centred Fourier grid of a real map (inverse of :func:`map_from_fourier`)."""
    dims = tuple(range(vol.ndim - ndim, vol.ndim))
    return torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(vol, dim=dims), dim=dims), dim=dims)


def unregularised(data: torch.Tensor, weight: torch.Tensor, shells: torch.Tensor, floor_frac: float = 1e-3) -> torch.Tensor:
    """data / max(weight, floor_frac * shell mean weight) (RELION --skip_gridding style floor)."""
    n_shells = int(shells.max()) + 1
    mean_w = shell_mean(weight, shells, n_shells).float()
    floor = (floor_frac * mean_w)[..., shells].clamp(min=1e-30)
    return data / torch.maximum(weight, floor)


def reconstruct(data: torch.Tensor, weight: torch.Tensor, ndim: int, tau2: torch.Tensor | None = None,
                tau2_fudge: float = 1.0, max_shell: int | None = None) -> torch.Tensor:
    """MAP (with tau2) or unregularised map from *symmetrised* grids; zero beyond ``max_shell``."""
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
    """FSC (n_shells = N//2+1) of the unregularised half reconstructions (symmetrised grids); FSC(0)=1."""
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
    """(tau2, ssnr, sigma2_rec) per shell from the half-map FSC and the (symmetrised) weight grid."""
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
    """Classification prior: per-shell mean |V|^2 / 2 of the reference (n_shells,)."""
    n = vol.shape[-1]
    shells = full_shells(n, ndim, vol.device)
    f = fourier_from_map(vol, ndim)
    return (shell_mean(f.abs() ** 2, shells, n // 2 + 1) / 2).float()


def data_vs_prior(weight: torch.Tensor, tau2: torch.Tensor, tau2_fudge: float, ndim: int) -> torch.Tensor:
    """Mean over each shell of weight * T * tau^2 (classification's data_vs_prior)."""
    n = weight.shape[-1]
    shells = full_shells(n, ndim, weight.device)
    mean_w = shell_mean(weight, shells, tau2.shape[-1])
    return (mean_w * tau2_fudge * tau2.double()).float()


def resolution_shell(dvp: torch.Tensor, scan_from_top: bool = False, min_shell: int = 1) -> int:
    """RELION's current resolution: (first shell r >= 1 with data_vs_prior < 1) - 1.

    With ``scan_from_top`` (auto-refine) a shell with SSNR > 1 more than 3 shells higher is used instead.
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
    return box * pixel_size_A / max(shell, 1e-9)


def soft_sphere(n: int, ndim: int, radius_px: float, edge_px: float = 5.0, device=None) -> torch.Tensor:
    """1 inside radius, raised-cosine edge to 0 (RELION's solvent mask); centre N//2."""
    ax = torch.arange(n, device=device, dtype=torch.float32) - n // 2
    grids = torch.meshgrid(*([ax] * ndim), indexing="ij")
    r = torch.sqrt(sum(g ** 2 for g in grids))
    t = ((r - radius_px) / max(edge_px, 1e-6)).clamp(0, 1)
    return 0.5 + 0.5 * torch.cos(math.pi * t)


def particle_transform(vol: torch.Tensor, ndim: int) -> torch.Tensor:
    """rfft of particles in the engine's layout (subtomo.fourier.fft_centered)."""
    return fft_centered(vol, ndim)
