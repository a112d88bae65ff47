"""Gold-standard FSC curves: unmasked, masked, phase-randomised, corrected, directional.

The mask-corrected FSC follows Chen et al. (2013) as RELION's ``relion_postprocess``
computes it (reference notes section 4): phases of both half maps are randomised from
the first shell where the *unmasked* FSC falls below ``randomize_at_fsc`` (0.8), the
randomised maps are masked, and FSC_true = (FSC_masked - FSC_n) / (1 - FSC_n) from two
shells beyond that point (FSC_masked below it). Random phases are the phases of the rfft
of real white noise, so they are Hermitian-consistent on the kx = 0 and Nyquist planes.

Directional FSC: the same shells restricted to double cones (both k and -k) of a given
half-angle around chosen axes, to show the missing-wedge anisotropy of tomographic data
(z = the beam direction of the untilted view). It uses the unmasked maps by default
(see :func:`directional_fsc` for why masking hides an empty wedge).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from subtomo.errors import SubtomoError
from subtomo.fourier import (
    fft_centered,
    fsc,
    ifft_centered,
    resolution_at_threshold,
    rfft_frequencies,
    rfft_multiplicity,
    shell_index,
)


def n_shells_of(box: int) -> int:
    """Number of Fourier shells 0..N/2 of a box of ``box`` px.

    Parameters
    ----------
    box
        Box size N [px].

    Returns
    -------
    int
        N // 2 + 1.
    """
    return box // 2 + 1


def first_shell_below(curve: torch.Tensor | np.ndarray, threshold: float) -> int | None:
    """First shell r > 0 with curve(r) < threshold, or None.

    Parameters
    ----------
    curve
        (n_shells,) FSC per shell.
    threshold
        FSC value.

    Returns
    -------
    int or None
        The shell index, None when the curve never drops below ``threshold``.
    """
    c = np.asarray(torch.as_tensor(curve).detach().cpu().double())
    idx = np.nonzero(c[1:] < threshold)[0]
    return int(idx[0]) + 1 if len(idx) else None


def resolution_from_curve(curve: torch.Tensor | np.ndarray, box: int, pixel_size_A: float,
                          threshold: float = 0.143) -> tuple[float, int]:
    """Resolution and shell of the last shell before the curve first drops below ``threshold``.

    The rule is :func:`subtomo.fourier.resolution_at_threshold` (the one definition); this
    adds the shell index. If the curve never drops, the last shell (Nyquist) is returned.

    Parameters
    ----------
    curve
        (box // 2 + 1,) FSC per shell.
    box
        Box size [px].
    pixel_size_A
        Pixel size [Å].
    threshold
        FSC threshold.

    Returns
    -------
    tuple of (float, int)
        Resolution [Å] and its shell (>= 1).
    """
    res = resolution_at_threshold(torch.as_tensor(curve), box, pixel_size_A, threshold)
    return res, int(round(box * pixel_size_A / res))


def particle_fraction_fsc(unmasked: torch.Tensor, mask_fraction: float, particle_per_mask: float = 0.476) -> np.ndarray:
    """cisTEM-style "part FSC": the unmasked FSC corrected for the solvent in the box.

    With the solvent dilution L = V_box / V_particle, FSC_part = L FSC / (1 + (L - 1) FSC);
    the particle volume is estimated as ``particle_per_mask`` x the mask volume (an
    approximation: a soft mask around a particle is about twice its volume).

    Parameters
    ----------
    unmasked
        (n_shells,) FSC of the unmasked half maps.
    mask_fraction
        Mean mask value = fraction of the box inside the mask.
    particle_per_mask
        Particle volume per mask volume.

    Returns
    -------
    numpy.ndarray
        (n_shells,) float64 particle-fraction FSC.
    """
    dilution = 1.0 / max(mask_fraction * particle_per_mask, 1e-6)
    fu = unmasked.detach().cpu().double().numpy()
    return dilution * fu / (1 + (dilution - 1) * fu)


def randomize_phases_beyond(f: torch.Tensor, shells: torch.Tensor, from_shell: int, shape: tuple[int, ...],
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """Keep amplitudes, replace phases by random ones for shells >= ``from_shell``.

    Parameters
    ----------
    f
        rfft of a real map, shape ``rfft(shape)``, complex64.
    shells
        Shell index of every rfft voxel (same shape as ``f``).
    from_shell
        First shell whose phases are randomised.
    shape
        Real-space shape (z, y, x) [px].
    generator
        Random generator (reproducible phases).

    Returns
    -------
    torch.Tensor
        Same shape as ``f``: amplitudes kept, phases of real white noise from ``from_shell`` on.
    """
    noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(f.device)
    g = torch.fft.rfftn(noise, dim=tuple(range(-len(shape), 0)))
    phase = g / g.abs().clamp(min=1e-30)
    return torch.where(shells >= from_shell, f.abs() * phase, f)


def corrected_fsc(fsc_masked: torch.Tensor, fsc_randomized: torch.Tensor, randomize_from: int) -> torch.Tensor:
    """Chen et al. 2013 / RELION ``calculateFSCtrue``: masked FSC below r_rand + 2, corrected beyond.

    Parameters
    ----------
    fsc_masked
        (n_shells,) FSC of the masked half maps.
    fsc_randomized
        (n_shells,) FSC of the phase-randomised, masked half maps.
    randomize_from
        Shell from which phases were randomised.

    Returns
    -------
    torch.Tensor
        (n_shells,) (FSC_masked - FSC_rand) / (1 - FSC_rand) from ``randomize_from + 2`` on.
    """
    out = fsc_masked.clone()
    r = torch.arange(len(out), device=out.device)
    n = fsc_randomized
    corr = (fsc_masked - n) / (1 - n).clamp(min=1e-6)
    out = torch.where(r >= randomize_from + 2, corr, out)
    if out[0] <= 0:
        out[0] = 1.0
    return out


@dataclass
class FscResult:
    """All curves of one postprocessing run (index = shell, 0..N/2)."""

    box: int
    pixel_size_A: float
    unmasked: torch.Tensor
    masked: torch.Tensor | None = None
    randomized_masked: torch.Tensor | None = None
    corrected: torch.Tensor | None = None
    randomize_from: int | None = None  # shell
    threshold: float = 0.143
    resolution_A: float = float("nan")
    resolution_shell: int = 1
    used_unmasked: bool = False  # corrected curve was worse than the unmasked one
    warnings: list[str] = field(default_factory=list)

    @property
    def final(self) -> torch.Tensor:
        """The curve the resolution, FSC weighting and XML use."""
        if self.corrected is None or self.used_unmasked:
            return self.unmasked
        return self.corrected

    def spatial_frequency_A(self) -> np.ndarray:
        """(n_shells,) float64 spatial frequency of each shell [1/Å]."""
        return np.arange(len(self.unmasked)) / (self.box * self.pixel_size_A)

    def shell_resolution_A(self) -> np.ndarray:
        """(n_shells,) float64 resolution of each shell [Å]; 999 for shell 0 (RELION's convention)."""
        s_A = self.spatial_frequency_A()
        return np.where(s_A > 0, 1 / np.where(s_A > 0, s_A, 1), 999.0)


def masked_corrected_fsc(half1: torch.Tensor, half2: torch.Tensor, mask: torch.Tensor | None,
                         pixel_size_A: float, randomize_at_fsc: float = 0.8, threshold: float = 0.143,
                         seed: int = 0, force_mask: bool = False) -> tuple[FscResult, dict]:
    """Unmasked, masked, phase-randomised-masked and corrected FSC of two half maps.

    The transforms computed on the way (``f1``, ``f2``, ``m1``, ``m2``, ``r1``, ``r2``:
    unmasked, masked, randomised-masked) are returned for the directional FSC.

    Parameters
    ----------
    half1, half2
        (n, n, n) float32 half maps.
    mask
        (n, n, n) mask in 0..1, or None (unmasked FSC only).
    pixel_size_A
        Pixel size [Å].
    randomize_at_fsc
        Randomise phases from the first shell where the unmasked FSC drops below this.
    threshold
        FSC threshold of the resolution.
    seed
        Seed of the random phases.
    force_mask
        Use the corrected curve even where the unmasked one reaches further.

    Returns
    -------
    tuple of (FscResult, dict)
        The curves (n // 2 + 1 shells each) and resolution [Å]; the transforms. Raises
        SubtomoError when no randomisation shell exists.
    """
    shape, box, ns = tuple(half1.shape), half1.shape[-1], n_shells_of(half1.shape[-1])
    shells = shell_index(shape, device=half1.device)
    f1, f2 = fft_centered(half1.float(), 3), fft_centered(half2.float(), 3)
    unmasked = fsc(f1, f2, shells, ns)
    res = FscResult(box, pixel_size_A, unmasked, threshold=threshold)
    transforms = {"f1": f1, "f2": f2, "shells": shells}
    if mask is None:
        res.resolution_A, res.resolution_shell = resolution_from_curve(unmasked, box, pixel_size_A, threshold)
        return res, transforms
    mask = mask.float().to(half1.device)
    m1, m2 = fft_centered(half1 * mask, 3), fft_centered(half2 * mask, 3)
    masked = fsc(m1, m2, shells, ns)
    if not torch.isfinite(masked).all() or float((m1.abs() ** 2).sum()) == 0:
        raise SubtomoError("the masked maps are empty (all-black or unsuitable mask). "
                           "Adjust the automask parameters (--mask-threshold, --mask-extend) or make a mask with subtomo mask.")
    r_rand = first_shell_below(unmasked, randomize_at_fsc)
    if r_rand is None:
        raise SubtomoError(
            f"the unmasked FSC never drops below --randomize-at-fsc {randomize_at_fsc}, so the mask correction "
            "(phase randomisation) cannot be done. Usually the mask is all black or otherwise unsuitable: "
            "adjust the automask parameters or make a mask with subtomo mask. If the half maps are identical "
            "or not independent, refine them as gold-standard halves.")
    r1, r2 = _randomized_masked(f1, f2, shells, r_rand, mask, seed)
    rand = fsc(r1, r2, shells, ns)
    corr = corrected_fsc(masked, rand, r_rand)
    res.masked, res.randomized_masked, res.corrected, res.randomize_from = masked, rand, corr, r_rand
    _choose_resolution(res, force_mask)
    transforms.update(m1=m1, m2=m2, r1=r1, r2=r2)
    return res, transforms


def _randomized_masked(f1: torch.Tensor, f2: torch.Tensor, shells: torch.Tensor, from_shell: int, mask: torch.Tensor,
                       seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fourier transforms (rfft) of both half maps with phases randomised from ``from_shell``, then masked (same seed, same phases)."""
    shape = tuple(mask.shape)
    gen = torch.Generator().manual_seed(int(seed))
    rf1 = randomize_phases_beyond(f1, shells, from_shell, shape, gen)
    rf2 = randomize_phases_beyond(f2, shells, from_shell, shape, gen)
    return fft_centered(ifft_centered(rf1, shape) * mask, 3), fft_centered(ifft_centered(rf2, shape) * mask, 3)


def _choose_resolution(res: FscResult, force_mask: bool) -> None:
    """Resolution from the corrected curve, or the unmasked one where it reaches further (RELION), with warnings."""
    assert res.corrected is not None and res.randomized_masked is not None
    rand = res.randomized_masked
    res_c, shell_c = resolution_from_curve(res.corrected, res.box, res.pixel_size_A, res.threshold)
    res_u, shell_u = resolution_from_curve(res.unmasked, res.box, res.pixel_size_A, res.threshold)
    if shell_u > shell_c and not force_mask:
        res.used_unmasked = True
        res.warnings.append(f"the unmasked FSC reaches further ({res_u:.2f} A) than the mask-corrected one "
                            f"({res_c:.2f} A); the unmasked curve is used (as RELION does).")
        res.resolution_A, res.resolution_shell = res_u, shell_u
    else:
        res.resolution_A, res.resolution_shell = res_c, shell_c
    if not res.used_unmasked and res.resolution_shell < len(rand) and float(rand[res.resolution_shell]) > 0.1:
        res.warnings.append(f"the phase-randomised masked FSC is {float(rand[res.resolution_shell]):.2f} (> 0.1) at the "
                            "resolution: the mask is probably too tight or too sharp; use a softer, wider mask.")


# ---------------------------------------------------------------------------------------
# Directional (cone) FSC


def default_cone_axes() -> tuple[list[str], torch.Tensor]:
    """Axes (x, y, z): z, four directions in the x-y plane, and two at 45° elevation.

    Returns
    -------
    tuple of (list of str, torch.Tensor)
        Names and (7, 3) float32 unit axes (x, y, z).
    """
    names, axes = ["z"], [(0.0, 0.0, 1.0)]
    for az in (0, 45, 90, 135):
        a = math.radians(az)
        names.append(f"xy{az:03d}")
        axes.append((math.cos(a), math.sin(a), 0.0))
    for az in (0, 90):
        a = math.radians(az)
        e = math.radians(45)
        names.append(f"el45_az{az:03d}")
        axes.append((math.cos(e) * math.cos(a), math.cos(e) * math.sin(a), math.sin(e)))
    return names, torch.tensor(axes, dtype=torch.float32)


def cone_weights(shape: tuple[int, ...], axes_xyz: torch.Tensor, half_angle_deg: float, device=None) -> torch.Tensor:
    """(n_axes, *rfft_shape) 0/1 weights: voxels within ``half_angle_deg`` of ±axis (DC included).

    Parameters
    ----------
    shape
        Real-space shape (z, y, x) [px].
    axes_xyz
        (n_axes, 3) cone axes (x, y, z), any length.
    half_angle_deg
        Cone half-angle [deg].
    device
        Torch device.

    Returns
    -------
    torch.Tensor
        (n_axes, *rfft_shape) float32 0/1 weights.
    """
    k = rfft_frequencies(shape, device=device)
    kn = k / k.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    a = axes_xyz.to(device=kn.device, dtype=kn.dtype)
    a = a / a.norm(dim=-1, keepdim=True)
    cosang = torch.einsum("...c,nc->n...", kn, a).abs()
    return (cosang >= math.cos(math.radians(half_angle_deg))).float()


def cone_fsc(f1: torch.Tensor, f2: torch.Tensor, shells: torch.Tensor, n_shells: int, weights: torch.Tensor,
             return_counts: bool = False):
    """FSC per cone: (n_cones, n_shells). Shells without voxels in a cone get 0 (FSC(0) = 1).

    With ``return_counts`` also the number of (full-space) voxels per cone and shell.

    Parameters
    ----------
    f1, f2
        rfft of the two maps (same shape).
    shells
        Shell index of every rfft voxel.
    n_shells
        Number of shells (N // 2 + 1).
    weights
        (n_cones, *rfft_shape) 0/1 cone weights (:func:`cone_weights`).
    return_counts
        Also return the voxel count per cone and shell.

    Returns
    -------
    torch.Tensor or tuple of torch.Tensor
        (n_cones, n_shells) FSC; with ``return_counts`` also (n_cones, n_shells) counts.
    """
    box = (shells.shape[-1] - 1) * 2
    w = weights * rfft_multiplicity(tuple(shells.shape[:-1]) + (box,), device=f1.device)
    idx = shells.reshape(-1).clamp(max=n_shells)
    n = w.shape[0]

    def shell_sum(v: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(n, n_shells + 1, dtype=v.dtype, device=v.device)
        out.index_add_(1, idx, (w * v).reshape(n, -1))
        return out[:, :n_shells]

    num = shell_sum((f1 * f2.conj()).real.expand_as(w))
    d1 = shell_sum((f1.abs() ** 2).expand_as(w))
    d2 = shell_sum((f2.abs() ** 2).expand_as(w))
    out = num / torch.sqrt(d1 * d2).clamp(min=1e-30)
    out[:, 0] = 1.0
    if return_counts:
        return out, shell_sum(torch.ones_like(w))
    return out


@dataclass
class DirectionalFsc:
    """FSC curves in double cones around chosen axes (missing-wedge anisotropy)."""

    names: list[str]
    axes_xyz: np.ndarray  # (n, 3)
    half_angle_deg: float
    curves: torch.Tensor  # (n, n_shells), mask-corrected where a mask was given
    resolutions_A: list[float]

    def spread_A(self) -> tuple[float, float]:
        """(best, worst) cone resolution [Å]."""
        return min(self.resolutions_A), max(self.resolutions_A)


def directional_fsc(transforms: dict, box: int, pixel_size_A: float, half_angle_deg: float = 25.0,
                    threshold: float = 0.143, randomize_from: int | None = None,
                    axes: tuple[list[str], torch.Tensor] | None = None, min_voxels: int = 30,
                    use_masked: bool = False) -> DirectionalFsc:
    """Cone FSCs from :func:`masked_corrected_fsc`'s transforms.

    By default the *unmasked* maps are used: masking convolves the spectrum with the
    mask's transform, which fills an empty missing wedge with leaked signal and noise from
    neighbouring directions, and because the FSC ignores amplitude even a tiny leak then
    correlates as well as its source (phase randomisation does not remove it). With
    ``use_masked`` the masked, phase-randomisation-corrected curves are used instead
    (fine for anisotropy without empty regions). Low shells hold only a handful of voxels
    per cone; where a cone has fewer than ``min_voxels`` voxels in a shell the
    all-directions curve is used.

    Parameters
    ----------
    transforms
        Transforms returned by :func:`masked_corrected_fsc`.
    box
        Box size N [px].
    pixel_size_A
        Pixel size [Å].
    half_angle_deg
        Cone half-angle [deg].
    threshold
        FSC threshold of the cone resolutions.
    randomize_from
        Shell of the phase randomisation (for ``use_masked``).
    axes
        (names, (n, 3) axes x, y, z); default :func:`default_cone_axes`.
    min_voxels
        Fewest voxels of a cone shell before the all-directions FSC is used instead.
    use_masked
        Use the masked, corrected curves.

    Returns
    -------
    DirectionalFsc
        (n_cones, n_shells) curves and the resolution of each cone [Å].
    """
    names, ax = axes if axes is not None else default_cone_axes()
    shells = transforms["shells"]
    ns = n_shells_of(box)
    w = cone_weights((box, box, box), ax, half_angle_deg, device=shells.device)
    if use_masked and "m1" in transforms:
        masked, counts = cone_fsc(transforms["m1"], transforms["m2"], shells, ns, w, return_counts=True)
        rand = cone_fsc(transforms["r1"], transforms["r2"], shells, ns, w)
        rf = randomize_from or 0
        curves = torch.stack([corrected_fsc(masked[i], rand[i], rf) for i in range(len(names))])
        glob = corrected_fsc(fsc(transforms["m1"], transforms["m2"], shells, ns),
                             fsc(transforms["r1"], transforms["r2"], shells, ns), rf)
    else:
        curves, counts = cone_fsc(transforms["f1"], transforms["f2"], shells, ns, w, return_counts=True)
        glob = fsc(transforms["f1"], transforms["f2"], shells, ns)
    curves = torch.where(counts < min_voxels, glob.expand_as(curves), curves)
    resolutions = [resolution_from_curve(c, box, pixel_size_A, threshold)[0] for c in curves]
    return DirectionalFsc(names, ax.cpu().numpy(), half_angle_deg, curves, resolutions)
