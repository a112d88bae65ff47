"""Flattened Fourier components inside the current resolution (dimension-agnostic).

The likelihood engine never sees full Fourier grids: it works on the M components of a
cropped rfft (``subtomo.fourier.crop_rfft`` to the current size ``size``) whose shell r
satisfies 1 <= r < size/2 (DC excluded as in RELION), and of each Hermitian pair only one
member is kept (kx > 0, or kx == 0 and the first non-zero of (ky[, kz]) > 0). Sums over
these components are therefore sums over independent complex Gaussian variables.
Frequencies ``k`` are in index units of the original box (cycles per box; cycles/px = k/box).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from subtomo.fourier import crop_rfft, rfft_frequencies


@dataclass
class FourierComponents:
    """The component set of one (box, size, ndim, max_shell).

    idx: (M,) indices into the flattened rfft grid of side ``size``;
    k: (M, ndim) frequency vectors (x, y[, z]) in index units of the full box;
    shell: (M,) integer shell round(|k|).
    """

    box: int
    size: int
    ndim: int
    idx: torch.Tensor
    k: torch.Tensor
    shell: torch.Tensor

    @property
    def m(self) -> int:
        """Number of components M."""
        return int(self.idx.numel())

    def extract(self, f: torch.Tensor) -> torch.Tensor:
        """(B, *rfft grid of box or of size) -> (B, M): crop to ``size`` and gather the components."""
        if f.shape[-2] != self.size:
            f = crop_rfft(f, self.size, self.ndim)
        return f.reshape(*f.shape[: f.ndim - self.ndim], -1)[..., self.idx]

    def subset(self, max_shell: float) -> tuple["FourierComponents", torch.Tensor]:
        """Components with shell < max_shell (e.g. the coarse-pass crop) and the (M,) bool mask."""
        keep = self.shell < max_shell
        sub = FourierComponents(self.box, self.size, self.ndim, self.idx[keep], self.k[keep], self.shell[keep])
        return sub, keep

    def select(self, keep: torch.Tensor) -> "FourierComponents":
        """The components where the (M,) bool ``keep`` is true (e.g. outside the missing wedge)."""
        return FourierComponents(self.box, self.size, self.ndim, self.idx[keep], self.k[keep], self.shell[keep])

    def phase_ramps(self, shifts_px: torch.Tensor) -> torch.Tensor:
        """exp(-2 pi i k.t / box) for shifts (..., ndim) px -> (..., M) complex.

        Multiplying a particle by it translates its content by +t (RELION: an image is
        translated by +origin to centre it, so t = rlnOrigin in px).
        """
        ang = (-2 * math.pi / self.box) * torch.matmul(shifts_px.to(self.k.dtype), self.k.T)
        return torch.polar(torch.ones_like(ang), ang)


def fourier_components(box: int, size: int, ndim: int, max_shell: float | None = None,
                       device=None) -> FourierComponents:
    """Component set of the rfft cropped to ``size`` (even), shells 1 <= r < min(size/2, max_shell).

    Parameters
    ----------
    box : int
        Box size N [px].
    size : int
        Current image size [px] (capped at N; made even).
    ndim : int
        2 or 3.
    max_shell : float, optional
        Further limit on the shell [Fourier px].
    device : torch.device or str, optional
        Where the index tensors live.

    Returns
    -------
    FourierComponents
        M components: indices, frequencies k (M, ndim) in index units, shells (M,).
    """
    size = min(int(size), box)
    if size % 2:
        size -= 1
    shape = (size,) * ndim
    k = rfft_frequencies(shape, device=device) * size  # index units (integers), (..., ndim) x first
    k = k.reshape(-1, ndim)
    r = k.norm(dim=-1)
    shell = torch.round(r).long()
    limit = size / 2 if max_shell is None else min(size / 2, max_shell)
    keep = (shell >= 1) & (shell < limit)
    # one member of each Hermitian pair: kx > 0, or kx == 0 and the next axis decides
    kx = k[:, 0]
    half = kx > 0
    rest = kx == 0
    for axis in range(1, ndim):
        half = half | (rest & (k[:, axis] > 0))
        rest = rest & (k[:, axis] == 0)
    keep = keep & half
    # the -size/2 row has no mate inside the grid: drop it for a symmetric set
    for axis in range(ndim):
        keep = keep & (k[:, axis] > -size / 2)
    idx = torch.nonzero(keep).squeeze(1)
    kk = k[idx].float()
    return FourierComponents(box, size, ndim, idx, kk, shell[idx])


def shell_counts(comps: FourierComponents, n_shells: int) -> torch.Tensor:
    """Number of components per shell.

    Parameters
    ----------
    comps : FourierComponents
        The components.
    n_shells : int
        Shells 0..n_shells-1.

    Returns
    -------
    torch.Tensor
        (n_shells,) counts.
    """
    return torch.bincount(comps.shell, minlength=n_shells)[:n_shells].to(torch.float64)
