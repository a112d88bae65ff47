"""Solvent and focus masks: automask from a map, soft spheres and cylinders, combinations.

The automask follows RELION (``mask.cpp: autoMask``, also ``relion_mask_create``):
binarise at a threshold (voxel >= threshold -> 1), extend: every 0-voxel at Euclidean
distance d < ``extend_px`` from a 1-voxel becomes 1 (negative values erode), then a soft
edge: every remaining 0-voxel whose nearest 1-voxel is at d < ``soft_edge_px`` gets
0.5 + 0.5 cos(pi d / soft_edge_px). Distances come from an exact Euclidean distance
transform (scipy, on the CPU; masks are made once per job), so the result equals the
brute-force definition. Geometric masks use the same raised-cosine edge outside their
hard boundary. All functions take and return (z, y, x) torch tensors on the input's device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from subtomo.errors import SubtomoError
from subtomo.fourier import lowpass

DEFAULT_THRESHOLD_FRACTION = 0.2


def _edt(outside: np.ndarray) -> np.ndarray:
    """Distance of every voxel to the nearest voxel where ``outside`` is False."""
    if not (~outside).any():
        return np.full(outside.shape, np.inf)
    return ndimage.distance_transform_edt(outside)


def extend_and_soften(binary: torch.Tensor, extend_px: float = 0.0, soft_edge_px: float = 0.0) -> torch.Tensor:
    """RELION's extension and raised-cosine soft edge of a binary mask (float32, same device)."""
    b = binary.detach().cpu().numpy().astype(bool)
    if extend_px > 0:
        b = b | (_edt(~b) < extend_px)
    elif extend_px < 0:
        # erosion: a 1-voxel survives if no 0-voxel lies within |extend| of it
        b = b & (_edt(b) >= -extend_px) if (~b).any() else b
    out = b.astype(np.float32)
    if soft_edge_px > 0 and b.any():
        d = _edt(~b)
        edge = (~b) & (d < soft_edge_px)
        out[edge] = 0.5 + 0.5 * np.cos(math.pi * d[edge] / soft_edge_px)
    return torch.from_numpy(out).to(binary.device)


def default_threshold(volume: torch.Tensor, fraction: float = DEFAULT_THRESHOLD_FRACTION) -> float:
    """Data-driven binarisation threshold: ``fraction`` of the map's maximum above its median.

    RELION's 0.02 refers to its own absolute grey scale; maps from other programs (or
    normalised subtomograms) have arbitrary scales, so the default is relative:
    median + fraction * (max - median). With the median ~ solvent level this contours
    at ``fraction`` of the strongest density.
    """
    v = volume.detach().float()
    med = float(v.median())
    return med + fraction * (float(v.max()) - med)


def automask(volume: torch.Tensor, pixel_size_A: float, threshold: float | None = None,
             extend_px: float = 3.0, soft_edge_px: float = 6.0, lowpass_A: float | None = None,
             threshold_fraction: float = DEFAULT_THRESHOLD_FRACTION) -> tuple[torch.Tensor, float]:
    """Mask from a map: optional low-pass, threshold, extend, soft edge. Returns (mask, threshold used)."""
    v = volume.float()
    if lowpass_A:
        if lowpass_A < 2 * pixel_size_A:
            raise SubtomoError(f"mask low-pass {lowpass_A} A is beyond Nyquist ({2 * pixel_size_A:.2f} A). Give a larger value.")
        v = lowpass(v, lowpass_A, pixel_size_A)
    thr = default_threshold(v, threshold_fraction) if threshold is None else float(threshold)
    mask = extend_and_soften(v >= thr, extend_px, soft_edge_px)
    return mask, thr


def _grid_xyz(shape: tuple[int, int, int], device) -> torch.Tensor:
    """Voxel coordinates (z, y, x, 3) with components (x, y, z) in pixels."""
    axes = [torch.arange(n, device=device, dtype=torch.float32) for n in shape]
    z, y, x = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([x, y, z], dim=-1)


