"""Local resolution from two half maps: FSC in a soft sphere sliding over the masked region.

Both maps are first whitened by their common shell-wise RMS amplitude (see
:func:`whiten_pair`). For every point of a regular grid (``step_px``) whose mask value is > 0.5, a cube of side
W around it is cut from both half maps (windows are gathered in batches from a strided
view of the zero-padded maps, so nothing is copied per voxel), each window has its
sphere-weighted mean removed and is multiplied by a soft sphere (diameter ``window_px``,
raised-cosine edge), both windows are Fourier transformed in one batched FFT, and the FSC
of each pair is computed with the same nearest-shell binning as the global FSC. The local
resolution is where that FSC first crosses ``threshold`` (linear interpolation between the
two shells around the crossing, so values are not limited to W·p/r). The coarse grid is
hole-filled with the nearest valid value and trilinearly interpolated to every voxel;
voxels outside the mask (mask <= 0) are 0.

Small windows give noisy FSCs and a coarse shell spacing (W·p/r), and leakage of
low-resolution signal through the window still biases low-resolution regions towards
better values (~25% in tests with a 12 px window); the values are a local *relative*
measure like ResMap's or blocres', not a replacement for the global FSC.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from scipy import ndimage

from subtomo.errors import SubtomoError
from subtomo.fourier import fft_centered, fsc, ifft_centered, radial_average, rfft_multiplicity, shell_index, soft_sphere_mask


@dataclass
class LocalResResult:
    """Local resolution at every voxel and at the window centres."""

    map_A: torch.Tensor  # (z, y, x) local resolution in Å, 0 outside the mask
    centres_zyx: np.ndarray  # (n, 3) window centres (voxel indices)
    values_A: np.ndarray  # (n,) local resolution at the centres
    window_px: float
    cube_px: int
    step_px: int
    threshold: float

    def stats(self) -> dict[str, float]:
        """Min, 5th percentile, median, 95th percentile and max of the window values [Å]."""
        v = self.values_A
        return {"min": float(v.min()), "p05": float(np.percentile(v, 5)), "median": float(np.median(v)),
                "p95": float(np.percentile(v, 95)), "max": float(v.max())}


def window_geometry(window_px: float) -> tuple[int, float]:
    """(cube side W (even), soft-edge width) for a window sphere of diameter ``window_px``.

    Parameters
    ----------
    window_px
        Window sphere diameter [px].

    Returns
    -------
    tuple of (int, float)
        Cube side W [px] (even, at least 8) and soft-edge width [px].
    """
    edge = max(2.0, round(window_px / 3))
    cube = int(math.ceil(window_px + 2 * edge))
    cube += cube % 2
    return max(cube, 8), edge


def crossing_resolution(curves: torch.Tensor, cube_px: int, pixel_size_A: float, threshold: float) -> torch.Tensor:
    """Resolution (Å) where each FSC (batch, n_shells) first drops below ``threshold`` (interpolated).

    Never below: Nyquist (2 p). Below already at shell 1: capped at the cube size W p.

    Parameters
    ----------
    curves
        (batch, n_shells) FSC curves of windows of side ``cube_px``.
    cube_px
        Window cube side W [px].
    pixel_size_A
        Pixel size [Å].
    threshold
        FSC value defining the local resolution.

    Returns
    -------
    torch.Tensor
        (batch,) resolution [Å].
    """
    c = curves.double()
    n = c.shape[-1]
    below = c[:, 1:] < threshold
    has = below.any(dim=1)
    r = torch.where(has, below.float().argmax(dim=1) + 1, torch.full_like(has, n - 1, dtype=torch.long))
    prev = c.gather(1, (r - 1).unsqueeze(1)).squeeze(1)
    cur = c.gather(1, r.unsqueeze(1)).squeeze(1)
    frac = ((prev - threshold) / (prev - cur).clamp(min=1e-9)).clamp(0, 1)
    r_cross = torch.where(has, (r - 1).double() + frac, torch.full_like(prev, float(n - 1)))
    r_cross = r_cross.clamp(min=1.0)
    return cube_px * pixel_size_A / r_cross


def _linear_weights(n_out: int, positions: np.ndarray) -> torch.Tensor:
    """(n_out, G) matrix interpolating linearly from grid ``positions`` (sorted) to 0..n_out-1."""
    g = len(positions)
    m = np.zeros((n_out, g))
    v = np.arange(n_out, dtype=float)
    if g == 1:
        m[:, 0] = 1
        return torch.from_numpy(m)
    u = np.clip(np.interp(v, positions, np.arange(g)), 0, g - 1)
    i0 = np.clip(np.floor(u).astype(int), 0, g - 2)
    t = u - i0
    m[np.arange(n_out), i0] = 1 - t
    m[np.arange(n_out), i0 + 1] += t
    return torch.from_numpy(m)


def whiten_pair(half1: torch.Tensor, half2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Divide both maps by the shell-wise RMS amplitude of the pair (a global, shared filter).

    Global FSCs do not change under a shell-wise filter, but windowed ones do: without
    whitening the strong low-resolution power leaks through the window's transform into
    higher shells and makes low-resolution regions look better than they are.

    Parameters
    ----------
    half1, half2
        (n, n, n) half maps.

    Returns
    -------
    tuple of torch.Tensor
        The two whitened (n, n, n) float32 maps.
    """
    shape = tuple(half1.shape)
    shells = shell_index(shape, device=half1.device)
    ns = shape[-1] // 2 + 1
    f1, f2 = fft_centered(half1.float(), 3), fft_centered(half2.float(), 3)
    power = radial_average((f1.abs() ** 2 + f2.abs() ** 2) / 2, shells, ns, rfft_multiplicity(shape, device=half1.device))
    w = torch.cat([power, power[-1:]]).clamp(min=1e-30).rsqrt()[shells.clamp(max=ns)]
    return ifft_centered(f1 * w, shape), ifft_centered(f2 * w, shape)


