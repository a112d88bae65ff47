"""Fourier-space primitives shared by every stage (pure torch functions).

Layout (docs/conventions.md): real-space arrays are (z, y, x) or (y, x) with the box
centre at index N//2 in every axis. Transforms are ``rfftn`` of the ifftshifted array,
so the phase origin is the box centre and the half axis is x (last). Frequency vectors
are returned with components ordered (x, y[, z]) in cycles per pixel, to be multiplied
with rotation matrices that act on (x, y, z). Shell index r = round(|k| * N) for cubic
boxes of side N. All functions follow the device and dtype of their tensor inputs.
"""

from __future__ import annotations

import math
import operator
from functools import reduce
from typing import Any

import torch


def rfft_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the rfft of a real array of ``shape``.

    Parameters
    ----------
    shape : tuple of int
        Real-space shape, (z, y, x) or (y, x) [px]; the last axis (x) is the half axis.

    Returns
    -------
    tuple of int
        ``shape`` with the last entry replaced by ``shape[-1] // 2 + 1``, e.g. (box, box, box//2+1).
    """
    return (*shape[:-1], shape[-1] // 2 + 1)


def rfft_frequencies(shape: tuple[int, ...], device=None, dtype=torch.float32) -> torch.Tensor:
    """Frequency vector of each sample of the rfft grid of ``shape``.

    Parameters
    ----------
    shape : tuple of int
        Real-space shape, (z, y, x) or (y, x) [px].
    device : torch.device or str, optional
        Device of the result.
    dtype : torch.dtype
        Floating dtype of the result (default float32).

    Returns
    -------
    torch.Tensor
        (*rfft_shape(shape), ndim) of ``dtype``: frequencies [cycles/px] in the unshifted rfft order
        (``fftfreq`` on full axes, ``rfftfreq`` on the half axis x), components ordered (x, y[, z]) so that
        they can be multiplied with rotation matrices acting on (x, y, z).
    """
    axes = [torch.fft.fftfreq(n, device=device, dtype=dtype) for n in shape[:-1]]
    axes.append(torch.fft.rfftfreq(shape[-1], device=device, dtype=dtype))
    grids = torch.meshgrid(*axes, indexing="ij")  # (z, y, x) order
    return torch.stack(grids[::-1], dim=-1)


def frequency_radius(shape: tuple[int, ...], device=None) -> torch.Tensor:
    """Frequency magnitude |k| of each sample of the rfft grid of ``shape``.

    Parameters
    ----------
    shape : tuple of int
        Real-space shape, (z, y, x) or (y, x) [px].
    device : torch.device or str, optional
        Device of the result.

    Returns
    -------
    torch.Tensor
        rfft_shape(shape) float32, |k| [cycles/px].
    """
    return rfft_frequencies(shape, device=device).norm(dim=-1)


def shell_index(shape: tuple[int, ...], device=None) -> torch.Tensor:
    """Integer Fourier shell r = round(|k| N) of each rfft sample.

    Parameters
    ----------
    shape : tuple of int
        Real-space shape of a cubic or square box, (box, box, box) or (box, box) [px]; N = ``shape[-1]``.
    device : torch.device or str, optional
        Device of the result.

    Returns
    -------
    torch.Tensor
        rfft_shape(shape) int64 shell index (0 at the origin; N/2 at Nyquist along an axis, larger in the
        corners). Shell r is at spatial frequency r / (N * pixel size).
    """
    n = shape[-1]
    return torch.round(frequency_radius(shape, device=device) * n).long()


def rfft_multiplicity(shape: tuple[int, ...], device=None) -> torch.Tensor:
    """Weight 2 for rfft samples whose Hermitian mate is not stored, 1 otherwise.

    Sums of |F|^2 over the half grid times this weight equal sums over the full grid.

    Parameters
    ----------
    shape : tuple of int
        Real-space shape, (z, y, x) or (y, x) [px].
    device : torch.device or str, optional
        Device of the result.

    Returns
    -------
    torch.Tensor
        rfft_shape(shape) float32: 1 on the x = 0 plane (and the x = N/2 Nyquist plane for even N), 2 elsewhere.
    """
    n = shape[-1]
    w = torch.full(rfft_shape(shape), 2.0, device=device)
    w[..., 0] = 1.0
    if n % 2 == 0:
        w[..., n // 2] = 1.0
    return w


def fft_centered(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """Rfft of a real array whose origin is the box centre (last ``ndim`` axes).

    ``rfftn(ifftshift(x))``: the phase origin is index N//2 on each axis, frequencies are in unshifted
    order and the half axis is x (docs/conventions.md, Fourier layout).

    Parameters
    ----------
    x : torch.Tensor
        (..., z, y, x) or (..., y, x) real array (e.g. float32), leading dims are a batch.
    ndim : int
        Number of trailing axes to transform (2 or 3).

    Returns
    -------
    torch.Tensor
        (..., *rfft_shape(grid)) complex, e.g. (..., box, box, box//2+1) complex64 for float32 input.
    """
    dims = tuple(range(-ndim, 0))
    return torch.fft.rfftn(torch.fft.ifftshift(x, dim=dims), dim=dims)


def ifft_centered(f: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`fft_centered` back to a real array of ``shape``.

    Parameters
    ----------
    f : torch.Tensor
        (..., *rfft_shape(shape)) complex transform in the :func:`fft_centered` layout.
    shape : tuple of int
        Real-space grid shape, (z, y, x) or (y, x) [px]; its length is the number of transformed axes.

    Returns
    -------
    torch.Tensor
        (..., *shape) real (float32 for complex64 input), box centre at index N//2.
    """
    dims = tuple(range(-len(shape), 0))
    return torch.fft.fftshift(torch.fft.irfftn(f, s=shape, dim=dims), dim=dims)


def radial_average(values: torch.Tensor, shells: torch.Tensor, n_shells: int,
                   weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``values`` per Fourier shell 0..n_shells-1 (batched).

    Parameters
    ----------
    values : torch.Tensor
        (..., *grid) real values on a grid (usually the rfft grid), leading dims are a batch.
    shells : torch.Tensor
        grid-shaped int64 shell index of each sample (e.g. :func:`shell_index`); samples with
        shell >= ``n_shells`` are left out.
    n_shells : int
        Number of shells returned.
    weights : torch.Tensor, optional
        grid-shaped weight of each sample (e.g. :func:`rfft_multiplicity` so that the half grid counts
        as the full grid); default 1.

    Returns
    -------
    torch.Tensor
        (..., n_shells) of ``values.dtype``: weighted mean per shell; 0 for a shell without samples.
    """
    grid_ndim = shells.ndim
    batch = values.shape[: values.ndim - grid_ndim]
    flat_vals = values.reshape(*batch, -1)
    idx = shells.reshape(-1).clamp(max=n_shells)  # shells beyond go to an overflow bin
    w = torch.ones_like(idx, dtype=values.dtype) if weights is None else weights.reshape(-1).to(values.dtype)
    sums = torch.zeros(*batch, n_shells + 1, dtype=values.dtype, device=values.device)
    sums.index_add_(-1, idx, flat_vals * w)
    counts = torch.zeros(n_shells + 1, dtype=values.dtype, device=values.device).index_add_(0, idx, w)
    return (sums / counts.clamp(min=1e-12))[..., :n_shells]


def fsc(f1: torch.Tensor, f2: torch.Tensor, shells: torch.Tensor, n_shells: int) -> torch.Tensor:
    """Fourier shell correlation of two transforms on the same rfft grid (RELION: nearest shell).

    Each shell sums Re(F1 F2*) / sqrt(sum |F1|^2 sum |F2|^2) over the full grid (half-grid samples
    weighted by :func:`rfft_multiplicity`).

    Parameters
    ----------
    f1, f2 : torch.Tensor
        (..., box, box, box//2+1) or (..., box, box//2+1) complex transforms (:func:`fft_centered`
        layout, even box); leading dims are a batch.
    shells : torch.Tensor
        rfft-grid int64 shell index (:func:`shell_index`); shells >= ``n_shells`` are left out.
    n_shells : int
        Number of shells returned (usually box//2 + 1).

    Returns
    -------
    torch.Tensor
        (..., n_shells) real FSC, shell 0 first; FSC(0) = 1 by convention.
    """
    w = rfft_multiplicity(tuple(shells.shape[:-1]) + ((shells.shape[-1] - 1) * 2,), device=f1.device)
    num = radial_average((f1 * f2.conj()).real, shells, n_shells, w)
    d1 = radial_average(f1.abs() ** 2, shells, n_shells, w)
    d2 = radial_average(f2.abs() ** 2, shells, n_shells, w)
    out = num / torch.sqrt(d1 * d2).clamp(min=1e-30)
    out[..., 0] = 1.0
    return out


def fsc_maps(map1: torch.Tensor, map2: torch.Tensor) -> torch.Tensor:
    """FSC of two real cubic or square maps.

    Parameters
    ----------
    map1, map2 : torch.Tensor
        (box, box, box) or (box, box) real maps of the same shape (even box, centre at N//2); no batch dim.

    Returns
    -------
    torch.Tensor
        (box//2 + 1,) real FSC per shell (:func:`fsc`), shell 0 first; FSC(0) = 1.
    """
    ndim = map1.ndim
    shape = tuple(map1.shape)
    shells = shell_index(shape, device=map1.device)
    return fsc(fft_centered(map1, ndim), fft_centered(map2, ndim), shells, shape[-1] // 2 + 1)


def shell_resolution_A(n_shells: int, box: int, pixel_size_A: float) -> torch.Tensor:
    """Resolution of Fourier shells 0..n_shells-1.

    Parameters
    ----------
    n_shells : int
        Number of shells.
    box : int
        Box size N [px].
    pixel_size_A : float
        Pixel size [Å].

    Returns
    -------
    torch.Tensor
        (n_shells,) float64 resolution N * pixel size / r [Å]; shell 0 -> inf.
    """
    r = torch.arange(n_shells, dtype=torch.float64)
    return torch.where(r > 0, box * pixel_size_A / r.clamp(min=1), torch.tensor(float("inf"), dtype=torch.float64))


def threshold_shell(curve: torch.Tensor, threshold: float = 0.143) -> int:
    """Index of the last shell before a resolution curve (FSC, SSNR) first drops below ``threshold``.

    Parameters
    ----------
    curve : torch.Tensor
        (n_shells,) values per Fourier shell, shell 0 first.
    threshold : float
        The criterion, e.g. 0.143 (gold-standard FSC) or 0.5.

    Returns
    -------
    int
        Shell index r (0 when shell 1 is already below; n_shells - 1 when no shell is).
    """
    values = curve.detach().cpu().double()
    below = torch.nonzero(values[1:] < threshold)
    return int(below[0]) if len(below) else len(values) - 1


def resolution_at_threshold(curve: torch.Tensor, box: int, pixel_size_A: float, threshold: float = 0.143) -> float:
    """Resolution of the last shell before the curve first drops below ``threshold``.

    Parameters
    ----------
    curve : torch.Tensor
        (n_shells,) FSC (or other resolution curve) per shell.
    box : int
        Box size N [px].
    pixel_size_A : float
        Pixel size [Å].
    threshold : float
        The criterion (0.143 for gold-standard half maps, 0.5 against a known map).

    Returns
    -------
    float
        N * pixel size / r [Å], with r = :func:`threshold_shell` (at least 1).
    """
    return box * pixel_size_A / max(threshold_shell(curve, threshold), 1)


def raised_cosine_lowpass(shape: tuple[int, ...], cutoff_shell: float, edge_shells: float = 2.0,
                          device=None) -> torch.Tensor:
    """Raised-cosine low-pass filter on the rfft grid.

    Parameters
    ----------
    shape : tuple of int
        Real-space shape, (z, y, x) or (y, x) [px]; radii are measured in shells of N = ``shape[-1]``.
    cutoff_shell : float
        Centre of the edge, in shells (|k| N; resolution [Å] = N * pixel size / shell).
    edge_shells : float
        Full width of the cosine edge [shells].
    device : torch.device or str, optional
        Device of the result.

    Returns
    -------
    torch.Tensor
        rfft_shape(shape) float32: 1 below ``cutoff_shell - edge_shells/2``, 0 above
        ``cutoff_shell + edge_shells/2``, half a cosine between.
    """
    r = frequency_radius(shape, device=device) * shape[-1]
    lo, hi = cutoff_shell - edge_shells / 2, cutoff_shell + edge_shells / 2
    t = ((r - lo) / max(hi - lo, 1e-6)).clamp(0, 1)
    return 0.5 + 0.5 * torch.cos(math.pi * t)


def lowpass(volume: torch.Tensor, resolution_A: float, pixel_size_A: float, edge_shells: float = 2.0) -> torch.Tensor:
    """Low-pass a real map to ``resolution_A`` with a raised-cosine edge.

    Parameters
    ----------
    volume : torch.Tensor
        (..., box, box, box) real map, or a single (box, box) image; an array with 3 or more dims is
        filtered over its last 3 axes (so a stack of 2D images is not supported).
    resolution_A : float
        Cut-off resolution [Å] (centre of the edge, at shell N * pixel size / resolution).
    pixel_size_A : float
        Pixel size [Å].
    edge_shells : float
        Full width of the cosine edge [shells] (:func:`raised_cosine_lowpass`).

    Returns
    -------
    torch.Tensor
        The filtered map, same shape as ``volume``, real.
    """
    shape = tuple(volume.shape[-3:]) if volume.ndim >= 3 else tuple(volume.shape)
    ndim = len(shape)
    cutoff = shape[-1] * pixel_size_A / resolution_A
    filt = raised_cosine_lowpass(shape, cutoff, edge_shells, device=volume.device)
    return ifft_centered(fft_centered(volume, ndim) * filt, shape)


def phase_shift(f: torch.Tensor, shifts_px: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Translate content by ``shifts_px`` in Fourier space.

    f(r) -> f(r - t): multiplies by exp(-2 pi i k.t). Batched over leading dims of shifts.

    Parameters
    ----------
    f : torch.Tensor
        Complex transform on the rfft grid of ``shape`` (:func:`fft_centered` layout), broadcastable
        against (..., *rfft_shape(shape)).
    shifts_px : torch.Tensor
        (..., ndim) shifts t [px], components (x, y[, z]); its dtype sets the frequency dtype.
    shape : tuple of int
        Real-space grid shape, (z, y, x) or (y, x) [px].

    Returns
    -------
    torch.Tensor
        (..., *rfft_shape(shape)) complex, ``f`` times the phase ramp (leading dims from ``shifts_px``
        broadcast with those of ``f``).
    """
    k = rfft_frequencies(shape, device=f.device, dtype=shifts_px.dtype)
    ang = -2 * math.pi * torch.tensordot(shifts_px, k, dims=([-1], [-1]))
    return f * torch.polar(torch.ones_like(ang), ang)


def fourier_resize(volume: torch.Tensor, new_size: int) -> torch.Tensor:
    """Rescale a cubic/square real map to ``new_size`` by Fourier cropping or zero padding.

    The pixel size changes by old/new; the mean value is preserved.

    Parameters
    ----------
    volume : torch.Tensor
        (..., box, box, box) real map, or a single (box, box) image; an array with 3 or more dims is
        resized over its last 3 axes. Centre at index N//2.
    new_size : int
        New box size [px].

    Returns
    -------
    torch.Tensor
        (..., new_size, new_size, new_size) (or (new_size, new_size)) real, centre at new_size//2; pixel
        size = old pixel size * box / new_size. A copy of ``volume`` when ``new_size`` equals the box.
    """
    ndim = 3 if volume.ndim >= 3 else 2
    old = volume.shape[-1]
    if new_size == old:
        return volume.clone()
    dims = tuple(range(-ndim, 0))
    full = torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(volume, dim=dims), dim=dims), dim=dims)
    out_shape = (*volume.shape[:-ndim], *([new_size] * ndim))
    out = torch.zeros(out_shape, dtype=full.dtype, device=volume.device)
    m = min(old, new_size)
    src = [slice(old // 2 - m // 2, old // 2 - m // 2 + m)] * ndim
    dst = [slice(new_size // 2 - m // 2, new_size // 2 - m // 2 + m)] * ndim
    dst_index: tuple[Any, ...] = (..., *dst)
    src_index: tuple[Any, ...] = (..., *src)
    out[dst_index] = full[src_index]
    res = torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(out, dim=dims), dim=dims), dim=dims).real
    return res * (new_size / old) ** ndim


def soft_sphere_mask(shape: tuple[int, ...], radius_px: float, edge_px: float = 5.0, device=None) -> torch.Tensor:
    """Soft spherical (circular) mask about the box centre (RELION's soft edge).

    Parameters
    ----------
    shape : tuple of int
        Shape of the mask, (z, y, x) or (y, x) [px]; the centre is index n//2 on each axis.
    radius_px : float
        Radius where the edge starts [px].
    edge_px : float
        Width of the raised-cosine fall from 1 to 0 [px]; <= 0 gives a hard mask (1 for r <= radius).
    device : torch.device or str, optional
        Device of the result.

    Returns
    -------
    torch.Tensor
        ``shape`` float32 in [0, 1]: 1 inside ``radius_px``, 0 beyond ``radius_px + edge_px``.
    """
    axes = [torch.arange(n, device=device, dtype=torch.float32) - n // 2 for n in shape]
    grids = torch.meshgrid(*axes, indexing="ij")
    r = torch.sqrt(reduce(operator.add, (g ** 2 for g in grids)))
    if edge_px <= 0:
        return (r <= radius_px).float()
    t = ((r - radius_px) / edge_px).clamp(0, 1)
    return 0.5 + 0.5 * torch.cos(math.pi * t)


def crop_rfft(f: torch.Tensor, size: int, ndim: int = 3) -> torch.Tensor:
    """Keep the low-frequency part of an rfft (unshifted layout) as the rfft of a ``size`` grid.

    Frequencies keep their physical meaning (index / (N * pixel)); only components with
    index in [-size/2, size/2) per full axis and [0, size/2] on the half axis survive.
    Used to work at the "current image size" of an iteration.

    Parameters
    ----------
    f : torch.Tensor
        (..., box, box, box//2+1) (``ndim`` = 3) or (..., box, box//2+1) (``ndim`` = 2) complex transform
        in the :func:`fft_centered` layout.
    size : int
        The current size s [px]; must be even.
    ndim : int
        Number of transformed axes, 2 or 3.

    Returns
    -------
    torch.Tensor
        (..., s, s, s//2+1) or (..., s, s//2+1) of ``f.dtype``, in the same unshifted layout;
        ``f`` itself (not a copy) when ``size`` >= box.
    """
    n = f.shape[-2]
    if size >= n:
        return f
    h = size // 2
    out = f[..., : h + 1]
    for axis in range(ndim - 1):
        dim = -2 - axis
        idx = torch.cat([torch.arange(0, h), torch.arange(n - h, n)]).to(f.device)
        out = out.index_select(dim, idx)
    return out


def pad_rfft(f: torch.Tensor, box: int, ndim: int = 3) -> torch.Tensor:
    """Inverse of :func:`crop_rfft`: zero-fill an rfft of a small grid back to a ``box`` grid.

    Parameters
    ----------
    f : torch.Tensor
        (..., s, s, s//2+1) (``ndim`` = 3) or (..., s, s//2+1) (``ndim`` = 2) complex transform of a
        current-size grid (unshifted layout, even s).
    box : int
        Full box size N [px].
    ndim : int
        Number of transformed axes, 2 or 3.

    Returns
    -------
    torch.Tensor
        (..., box, box, box//2+1) or (..., box, box//2+1) of ``f.dtype``, zero outside the kept
        components; ``f`` itself when s >= box.
    """
    size = f.shape[-2]
    if size >= box:
        return f
    h = size // 2
    shape = (*f.shape[:-ndim], *([box] * (ndim - 1)), box // 2 + 1)
    out = torch.zeros(shape, dtype=f.dtype, device=f.device)
    idx = torch.cat([torch.arange(0, h), torch.arange(box - h, box)]).to(f.device)
    if ndim == 3:
        out[..., idx[:, None], idx[None, :], : h + 1] = f
    else:
        out[..., idx, : h + 1] = f
    return out
