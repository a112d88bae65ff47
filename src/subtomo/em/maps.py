"""Operations on reference maps shared by the 3D clients: masks, low-pass, rotation.

Maps are real (N, N, N) float32 tensors with the box centre at index N//2 (the
conventions of :mod:`subtomo.fourier`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from subtomo.em.components import fourier_components
from subtomo.em.projector3d import Projector3D
from subtomo.fourier import fft_centered, ifft_centered, raised_cosine_lowpass, soft_sphere_mask


def even_size(value: float) -> int:
    """The smallest even integer >= ``value`` (image sizes of the engine are even).

    Parameters
    ----------
    value : float
        A size [px].

    Returns
    -------
    int
        2 * ceil(value / 2).
    """
    return int(2 * math.ceil(value / 2))


def particle_mask(box: int, diameter_A: float, pixel_size_A: float, device=None, edge_px: float = 5.0) -> torch.Tensor:
    """RELION's E-step mask: a soft sphere of the particle diameter, zero outside.

    Parameters
    ----------
    box : int
        Box size N [px].
    diameter_A : float
        Particle diameter [Å]; the radius is capped at N/2 - 1 px.
    pixel_size_A : float
        Pixel size [Å].
    device : torch.device or str, optional
        Where the mask lives.
    edge_px : float
        Width of the raised-cosine edge [px], centred on the particle radius.

    Returns
    -------
    torch.Tensor
        (N, N, N) float32 in 0..1.
    """
    radius = min(diameter_A / (2 * pixel_size_A), box / 2 - 1)
    return soft_sphere_mask((box,) * 3, max(radius - edge_px / 2, 1.0), edge_px, device)


def lowpass_map(vol: torch.Tensor, shell: float) -> torch.Tensor:
    """Low-pass a map at a Fourier shell with a 2-shell raised-cosine edge.

    Parameters
    ----------
    vol : torch.Tensor
        (N, N, N) real map.
    shell : float
        Cut-off shell [px^-1 in units of 1/N], e.g. N * pixel size / resolution.

    Returns
    -------
    torch.Tensor
        (N, N, N) filtered map.
    """
    shape = tuple(vol.shape)
    filt = raised_cosine_lowpass(shape, shell, 2.0, device=vol.device)
    return ifft_centered(fft_centered(vol, 3) * filt, shape)


def rotate_map(vol: torch.Tensor, matrix: np.ndarray, pad: int = 2) -> torch.Tensor:
    """A map rotated by A (particle convention: out(r) = vol(A^T r)), by Fourier sampling.

    Band-limited to the Nyquist sphere (the corners of the cube are dropped); the mean is kept.

    Parameters
    ----------
    vol : torch.Tensor
        (N, N, N) real map.
    matrix : numpy.ndarray
        (3, 3) rotation A (acts on (x, y, z)).
    pad : int
        Padding factor of the reference transform.

    Returns
    -------
    torch.Tensor
        (N, N, N) rotated map, on the device of ``vol``.
    """
    box = vol.shape[-1]
    comps = fourier_components(box, box, 3, device=vol.device)
    a = Projector3D(vol, pad=pad).project(torch.as_tensor(matrix, dtype=torch.float32, device=vol.device)[None], comps.k)[0]
    f = torch.zeros(box * box * (box // 2 + 1), dtype=torch.complex64, device=vol.device)
    # components with kx > 0 stand for their mate too (the inverse rfft adds it); on the
    # kx = 0 plane only one member of each pair is set, and the inverse keeps half of it
    f[comps.idx] = a * torch.where(comps.k[:, 0] == 0, 2.0, 1.0).to(a.dtype)
    f = f.reshape(box, box, box // 2 + 1)
    out = ifft_centered(f, (box,) * 3)
    return out - out.mean() + vol.mean()  # the DC component is not among the components
