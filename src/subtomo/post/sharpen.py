"""Map sharpening as in ``relion_postprocess``: MTF division, FSC weighting, B-factor, low-pass.

Order (reference notes section 4), applied to the average of the two unmasked half maps:
1. divide every Fourier component below Nyquist by the detector MTF (RELION MTF STAR,
   ``rlnResolutionInversePixel`` in 1/pixel of the detector at ``mtf_angpix``);
2. FSC weighting: shell r times sqrt(2 FSC/(1 + FSC)) (0 where FSC <= 0), zero beyond the
   first shell with FSC < 1e-4 (skipped with ``skip_fsc_weighting``);
3. Guinier plot x = 1/d² [Å⁻²], y = ln(mean |F| of the shell);
4. B-factor: user value, or Rosenthal & Henderson: least-squares line through the
   FSC-weighted curve between ``autob_lowres`` (10 Å) and the resolution; B = 4 slope;
5. F <- F exp(-B s²/4) up to Nyquist, 0 beyond;
6. raised-cosine low-pass (2 shells wide) at the resolution (or a given value).

Automatic B-factors only where they mean something (protocol: maps beyond ~9-10 Å): the
Guinier plot of a map is a straight line only beyond ~10 Å, where the protein's form
factor has flattened out (Rosenthal & Henderson 2003); at lower resolution the slope
measures the particle's shape, not its blur, and a fit "sharpens" with absurd B-factors
(e.g. -3,400 Å² at 16 Å). So (:func:`choose_bfactor`):

* a user B-factor (``--adhoc-bfac``) is always used as given;
* a map whose resolution is not better than ``autob_lowres`` (RELION's default 10 Å) is
  not fitted and not sharpened (B = 0), and the reason is returned;
* a fit with fewer than 3 shells, a positive B (blurring) or a B outside the plausible
  range for the resolution d is refused (B = 0) with the reason. Plausible:
  -4 ln(MAX_SHARPENING_GAIN) d² <= B <= 0, i.e. the sharpening multiplies the amplitudes
  at the resolution by at most ``MAX_SHARPENING_GAIN`` (10⁶; -498 Å² at 3 Å, -2,210 Å² at
  6.3 Å, -5,530 Å² at 10 Å).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from subtomo.fourier import (
    fft_centered,
    frequency_radius,
    ifft_centered,
    radial_average,
    raised_cosine_lowpass,
    rfft_multiplicity,
    shell_index,
)

# ---------------------------------------------------------------------------------------
# MTF (the curve is read by subtomo.io.mtf.read_mtf)

def mtf_on_grid(shape: tuple[int, ...], pixel_size_A: float, mtf_x: np.ndarray, mtf_y: np.ndarray,
                mtf_angpix: float, device=None) -> torch.Tensor:
    """MTF value at every rfft voxel: linear interpolation at s * mtf_angpix (s in 1/Å).

    Beyond the last tabulated frequency the last value is used (np.interp convention).

    Parameters
    ----------
    shape
        Real-space shape (z, y, x) [px].
    pixel_size_A
        Pixel size of the map [Å].
    mtf_x, mtf_y
        MTF curve: (m,) frequency [1/detector px] (sorted) and (m,) value.
    mtf_angpix
        Detector pixel size the curve refers to [Å].
    device
        Torch device.

    Returns
    -------
    torch.Tensor
        rfft-shaped float32 MTF values.
    """
    s_A = frequency_radius(shape, device=device) / pixel_size_A
    x = torch.as_tensor(mtf_x, dtype=torch.float32, device=s_A.device)
    y = torch.as_tensor(mtf_y, dtype=torch.float32, device=s_A.device)
    q = (s_A * mtf_angpix).clamp(min=float(x[0]), max=float(x[-1]))
    i = torch.searchsorted(x, q.reshape(-1).contiguous(), right=True).clamp(1, len(x) - 1).reshape(q.shape)
    x0, x1, y0, y1 = x[i - 1], x[i], y[i - 1], y[i]
    t = ((q - x0) / (x1 - x0).clamp(min=1e-12)).clamp(0, 1)
    return y0 + t * (y1 - y0)


def divide_by_mtf(f: torch.Tensor, shape: tuple[int, ...], pixel_size_A: float, mtf_x: np.ndarray,
                  mtf_y: np.ndarray, mtf_angpix: float, min_mtf: float = 1e-3) -> torch.Tensor:
    """Divide components below Nyquist by the MTF (clamped at ``min_mtf``); others unchanged.

    Parameters
    ----------
    f
        rfft of the map.
    shape
        Real-space shape (z, y, x) [px].
    pixel_size_A
        Pixel size of the map [Å].
    mtf_x, mtf_y
        MTF curve: frequency [1/detector px] and value.
    mtf_angpix
        Detector pixel size the curve refers to [Å].
    min_mtf
        Smallest MTF value divided by.

    Returns
    -------
    torch.Tensor
        rfft of the MTF-corrected map (same shape as ``f``).
    """
    mtf = mtf_on_grid(shape, pixel_size_A, mtf_x, mtf_y, mtf_angpix, device=f.device).clamp(min=min_mtf)
    below = frequency_radius(shape, device=f.device) <= 0.5
    return torch.where(below, f / mtf, f)


# ---------------------------------------------------------------------------------------
# FSC weighting, Guinier, B-factor

def fsc_weighting(f: torch.Tensor, fsc_curve: torch.Tensor, shells: torch.Tensor) -> torch.Tensor:
    """RELION ``applyFscWeighting``: sqrt(2 FSC / (1 + FSC)) per shell, 0 beyond the first FSC < 1e-4.

    Parameters
    ----------
    f
        rfft of the map.
    fsc_curve
        (n_shells,) FSC.
    shells
        Shell index of every rfft voxel.

    Returns
    -------
    torch.Tensor
        The weighted rfft (same shape as ``f``).
    """
    c = fsc_curve.to(f.device).double()
    w = torch.where(c > 0, torch.sqrt((2 * c / (1 + c)).clamp(min=0)), torch.zeros_like(c))
    below = torch.nonzero(c[1:] < 1e-4)
    if len(below):
        w[int(below[0]) + 1:] = 0
    w_ext = torch.cat([w, torch.zeros(1, dtype=w.dtype, device=w.device)]).float()
    return f * w_ext[shells.clamp(max=len(w))]


def guinier_curve(f: torch.Tensor, shells: torch.Tensor, box: int, pixel_size_A: float) -> tuple[np.ndarray, np.ndarray]:
    """(x = 1/d² in Å⁻², y = ln mean |F| per shell) for shells 1..N/2; empty shells -> -99.

    Parameters
    ----------
    f
        rfft of a (box, box, box) map.
    shells
        Shell index of every rfft voxel.
    box
        Box size N [px].
    pixel_size_A
        Pixel size [Å].

    Returns
    -------
    tuple of numpy.ndarray
        (N // 2,) 1/d² [Å⁻²] and (N // 2,) ln mean |F|.
    """
    ns = box // 2 + 1
    w = rfft_multiplicity((box, box, box), device=f.device)
    amp = radial_average(f.abs().float(), shells, ns, w).double().cpu().numpy()
    r = np.arange(1, ns)
    x = (r / (box * pixel_size_A)) ** 2
    a = amp[1:]
    y = np.where(a > 0, np.log(np.where(a > 0, a, 1.0)), -99.0)
    return x, y


@dataclass
class GuinierFit:
    """Least-squares line ln|F| = intercept + slope / d² through the shells from ``lowres_A`` to ``highres_A``."""

    slope: float
    intercept: float
    correlation: float
    n_points: int
    lowres_A: float
    highres_A: float

    @property
    def bfactor(self) -> float:
        """B-factor of the fitted decay [Å²] (4 x slope; negative sharpens when applied)."""
        return 4.0 * self.slope


def fit_guinier(x: np.ndarray, y: np.ndarray, lowres_A: float, highres_A: float) -> GuinierFit | None:
    """Least-squares line through the points with lowres >= d >= highres and y > -99.

    Parameters
    ----------
    x, y
        Guinier plot: 1/d² [Å⁻²] and ln mean |F| (-99 = empty shell).
    lowres_A, highres_A
        Fit range [Å].

    Returns
    -------
    GuinierFit or None
        The line, or None with fewer than 3 points in the range.
    """
    d = 1.0 / np.sqrt(x)
    sel = (d <= lowres_A + 1e-9) & (d >= highres_A - 1e-9) & (y > -99)
    if sel.sum() < 3:
        return None
    xs, ys = x[sel], y[sel]
    slope, intercept = np.polyfit(xs, ys, 1)
    corr = float(np.corrcoef(xs, ys)[0, 1]) if np.std(ys) > 0 else 1.0
    return GuinierFit(float(slope), float(intercept), corr, int(sel.sum()), lowres_A, highres_A)


def apply_bfactor(f: torch.Tensor, shape: tuple[int, ...], pixel_size_A: float, bfactor_A2: float) -> torch.Tensor:
    """F exp(-B s²/4) below Nyquist, 0 beyond (RELION ``applyBFactorToMap``).

    Parameters
    ----------
    f
        rfft of the map to filter.
    shape
        Real-space shape (z, y, x) [px].
    pixel_size_A
        Pixel size [Å].
    bfactor_A2
        B-factor [Å²] (negative sharpens).

    Returns
    -------
    torch.Tensor
        The filtered rfft (same shape as ``f``).
    """
    k = frequency_radius(shape, device=f.device)
    s2 = (k / pixel_size_A) ** 2
    env = torch.exp(-bfactor_A2 * s2 / 4)
    return torch.where(k <= 0.5, f * env, torch.zeros_like(f))


# ---------------------------------------------------------------------------------------
# Which B-factor

MAX_SHARPENING_GAIN = 1e6  # largest plausible amplitude gain of a fitted B at the resolution


@dataclass
class BfactorChoice:
    """The B-factor used for sharpening, where it came from and why."""

    bfactor_A2: float  # [Å²]; 0 = not sharpened
    source: str  # "user", "fit" or "none"
    reason: str  # one sentence for the log and the postprocess STAR file
    fit: GuinierFit | None = None  # the Guinier fit, when one was made (also when refused)
    warnings: list[str] = field(default_factory=list)


def plausible_bfactor_range(resolution_A: float) -> tuple[float, float]:
    """Range of fitted B-factors accepted at ``resolution_A``.

    Parameters
    ----------
    resolution_A
        Resolution of the map [Å].

    Returns
    -------
    tuple of float
        (lowest, highest) B [Å²]: (-4 ln(MAX_SHARPENING_GAIN) d², 0).
    """
    return -4.0 * math.log(MAX_SHARPENING_GAIN) * resolution_A ** 2, 0.0


def choose_bfactor(guinier_x: np.ndarray, guinier_y: np.ndarray, resolution_A: float,
                   adhoc_bfactor_A2: float | None = None, autob_lowres_A: float = 10.0,
                   autob_highres_A: float | None = None) -> BfactorChoice:
    """The sharpening B-factor: the user's, a Rosenthal-Henderson fit, or none (module docstring).

    Parameters
    ----------
    guinier_x, guinier_y
        (n_shells - 1,) Guinier plot of the FSC-weighted map: 1/d² [Å⁻²], ln mean |F|.
    resolution_A
        Final resolution [Å].
    adhoc_bfactor_A2
        User B-factor [Å²]; None: automatic.
    autob_lowres_A, autob_highres_A
        Fit range [Å] (high: default the resolution). No fit when the resolution is not
        better than ``autob_lowres_A``.

    Returns
    -------
    BfactorChoice
        B [Å²], its source, the reason and the fit.
    """
    if adhoc_bfactor_A2 is not None:
        return BfactorChoice(float(adhoc_bfactor_A2), "user", f"user B-factor {adhoc_bfactor_A2:g} A^2 (--adhoc-bfac)")
    if resolution_A >= autob_lowres_A:
        return BfactorChoice(0.0, "none", (
            f"no automatic B-factor: the resolution ({resolution_A:.1f} A) is not better than the low-resolution limit of "
            f"the fit ({autob_lowres_A:g} A, --autob-lowres); below it a Guinier fit measures the particle's shape, not "
            "its blur. The map is not sharpened (give --adhoc-bfac to sharpen)"))
    high = resolution_A if autob_highres_A is None else autob_highres_A
    fit = fit_guinier(guinier_x, guinier_y, autob_lowres_A, high)
    if fit is None:
        reason = (f"too few Guinier points between {autob_lowres_A:g} and {high:.1f} A for an automatic B-factor; "
                  "B = 0 used (give --adhoc-bfac to sharpen)")
        return BfactorChoice(0.0, "none", reason, None, [reason + "."])
    lowest, highest = plausible_bfactor_range(resolution_A)
    if fit.bfactor > highest:
        reason = (f"fitted B-factor {fit.bfactor:.0f} A^2 is positive (the curve rises), which would blur the map; "
                  "B = 0 used (give --adhoc-bfac to sharpen)")
        return BfactorChoice(0.0, "none", reason, fit, [reason + "."])
    if fit.bfactor < lowest:
        reason = (f"fitted B-factor {fit.bfactor:.0f} A^2 is implausible at {resolution_A:.1f} A (it would amplify the "
                  f"amplitudes at the resolution more than {MAX_SHARPENING_GAIN:.0e}-fold; plausible {lowest:.0f} to 0 "
                  "A^2); refused, B = 0 used (check the fit range --autob-lowres/--autob-highres, or give --adhoc-bfac)")
        return BfactorChoice(0.0, "none", reason, fit, [reason + "."])
    return BfactorChoice(fit.bfactor, "fit", f"automatic B-factor {fit.bfactor:.1f} A^2 (Guinier fit "
                         f"{fit.lowres_A:.1f}-{fit.highres_A:.1f} A, {fit.n_points} shells)", fit)


# ---------------------------------------------------------------------------------------
# The whole recipe

@dataclass
class SharpenResult:
    """The sharpened map and everything the postprocess job reports about it."""

    map: torch.Tensor  # (n, n, n) float32 sharpened, low-passed average
    bfactor_A2: float  # B applied [Å²]
    fit: GuinierFit | None  # the Guinier fit, when one was made
    lowpass_A: float | None  # low-pass applied [Å]; None: none
    guinier_x: np.ndarray  # (n_shells - 1,) 1/d² [Å⁻²]
    guinier: dict  # name -> y array (original, mtf_corrected, weighted, sharpened, intercept)
    warnings: list[str] = field(default_factory=list)
    bfactor_source: str = "fit"  # "user", "fit" or "none"
    bfactor_reason: str = ""  # why this B (one sentence)


def sharpen(average: torch.Tensor, fsc_curve: torch.Tensor, resolution_A: float, pixel_size_A: float,
            mtf: tuple[np.ndarray, np.ndarray] | None = None, mtf_angpix: float | None = None,
            adhoc_bfactor_A2: float | None = None, autob_lowres_A: float = 10.0, autob_highres_A: float | None = None,
            skip_fsc_weighting: bool = False, lowpass_A: float | None = None) -> SharpenResult:
    """Sharpen the average of the unmasked half maps (see module docstring).

    Parameters
    ----------
    average
        (n, n, n) float32 average of the half maps.
    fsc_curve
        (n // 2 + 1,) FSC used for weighting.
    resolution_A
        Final resolution [Å].
    pixel_size_A
        Pixel size [Å].
    mtf, mtf_angpix
        Detector MTF (frequency [1/detector px], value) and its pixel size [Å]; None: no correction.
    adhoc_bfactor_A2, autob_lowres_A, autob_highres_A
        B-factor choice (:func:`choose_bfactor`) [Å², Å, Å].
    skip_fsc_weighting
        Do not weight by sqrt(2 FSC / (1 + FSC)).
    lowpass_A
        Low-pass [Å]; None: the resolution; 0: none.

    Returns
    -------
    SharpenResult
        The sharpened map, the B-factor used (with source and reason) and the Guinier curves.
    """
    shape = tuple(average.shape)
    box = shape[-1]
    shells = shell_index(shape, device=average.device)
    f = fft_centered(average.float(), 3)
    gx, y_orig = guinier_curve(f, shells, box, pixel_size_A)
    if mtf is not None:
        f = divide_by_mtf(f, shape, pixel_size_A, mtf[0], mtf[1], mtf_angpix or pixel_size_A)
    _, y_mtf = guinier_curve(f, shells, box, pixel_size_A)
    if not skip_fsc_weighting:
        f = fsc_weighting(f, fsc_curve, shells)
    _, y_w = guinier_curve(f, shells, box, pixel_size_A)
    choice = choose_bfactor(gx, y_w, resolution_A, adhoc_bfactor_A2, autob_lowres_A, autob_highres_A)
    f = apply_bfactor(f, shape, pixel_size_A, choice.bfactor_A2)
    _, y_sharp = guinier_curve(f, shells, box, pixel_size_A)
    lp: float | None = resolution_A if lowpass_A is None else lowpass_A
    if lp and lp > 0:
        f = f * raised_cosine_lowpass(shape, box * pixel_size_A / lp, 2.0, device=f.device)
    else:
        lp = None
    fit = choice.fit
    intercept = (fit.intercept + fit.slope * gx) if fit is not None else np.full_like(gx, -99.0)
    out = ifft_centered(f, shape)
    curves = {"original": y_orig, "mtf_corrected": y_mtf, "weighted": y_w, "sharpened": y_sharp, "intercept": intercept}
    return SharpenResult(out, choice.bfactor_A2, fit, lp, gx, curves, list(choice.warnings), choice.source,
                         choice.reason)
