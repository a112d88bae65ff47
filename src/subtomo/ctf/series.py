"""CTF of a whole tilt series (protocol Steps 8 and 11): batches, trials, lower-tilt defoci.

The per-tilt result table (``<t>_ctffind.star``) has one row per image of the aligned
stack, in stack order: rlnMicrographName, rlnTomoNominalStageTiltAngle,
rlnMicrographPreExposure, rlnDefocusU/V (Å), rlnDefocusAngle (°), rlnCtfFigureOfMerit,
rlnCtfMaxResolution (Å), subtomoCtfFitFailed (0/1), plus subtomoCtfSignificance (t of the
ring amplitude) and subtomoCtfSource (fit, trials, lower_tilts, ctffind, imod, skip).
``subtomoCtfFittedDefocus`` keeps the mean defocus the fit itself found (Å), also for images
whose defocus was replaced (source ``trend``: :mod:`subtomo.ctf.trend`; ``lower_tilts``).
Users may edit the file by hand (Step 10's manual override); later stages read it as is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd
import torch

from subtomo.ctf.estimate import CtfFit, CtfSearchParams, astig_vector, effective_band, estimate_ctf, uv_angle
from subtomo.ctf.model import Optics
from subtomo.ctf.trend import check_against_trend, ctf_unknown
from subtomo.errors import SubtomoError
from subtomo.io.mrc import open_mrc_mmap, read_mrc_header
from subtomo.io.particles import resolve_project_path
from subtomo.io.relion import upgrade_legacy_labels
from subtomo.io.star import read_star_table

RESULT_COLUMNS = [
    "rlnMicrographName", "rlnTomoNominalStageTiltAngle", "rlnMicrographPreExposure",
    "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnCtfFigureOfMerit", "rlnCtfMaxResolution",
    "subtomoCtfFitFailed", "subtomoCtfSignificance", "subtomoCtfSource", "subtomoCtfFittedDefocus",
]
TOMOGRAM_COLUMNS = ("rlnTomoName", "rlnTomoTiltSeriesName", "rlnTomoTiltSeriesStarFile", "rlnTomoTiltSeriesPixelSize",
                    "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast")
Progress = Callable[[Iterable, int, str], Iterable]


@dataclass(frozen=True)
class TiltSeries:
    """One tilt series of an ``all_tomograms.star`` row: its stack, images and optics.

    Attributes
    ----------
    name : str
        Tomogram name (``rlnTomoName``).
    stack : Path
        The aligned tilt-series stack (MRC, one image per tilt).
    tilt_star : Path
        Its per-image STAR table (from ``subtomo import``).
    image_names : list of str
        (n,) ``index@stack`` of every image, stack order.
    tilts_deg : numpy.ndarray
        (n,) float64 nominal tilt angles [deg].
    pre_exposure : numpy.ndarray
        (n,) float64 accumulated dose before each image [e/Å²].
    optics : Optics
        Microscope and tilt-image pixel size [Å].
    """

    name: str
    stack: Path
    tilt_star: Path
    image_names: list[str]
    tilts_deg: np.ndarray
    pre_exposure: np.ndarray
    optics: Optics

    def __len__(self) -> int:
        return len(self.image_names)


def read_tilt_series(project: Path, row: pd.Series, source: Path | None = None) -> TiltSeries:
    """The tilt series of one ``all_tomograms.star`` row (paths resolved against ``project``).

    Parameters
    ----------
    project : Path
        Project directory.
    row : pandas.Series
        A row with the :data:`TOMOGRAM_COLUMNS`.
    source : Path, optional
        The table the row was read from: its paths are then confined to the project.

    Returns
    -------
    TiltSeries
        Its stack, per-image names, tilts [deg], doses [e/Å²] and optics.
    """
    tilt_star = resolve_project_path(project, str(row["rlnTomoTiltSeriesStarFile"]), source=source,
                                     column="rlnTomoTiltSeriesStarFile")
    tilts = read_star_table(tilt_star)
    optics = Optics(float(row["rlnVoltage"]), float(row["rlnSphericalAberration"]),
                    float(row["rlnAmplitudeContrast"]), float(row["rlnTomoTiltSeriesPixelSize"]))
    return TiltSeries(str(row["rlnTomoName"]), resolve_project_path(project, str(row["rlnTomoTiltSeriesName"]), source=source,
                                                                      column="rlnTomoTiltSeriesName"), tilt_star,
                      [str(v) for v in tilts["rlnMicrographName"]], tilts["rlnTomoNominalStageTiltAngle"].to_numpy(float),
                      tilts["rlnMicrographPreExposure"].to_numpy(float), optics)


def concat_fits(fits: list[CtfFit]) -> CtfFit:
    """One CtfFit from several batches.

    Parameters
    ----------
    fits : list of CtfFit
        Batches, in order.

    Returns
    -------
    CtfFit
        Their images in order (diagnostics kept only if every batch has them).
    """
    cat = lambda name: np.concatenate([getattr(f, name) for f in fits])  # noqa: E731
    diags = None
    if all(f.diagnostics is not None for f in fits):
        diags = [d for f in fits for d in (f.diagnostics or [])]
    return CtfFit(cat("defocus_u_A"), cat("defocus_v_A"), cat("defocus_angle_deg"), cat("figure_of_merit"),
                  cat("max_resolution_A"), cat("failed"), cat("significance"),
                  [r for f in fits for r in f.reasons], diags)


def read_sections(path: Path, indices: Iterable[int]) -> np.ndarray:
    """Sections of an MRC stack, memory-mapped read.

    Parameters
    ----------
    path : Path
        The stack.
    indices : iterable of int
        0-based sections.

    Returns
    -------
    numpy.ndarray
        (N, ny, nx) float32.
    """
    idx = list(indices)
    with open_mrc_mmap(path) as mrc:
        data = mrc.data
        if data.ndim == 2:
            data = data[None]
        n = data.shape[0]
        bad = [i for i in idx if not 0 <= i < n]
        if bad:
            raise SubtomoError(f"{path}: has {n} images; image(s) {', '.join(str(i + 1) for i in bad)} do not exist.")
        return np.stack([np.asarray(data[i], dtype=np.float32) for i in idx])


def estimate_stack(path: Path, tilts_deg: np.ndarray, optics: Optics, params: CtfSearchParams,
                   indices: list[int] | None = None, device: torch.device | str = "cpu", batch: int = 8,
                   diagnostics: bool = False,
                   progress: Callable[[Iterable, int, str], Iterable] | None = None) -> CtfFit:
    """Fit every selected image of an MRC stack, in batches.

    Parameters
    ----------
    path : Path
        The tilt-series stack.
    tilts_deg : numpy.ndarray
        (N,) tilts of the selected images [deg], in the order of ``indices``.
    optics : Optics
        Microscope and pixel size [Å].
    params : CtfSearchParams
        Search options.
    indices : list of int, optional
        0-based images (default all).
    device, batch, diagnostics, progress
        Torch device, images per batch, keep diagnostics, progress wrapper.

    Returns
    -------
    CtfFit
        N fits.
    """
    (nz, _, _), _ = read_mrc_header(path)
    indices = list(range(nz)) if indices is None else list(indices)
    tilts_deg = np.asarray(tilts_deg, dtype=np.float64)
    if len(tilts_deg) != len(indices):
        raise SubtomoError(f"{path}: {len(indices)} images selected but {len(tilts_deg)} tilt angles given.")
    starts = list(range(0, len(indices), max(1, batch)))
    it = progress(starts, len(starts), f"CTF {Path(path).name}") if progress else starts
    fits = []
    for b0 in it:
        sel = indices[b0:b0 + batch]
        imgs = torch.from_numpy(read_sections(path, sel)).to(device)
        fits.append(estimate_ctf(imgs, tilts_deg[b0:b0 + batch], optics, params, diagnostics=diagnostics))
    return concat_fits(fits)


def average_trials(fit: CtfFit) -> CtfFit:
    """Per-tilt mean of two trial fits (images 2i, 2i+1 belong to tilt i).

    Defocus and astigmatism are averaged as (mean defocus, astigmatism vector); a trial
    whose fit failed is left out unless both failed (then the tilt stays flagged).

    Parameters
    ----------
    fit : CtfFit
        2T trial fits.

    Returns
    -------
    CtfFit
        T per-tilt fits (no diagnostics).
    """
    n2 = len(fit.defocus_u_A)
    if n2 % 2:
        raise ValueError("trial fits must come in pairs")
    D, a1, a2 = astig_vector(fit.defocus_u_A, fit.defocus_v_A, fit.defocus_angle_deg)
    ok = ~fit.failed.reshape(-1, 2)
    w = np.where(ok.any(1, keepdims=True), ok, True).astype(float)
    w /= w.sum(1, keepdims=True)
    mean = lambda a: (np.asarray(a, float).reshape(-1, 2) * w).sum(1)  # noqa: E731
    u, v, ang = uv_angle(mean(D), mean(a1), mean(a2))
    reasons = []
    for i in range(n2 // 2):
        both_failed = not ok[i].any()
        reasons.append("; ".join(f"trial {k + 1}: {fit.reasons[2 * i + k]}" for k in range(2)) if both_failed else "")
    return CtfFit(u, v, ang, mean(fit.figure_of_merit), mean(fit.max_resolution_A), np.asarray(~ok.any(1), dtype=bool),
                  mean(fit.significance), reasons, None)


def estimate_trials(trial_path: Path, tilts_deg: np.ndarray, optics: Optics, params: CtfSearchParams,
                    tilt_indices: list[int] | None = None, device="cpu", batch: int = 8,
                    progress=None) -> tuple[CtfFit, CtfFit]:
    """Fit the two trial images of each selected tilt and average them.

    Parameters
    ----------
    trial_path : Path
        The ``.trial`` stack: 2T images, images 2i and 2i+1 belong to tilt i (aligned-stack order).
    tilts_deg : numpy.ndarray
        (T,) tilt angles of the whole series [deg], stack order.
    optics : Optics
        Microscope and pixel size of the trial images [Å].
    params : CtfSearchParams
        Search options.
    tilt_indices : list of int, optional
        0-based tilts to fit (default all).
    device, batch, progress
        Torch device, images per batch, progress wrapper (as :func:`estimate_stack`).

    Returns
    -------
    averaged : CtfFit
        One fit per selected tilt (:func:`average_trials`; defoci [Å] at the image centre).
    raw : CtfFit
        The 2 x (selected tilts) per-trial fits, with diagnostics.

    Raises
    ------
    SubtomoError
        The stack is unreadable or does not hold exactly 2T images.
    """
    n = len(tilts_deg)
    (nz, _, _), _ = read_mrc_header(trial_path)
    if nz != 2 * n:
        raise SubtomoError(f"{trial_path}: holds {nz} trial images but the tilt series has {n} images; it must hold "
                           f"exactly 2 per tilt ({2 * n}), in the order of the aligned stack. Fix the .trial stack, "
                           f"or run without --use-trials.")
    sel = list(range(n)) if tilt_indices is None else list(tilt_indices)
    idx = [2 * i + k for i in sel for k in range(2)]
    tilts = np.repeat(np.asarray(tilts_deg, float)[sel], 2)
    raw = estimate_stack(trial_path, tilts, optics, params, idx, device, batch, diagnostics=True, progress=progress)
    return average_trials(raw), raw


def results_table(names: list[str], tilts_deg, dose, fit: CtfFit, source: str) -> pd.DataFrame:
    """The ``<t>_ctffind.star`` table of fitted (or imported) images.

    Parameters
    ----------
    names : list of str
        (n,) ``index@stack`` image names.
    tilts_deg, dose : array_like
        (n,) tilt angles [deg] and accumulated doses [e/Å²].
    fit : CtfFit
        The n fits.
    source : str
        ``subtomoCtfSource`` of every row (fit, trials, ctffind, imod, skip).

    Returns
    -------
    pandas.DataFrame
        (n rows, :data:`RESULT_COLUMNS`).
    """
    return pd.DataFrame({
        "rlnMicrographName": list(names),
        "rlnTomoNominalStageTiltAngle": np.asarray(tilts_deg, float),
        "rlnMicrographPreExposure": np.asarray(dose, float),
        "rlnDefocusU": fit.defocus_u_A, "rlnDefocusV": fit.defocus_v_A, "rlnDefocusAngle": fit.defocus_angle_deg,
        "rlnCtfFigureOfMerit": fit.figure_of_merit, "rlnCtfMaxResolution": fit.max_resolution_A,
        "subtomoCtfFitFailed": fit.failed.astype(int), "subtomoCtfSignificance": fit.significance,
        "subtomoCtfSource": [source] * len(names), "subtomoCtfFittedDefocus": fit.defocus_mean_A,
    })[RESULT_COLUMNS]


def skip_ctf_table(names: list[str], tilts_deg, dose) -> pd.DataFrame:
    """Table 1, row 8: no CTF (phase plate, or target resolution below the first zero).

    Defocus 0 everywhere and source ``skip``; with Cs 0 and Q0 1 (set by prepare) the CTF
    is exactly 1, leaving only the wedge, tilt and dose weighting.

    Parameters
    ----------
    names : list of str
        (n,) image names.
    tilts_deg, dose : array_like
        (n,) tilt angles [deg] and accumulated doses [e/Å²].

    Returns
    -------
    pandas.DataFrame
        n rows of :data:`RESULT_COLUMNS`.
    """
    n = len(names)
    z = np.zeros(n)
    fit = CtfFit(z, z, z, z, z, np.zeros(n, bool), z, [""] * n)
    return results_table(names, tilts_deg, dose, fit, "skip")


def apply_lower_tilt_defoci(table: pd.DataFrame, threshold_deg: float, where: str = "") -> tuple[pd.DataFrame, int, list[str]]:
    """Step 11: tilts with |θ| > T get the mean defocus of the tilts with |θ| < T.

    Tilts with |θ| = T keep their own (as in relion_prepare_subtomograms.py). The mean is
    over the successful lower-tilt fits, averaged as (mean defocus, astigmatism vector);
    when none succeeded the CTF is unknown and this is an error (never a mean of failed
    fits).

    Parameters
    ----------
    table : pandas.DataFrame
        One tilt series' ``<t>_ctffind.star`` table (:data:`RESULT_COLUMNS`; defoci [Å], angles [deg]).
    threshold_deg : float
        The threshold T [deg].
    where : str
        What the table belongs to (a tomogram name), for the messages.

    Returns
    -------
    table : pandas.DataFrame
        A copy; the replaced rows get the mean rlnDefocusU/V [Å] and rlnDefocusAngle [deg],
        subtomoCtfFitFailed 0 and source ``lower_tilts`` (subtomoCtfFittedDefocus is kept).
    n_replaced : int
        Number of rows replaced.
    notes : list of str
        Notes for the log (currently always empty).

    Raises
    ------
    SubtomoError
        No image has |θ| < T, or every fit with |θ| < T failed.
    """
    t = table.copy()
    tilt = t["rlnTomoNominalStageTiltAngle"].to_numpy(float)
    lower = np.abs(tilt) < threshold_deg
    higher = np.abs(tilt) > threshold_deg
    if not lower.any():
        raise SubtomoError(f"--lower-tilt-defoci {threshold_deg:g}: no image{' of ' + where if where else ''} has "
                           f"|tilt| < {threshold_deg:g} deg (tilts {tilt.min():.1f} to {tilt.max():.1f}). Use a larger threshold.")
    notes: list[str] = []
    good = lower & (t["subtomoCtfFitFailed"].to_numpy(int) == 0)
    use = good
    if not good.any():
        raise SubtomoError(f"--lower-tilt-defoci {threshold_deg:g}: every fit{' of ' + where if where else ''} with |tilt| < "
                           f"{threshold_deg:g} deg failed, so the CTF is unknown and there is no defocus to copy. Supply "
                           "defoci (--import-ctffind, --import-imod, or edit the _ctffind.star file), try --use-trials, "
                           "or run with --skip-ctf.")
    D, a1, a2 = astig_vector(t["rlnDefocusU"].to_numpy(float), t["rlnDefocusV"].to_numpy(float),
                             t["rlnDefocusAngle"].to_numpy(float))
    u, v, ang = uv_angle(np.array([D[use].mean()]), np.array([a1[use].mean()]), np.array([a2[use].mean()]))
    t.loc[higher, "rlnDefocusU"] = u[0]
    t.loc[higher, "rlnDefocusV"] = v[0]
    t.loc[higher, "rlnDefocusAngle"] = ang[0]
    t.loc[higher, "subtomoCtfFitFailed"] = 0
    t.loc[higher, "subtomoCtfSource"] = "lower_tilts"
    return t, int(higher.sum()), notes


def flag_inconsistent_defoci(table: pd.DataFrame, max_deviation_A: float, rows: Iterable[int] | None = None,
                             neighbours: int = 6) -> tuple[pd.DataFrame, list[str]]:
    """Tilt-series consistency check: flag fits far from the series' robust defocus trend.

    Defocus changes little between neighbouring tilts (autofocus, eucentric height), so a
    fitted mean defocus farther than ``max_deviation_A`` from the median of its
    ``neighbours`` nearest tilts (by tilt angle; the image itself and failed fits left
    out) is almost surely a wrong fit (a neighbouring ring order, a background feature).
    Such images keep their fitted values but get ``subtomoCtfFitFailed = 1``; later
    stages then treat them like any failed fit.

    Parameters
    ----------
    table : pandas.DataFrame
        One tilt series' ``<t>_ctffind.star`` table (:data:`RESULT_COLUMNS`); the mean defocus is
        (rlnDefocusU + rlnDefocusV) / 2 [Å].
    max_deviation_A : float
        Largest accepted distance from the trend [Å]; <= 0 disables the check.
    rows : iterable of int, optional
        0-based images to check (e.g. the re-estimated ones); the others still define the trend.
        Default: all.
    neighbours : int
        Number of nearest tilts whose median is the trend (an image with fewer than 3 successful
        other fits is not checked).

    Returns
    -------
    table : pandas.DataFrame
        A copy with ``subtomoCtfFitFailed`` updated (unchanged for fewer than 3 rows).
    messages : list of str
        One message per flagged image.
    """
    t = table.copy()
    if max_deviation_A <= 0 or len(t) < 3:
        return t, []
    tilt = t["rlnTomoNominalStageTiltAngle"].to_numpy(float)
    dmean = (t["rlnDefocusU"].to_numpy(float) + t["rlnDefocusV"].to_numpy(float)) / 2
    failed = t["subtomoCtfFitFailed"].to_numpy(int) > 0
    check = np.zeros(len(t), bool)
    check[list(range(len(t))) if rows is None else list(rows)] = True
    new_fail = failed.copy()
    messages = []
    for i in np.flatnonzero(check & ~failed):
        others = np.flatnonzero(~failed & (np.arange(len(t)) != i))
        if len(others) < 3:
            continue
        near = others[np.argsort(np.abs(tilt[others] - tilt[i]), kind="stable")[:neighbours]]
        trend = float(np.median(dmean[near]))
        if abs(dmean[i] - trend) > max_deviation_A:
            new_fail[i] = True
            messages.append(f"image {i + 1} (tilt {tilt[i]:.1f} deg): defocus {dmean[i]:.0f} A is "
                            f"{abs(dmean[i] - trend):.0f} A from the series trend {trend:.0f} A (neighbouring tilts); "
                            f"flagged as a failed fit")
    t["subtomoCtfFitFailed"] = new_fail.astype(int)
    return t, messages


def merge_refitted(previous: pd.DataFrame, new: pd.DataFrame, rows: list[int], path: Path) -> pd.DataFrame:
    """A previous ``<t>_ctffind.star`` table with ``rows`` (0-based) replaced by the rows of ``new``.

    Parameters
    ----------
    previous : pandas.DataFrame
        The whole series' table (n rows), possibly edited by hand or from an older version
        (missing columns are added: 0, source ``manual``, fitted defocus = its defocus).
    new : pandas.DataFrame
        len(rows) re-estimated rows (:data:`RESULT_COLUMNS`).
    rows : list of int
        Where the new rows go.
    path : Path
        The previous table's file (for messages).

    Returns
    -------
    pandas.DataFrame
        n rows, :data:`RESULT_COLUMNS`.
    """
    if max(rows, default=-1) >= len(previous):
        raise SubtomoError(f"{path}: {len(previous)} rows, but image {max(rows) + 1} was re-estimated. Re-run the whole "
                           "tilt series (without --image).")
    table = previous.copy()
    for col in RESULT_COLUMNS:
        if col == "subtomoCtfFittedDefocus" and col not in table.columns:
            table[col] = (table["rlnDefocusU"].astype(float) + table["rlnDefocusV"].astype(float)) / 2
        elif col not in table.columns:
            table[col] = 0 if col != "subtomoCtfSource" else "manual"
    table = table[RESULT_COLUMNS].copy()
    for col in RESULT_COLUMNS:
        table[col] = table[col].astype(new[col].dtype)
        table.loc[table.index[rows], col] = new[col].to_numpy()
    return table


def fit_tilt_series(series: TiltSeries, params: CtfSearchParams, rows: list[int], use_trials: bool = False,
                    device: torch.device | str = "cpu", batch: int = 8, diagnostics: bool = False,
                    progress: Progress | None = None,
                    handedness: int = -1) -> tuple[pd.DataFrame, CtfFit, list[tuple[int, int]]]:
    """Fit the CTF of images ``rows`` of a tilt series (or of their trial images).

    Parameters
    ----------
    series : TiltSeries
        The tilt series.
    params : CtfSearchParams
        Search options.
    rows : list of int
        0-based images to fit.
    use_trials : bool
        Fit the two trial images of each tilt (``<stack>.trial``) and use their mean.
    device, batch, diagnostics, progress
        Torch device, images per batch, keep diagnostics for plots, progress wrapper.
    handedness : int
        Defocus handedness of the tilt gradient (docs/conventions.md): −1 (default), at
        positive tilt the right side (x > 0) is more underfocused (offset x tan θ); +1 the
        opposite (the fits see the tilts with their sign flipped).

    Returns
    -------
    table : pandas.DataFrame
        len(rows) rows of :data:`RESULT_COLUMNS`, source ``fit`` or ``trials``.
    diagnostic_fit : CtfFit
        The fit whose diagnostics belong to the images (per trial with ``use_trials``).
    labels : list of (int, int)
        (image row, trial number 1/2 or 0) of each diagnostic.
    """
    (nz, _, _), _ = read_mrc_header(series.stack)
    if nz != len(series):
        raise SubtomoError(f"{series.stack}: {nz} images but {series.tilt_star} lists {len(series)}. Re-run subtomo import.")
    bad = [i + 1 for i in rows if i >= len(series)]
    if bad:
        raise SubtomoError(f"--image {','.join(map(str, bad))}: {series.name} has {len(series)} images.")
    tilts = series.tilts_deg
    grad = -handedness * tilts  # the estimator's gradient is x tan(tilt): hand -1
    if use_trials:
        trial = series.stack.with_suffix(".trial")
        if not trial.exists():
            raise SubtomoError(f"{trial}: not found; --use-trials needs a .trial stack (2 images per tilt) beside "
                               f"{series.stack.name}.")
        fit, raw = estimate_trials(trial, grad, series.optics, params, rows, device, batch, progress)
        diagnostic_fit, labels, source = raw, [(i, k) for i in rows for k in (1, 2)], "trials"
    else:
        fit = estimate_stack(series.stack, grad[rows], series.optics, params, rows, device, batch,
                             diagnostics=diagnostics, progress=progress)
        diagnostic_fit, labels, source = fit, [(i, 0) for i in rows], "fit"
    table = results_table([series.image_names[i] for i in rows], tilts[rows], series.pre_exposure[rows], fit, source)
    return table, diagnostic_fit, labels


def series_ctf_unknown(table: pd.DataFrame) -> bool:
    """True when no fit with |tilt| <= 30° succeeded (:func:`subtomo.ctf.trend.ctf_unknown`).

    Parameters
    ----------
    table : pandas.DataFrame
        A series' ``<t>_ctffind.star`` table.

    Returns
    -------
    bool
        The series' CTF is unknown.
    """
    failed = table["subtomoCtfFitFailed"].to_numpy(int) > 0 if "subtomoCtfFitFailed" in table else np.zeros(len(table), bool)
    return ctf_unknown(table["rlnTomoNominalStageTiltAngle"].to_numpy(float), failed)


def series_columns(table: pd.DataFrame) -> dict[str, int]:
    """Per-series columns of ``ctf_tomograms.star`` from its ``<t>_ctffind.star`` table.

    Parameters
    ----------
    table : pandas.DataFrame
        The series' per-image CTF table.

    Returns
    -------
    dict
        ``subtomoSkipCtf`` (1: no CTF, every image skipped), ``subtomoCtfReplacedByTrend``
        (images that got the series' defocus trend) and ``subtomoCtfUnknown`` (1: no fit
        with |tilt| <= 30° succeeded, the series needs supplied defoci or --skip-ctf).
    """
    sources = table["subtomoCtfSource"].astype(str) if "subtomoCtfSource" in table.columns else pd.Series([""] * len(table))
    skip = int(len(table) > 0 and bool((sources == "skip").all()))
    unknown = int(not skip and "subtomoCtfFitFailed" in table.columns and series_ctf_unknown(table))
    return {"subtomoSkipCtf": skip, "subtomoCtfReplacedByTrend": int((sources == "trend").sum()), "subtomoCtfUnknown": unknown}


UNKNOWN_CTF_ADVICE = ("the CTF is unknown: no fit with |tilt| <= 30 deg succeeded (no reliable Thon rings), so no defocus "
                      "is trustworthy and none was replaced. Supply defoci (subtomo ctf --import-ctffind or --import-imod, "
                      "or edit the _ctffind.star file), try --use-trials, or run --skip-ctf")


@dataclass
class SeriesEstimate:
    """CTF of one tilt series after fitting and the consistency checks (:func:`estimate_series`).

    Attributes
    ----------
    table : pandas.DataFrame
        The whole series' ``<t>_ctffind.star`` table (:data:`RESULT_COLUMNS`).
    source : str
        ``fit`` or ``trials``.
    diagnostic_fit : CtfFit
        Fits whose diagnostics are to be drawn, labelled by ``labels`` (image, trial).
    labels : list of (int, int)
        (0-based image, trial 1/2 or 0) of each diagnostic.
    notes, warnings : list of str
        What to log, and what the user must look at (flagged fits, unknown CTF).
    unknown : bool
        No fit with |tilt| <= 30° succeeded.
    """

    table: pd.DataFrame
    source: str
    diagnostic_fit: CtfFit
    labels: list[tuple[int, int]]
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    unknown: bool = False


def estimate_series(series: TiltSeries, params: CtfSearchParams, rows: list[int], previous: pd.DataFrame | None = None,
                    previous_path: Path | None = None, max_deviation_A: float = 10000.0, trend_tolerance: float = 3.0,
                    use_trials: bool = False, device: torch.device | str = "cpu", batch: int = 8,
                    diagnostics: bool = False, progress: Progress | None = None, handedness: int = -1) -> SeriesEstimate:
    """Fit images ``rows`` of a tilt series, then check the whole series for consistency.

    The fits (:func:`fit_tilt_series`) replace ``rows`` of ``previous`` (a table to update,
    e.g. after a manual edit) or make the table. Then fits far from the median of their
    neighbouring tilts (:func:`flag_inconsistent_defoci`, ``max_deviation_A`` [Å]) and far
    from the series' defocus trend (:func:`subtomo.ctf.trend.check_against_trend`,
    ``trend_tolerance`` expected precisions) are flagged, and failed or flagged fits get
    the trend's defocus; only ``rows`` are checked (others keep a manual override).

    Parameters
    ----------
    series, params, rows
        The tilt series, the search options and the 0-based images to fit.
    previous : pandas.DataFrame, optional
        The series' previous table (n rows) to update; ``previous_path`` names its file.
    max_deviation_A, trend_tolerance : float
        The two consistency checks' thresholds (0: off).
    use_trials, device, batch, diagnostics, progress, handedness
        As for :func:`fit_tilt_series`.

    Returns
    -------
    SeriesEstimate
        Table, diagnostics and messages.
    """
    (_, ny, nx), _ = read_mrc_header(series.stack)
    notes = list(effective_band((ny, nx), series.optics.pixel_size_A, params).notes)
    new, diagnostic_fit, labels = fit_tilt_series(series, params, rows, use_trials, device, batch, diagnostics, progress,
                                                  handedness)
    table = merge_refitted(previous, new, rows, previous_path or Path("previous table")) if previous is not None else new
    if len(table) != len(series):
        raise SubtomoError(f"{previous_path}: {len(table)} rows but {series.name} has {len(series)} images.")
    # consistency along the series before any --lower-tilt-defoci replacement, so that
    # outliers neither enter the lower-tilt mean nor hide behind it
    table, messages = flag_inconsistent_defoci(table, max_deviation_A, rows)
    warnings = [f"{m}; fix the value by editing the STAR file or re-running the image" for m in messages]
    check = check_against_trend(table, trend_tolerance, rows)
    result = SeriesEstimate(check.table, str(new["subtomoCtfSource"].iloc[0]), diagnostic_fit, labels, notes, warnings,
                            check.unknown)
    if check.unknown:
        result.warnings.append(UNKNOWN_CTF_ADVICE + "; prepare refuses this tomogram until then")
    else:
        trend = check.trend
        assert trend is not None
        result.warnings.extend(f"{m}. Check its diagnostic plot" for m in check.messages)
        result.notes.append(f"defocus trend sigma0 {trend.sigma0_A:.0f} A (tolerance {trend.tolerance_A(np.zeros(1))[0]:.0f} A "
                            f"at 0 deg, {trend.tolerance_A(np.full(1, 60.0))[0]:.0f} A at 60 deg); {len(check.flagged)} "
                            f"fit(s) off the trend, {len(check.replaced)} image(s) given the trend's defocus")
    return result


def handedness_scores(series: TiltSeries, params: CtfSearchParams, min_tilt_deg: float = 30.0, n_images: int = 4,
                      device: torch.device | str = "cpu") -> dict[int, float]:
    """How well each defocus handedness fits the highest-tilt images (where the gradient is largest).

    Parameters
    ----------
    series : TiltSeries
        The tilt series.
    params : CtfSearchParams
        Search options (with the tilt gradient on).
    min_tilt_deg : float
        Only images with |tilt| >= this [deg].
    n_images : int
        At most this many images, highest |tilt| first.
    device : torch.device or str
        Where to fit.

    Returns
    -------
    dict of int to float
        {−1: score, +1: score}: mean figure of merit (2D correlation of data and model) of
        the images' fits with each hand; empty when no image is tilted enough.
    """
    order = np.argsort(-np.abs(series.tilts_deg), kind="stable")
    rows = [int(i) for i in order[:n_images] if abs(series.tilts_deg[i]) >= min_tilt_deg]
    if not rows or not params.tilt_gradient:
        return {}
    tilts = series.tilts_deg[rows]
    return {hand: float(np.mean(estimate_stack(series.stack, -hand * tilts, series.optics, params, rows, device,
                                               len(rows)).figure_of_merit)) for hand in (-1, 1)}


def handedness_report(series: TiltSeries, params: CtfSearchParams, chosen: int,
                      device: torch.device | str = "cpu") -> tuple[str, bool] | None:
    """A log line with both hands' scores on the highest tilts (:func:`handedness_scores`).

    Parameters
    ----------
    series, params, device
        As for :func:`handedness_scores`.
    chosen : int
        The handedness in use (−1 or +1).

    Returns
    -------
    tuple of (str, bool) or None
        The message and whether the other hand fits better (a warning); None without tilted images.
    """
    hs = handedness_scores(series, params, device=device)
    if not hs:
        return None
    better = max(hs, key=lambda h: hs[h])
    advice = "" if better == chosen else f"; hand {better:+d} fits better: consider --defocus-handedness {better:+d} (ctf, prepare)"
    return (f"defocus handedness on the highest tilts: mean fit score {hs[-1]:.4f} for hand -1, {hs[1]:.4f} for hand +1"
            f" (using {chosen:+d}){advice}", better != chosen)


def previous_results(project: Path, job_dir: str, node: str = "ctf_tomograms.star") -> dict[str, Path]:
    """The ``<t>_ctffind.star`` of every tomogram of an earlier CtfFind job (``--update``).

    Parameters
    ----------
    project : Path
        Project directory.
    job_dir : str
        The job directory, absolute or project-relative.
    node : str
        The job's tomogram table.

    Returns
    -------
    dict of str to Path
        Tomogram name -> its result table.
    """
    path = resolve_project_path(project, job_dir) / node
    if not path.exists():
        raise SubtomoError(f"--update {job_dir}: {path} not found. Give a finished CtfFind job directory.")
    table = read_star_table(path)
    table = upgrade_legacy_labels(table)
    return {str(r["rlnTomoName"]): resolve_project_path(project, str(r["subtomoCtfResultsStar"]), source=path, row=i + 1,
                                                        column="subtomoCtfResultsStar")
            for i, (_, r) in enumerate(table.iterrows())}
