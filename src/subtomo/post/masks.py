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
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage

from subtomo.errors import SubtomoError
from subtomo.fourier import fsc_maps, lowpass, resolution_at_threshold

DEFAULT_THRESHOLD_FRACTION = 0.2


def _edt(outside: np.ndarray) -> np.ndarray:
    """Distance of every voxel to the nearest voxel where ``outside`` is False."""
    if not (~outside).any():
        return np.full(outside.shape, np.inf)
    return ndimage.distance_transform_edt(outside)


def extend_and_soften(binary: torch.Tensor, extend_px: float = 0.0, soft_edge_px: float = 0.0) -> torch.Tensor:
    """RELION's extension and raised-cosine soft edge of a binary mask (float32, same device).

    Parameters
    ----------
    binary
        (n, n, n) bool or 0/1 mask.
    extend_px
        Extension [px] (negative erodes).
    soft_edge_px
        Width of the raised-cosine edge [px].

    Returns
    -------
    torch.Tensor
        (n, n, n) float32 mask in 0..1 on the input's device.
    """
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

    Parameters
    ----------
    volume
        Map (any shape) [grey values].
    fraction
        Fraction of (max - median) above the median.

    Returns
    -------
    float
        The threshold [grey values].
    """
    v = volume.detach().float()
    med = float(v.median())
    return med + fraction * (float(v.max()) - med)


def automask(volume: torch.Tensor, pixel_size_A: float, threshold: float | None = None,
             extend_px: float = 3.0, soft_edge_px: float = 6.0, lowpass_A: float | None = None,
             threshold_fraction: float = DEFAULT_THRESHOLD_FRACTION) -> tuple[torch.Tensor, float]:
    """Mask from a map: optional low-pass, threshold, extend, soft edge. Returns (mask, threshold used).

    Parameters
    ----------
    volume
        (n, n, n) map.
    pixel_size_A
        Pixel size [Å].
    threshold
        Binarisation threshold [grey values]; None: :func:`default_threshold`.
    extend_px, soft_edge_px
        Extension (negative erodes) and soft-edge width [px].
    lowpass_A
        Low-pass before thresholding [Å]; None: none.
    threshold_fraction
        Fraction for the default threshold.

    Returns
    -------
    tuple of (torch.Tensor, float)
        (n, n, n) float32 mask in 0..1 and the threshold used [grey values].
    """
    v = volume.float()
    if lowpass_A:
        if lowpass_A < 2 * pixel_size_A:
            raise SubtomoError(f"mask low-pass {lowpass_A} A is beyond Nyquist ({2 * pixel_size_A:.2f} A). Give a larger value.")
        v = lowpass(v, lowpass_A, pixel_size_A)
    thr = default_threshold(v, threshold_fraction) if threshold is None else float(threshold)
    mask = extend_and_soften(v >= thr, extend_px, soft_edge_px)
    return mask, thr


@dataclass
class HalfMapAutomask:
    """An automask made from two half maps, with what was used to make it."""

    mask: torch.Tensor  # (n, n, n) float32, 0..1
    threshold: float  # binarisation threshold [map grey values]
    lowpass_A: float | None  # low-pass applied before thresholding [Å]; None: none
    noise_sigma: float  # std of the (low-passed) half-map difference / 2 [map grey values]
    warnings: list[str] = field(default_factory=list)


def automask_from_halves(half1: torch.Tensor, half2: torch.Tensor, pixel_size_A: float, threshold: float | None = None,
                         extend_px: float = 3.0, soft_edge_px: float = 6.0, lowpass_A: float | None = None,
                         threshold_fraction: float = DEFAULT_THRESHOLD_FRACTION, fsc_threshold: float = 0.143,
                         remedy: str = "") -> HalfMapAutomask:
    """Automask of the average of two half maps (``relion_postprocess --auto_mask``).

    Without ``lowpass_A`` the average is low-passed to the unmasked-FSC resolution (when
    that is coarser than 2.5 px), so the mask follows the reliable density, not its noise.
    The noise level of the average, (half1 - half2) / 2 after the same low-pass, is
    returned; a threshold below three times it gives a warning (noise islands).

    Parameters
    ----------
    half1, half2
        (n, n, n) float32 half maps.
    pixel_size_A
        Pixel size [Å].
    threshold
        Binarisation threshold [grey values]; None: :func:`default_threshold`.
    extend_px, soft_edge_px
        Extension (negative erodes) and raised-cosine edge width [px].
    lowpass_A
        Low-pass before thresholding [Å]; 0: none; None: the unmasked-FSC resolution.
    threshold_fraction
        Fraction for the default threshold.
    fsc_threshold
        FSC threshold defining the unmasked resolution.
    remedy
        Sentence appended to the refusal of an unusable mask.

    Returns
    -------
    HalfMapAutomask
        The (n, n, n) mask in 0..1 and the threshold, low-pass [Å] and noise sigma used.
    """
    lp = lowpass_A
    if lp is None:
        res_u = resolution_at_threshold(fsc_maps(half1, half2), half1.shape[-1], pixel_size_A, fsc_threshold)
        lp = res_u if res_u > 2.5 * pixel_size_A else 0.0
    mask, thr = automask((half1 + half2) / 2, pixel_size_A, threshold, extend_px, soft_edge_px, lp or None,
                         threshold_fraction)
    noise = (half1 - half2) / 2
    if lp:
        noise = lowpass(noise, lp, pixel_size_A)
    sigma = float(noise.std())
    check_mask(mask, "automask", remedy)
    result = HalfMapAutomask(mask, thr, lp or None, sigma)
    if sigma > 0 and thr < 3 * sigma:
        result.warnings.append(
            f"automask threshold {thr:.3g} is below 3x the noise sigma ({sigma:.3g}): the mask may contain noise "
            "islands in the solvent. Raise --mask-threshold or --mask-lowpass, or check postprocess_automask.mrc.")
    return result


def _grid_xyz(shape: tuple[int, int, int], device) -> torch.Tensor:
    """Voxel coordinates (z, y, x, 3) with components (x, y, z) in pixels."""
    axes = [torch.arange(n, device=device, dtype=torch.float32) for n in shape]
    z, y, x = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([x, y, z], dim=-1)


def _centre(shape: tuple[int, int, int], centre_xyz_px, device) -> torch.Tensor:
    """(x, y, z) centre in pixels: the given one, or the box centre N // 2."""
    return torch.tensor([n // 2 for n in shape[::-1]] if centre_xyz_px is None else list(centre_xyz_px),
                        dtype=torch.float32, device=device)


def _soft_from_distance(d: torch.Tensor, edge_px: float) -> torch.Tensor:
    """1 where d <= 0, raised cosine to 0 over ``edge_px`` outside (d = distance beyond the hard edge)."""
    if edge_px <= 0:
        return (d <= 0).float()
    t = (d / edge_px).clamp(0, 1)
    return 0.5 + 0.5 * torch.cos(math.pi * t)


def sphere_mask(shape: tuple[int, int, int], diameter_px: float, centre_xyz_px=None, edge_px: float = 0.0,
                device=None) -> torch.Tensor:
    """Soft sphere of ``diameter_px`` at ``centre_xyz_px`` (default the box centre N//2).

    Parameters
    ----------
    shape
        (z, y, x) box [px].
    diameter_px
        Sphere diameter [px].
    centre_xyz_px
        Centre (x, y, z) [px]; default the box centre N // 2.
    edge_px
        Raised-cosine edge outside the sphere [px].
    device
        Torch device.

    Returns
    -------
    torch.Tensor
        (z, y, x) float32 mask in 0..1.
    """
    c = _centre(shape, centre_xyz_px, device)
    r = (_grid_xyz(shape, device) - c).norm(dim=-1)
    return _soft_from_distance(r - diameter_px / 2, edge_px)


def cylinder_mask(shape: tuple[int, int, int], diameter_px: float, length_px: float | None = None,
                  centre_xyz_px=None, axis_xyz=(0.0, 0.0, 1.0), edge_px: float = 0.0, device=None) -> torch.Tensor:
    """Soft cylinder (diameter, length along ``axis_xyz``; default length = the whole box).

    Parameters
    ----------
    shape
        (z, y, x) box [px].
    diameter_px
        Cylinder diameter [px].
    length_px
        Length along the axis [px]; None: through the whole box.
    centre_xyz_px
        Centre (x, y, z) [px]; default the box centre N // 2.
    axis_xyz
        Axis direction (x, y, z), any length but not zero.
    edge_px
        Raised-cosine edge outside the cylinder [px].
    device
        Torch device of the result.

    Returns
    -------
    torch.Tensor
        (z, y, x) float32 cylinder mask in 0..1.
    """
    c = _centre(shape, centre_xyz_px, device)
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
    """RELION ``--or``: voxel-wise maximum.

    Parameters
    ----------
    a, b
        Masks of one shape, values 0..1.

    Returns
    -------
    torch.Tensor
        max(a, b), same shape.
    """
    return torch.maximum(a, b)


def subtract(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """RELION ``--and_not``: min(a, 1 - b) (white in a, black where b is white).

    Parameters
    ----------
    a, b
        Mask to keep (a) and mask to cut out (b), one shape, values 0..1.

    Returns
    -------
    torch.Tensor
        min(a, 1 - b), same shape.
    """
    return torch.minimum(a, 1 - b)


@dataclass
class MaskStats:
    """How much of the box a mask covers and whether it reaches the box edge."""

    fraction: float  # mean mask value = fraction of the box volume
    n_ones: int
    n_soft: int
    touches_box_edge: bool


def mask_stats(mask: torch.Tensor) -> MaskStats:
    """Coverage of a mask.

    Parameters
    ----------
    mask
        (n, n, n) mask, values 0..1.

    Returns
    -------
    MaskStats
        Mean value (fraction of the box), voxels at 1, voxels in the soft edge (0 < m < 1),
        and whether any face of the box has a value > 0.01.
    """
    m = mask.detach()
    edge = torch.cat([m[0].flatten(), m[-1].flatten(), m[:, 0].flatten(), m[:, -1].flatten(),
                      m[:, :, 0].flatten(), m[:, :, -1].flatten()])
    return MaskStats(float(m.float().mean()), int((m >= 1 - 1e-6).sum()),
                     int(((m > 1e-6) & (m < 1 - 1e-6)).sum()), bool((edge > 0.01).any()))


def check_mask(mask: torch.Tensor, what: str = "mask", remedy: str = "") -> MaskStats:
    """Refuse all-black, all-white or out-of-range masks with a clear message.

    Parameters
    ----------
    mask
        (n, n, n) mask.
    what
        Name of the mask in the message (option and file).
    remedy
        Sentence telling the user how to fix it.

    Returns
    -------
    MaskStats
        Coverage of the mask (when it is usable).
    """
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
