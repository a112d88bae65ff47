"""Weighted back-projection (tilt axis = y), as IMOD's ``tilt`` does for a single-axis series.

Every image row is a 1D projection of one xz slice of the tomogram; the rows are
R-weighted (|k_x|, the density of central lines in 2D) and smeared back along the beam
direction n_θ = (−sin θ, 0, cos θ) with linear interpolation. Voxel (x_t, y, z_t) reads
the image at x_img = x_t cos θ + z_t sin θ (docs/conventions.md). Slabs of z are computed
and handed to ``write`` one at a time, so memory stays bounded for large tomograms.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F


def ramp_filter(images: torch.Tensor, tilts_deg: np.ndarray) -> torch.Tensor:
    """R-weight every image row: |k_x| times the angular step, DC kept at half a step."""
    nx = images.shape[-1]
    k = torch.fft.rfftfreq(nx, device=images.device, dtype=torch.float32)
    w = k.abs().clone()
    w[0] = 0.25 / nx
    step = math.radians(float(np.mean(np.diff(np.sort(tilts_deg))))) if len(tilts_deg) > 1 else 1.0
    return torch.fft.irfft(torch.fft.rfft(images, dim=-1) * (w * step * nx), n=nx, dim=-1)


def weighted_backprojection(images: torch.Tensor, tilts_deg: np.ndarray, nz: int,
                            write: Callable[[int, torch.Tensor], None], slab_bytes: int = 64 * 2 ** 20) -> None:
    """Back-project ``images`` (T, ny, nx) at ``tilts_deg`` into an (nz, ny, nx) volume, slab by slab.

    ``write(z0, block)`` receives consecutive blocks (nzb, ny, nx) starting at z index z0.
    Each tilt's rows are interpolated with one ``grid_sample`` call (image rows as channels).
    """
    t_count, ny, nx = images.shape
    filtered = ramp_filter(images.float(), tilts_deg)[:, :, None, :]  # (T, ny, 1, nx): rows as channels
    dev = filtered.device
    slab = max(1, min(nz, slab_bytes // (4 * ny * nx)))
    xs = torch.arange(nx, dtype=torch.float32, device=dev) - nx / 2
    rad = np.deg2rad(np.asarray(tilts_deg, dtype=np.float64))
    for z0 in range(0, nz, slab):
        zs = torch.arange(z0, min(nz, z0 + slab), dtype=torch.float32, device=dev) - nz / 2
        acc = torch.zeros(1, ny, len(zs), nx, dtype=torch.float32, device=dev)
        for t in range(t_count):
            j = xs[None, :] * math.cos(rad[t]) + zs[:, None] * math.sin(rad[t]) + nx / 2  # image column (nzb, nx)
            g = torch.stack([2 * j / (nx - 1) - 1, torch.zeros_like(j)], dim=-1)[None]
            acc += F.grid_sample(filtered[t:t + 1], g, mode="bilinear", padding_mode="zeros", align_corners=True)
        write(z0, acc[0].permute(1, 0, 2).contiguous())
