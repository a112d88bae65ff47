"""A tilt series' own defocus trend: outlier fits are flagged and replaced by it (issue 21).

The defocus of the images of one tilt series is not random: it follows the autofocus
target, the eucentric height of the specimen (a smooth function of the tilt angle) and a
slow drift over the acquisition. Per-image CTF fits at high tilt are the least precise
(thicker ice, fewer electrons, the defocus gradient across the image), and a wrong fit (a
neighbouring ring order, a background feature) can still look significant. So the fits
that succeeded define a smooth **trend**, and a fit too far from it is an outlier.

**Trend.** Mean defocus D (Å) against the tilt angle θ and the acquisition fraction a
(0 for the first image taken, 1 for the last, from ``rlnMicrographPreExposure``)::

    D(θ, a) = c0 + c1 a + c2 sin θ + c3 (1 − cos θ) + c4 a²

(a drift over the acquisition; an offset of the specimen from the tilt axis along x and
along the beam). A term enters only when at least 3 good fits lie at each end of its
variable (:func:`supported_terms`): one wrong high-tilt fit must not set a slope. The fit is a weighted least squares, iteratively reweighted with Tukey's
bisquare (c = 4.685) so that outliers do not pull it; each fit is weighted by its expected
precision. How many of the terms are used (1 to n/4, at most 5, n good fits) is chosen
by BIC, so a series whose defocus has no trend gets a robust mean and no slope fitted to
noise is extrapolated to the tilts whose fits failed.

**Expected precision and tolerance.** The precision of a fit at tilt θ is taken as
``σ(θ) = σ0 / cos θ`` (cos θ floored at 0.2): the signal of a tilt image falls roughly as
cos θ. ``σ0`` is the series' own scatter: 1.4826 × the median of ``|r_i| cos θ_i`` over the
good fits with |θ| <= 30° (all good fits if fewer than 3 of those), r_i the residual to the
trend, and at least :data:`MIN_PRECISION_A` (150 Å). A good fit is an **outlier** when
``|r_i| > k σ(θ_i)``, ``k`` = ``tolerance_sigma`` (default 3): at least 450 Å at 0° and
900 Å at 60°.

**Replacement.** Outliers are flagged (``subtomoCtfFitFailed = 1``) and, like every failed
fit, get the trend's defocus at their tilt and acquisition time, with the mean astigmatism
(vector mean of U − V and angle) of the good fits; ``subtomoCtfSource`` becomes ``trend``.

**Unknown CTF.** When no fit with |θ| <= 30° succeeded, the series has no reliable defocus
at all (e.g. no Thon rings anywhere): a trend through failed or high-tilt fits would be a
guess, so nothing is replaced and :attr:`TrendCheck.unknown` is set; the user must supply
defoci or process the data without CTF correction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

LOW_TILT_DEG = 30.0  # fits up to this |tilt| are the reliable core of a series
MIN_PRECISION_A = 150.0  # floor of the expected precision at 0 deg
MIN_COS_TILT = 0.2  # the precision model's cos(tilt) is not allowed below this
BISQUARE_C = 4.685  # Tukey's bisquare constant (95 % efficiency for normal residuals)
TREND_SOURCE = "trend"  # subtomoCtfSource of an image that got the trend's defocus
TREND_TERMS = ("constant", "acquisition", "sin(tilt)", "1 - cos(tilt)", "acquisition^2")


def acquisition_fraction(pre_exposure: np.ndarray) -> np.ndarray:
    """Position of each image in the acquisition, from its accumulated dose.

    Parameters
    ----------
    pre_exposure : numpy.ndarray
        (n,) accumulated dose before each image [e/Å²] (``rlnMicrographPreExposure``).

    Returns
    -------
    numpy.ndarray
        (n,) float64 in [0, 1]: 0 for the first image taken, 1 for the last; zeros when the
        dose does not vary (no acquisition information).
    """
    dose = np.asarray(pre_exposure, dtype=np.float64)
    span = float(dose.max() - dose.min()) if len(dose) else 0.0
    return (dose - dose.min()) / span if span > 0 else np.zeros(len(dose))


def trend_basis(tilt_deg: np.ndarray, acquisition: np.ndarray, terms: Sequence[int] = range(len(TREND_TERMS))) -> np.ndarray:
    """Design matrix of some of the trend's terms (:data:`TREND_TERMS`, by index).

    Parameters
    ----------
    tilt_deg : numpy.ndarray
        (n,) tilt angles [deg].
    acquisition : numpy.ndarray
        (n,) acquisition fractions in [0, 1].
    terms : sequence of int
        Indices into :data:`TREND_TERMS` (default all five).

    Returns
    -------
    numpy.ndarray
        (n, len(terms)) float64.
    """
    th = np.radians(np.asarray(tilt_deg, dtype=np.float64))
    a = np.asarray(acquisition, dtype=np.float64)
    columns = [np.ones_like(th), a, np.sin(th), 1 - np.cos(th), a * a]
    return np.stack([columns[k] for k in terms], axis=1)


def supported_terms(tilt_deg: np.ndarray, acquisition: np.ndarray, series_tilt_deg: np.ndarray) -> list[int]:
    """The terms that the good fits can pin down: never a slope set by one or two points.

    A term is used only when at least 3 good fits lie at each end of its variable over the
    series: acquisition (and its square): the first and the last third of the acquisition;
    sin θ: each third of the tilt range at either side; 1 − cos θ: the lowest and highest
    third of |θ|. Without this, a single wrong high-tilt fit could set a slope that is then
    extrapolated to every failed fit.

    Parameters
    ----------
    tilt_deg, acquisition : numpy.ndarray
        (n,) tilts [deg] and acquisition fractions of the good fits.
    series_tilt_deg : numpy.ndarray
        (m,) every tilt of the series [deg].

    Returns
    -------
    list of int
        Indices into :data:`TREND_TERMS`, starting with 0 (constant).
    """
    tilt = np.asarray(tilt_deg, dtype=np.float64)
    a = np.asarray(acquisition, dtype=np.float64)
    third = max(float(np.abs(series_tilt_deg).max()), 1e-6) / 3
    both = lambda lo, hi: int(lo.sum()) >= 3 and int(hi.sum()) >= 3  # noqa: E731
    drift = both(a <= 1 / 3, a >= 2 / 3)
    ok = [True, drift, both(tilt <= -third, tilt >= third), both(np.abs(tilt) <= third, np.abs(tilt) >= 2 * third),
          drift and int(((a > 1 / 3) & (a < 2 / 3)).sum()) >= 3]
    return [k for k, use in enumerate(ok) if use]


def _cos_tilt(tilt_deg: np.ndarray) -> np.ndarray:
    return np.maximum(np.cos(np.radians(np.asarray(tilt_deg, dtype=np.float64))), MIN_COS_TILT)


@dataclass(frozen=True)
class DefocusTrend:
    """A fitted defocus trend of one tilt series and its tolerance.

    Attributes
    ----------
    coefficients : numpy.ndarray
        (p,) float64, the coefficients of the terms used [Å].
    terms : tuple of int
        (p,) which :data:`TREND_TERMS` they belong to.
    sigma0_A : float
        Expected precision of a fit at 0° tilt [Å].
    tolerance_sigma : float
        Outliers lie more than this many expected precisions from the trend.
    """

    coefficients: np.ndarray
    terms: tuple[int, ...]
    sigma0_A: float
    tolerance_sigma: float

    def predict(self, tilt_deg: np.ndarray, acquisition: np.ndarray) -> np.ndarray:
        """Trend defocus (n,) [Å] at tilts (n,) [deg] and acquisition fractions (n,)."""
        return trend_basis(tilt_deg, acquisition, self.terms) @ self.coefficients

    def precision_A(self, tilt_deg: np.ndarray) -> np.ndarray:
        """Expected precision σ0 / cos θ (n,) [Å] of fits at tilts (n,) [deg]."""
        return self.sigma0_A / _cos_tilt(tilt_deg)

    def tolerance_A(self, tilt_deg: np.ndarray) -> np.ndarray:
        """Largest accepted distance from the trend (n,) [Å] at tilts (n,) [deg]."""
        return self.tolerance_sigma * self.precision_A(tilt_deg)


def _robust_sigma0(scaled_residual: np.ndarray, low: np.ndarray) -> float:
    """σ0 from residuals × cos θ: 1.4826 MAD about 0 of the low-tilt ones (all if < 3)."""
    use = scaled_residual[low] if int(low.sum()) >= 3 else scaled_residual
    return max(1.4826 * float(np.median(np.abs(use))), MIN_PRECISION_A)


def _robust_fit(basis: np.ndarray, d: np.ndarray, cos: np.ndarray, low: np.ndarray,
                max_iter: int) -> tuple[np.ndarray, np.ndarray]:
    """Bisquare-reweighted least squares of d (n,) on basis (n, p), weighted by cos² θ: (coefficients, residuals)."""
    residual = d - np.median(d)
    coefficients = np.zeros(basis.shape[1])
    for _ in range(max_iter):
        sigma0 = _robust_sigma0(residual * cos, low)
        u = residual * cos / (BISQUARE_C * sigma0)
        weight = np.where(np.abs(u) < 1, (1 - u * u) ** 2, 0.0)
        if weight.sum() <= 0:
            weight = np.ones_like(d)
        root_w = np.sqrt(weight) * cos  # bisquare x expected precision (variance ~ 1/cos²)
        coefficients = np.linalg.lstsq(basis * root_w[:, None], d * root_w, rcond=None)[0]
        new_residual = d - basis @ coefficients
        converged = np.allclose(new_residual, residual, atol=0.5)
        residual = new_residual
        if converged:
            break
    return coefficients, residual


def fit_defocus_trend(tilt_deg: np.ndarray, acquisition: np.ndarray, defocus_A: np.ndarray,
                      tolerance_sigma: float = 3.0, series_tilt_deg: np.ndarray | None = None,
                      max_iter: int = 50) -> DefocusTrend:
    """Robust fit of the defocus trend through the good fits of one tilt series.

    Of the :func:`supported_terms`, the first 1 to p_max (p_max = n // 4) are fitted; the
    model with the smallest ``n log(s²) + p log(n)`` is kept (BIC, with s the robust scale
    1.4826 MAD of the cos-weighted residuals), so that a series without a trend gets a
    robust mean and no spurious slope is extrapolated to the tilts without good fits.

    Parameters
    ----------
    tilt_deg : numpy.ndarray
        (n,) tilt angles of the good fits [deg], n >= 1.
    acquisition : numpy.ndarray
        (n,) their acquisition fractions in [0, 1] (:func:`acquisition_fraction`).
    defocus_A : numpy.ndarray
        (n,) their mean defocus [Å].
    tolerance_sigma : float
        Outlier threshold in expected precisions (stored in the result).
    series_tilt_deg : numpy.ndarray, optional
        (m,) every tilt of the series [deg] (default: the good fits' tilts).
    max_iter : int
        Iterations of the reweighted least squares.

    Returns
    -------
    DefocusTrend
        Coefficients, terms, σ0 and the tolerance.
    """
    tilt = np.asarray(tilt_deg, dtype=np.float64)
    d = np.asarray(defocus_A, dtype=np.float64)
    cos = _cos_tilt(tilt)
    low = np.abs(tilt) <= LOW_TILT_DEG
    candidates = supported_terms(tilt, acquisition, tilt if series_tilt_deg is None else series_tilt_deg)
    best: tuple[float, tuple[int, ...], np.ndarray, np.ndarray] | None = None
    for n_terms in range(1, min(len(candidates), max(1, len(d) // 4)) + 1):
        terms = tuple(candidates[:n_terms])
        coefficients, residual = _robust_fit(trend_basis(tilt, acquisition, terms), d, cos, low, max_iter)
        scale = max(1.4826 * float(np.median(np.abs(residual * cos))), 1.0)
        score = len(d) * np.log(scale ** 2) + n_terms * np.log(len(d))
        if best is None or score < best[0]:
            best = (score, terms, coefficients, residual)
    assert best is not None
    _, terms, coefficients, residual = best
    return DefocusTrend(coefficients, terms, _robust_sigma0(residual * cos, low), float(tolerance_sigma))


@dataclass
class TrendCheck:
    """Result of :func:`check_against_trend` for one tilt series.

    Attributes
    ----------
    table : pandas.DataFrame
        The per-image CTF table with outliers flagged and failed fits replaced.
    flagged : list of int
        Rows (0-based) newly flagged as outliers.
    replaced : list of int
        Rows (0-based) that got the trend's defocus.
    unknown : bool
        No fit with |tilt| <= 30° succeeded: nothing was replaced.
    trend : DefocusTrend or None
        The fitted trend (None when unknown).
    messages : list of str
        One line per flagged image.
    """

    table: pd.DataFrame
    flagged: list[int] = field(default_factory=list)
    replaced: list[int] = field(default_factory=list)
    unknown: bool = False
    trend: DefocusTrend | None = None
    messages: list[str] = field(default_factory=list)


def ctf_unknown(tilt_deg: np.ndarray, failed: np.ndarray) -> bool:
    """True when no fit at low tilt (|θ| <= 30°, or the lowest tilt present) succeeded.

    Parameters
    ----------
    tilt_deg : numpy.ndarray
        (n,) tilt angles [deg].
    failed : numpy.ndarray
        (n,) bool, the fit failed (or was flagged).

    Returns
    -------
    bool
        The series' CTF is unknown.
    """
    tilt = np.abs(np.asarray(tilt_deg, dtype=np.float64))
    if len(tilt) == 0:
        return True
    low = tilt <= max(LOW_TILT_DEG, float(tilt.min()))
    return not bool((low & ~np.asarray(failed, dtype=bool)).any())


def _series_arrays(table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(tilt [deg], acquisition fraction, mean defocus [Å], failed) of a per-image table."""
    tilt = table["rlnTomoNominalStageTiltAngle"].to_numpy(float)
    dose = table["rlnMicrographPreExposure"].to_numpy(float) if "rlnMicrographPreExposure" in table else np.zeros(len(table))
    u = table["rlnDefocusU"].to_numpy(float)
    v = table["rlnDefocusV"].to_numpy(float) if "rlnDefocusV" in table else u
    failed = table["subtomoCtfFitFailed"].to_numpy(int) > 0 if "subtomoCtfFitFailed" in table else np.zeros(len(table), bool)
    return tilt, acquisition_fraction(dose), (u + v) / 2, failed


def _mean_astigmatism(table: pd.DataFrame, good: np.ndarray) -> tuple[float, float]:
    """Vector mean (half U − V [Å], angle of U [deg]) of the astigmatism of the good fits."""
    u = table["rlnDefocusU"].to_numpy(float)[good]
    v = table["rlnDefocusV"].to_numpy(float)[good] if "rlnDefocusV" in table else u
    ang = table["rlnDefocusAngle"].to_numpy(float)[good] if "rlnDefocusAngle" in table else np.zeros(len(u))
    half = (u - v) / 2
    a1, a2 = float(np.mean(half * np.cos(np.radians(2 * ang)))), float(np.mean(half * np.sin(np.radians(2 * ang))))
    return float(np.hypot(a1, a2)), float(0.5 * np.degrees(np.arctan2(a2, a1)))


def _write_trend_values(table: pd.DataFrame, rows: np.ndarray, defocus_A: np.ndarray, good: np.ndarray) -> None:
    """Give ``rows`` the trend's defocus (and the mean astigmatism of the good fits), in place."""
    half, angle = _mean_astigmatism(table, good)
    table.loc[table.index[rows], "rlnDefocusU"] = defocus_A[rows] + half
    table.loc[table.index[rows], "rlnDefocusV"] = defocus_A[rows] - half
    table.loc[table.index[rows], "rlnDefocusAngle"] = angle
    table.loc[table.index[rows], "subtomoCtfFitFailed"] = 1
    table.loc[table.index[rows], "subtomoCtfSource"] = TREND_SOURCE


def check_against_trend(table: pd.DataFrame, tolerance_sigma: float = 3.0,
                        rows: Iterable[int] | None = None) -> TrendCheck:
    """Flag fits far from the series' defocus trend and give every failed fit the trend.

    Parameters
    ----------
    table : pandas.DataFrame
        Per-image CTF table of one tilt series (``rlnTomoNominalStageTiltAngle``,
        ``rlnDefocusU``/``V``/``Angle``, ``subtomoCtfFitFailed``; ``rlnMicrographPreExposure``
        for the acquisition order).
    tolerance_sigma : float
        Outlier threshold in expected precisions; 0 flags nothing (failed fits still get
        the trend).
    rows : iterable of int, optional
        0-based rows to check and replace (e.g. the re-estimated ones; default all). Rows
        that already hold a trend value are always refreshed.

    Returns
    -------
    TrendCheck
        The new table and what was flagged and replaced.
    """
    out = table.copy()
    for column in ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"):
        if column in out:
            out[column] = out[column].astype(np.float64)
    if "subtomoCtfFitFailed" not in out:
        out["subtomoCtfFitFailed"] = 0
    if "subtomoCtfSource" not in out:
        out["subtomoCtfSource"] = "fit"
    tilt, acq, dmean, failed = _series_arrays(out)
    if ctf_unknown(tilt, failed):
        return TrendCheck(out, unknown=True)
    check = np.zeros(len(out), bool)
    check[list(range(len(out))) if rows is None else list(rows)] = True
    trend = fit_defocus_trend(tilt[~failed], acq[~failed], dmean[~failed], tolerance_sigma, tilt)
    expected = trend.predict(tilt, acq)
    distance = np.abs(dmean - expected)
    outlier = check & ~failed & (tolerance_sigma > 0) & (distance > trend.tolerance_A(tilt))
    messages = [f"image {i + 1} (tilt {tilt[i]:.1f} deg): defocus {dmean[i]:.0f} A is {distance[i]:.0f} A from the "
                f"series trend {expected[i]:.0f} A (tolerance {trend.tolerance_A(tilt[i:i + 1])[0]:.0f} A at this tilt); "
                f"flagged and replaced by the trend" for i in np.flatnonzero(outlier)]
    good = ~failed & ~outlier
    was_trend = out["subtomoCtfSource"].astype(str).to_numpy() == TREND_SOURCE
    replace = (check & (failed | outlier)) | was_trend
    _write_trend_values(out, replace, expected, good)
    return TrendCheck(out, [int(i) for i in np.flatnonzero(outlier)], [int(i) for i in np.flatnonzero(replace)],
                      False, trend, messages)