def _soft_from_distance(d: torch.Tensor, edge_px: float) -> torch.Tensor:
    """1 where d <= 0, raised cosine to 0 over ``edge_px`` outside (d = distance beyond the hard edge)."""
    if edge_px <= 0:
        return (d <= 0).float()
    t = (d / edge_px).clamp(0, 1)
    return 0.5 + 0.5 * torch.cos(math.pi * t)


def sphere_mask(shape: tuple[int, int, int], diameter_px: float, centre_xyz_px=None, edge_px: float = 0.0,
                device=None) -> torch.Tensor:
    """Soft sphere of ``diameter_px`` at ``centre_xyz_px`` (default the box centre N//2)."""
    c = torch.tensor([n // 2 for n in shape[::-1]] if centre_xyz_px is None else list(centre_xyz_px),
                     dtype=torch.float32, device=device)
    r = (_grid_xyz(shape, device) - c).norm(dim=-1)
    return _soft_from_distance(r - diameter_px / 2, edge_px)


def cylinder_mask(shape: tuple[int, int, int], diameter_px: float, length_px: float | None = None,
                  centre_xyz_px=None, axis_xyz=(0.0, 0.0, 1.0), edge_px: float = 0.0, device=None) -> torch.Tensor:
    """Soft cylinder (diameter, length along ``axis_xyz``; default length = the whole box)."""
    c = torch.tensor([n // 2 for n in shape[::-1]] if centre_xyz_px is None else list(centre_xyz_px),
                     dtype=torch.float32, device=device)
    a = torch.tensor(list(axis_xyz), dtype=torch.float32, device=device)
    if float(a.norm()) == 0:
        raise SubtomoError("--axis 0,0,0: the cylinder axis must be a non-zero vector (x,y,z).")
    a = a / a.norm()
    rel = _grid_xyz(shape, device) - c
    h = rel @ a
    rho = (rel - h[..., None] * a).norm(dim=-1)
    half = float("inf") if length_px is None else length_px / 2
    d_rad = (rho - diameter_px / 2).clamp(min=0)
    d_ax = (h.abs() - half).clamp(min=0)
    inside = (rho <= diameter_px / 2) & (h.abs() <= half)
    d = torch.where(inside, torch.zeros_like(rho), torch.sqrt(d_rad ** 2 + d_ax ** 2).clamp(min=1e-6))
    return _soft_from_distance(d, edge_px)


def union(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """RELION ``--or``: voxel-wise maximum."""
    return torch.maximum(a, b)


def subtract(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """RELION ``--and_not``: min(a, 1 - b) (white in a, black where b is white)."""
    return torch.minimum(a, 1 - b)


@dataclass
class MaskStats:
    fraction: float  # mean mask value = fraction of the box volume
    n_ones: int
    n_soft: int
    touches_box_edge: bool


def mask_stats(mask: torch.Tensor) -> MaskStats:
    m = mask.detach()
    edge = torch.cat([m[0].flatten(), m[-1].flatten(), m[:, 0].flatten(), m[:, -1].flatten(),
                      m[:, :, 0].flatten(), m[:, :, -1].flatten()])
    return MaskStats(float(m.float().mean()), int((m >= 1 - 1e-6).sum()),
                     int(((m > 1e-6) & (m < 1 - 1e-6)).sum()), bool((edge > 0.01).any()))


def check_mask(mask: torch.Tensor, what: str = "mask", remedy: str = "") -> MaskStats:
    """Refuse all-black, all-white or out-of-range masks with a clear message."""
    if not torch.isfinite(mask).all():
        raise SubtomoError(f"{what}: contains NaN or infinite values. {remedy}".strip())
    lo, hi = float(mask.min()), float(mask.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise SubtomoError(f"{what}: values must lie in [0, 1] (found {lo:.3g} to {hi:.3g}); it is not a mask. {remedy}".strip())
    if hi <= 1e-6:
        raise SubtomoError(f"{what}: the mask is all black (no voxel above 0). {remedy}".strip())
    if lo >= 1 - 1e-6:
        raise SubtomoError(f"{what}: the mask is all white (every voxel is 1), so it masks nothing. {remedy}".strip())
    return mask_stats(mask)
