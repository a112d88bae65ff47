"""Weighted back-projection (tilt axis = y), as IMOD's ``tilt`` does for a single-axis series.

Every image row is a 1D projection of one xz slice of the tomogram; the rows are
R-weighted (|k_x|, the density of central lines in 2D) and smeared back along the beam
direction n_θ = (−sin θ, 0, cos θ) with linear interpolation. Voxel (x_t, y, z_t), relative
to the tomogram centre ``size / 2``, reads the image at x_img = x_t cos θ + z_t sin θ
(``docs/conventions.md``, tilt geometry). Tilts are sampled in batches (one
``grid_sample`` call per batch) and summed in tilt order; slabs of z are handed to
``write`` one at a time, and :func:`reconstruct_stack` also walks the stack in blocks of
rows, so memory stays bounded for large tomograms and memory-mapped stacks.

This is the one back-projection of subtomo: ``subtomo reconstruct`` and the simulator
(:mod:`subtomo.simulate.project`) both call it.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F


def ramp_filter(images: torch.Tensor, tilts_deg: np.ndarray, sirt_iterations: int = 0) -> torch.Tensor:
    """R-weight every image row: |k_x| times the angular step, DC kept at a quarter of the first bin.

    With ``sirt_iterations`` N > 0 the weight becomes the one that makes a single
    back-projection equal to N steps of a Landweber/SIRT iteration started from zero
    (Zeng 2012): with the ramp w(k) and the step λ = w(1/nx) (the largest stable one),
    ``w_N(k) = w(k) [1 − (1 − min(1, λ / w(k)))^N]`` — the ramp at low frequencies, flat at
    ``N λ`` above about ``N / nx`` cycles/px, which damps the noise as a few SIRT
    iterations do. N → ∞ gives plain WBP.

    Parameters
    ----------
    images : torch.Tensor
        Tilt images, shape (T, ny, nx), float32.
    tilts_deg : numpy.ndarray
        Tilt angles [deg], shape (T,) (only their mean spacing is used).
    sirt_iterations : int
        N of the SIRT-like filter; 0 for plain R-weighting.

    Returns
    -------
    torch.Tensor
        Filtered images, shape (T, ny, nx).
    """
    nx = images.shape[-1]
    k = torch.fft.rfftfreq(nx, device=images.device, dtype=torch.float32)
    w = k.abs().clone()
    w[0] = 0.25 / nx
    if sirt_iterations > 0:
        ratio = torch.clamp((1.0 / nx) / w, max=1.0)
        w = w * (1 - (1 - ratio) ** int(sirt_iterations))
    step = math.radians(float(np.mean(np.diff(np.sort(tilts_deg))))) if len(tilts_deg) > 1 else 1.0
    return torch.fft.irfft(torch.fft.rfft(images, dim=-1) * (w * step * nx), n=nx, dim=-1)


def weighted_backprojection(images: torch.Tensor, tilts_deg: np.ndarray, nz: int,
                            write: Callable[[int, torch.Tensor], None], slab_bytes: int = 64 * 2 ** 20,
                            tilt_batch: int = 8, sirt_iterations: int = 0) -> None:
    """Back-project R-weighted ``images`` into an (nz, ny, nx) volume, slab by slab.

    Parameters
    ----------
    images : torch.Tensor
        Aligned tilt images, shape (T, ny, nx) (tilt axis = y); their device is used.
    tilts_deg : numpy.ndarray
        Tilt angle of each image [deg], shape (T,).
    nz : int
        Thickness of the volume [px].
    write : callable
        ``write(z0, block)`` receives consecutive blocks, shape (nzb, ny, nx), float32,
        starting at z index z0.
    slab_bytes : int
        Size of one block [bytes].
    tilt_batch : int
        Tilts interpolated by one ``grid_sample`` call (the sum stays in tilt order).
    sirt_iterations : int
        SIRT-like filter (:func:`ramp_filter`); 0 for plain WBP.

    Returns
    -------
    None
    """
    t_count, ny, nx = images.shape
    filtered = ramp_filter(images.float(), tilts_deg, sirt_iterations)[:, :, None, :]  # (T, ny, 1, nx): rows as channels
    dev = filtered.device
    slab = max(1, min(nz, slab_bytes // (4 * ny * nx)))
    xs = torch.arange(nx, dtype=torch.float32, device=dev) - nx / 2
    rad = np.deg2rad(np.asarray(tilts_deg, dtype=np.float64))
    batch = max(1, int(tilt_batch))
    for z0 in range(0, nz, slab):
        zs = torch.arange(z0, min(nz, z0 + slab), dtype=torch.float32, device=dev) - nz / 2
        acc = torch.zeros(1, ny, len(zs), nx, dtype=torch.float32, device=dev)
        for t0 in range(0, t_count, batch):
            ts = range(t0, min(t_count, t0 + batch))
            cols = torch.stack([xs[None, :] * math.cos(rad[t]) + zs[:, None] * math.sin(rad[t]) + nx / 2 for t in ts])
            g = torch.stack([2 * cols / (nx - 1) - 1, torch.zeros_like(cols)], dim=-1)  # (b, nzb, nx, 2)
            sampled = F.grid_sample(filtered[t0:t0 + len(ts)], g, mode="bilinear", padding_mode="zeros",
                                    align_corners=True)
            for b in range(len(ts)):
                acc += sampled[b:b + 1]
        write(z0, acc[0].permute(1, 0, 2).contiguous())


def bin_images(images: torch.Tensor, factor: int) -> torch.Tensor:
    """Average ``factor`` × ``factor`` pixel blocks (IMOD ``newstack -bin``); edges that do not fill a block are dropped.

    Parameters
    ----------
    images : torch.Tensor
        Shape (T, ny, nx).
    factor : int
        Binning factor (1: unchanged).

    Returns
    -------
    torch.Tensor
        Shape (T, ny // factor, nx // factor).
    """
    if factor == 1:
        return images
    return F.avg_pool2d(images[:, None], factor)[:, 0]


def relative_contrast(images: np.ndarray) -> np.ndarray:
    """Per-image offset and scale that turn a stack into relative contrast.

    Images with a positive mean (counts) become ``image / mean − 1``; others (already
    normalised) ``image − mean``.

    Parameters
    ----------
    images : numpy.ndarray
        Shape (T, ny, nx), any dtype (a memory map is read one image at a time).

    Returns
    -------
    numpy.ndarray
        (T, 2) float64: subtract column 0, then divide by column 1.
    """
    out = np.empty((len(images), 2))
    for t in range(len(images)):
        mean = float(np.mean(images[t], dtype=np.float64))
        out[t] = (mean, mean) if mean > 0 else (mean, 1.0)
    return out


def reconstruct_stack(stack: np.ndarray, tilts_deg: np.ndarray, nz: int, out: np.ndarray, binning: int = 1,
                      device: torch.device | str = "cpu", rows_per_block: int = 64,
                      sirt_iterations: int = 0) -> tuple[float, float]:
    """WBP of a (memory-mapped) tilt stack into ``out``, block of rows by block of rows.

    Parameters
    ----------
    stack : numpy.ndarray
        Aligned tilt series, shape (T, ny, nx) (tilt axis = y), e.g. an ``mrcfile`` memory map.
    tilts_deg : numpy.ndarray
        Tilt angle of each image [deg], shape (T,).
    nz : int
        Thickness of the tomogram [px, after binning].
    out : numpy.ndarray
        Writable output, shape (nz, ny // binning, nx // binning) (e.g. ``mrcfile.new_mmap``'s data).
    binning : int
        Images are averaged in ``binning`` × ``binning`` blocks before back-projection.
    device : torch.device or str
        Where to compute.
    rows_per_block : int
        Output rows (y) reconstructed at once; memory ~ (T + 9 nz) × rows × nx × 4 bytes
        (the filtered rows, the accumulator and one batch of 8 sampled tilts).
    sirt_iterations : int
        SIRT-like filter (:func:`ramp_filter`); 0 for plain WBP.

    Returns
    -------
    (float, float)
        Mean and standard deviation of the written tomogram.
    """
    scale = relative_contrast(stack)
    ny_out, nx_out = stack.shape[1] // binning, stack.shape[2] // binning
    step = max(1, int(rows_per_block))
    total, total_sq = 0.0, 0.0
    for y0 in range(0, ny_out, step):
        y1 = min(ny_out, y0 + step)
        block = np.asarray(stack[:, y0 * binning:y1 * binning, :nx_out * binning], dtype=np.float32)
        imgs = torch.as_tensor((block - scale[:, 0, None, None]) / scale[:, 1, None, None], dtype=torch.float32,
                               device=device)
        imgs = bin_images(imgs, binning)

        def write(z0: int, vol: torch.Tensor, y0: int = y0, y1: int = y1) -> None:
            nonlocal total, total_sq
            v = vol.double()
            total += float(v.sum())
            total_sq += float((v * v).sum())
            out[z0:z0 + vol.shape[0], y0:y1] = vol.cpu().numpy()

        weighted_backprojection(imgs, tilts_deg, nz, write, sirt_iterations=sirt_iterations)
    count = float(nz * ny_out * nx_out)
    mean = total / count
    return mean, math.sqrt(max(total_sq / count - mean * mean, 0.0))
