"""CTF of a whole tilt series (protocol Steps 8 and 11): batches, trials, lower-tilt defoci.

The per-tilt result table (``<t>_ctffind.star``) has one row per image of the aligned
stack, in stack order: rlnMicrographName, rlnTomoNominalStageTiltAngle,
rlnMicrographPreExposure, rlnDefocusU/V (Å), rlnDefocusAngle (°), rlnCtfFigureOfMerit,
rlnCtfMaxResolution (Å), subtomoCtfFitFailed (0/1), plus subtomoCtfSignificance (t of the
ring amplitude) and subtomoCtfSource (fit, trials, lower_tilts, ctffind, imod, skip).
Users may edit the file by hand (Step 10's manual override); later stages read it as is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd
import torch

from subtomo.ctf.estimate import CtfFit, CtfSearchParams, Optics, astig_vector, estimate_ctf, uv_angle
from subtomo.errors import SubtomoError
from subtomo.io.mrc import open_mrc_mmap, read_mrc_header

RESULT_COLUMNS = [
    "rlnMicrographName", "rlnTomoNominalStageTiltAngle", "rlnMicrographPreExposure",
    "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnCtfFigureOfMerit", "rlnCtfMaxResolution",
    "subtomoCtfFitFailed", "subtomoCtfSignificance", "subtomoCtfSource",
]


def concat_fits(fits: list[CtfFit]) -> CtfFit:
    """One CtfFit from several batches (in order)."""
    cat = lambda name: np.concatenate([getattr(f, name) for f in fits])  # noqa: E731
    diags = None
    if all(f.diagnostics is not None for f in fits):
        diags = [d for f in fits for d in f.diagnostics]
    return CtfFit(cat("defocus_u_A"), cat("defocus_v_A"), cat("defocus_angle_deg"), cat("figure_of_merit"),
                  cat("max_resolution_A"), cat("failed"), cat("significance"),
                  [r for f in fits for r in f.reasons], diags)


def read_sections(path: Path, indices: Iterable[int]) -> np.ndarray:
    """Sections (0-based) of an MRC stack as float32 (N, ny, nx), memory-mapped read."""
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
    """Fit every selected image (0-based ``indices``, default all) of an MRC stack, in batches.

    ``tilts_deg`` are the tilts of the selected images, in the same order.
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
    return CtfFit(u, v, ang, mean(fit.figure_of_merit), mean(fit.max_resolution_A), ~ok.any(1),
                  mean(fit.significance), reasons, None)


def estimate_trials(trial_path: Path, tilts_deg: np.ndarray, optics: Optics, params: CtfSearchParams,
                    tilt_indices: list[int] | None = None, device="cpu", batch: int = 8,
                    progress=None) -> tuple[CtfFit, CtfFit]:
    """Fit the two trial images of each selected tilt and average them.

    Returns (averaged per-tilt fit, raw per-trial fit with diagnostics).
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
    """The ``<t>_ctffind.star`` table for fitted images."""
    return pd.DataFrame({
        "rlnMicrographName": list(names),
        "rlnTomoNominalStageTiltAngle": np.asarray(tilts_deg, float),
        "rlnMicrographPreExposure": np.asarray(dose, float),
        "rlnDefocusU": fit.defocus_u_A, "rlnDefocusV": fit.defocus_v_A, "rlnDefocusAngle": fit.defocus_angle_deg,
        "rlnCtfFigureOfMerit": fit.figure_of_merit, "rlnCtfMaxResolution": fit.max_resolution_A,
        "subtomoCtfFitFailed": fit.failed.astype(int), "subtomoCtfSignificance": fit.significance,
        "subtomoCtfSource": [source] * len(names),
    })[RESULT_COLUMNS]


def skip_ctf_table(names: list[str], tilts_deg, dose) -> pd.DataFrame:
    """Table 1, row 8: no CTF (phase plate, or target resolution below the first zero).

    Defocus 0 everywhere and source ``skip``; with Cs 0 and Q0 1 (set by prepare) the CTF
    is exactly 1, leaving only the wedge, tilt and dose weighting.
    """
    n = len(names)
    z = np.zeros(n)
    fit = CtfFit(z, z, z, z, z, np.zeros(n, bool), z, [""] * n)
    return results_table(names, tilts_deg, dose, fit, "skip")


def apply_lower_tilt_defoci(table: pd.DataFrame, threshold_deg: float, where: str = "") -> tuple[pd.DataFrame, int, list[str]]:
    """Step 11: tilts with |θ| > T get the mean defocus of the tilts with |θ| < T.

    Tilts with |θ| = T keep their own (as in relion_prepare_subtomograms.py). The mean is
    over the successful lower-tilt fits (all lower tilts if none succeeded), averaged as
    (mean defocus, astigmatism vector). Returns (new table, number replaced, notes).
    """
    t = table.copy()
    tilt = t["rlnTomoNominalStageTiltAngle"].to_numpy(float)
    lower = np.abs(tilt) < threshold_deg
    higher = np.abs(tilt) > threshold_deg
    if not lower.any():
        raise SubtomoError(f"--lower-tilt-defoci {threshold_deg:g}: no image{' of ' + where if where else ''} has "
                           f"|tilt| < {threshold_deg:g} deg (tilts {tilt.min():.1f} to {tilt.max():.1f}). Use a larger threshold.")
    notes = []
    good = lower & (t["subtomoCtfFitFailed"].to_numpy(int) == 0)
    use = good if good.any() else lower
    if not good.any():
        notes.append(f"all lower-tilt fits{' of ' + where if where else ''} failed; their mean is used anyway")
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
    stages then treat them like any failed fit. ``rows`` (0-based) limits the check to
    those images (e.g. the re-estimated ones); the others still define the trend.
    Returns (new table, one message per flagged image).
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