def local_resolution(half1: torch.Tensor, half2: torch.Tensor, mask: torch.Tensor, pixel_size_A: float,
                     window_px: float = 16.0, step_px: int = 4, threshold: float = 0.143,
                     batch: int | None = None, progress=None, whiten: bool = True,
                     map_blocks: Callable[..., list] | None = None) -> LocalResResult:
    """Local-resolution map by windowed FSC (see module docstring).

    Parameters
    ----------
    half1, half2, mask
        (n, n, n) float32 unfiltered half maps; mask: windows are centred where it is > 0.5.
    pixel_size_A
        Pixel size [Å].
    window_px
        Diameter of the soft window sphere [px].
    step_px
        Grid spacing [px].
    threshold
        FSC threshold of the local resolution.
    batch
        Windows per batched FFT (None: automatic).
    progress
        Optional ``progress(iterable, total, desc)`` wrapper.
    whiten
        Whiten both maps by their common shell-wise amplitude first.
    map_blocks
        ``map_blocks(fn, blocks, shared)``: blocks of windows as tasks (``--cluster``); None: here.

    Returns
    -------
    LocalResResult
        (n, n, n) local resolution [Å] (0 outside the mask) and the per-window values.
    """
    if half1.shape != half2.shape or half1.shape != mask.shape:
        raise SubtomoError(f"local resolution: half maps {tuple(half1.shape)}, {tuple(half2.shape)} and mask "
                           f"{tuple(mask.shape)} must have the same size.")
    dev = half1.device
    shape = tuple(half1.shape)
    cube, _ = window_geometry(window_px)
    if cube > min(shape):
        raise SubtomoError(f"local resolution window {window_px:.1f} px (cube {cube} px) is larger than the map "
                           f"{shape}. Give a smaller --window-A.")
    grids = [np.arange(step_px // 2, n, step_px) for n in shape]
    gz, gy, gx = np.meshgrid(*grids, indexing="ij")
    m_np = mask.detach().cpu().numpy()
    inside = m_np[gz, gy, gx] > 0.5
    if not inside.any():
        raise SubtomoError("local resolution: no grid point lies inside the mask (mask > 0.5). "
                           "Give a larger mask or a smaller --step-px.")
    centres = np.stack([gz[inside], gy[inside], gx[inside]], axis=1)
    if whiten:
        half1, half2 = whiten_pair(half1, half2)
    args = (window_px, pixel_size_A, threshold, batch)
    if map_blocks is None:
        vals = window_resolutions(centres, half1, half2, *args, progress)
    else:  # blocks of windows as tasks: the (whitened) half maps are sent once, the centres per block
        blocks = np.array_split(centres, max(1, min(len(centres) // 256, 64)))
        vals = np.concatenate(map_blocks(window_resolutions, blocks, (half1.cpu(), half2.cpu(), *args)))
    full = _fill_grid(vals, inside, grids, mask).to(dev)
    return LocalResResult(full, centres, vals, float(window_px), cube, int(step_px), float(threshold))


def window_resolutions(centres: np.ndarray, half1: torch.Tensor, half2: torch.Tensor, window_px: float,
                       pixel_size_A: float, threshold: float, batch: int | None = None, progress=None) -> np.ndarray:
    """Local resolution of the windows centred on given voxels, in batches of windows (a task of ``--cluster``).

    Parameters
    ----------
    centres : numpy.ndarray
        (n, 3) window centres (z, y, x) [voxel].
    half1, half2 : torch.Tensor
        (n, n, n) (whitened) half maps.
    window_px, pixel_size_A, threshold, batch, progress
        As :func:`local_resolution`.

    Returns
    -------
    numpy.ndarray
        (n,) local resolution [Å].
    """
    dev = half1.device
    cube, edge = window_geometry(window_px)
    h = cube // 2
    pad = (h, h, h, h, h, h)
    p1 = torch.nn.functional.pad(half1.float(), pad)
    p2 = torch.nn.functional.pad(half2.float(), pad)
    v1 = p1.unfold(0, cube, 1).unfold(1, cube, 1).unfold(2, cube, 1)  # view, window at index c centred on c
    v2 = p2.unfold(0, cube, 1).unfold(1, cube, 1).unfold(2, cube, 1)
    sph = soft_sphere_mask((cube,) * 3, window_px / 2, edge, device=dev)
    sph_sum = sph.sum()
    shells = shell_index((cube,) * 3, device=dev)
    ns = cube // 2 + 1
    if batch is None:
        batch = max(1, int(4e6 // cube ** 3))
    c_t = torch.as_tensor(centres, device=dev)
    starts = range(0, len(centres), batch)
    it = progress(starts, len(starts), "local resolution windows") if progress else starts
    values = []
    for s in it:
        idx = c_t[s:s + batch]
        w1 = v1[idx[:, 0], idx[:, 1], idx[:, 2]]
        w2 = v2[idx[:, 0], idx[:, 1], idx[:, 2]]
        w1 = (w1 - (w1 * sph).sum(dim=(1, 2, 3), keepdim=True) / sph_sum) * sph
        w2 = (w2 - (w2 * sph).sum(dim=(1, 2, 3), keepdim=True) / sph_sum) * sph
        curves = fsc(fft_centered(w1, 3), fft_centered(w2, 3), shells, ns)
        values.append(crossing_resolution(curves, cube, pixel_size_A, threshold).cpu())
    return torch.cat(values).numpy()


def _fill_grid(values: np.ndarray, inside: np.ndarray, grids: list[np.ndarray], mask: torch.Tensor) -> torch.Tensor:
    """Grid values -> every voxel: holes take the nearest valid value, then trilinear; 0 outside the mask."""
    coarse = np.full(inside.shape, np.nan)
    coarse[inside] = values
    invalid = ~inside
    if invalid.any():
        _, nearest = ndimage.distance_transform_edt(invalid, return_indices=True)
        coarse = coarse[tuple(nearest)]
    mz, my, mx = (_linear_weights(n, g) for n, g in zip(tuple(mask.shape), grids))
    c = torch.from_numpy(coarse)
    c = torch.einsum("xk,ijk->ijx", mx, c)  # separable trilinear interpolation, one axis at a time
    c = torch.einsum("yj,ijx->iyx", my, c)
    full = torch.einsum("zi,iyx->zyx", mz, c)
    return torch.where(mask.detach().cpu() > 0, full, torch.zeros_like(full)).float()
