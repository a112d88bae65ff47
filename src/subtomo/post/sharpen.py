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

Subtomogram averages are often worse than 10 Å, where the 10 Å-to-resolution range is
empty. Then the fit uses 1.5 x the resolution to the resolution; if that has fewer than
3 shells or gives B > 0 (a blurring "sharpening"), B = 0 is used with a warning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from subtomo.errors import SubtomoError
from subtomo.fourier import (fft_centered, frequency_radius, ifft_centered, radial_average, raised_cosine_lowpass,
                             rfft_multiplicity, shell_index)
from subtomo.io.star import read_star


# ---------------------------------------------------------------------------------------
# MTF

def read_mtf(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """RELION MTF STAR -> (frequency in 1/detector pixel, MTF value), sorted by frequency."""
    blocks = read_star(path)
    tables = [t for t in blocks.values() if isinstance(t, pd.DataFrame)]
    table = next((t for t in tables if {"rlnResolutionInversePixel", "rlnMtfValue"} <= set(t.columns)), None)
    if table is None:
        raise SubtomoError(f"{path}: not an MTF STAR file (needs columns rlnResolutionInversePixel and rlnMtfValue). "
                           "Use a detector MTF curve as distributed for RELION.")
    x = table["rlnResolutionInversePixel"].to_numpy(float)
    y = table["rlnMtfValue"].to_numpy(float)
    order = np.argsort(x)
    x, y = x[order], y[order]
    if len(x) < 2 or not np.all(np.isfinite(y)) or (y <= 0).all():
        raise SubtomoError(f"{path}: MTF curve has fewer than 2 points or no positive value.")
    return x, y


def mtf_on_grid(shape: tuple[int, ...], pixel_size_A: float, mtf_x: np.ndarray, mtf_y: np.ndarray,
                mtf_angpix: float, device=None) -> torch.Tensor:
    """MTF value at every rfft voxel: linear interpolation at s * mtf_angpix (s in 1/Å).

    Beyond the last tabulated frequency the last value is used (np.interp convention).
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
    """Divide components below Nyquist by the MTF (clamped at ``min_mtf``); others unchanged."""
    mtf = mtf_on_grid(shape, pixel_size_A, mtf_x, mtf_y, mtf_angpix, device=f.device).clamp(min=min_mtf)
    below = frequency_radius(shape, device=f.device) <= 0.5
    return torch.where(below, f / mtf, f)


# ---------------------------------------------------------------------------------------
# FSC weighting, Guinier, B-factor

def fsc_weighting(f: torch.Tensor, fsc_curve: torch.Tensor, shells: torch.Tensor) -> torch.Tensor:
    """RELION ``applyFscWeighting``: sqrt(2 FSC / (1 + FSC)) per shell, 0 beyond the first FSC < 1e-4."""
    c = fsc_curve.to(f.device).double()
    w = torch.where(c > 0, torch.sqrt((2 * c / (1 + c)).clamp(min=0)), torch.zeros_like(c))
    below = torch.nonzero(c[1:] < 1e-4)
    if len(below):
        w[int(below[0]) + 1:] = 0
    w_ext = torch.cat([w, torch.zeros(1, dtype=w.dtype, device=w.device)]).float()
    return f * w_ext[shells.clamp(max=len(w))]


def guinier_curve(f: torch.Tensor, shells: torch.Tensor, box: int, pixel_size_A: float) -> tuple[np.ndarray, np.ndarray]:
    """(x = 1/d² in Å⁻², y = ln mean |F| per shell) for shells 1..N/2; empty shells -> -99."""
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
    slope: float
    intercept: float
    correlation: float
    n_points: int
    lowres_A: float
    highres_A: float

    @property
    def bfactor(self) -> float:
        return 4.0 * self.slope


def fit_guinier(x: np.ndarray, y: np.ndarray, lowres_A: float, highres_A: float) -> GuinierFit | None:
    """Least-squares line through the points with lowres >= d >= highres and y > -99."""
    d = 1.0 / np.sqrt(x)
    sel = (d <= lowres_A + 1e-9) & (d >= highres_A - 1e-9) & (y > -99)
    if sel.sum() < 3:
        return None
    xs, ys = x[sel], y[sel]
    slope, intercept = np.polyfit(xs, ys, 1)
    corr = float(np.corrcoef(xs, ys)[0, 1]) if np.std(ys) > 0 else 1.0
    return GuinierFit(float(slope), float(intercept), corr, int(sel.sum()), lowres_A, highres_A)


def apply_bfactor(f: torch.Tensor, shape: tuple[int, ...], pixel_size_A: float, bfactor_A2: float) -> torch.Tensor:
    """F exp(-B s²/4) below Nyquist, 0 beyond (RELION ``applyBFactorToMap``)."""
    k = frequency_radius(shape, device=f.device)
    s2 = (k / pixel_size_A) ** 2
    env = torch.exp(-bfactor_A2 * s2 / 4)
    return torch.where(k <= 0.5, f * env, torch.zeros_like(f))


# ---------------------------------------------------------------------------------------
# The whole recipe

@dataclass
class SharpenResult:
    map: torch.Tensor
    bfactor_A2: float
    fit: GuinierFit | None
    lowpass_A: float | None
    guinier_x: np.ndarray
    guinier: dict  # name -> y array (original, mtf_corrected, weighted, sharpened, intercept)
    warnings: list[str] = field(default_factory=list)


def sharpen(average: torch.Tensor, fsc_curve: torch.Tensor, resolution_A: float, pixel_size_A: float,
            mtf: tuple[np.ndarray, np.ndarray] | None = None, mtf_angpix: float | None = None,
            adhoc_bfactor_A2: float | None = None, autob_lowres_A: float = 10.0, autob_highres_A: float | None = None,
            skip_fsc_weighting: bool = False, lowpass_A: float | None = None) -> SharpenResult:
    """Sharpen the average of the unmasked half maps (see module docstring).

    ``lowpass_A``: None -> the resolution; 0 -> no low-pass.
    """
    shape = tuple(average.shape)
    box = shape[-1]
    shells = shell_index(shape, device=average.device)
    f = fft_centered(average.float(), 3)
    warnings: list[str] = []
    gx, y_orig = guinier_curve(f, shells, box, pixel_size_A)
    if mtf is not None:
        f = divide_by_mtf(f, shape, pixel_size_A, mtf[0], mtf[1], mtf_angpix or pixel_size_A)
    _, y_mtf = guinier_curve(f, shells, box, pixel_size_A)
    if not skip_fsc_weighting:
        f = fsc_weighting(f, fsc_curve, shells)
    _, y_w = guinier_curve(f, shells, box, pixel_size_A)
    fit = None
    if adhoc_bfactor_A2 is not None:
        bfac = float(adhoc_bfactor_A2)
    else:
        high = resolution_A if autob_highres_A is None else autob_highres_A
        low = autob_lowres_A
        fit = fit_guinier(gx, y_w, low, high)
        if fit is None or high >= low:
            low = 1.5 * high
            fit = fit_guinier(gx, y_w, low, high)
            if fit is not None:
                warnings.append(f"too few shells between {autob_lowres_A:g} A and the resolution ({high:.1f} A) for a "
                                f"Rosenthal-Henderson fit; B fitted from {low:.1f} to {high:.1f} A instead (less reliable "
                                "at low resolution; consider --adhoc-bfac).")
        if fit is None:
            bfac = 0.0
            warnings.append(f"too few Guinier points between {low:.1f} and {high:.1f} A for an automatic B-factor; "
                            "B = 0 used (give --adhoc-bfac to sharpen).")
        elif fit.bfactor > 0:
            warnings.append(f"fitted B-factor {fit.bfactor:.0f} A^2 is positive (the curve rises); B = 0 used "
                            "(give --adhoc-bfac to sharpen).")
            bfac = 0.0
        else:
            bfac = fit.bfactor
    f = apply_bfactor(f, shape, pixel_size_A, bfac)
    _, y_sharp = guinier_curve(f, shells, box, pixel_size_A)
    lp = resolution_A if lowpass_A is None else lowpass_A
    if lp and lp > 0:
        f = f * raised_cosine_lowpass(shape, box * pixel_size_A / lp, 2.0, device=f.device)
    else:
        lp = None
    intercept = (fit.intercept + fit.slope * gx) if fit is not None else np.full_like(gx, -99.0)
    out = ifft_centered(f, shape)
    return SharpenResult(out, bfac, fit, lp, gx, {"original": y_orig, "mtf_corrected": y_mtf, "weighted": y_w,
                                                   "sharpened": y_sharp, "intercept": intercept}, warnings)
