"""Compact per-particle 3D CTF model tables (protocol Steps 9, 11, 12): made here, read by :mod:`.ctf3d`.

For every particle of a tomogram and every tilt image the table holds the
position-dependent defocus (U and V shifted alike, :mod:`subtomo.tomo.defocus`), the dose
B-factor (B per dose × accumulated dose) and the scale factor cos θ: one row per particle
per tilt (``CtfModels/<t>_ctf.star``: a ``data_general`` block with the microscope and a
``data_ctf_models`` loop). A particle refers to its rows by
``subtomoCtfModel = NNNNNN@CtfModels/<t>_ctf.star`` (our label: RELION's ``rlnCtfImage`` names
a CTF volume, which this is not); :class:`subtomo.tomo.ctf3d.ParticleCtfModels` builds the 3D
volumes from them on the fly.

Per-tilt defoci come from the CTF job's ``<t>_ctffind.star``. Failed (or flagged) fits get
the tilt series' defocus trend (:mod:`subtomo.ctf.trend`), never a plain mean; a series
whose CTF is unknown (no successful fit with |tilt| <= 30°) is refused. The tomogram's
pixel size has one rule (:func:`tomogram_pixel_size_A`).

This module computes tables; the prepare job writes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from subtomo.ctf.series import UNKNOWN_CTF_ADVICE
from subtomo.ctf.trend import check_against_trend
from subtomo.errors import SubtomoError
from subtomo.io.mrc import read_mrc_header
from subtomo.io.particles import path_component, resolve_project_path
from subtomo.io.relion import CTF_MODEL, TOMOGRAM_PIXEL_SIZE, tomogram_pixel_size_label, upgrade_legacy_labels
from subtomo.io.star import read_star_table
from subtomo.io.text import match_order_to_tilts, read_coords, read_order, read_tlt
from subtomo.tomo.ctf3d import CTF_GENERAL_BLOCK, CTF_TABLE_BLOCK, ctf3d_from_tilts
from subtomo.tomo.defocus import particle_defocus_A

FAILED_COLUMN = "subtomoCtfFitFailed"
SKIP_COLUMN = "subtomoSkipCtf"
#: CTF-table columns in the argument order of :func:`subtomo.tomo.ctf3d.relion_ctf_cube` (U, V, angle, tilt, B, scale).
RELION_CTF_COLUMNS = ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnTomoNominalStageTiltAngle", "rlnCtfBfactor",
                      "rlnCtfScalefactor")
__all__ = ["CTF_GENERAL_BLOCK", "CTF_TABLE_BLOCK", "RELION_CTF_COLUMNS", "TomoCtf", "ctf_table", "general_block", "optics_groups",
           "particle_rows", "particle_volumes", "read_tomogram_ctfs", "relion_ctf_star", "relion_tomo_ctf",
           "tomogram_pixel_size_A"]


@dataclass
class TomoCtf:
    """Per-tilt CTF inputs of one tomogram and its particles.

    Attributes
    ----------
    name : str
        Tomogram name.
    tomogram : str
        Project-relative path of the tomogram (``rlnMicrographName``).
    size_xyz : tuple of int
        Tomogram size (x, y, z) [px].
    pixel_size_A : float
        Tomogram pixel size [Å].
    voltage_kV, cs_mm, amplitude_contrast : float
        Microscope [kV], [mm], Q0.
    skip_ctf : bool
        Wedge-only model (no CTF).
    tilts_deg, dose : numpy.ndarray
        (T,) tilt angles [deg] and accumulated doses [e/Å²].
    defocus_u_A, defocus_v_A, defocus_angle_deg : numpy.ndarray
        (T,) per-tilt defocus at the tomogram centre [Å] and astigmatism angle [deg].
    coords_px : numpy.ndarray
        (P, 3) particle coordinates (x, y, z) [px].
    notes : list of str
        What was decided for this tomogram (skipped CTF, replaced fits).
    scale, bfactor_A2 : numpy.ndarray or None
        (T,) per-tilt scale factors and B-factors [Å²] given by another program (RELION 4/5);
        None: cos θ and B per dose × dose.
    """

    name: str
    tomogram: str
    size_xyz: tuple[int, int, int]
    pixel_size_A: float
    voltage_kV: float
    cs_mm: float
    amplitude_contrast: float
    skip_ctf: bool
    tilts_deg: np.ndarray
    dose: np.ndarray
    defocus_u_A: np.ndarray
    defocus_v_A: np.ndarray
    defocus_angle_deg: np.ndarray
    coords_px: np.ndarray
    notes: list[str] = field(default_factory=list)
    scale: np.ndarray | None = None
    bfactor_A2: np.ndarray | None = None


def tomogram_pixel_size_A(row: pd.Series | dict, tomogram: Path) -> float:
    """Pixel size of a tomogram: ``subtomoTomogramPixelSize`` (older files: ``rlnTomoTiltSeriesPixelSize``), else its header.

    Parameters
    ----------
    row : pandas.Series or dict
        A row of a tomogram (or particle) table.
    tomogram : Path
        The tomogram file (read only when the row has no valid pixel size).

    Returns
    -------
    float
        Pixel size [Å].
    """
    label = tomogram_pixel_size_label(row.keys())
    px = row.get(label) if label else None
    if px is not None and np.isfinite(float(px)) and float(px) > 0:
        return float(px)
    return float(read_mrc_header(tomogram)[1])


def _tomogram_size_xyz(row: pd.Series, tomogram: Path) -> tuple[int, int, int]:
    """(x, y, z) size [px] from ``rlnTomoSizeX/Y/Z``, else the tomogram's MRC header."""
    if {"rlnTomoSizeX", "rlnTomoSizeY", "rlnTomoSizeZ"} <= set(row.index):
        return int(row["rlnTomoSizeX"]), int(row["rlnTomoSizeY"]), int(row["rlnTomoSizeZ"])
    (nz, ny, nx), _ = read_mrc_header(tomogram)
    return nx, ny, nz


def _tilt_inputs(project: Path, row: pd.Series, tomo: Path, star: Path, skip: bool) -> tuple[pd.DataFrame, str]:
    """Per-image table (tilt, dose[, defocus]) of one tomogram and where it came from."""
    if "subtomoCtfResultsStar" in row and isinstance(row["subtomoCtfResultsStar"], str):
        path = resolve_project_path(project, row["subtomoCtfResultsStar"], source=star, column="subtomoCtfResultsStar")
        return read_star_table(path), str(path)
    if not skip:
        raise SubtomoError(f"{star}: has no subtomoCtfResultsStar column, so there are no CTF estimates for "
                           f"{row.get('rlnTomoName', tomo)}. Fix: run subtomo ctf and give its ctf_tomograms.star, or "
                           "add --skip-ctf for data without CTF correction.")
    if "rlnTomoTiltSeriesStarFile" in row and isinstance(row["rlnTomoTiltSeriesStarFile"], str):
        path = resolve_project_path(project, row["rlnTomoTiltSeriesStarFile"], source=star,
                                    column="rlnTomoTiltSeriesStarFile")
        return read_star_table(path), str(path)
    tlt, order = tomo.with_suffix(".tlt"), tomo.with_suffix(".order")
    tilts = read_tlt(tlt)
    dose, _ = match_order_to_tilts(tilts, read_order(order))
    return pd.DataFrame({"rlnTomoNominalStageTiltAngle": tilts, "rlnMicrographPreExposure": dose}), f"{tlt} and {order}"


def lower_tilt_defoci(tilts: np.ndarray, du: np.ndarray, dv: np.ndarray, ang: np.ndarray,
                      limit: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Step 11 (PY16 rule): tilts with |θ| > L get the mean defocus of tilts with |θ| < L.

    Parameters
    ----------
    tilts : numpy.ndarray
        (T,) tilt angles [deg].
    du, dv, ang : numpy.ndarray
        (T,) defocus U, V [Å] and astigmatism angle [deg].
    limit : float
        L [deg].

    Returns
    -------
    tuple of numpy.ndarray
        New (du, dv, ang), each (T,); higher tilts take the angle of the lowest tilt.
    """
    low = np.abs(tilts) < limit
    if not low.any():
        raise SubtomoError(f"--use-lower-tilt-defoci: no tilt below --lower-tilt-limit {limit} deg. Raise the limit.")
    high = np.abs(tilts) > limit
    du, dv, ang = du.copy(), dv.copy(), ang.copy()
    du[high], dv[high] = du[low].mean(), dv[low].mean()
    ang[high] = ang[low][np.argmin(np.abs(tilts[low]))]
    return du, dv, ang


def _skip_reason(name: str, row: pd.Series, star: Path, tilt_table: pd.DataFrame, source: str) -> str | None:
    """Why this tomogram gets a wedge-only model though --skip-ctf was not given (None: it does not)."""
    if SKIP_COLUMN in row and int(row[SKIP_COLUMN]):
        return f"{name}: {star.name} marks this tomogram {SKIP_COLUMN} = 1: wedge-only model (no CTF)."
    if "rlnDefocusU" not in tilt_table.columns:
        raise SubtomoError(f"{source}: no rlnDefocusU column. Fix: run subtomo ctf, or add --skip-ctf.")
    du = tilt_table["rlnDefocusU"].to_numpy(float)
    dv = tilt_table["rlnDefocusV"].to_numpy(float) if "rlnDefocusV" in tilt_table else du
    if np.all(du == 0) and np.all(dv == 0):
        return f"{name}: every defocus in {source} is 0 (CTF estimation skipped): wedge-only model (no CTF)."
    if SKIP_COLUMN in tilt_table and (tilt_table[SKIP_COLUMN].astype(int) > 0).all():
        return f"{name}: {source} marks CTF estimation as skipped: wedge-only model (no CTF)."
    return None


def _image_defoci(name: str, tilt_table: pd.DataFrame, source: str, notes: list[str]) -> tuple[np.ndarray, ...]:
    """(U, V, angle) per tilt [Å, Å, deg]; failed fits get the series' defocus trend.

    Raises when the CTF is unknown (no successful fit with |tilt| <= 30 deg).
    """
    table = tilt_table.copy()
    if "rlnDefocusV" not in table:
        table["rlnDefocusV"] = table["rlnDefocusU"]
    if "rlnDefocusAngle" not in table:
        table["rlnDefocusAngle"] = 0.0
    if FAILED_COLUMN in table.columns and (table[FAILED_COLUMN].astype(int) > 0).any():
        check = check_against_trend(table, tolerance_sigma=0.0)
        if check.unknown:
            raise SubtomoError(f"{source}: {name}: {UNKNOWN_CTF_ADVICE}.")
        failed = table[FAILED_COLUMN].astype(int).to_numpy() > 0
        tilts = table["rlnTomoNominalStageTiltAngle"].to_numpy(float)
        notes.append(f"{name}: CTF fit failed or flagged for {failed.sum()} image(s) (tilts "
                     f"{', '.join(f'{t:.1f}' for t in tilts[failed])}); they get the tilt series' defocus trend. "
                     "Consider Step 11 options or re-running subtomo ctf.")
        table = check.table
    return tuple(table[c].to_numpy(float) for c in ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"))


def _read_one(project: Path, star: Path, row: pd.Series, skip_ctf: bool, lower_tilt_limit: float | None) -> TomoCtf:
    """The CTF inputs of one row of a tomogram table (problems raise SubtomoError)."""
    tomo = resolve_project_path(project, str(row["rlnMicrographName"]), source=star, column="rlnMicrographName")
    name = path_component(row["rlnTomoName"] if "rlnTomoName" in row else tomo.stem, "rlnTomoName", star)
    size, px = _tomogram_size_xyz(row, tomo), tomogram_pixel_size_A(row, tomo)
    coords_file = tomo.with_suffix(".coords")
    coords = read_coords(coords_file) if coords_file.exists() else np.zeros((0, 3))
    tilt_table, source = _tilt_inputs(project, row, tomo, star, skip_ctf)
    missing = [c for c in ("rlnTomoNominalStageTiltAngle", "rlnMicrographPreExposure") if c not in tilt_table.columns]
    if missing:
        raise SubtomoError(f"{source}: cannot be used", [f"{source}: no {c} column. Fix: re-run subtomo import / subtomo ctf."
                                                         for c in missing])
    tilts = tilt_table["rlnTomoNominalStageTiltAngle"].to_numpy(float)
    notes = [] if coords_file.exists() else [f"{name}: no {coords_file.name}: no particles from its picks (prepare "
                                             "--particles can give them)"]
    skip = bool(skip_ctf)
    if not skip and (reason := _skip_reason(name, row, star, tilt_table, source)):
        skip = True
        notes.append(reason)
    if skip:
        du = dv = ang = np.zeros_like(tilts)
    else:
        du, dv, ang = _image_defoci(name, tilt_table, source, notes)
        if lower_tilt_limit is not None:
            du, dv, ang = lower_tilt_defoci(tilts, du, dv, ang, lower_tilt_limit)
    return TomoCtf(name, str(row["rlnMicrographName"]), size, px, float(row.get("rlnVoltage", 300.0)),
                   float(row.get("rlnSphericalAberration", 2.7)), float(row.get("rlnAmplitudeContrast", 0.07)), skip,
                   tilts, tilt_table["rlnMicrographPreExposure"].to_numpy(float), du, dv, ang, coords, notes)


def read_tomogram_ctfs(star: Path, project: Path, skip_ctf: bool = False,
                       lower_tilt_limit: float | None = None) -> list[TomoCtf]:
    """The per-tilt CTF inputs of every tomogram of a tomogram table.

    Parameters
    ----------
    star : Path
        ``ctf_tomograms.star`` of the CTF job, or ``all_tomograms.star`` (with ``skip_ctf``).
    project : Path
        Project directory (relative paths resolve against it).
    skip_ctf : bool
        Wedge-only models for every tomogram.
    lower_tilt_limit : float, optional
        Step 11: tilts above this |θ| [deg] get the mean defocus of those below.

    Returns
    -------
    list of TomoCtf
        One per row, in table order.

    Raises
    ------
    SubtomoError
        Listing every tomogram's problem (missing files and columns, unknown CTF).
    """
    table = upgrade_legacy_labels(read_star_table(star))
    if "rlnMicrographName" not in table.columns:
        raise SubtomoError(f"{star}: no rlnMicrographName column (the tomogram of each row). Give the all_tomograms.star of "
                           f"subtomo import or the ctf_tomograms.star of subtomo ctf.")
    out: list[TomoCtf] = []
    problems: list[str] = []
    for _, row in table.iterrows():
        try:
            out.append(_read_one(project, star, row, skip_ctf, lower_tilt_limit))
        except SubtomoError as exc:
            problems.extend(exc.problems or [str(exc)])
    if problems:
        raise SubtomoError(f"{star}: cannot prepare the CTF models; nothing was written", problems)
    if not out:
        raise SubtomoError(f"{star}: lists no tomograms.")
    return out


def relion_tomo_ctf(tomo: pd.Series, tilts: pd.DataFrame, coords_px: np.ndarray, tomogram: str = "") -> TomoCtf:
    """The CTF inputs of one tomogram of a RELION 4/5 project (its row of ``tomograms.star`` and tilt table).

    RELION's sizes are of the unbinned tilt series: the reconstructed tomogram is
    ``rlnTomoSize / rlnTomoTomogramBinning`` voxels of ``rlnTomoTiltSeriesPixelSize ×
    binning`` Å, centred at size/2 like ours.

    Parameters
    ----------
    tomo : pandas.Series
        Its row of RELION's ``tomograms.star`` (rlnTomoName, rlnVoltage, rlnSphericalAberration,
        rlnAmplitudeContrast, rlnTomoTiltSeriesPixelSize, rlnTomoTomogramBinning, rlnTomoSizeX/Y/Z).
    tilts : pandas.DataFrame
        Its per-tilt table in our labels (:func:`subtomo.io.relion.relion_tilt_table`).
    coords_px : numpy.ndarray
        (P, 3) particle positions in the reconstructed tomogram [px].
    tomogram : str
        Project-relative path of the tomogram, when known.

    Returns
    -------
    TomoCtf
        With RELION's per-tilt scale factors (and B-factors, when given).
    """
    binning = float(tomo.get("rlnTomoTomogramBinning", 1.0))
    sx, sy, sz = (int(round(float(tomo[f"rlnTomoSize{a}"]) / binning)) for a in "XYZ")
    return TomoCtf(
        str(tomo["rlnTomoName"]), tomogram, (sx, sy, sz), float(tomo["rlnTomoTiltSeriesPixelSize"]) * binning,
        float(tomo.get("rlnVoltage", 300.0)), float(tomo.get("rlnSphericalAberration", 2.7)),
        float(tomo.get("rlnAmplitudeContrast", 0.07)), False, tilts["rlnTomoNominalStageTiltAngle"].to_numpy(float),
        tilts["rlnMicrographPreExposure"].to_numpy(float), tilts["rlnDefocusU"].to_numpy(float),
        tilts["rlnDefocusV"].to_numpy(float), tilts["rlnDefocusAngle"].to_numpy(float), np.asarray(coords_px, float),
        scale=tilts["rlnCtfScalefactor"].to_numpy(float),
        bfactor_A2=tilts["rlnCtfBfactor"].to_numpy(float) if "rlnCtfBfactor" in tilts else None)


def ctf_table(t: TomoCtf, bfactor_per_dose: float, model: str, handedness: int = -1) -> pd.DataFrame:
    """The compact CTF table of one tomogram.

    Parameters
    ----------
    t : TomoCtf
        The tomogram's per-tilt inputs (P particles, T tilts).
    bfactor_per_dose : float
        Dose B-factor [Å² per e/Å²].
    model : str
        Position-dependent defocus model (``exact`` or ``relion``, :mod:`subtomo.tomo.defocus`).
    handedness : int
        Defocus handedness (docs/conventions.md): −1 (default) gives ``D_θ − h`` (``exact``) or
        ``D_θ + x_img sin θ`` (``relion``), RELION 5's hand −1 and RELION 3's formula; +1 flips
        the sign of the position-dependent offset (data of the other hand).

    Returns
    -------
    pandas.DataFrame
        P × T rows (particle-major): rlnTomoParticleId (1-based), tilt [deg], defocus U/V [Å],
        angle [deg], rlnCtfBfactor [Å²], rlnCtfScalefactor (cos θ), rlnMicrographPreExposure
        (B-factors and scales of ``t`` where it has them).
    """
    n_p, n_t = len(t.coords_px), len(t.tilts_deg)
    if t.skip_ctf:
        du = dv = np.zeros((n_p, n_t))
    else:
        if handedness not in (-1, 1):
            raise SubtomoError(f"--defocus-handedness {handedness}: must be -1 or +1 (docs/conventions.md).")
        offset = -handedness * particle_defocus_A(np.zeros_like(t.tilts_deg), t.tilts_deg, t.coords_px, t.size_xyz,
                                                  t.pixel_size_A, model)  # (P, T); hand -1: the model's own sign
        du, dv = t.defocus_u_A[None, :] + offset, t.defocus_v_A[None, :] + offset
    rep = lambda a: np.tile(np.asarray(a, dtype=np.float64), n_p)  # noqa: E731  per-tilt value for every particle
    return pd.DataFrame({
        "rlnTomoParticleId": np.repeat(np.arange(1, n_p + 1), n_t),
        "rlnTomoNominalStageTiltAngle": rep(t.tilts_deg),
        "rlnDefocusU": du.reshape(-1),
        "rlnDefocusV": dv.reshape(-1),
        "rlnDefocusAngle": rep(t.defocus_angle_deg),
        "rlnCtfBfactor": rep(bfactor_per_dose * t.dose if t.bfactor_A2 is None else t.bfactor_A2),
        "rlnCtfScalefactor": rep(np.cos(np.deg2rad(t.tilts_deg)) if t.scale is None else t.scale),
        "rlnMicrographPreExposure": rep(t.dose),
    })


def general_block(t: TomoCtf, model: str, handedness: int = -1) -> dict:
    """The ``data_general`` block of a CTF table: microscope, pixel size [Å], size [px], skip flag, model.

    Parameters
    ----------
    t : TomoCtf
        The tomogram.
    model : str
        Position-dependent defocus model (``exact`` or ``relion``, :mod:`subtomo.tomo.defocus`).
    handedness : int
        Defocus handedness (−1 or +1, :func:`ctf_table`).

    Returns
    -------
    dict
        {label: value}: rlnTomoName, rlnVoltage [kV], rlnSphericalAberration [mm], rlnAmplitudeContrast,
        subtomoTomogramPixelSize [Å], rlnTomoSizeX/Y/Z [px], subtomoSkipCtf (0/1), subtomoDefocusModel,
        subtomoDefocusHandedness.
    """
    return {
        "rlnTomoName": t.name, "rlnVoltage": t.voltage_kV, "rlnSphericalAberration": t.cs_mm,
        "rlnAmplitudeContrast": t.amplitude_contrast, TOMOGRAM_PIXEL_SIZE: t.pixel_size_A,
        "rlnTomoSizeX": t.size_xyz[0], "rlnTomoSizeY": t.size_xyz[1], "rlnTomoSizeZ": t.size_xyz[2],
        SKIP_COLUMN: int(t.skip_ctf), "subtomoDefocusModel": model, "subtomoDefocusHandedness": int(handedness),
    }


def particle_volumes(t: TomoCtf, table: pd.DataFrame, ids: np.ndarray, box: int, device=None,
                     weighted: bool = True) -> torch.Tensor:
    """3D CTFs of particles ``ids`` of one tomogram, internal half layout.

    Parameters
    ----------
    t : TomoCtf
        The tomogram.
    table : pandas.DataFrame
        Its CTF table (:func:`ctf_table`).
    ids : numpy.ndarray
        (B,) 1-based particle ids.
    box : int
        Box size [px], even.
    device : torch.device or str, optional
        Where to compute.
    weighted : bool
        With dose B-factors and tilt scale (False: B 0, scale 1).

    Returns
    -------
    torch.Tensor
        (B, box, box, box//2+1) float32.
    """
    n_t = len(t.tilts_deg)
    sel = table.set_index("rlnTomoParticleId").loc[ids]
    get = lambda c: sel[c].to_numpy(float).reshape(len(ids), n_t)  # noqa: E731
    b = get("rlnCtfBfactor") if weighted else np.zeros((len(ids), n_t))
    s = get("rlnCtfScalefactor") if weighted else np.ones((len(ids), n_t))
    return ctf3d_from_tilts(get("rlnDefocusU"), get("rlnTomoNominalStageTiltAngle"), b, s, box, t.pixel_size_A,
                            t.voltage_kV, t.cs_mm, t.amplitude_contrast, skip_ctf=t.skip_ctf, device=device,
                            defocus_v_A=get("rlnDefocusV"), astig_angle_deg=get("rlnDefocusAngle"))


def relion_ctf_star(t: TomoCtf, rows: pd.DataFrame) -> pd.DataFrame:
    """RELION per-particle CTF STAR (one line per tilt), usable with relion_reconstruct --reconstruct_ctf.

    Our tilt-θ image fills the plane with normal n = (−sin θ, 0, cos θ) and in-plane x axis
    (cos θ, 0, sin θ). RELION inserts an image with Euler angles (rot, tilt, psi) at Aᵀ(x, y, 0);
    for (0, t, 0) that plane has normal (sin t, 0, cos t) and x axis (cos t, 0, −sin t)
    (relion-internals §2.2), so our tilt θ is RELION's (0, −θ, 0): relion_reconstruct rebuilds our
    volume from this table (tests/test_relion.py). relion_prepare_subtomo writes +θ for the same
    .tlt, which gives the mirror image (kx → −kx) of our geometry (docs/conventions.md).

    Parameters
    ----------
    t : TomoCtf
        The tomogram (microscope; Cs 0 and Q0 1 for a wedge-only model).
    rows : pandas.DataFrame
        The particle's T rows of the CTF table.

    Returns
    -------
    pandas.DataFrame
        T rows with RELION's CTF and angle labels.
    """
    skip = t.skip_ctf
    return pd.DataFrame({
        "rlnDefocusU": rows["rlnDefocusU"].to_numpy(float),
        "rlnDefocusV": rows["rlnDefocusV"].to_numpy(float),
        "rlnDefocusAngle": rows["rlnDefocusAngle"].to_numpy(float),
        "rlnVoltage": t.voltage_kV,
        "rlnSphericalAberration": 0.0 if skip else t.cs_mm,
        "rlnAmplitudeContrast": 1.0 if skip else t.amplitude_contrast,
        "rlnAngleRot": 0.0,
        "rlnAngleTilt": -rows["rlnTomoNominalStageTiltAngle"].to_numpy(float),
        "rlnAnglePsi": 0.0,
        "rlnCtfBfactor": rows["rlnCtfBfactor"].to_numpy(float),
        "rlnCtfScalefactor": rows["rlnCtfScalefactor"].to_numpy(float),
    })


def optics_groups(tomos: list[TomoCtf]) -> tuple[pd.DataFrame, dict[str, int]]:
    """One optics group per distinct (voltage, Cs, Q0, pixel size) of the tomograms.

    Parameters
    ----------
    tomos : list of TomoCtf
        The tomograms.

    Returns
    -------
    optics : pandas.DataFrame
        The ``data_optics`` table (rlnImagePixelSize [Å], rlnImageDimensionality 3).
    group_of : dict of str to int
        Tomogram name -> its optics group (1-based).
    """
    keys: dict[tuple, int] = {}
    group_of: dict[str, int] = {}
    for t in tomos:
        k = (t.voltage_kV, t.cs_mm, t.amplitude_contrast, round(t.pixel_size_A, 6))
        group_of[t.name] = keys.setdefault(k, len(keys) + 1)
    optics = pd.DataFrame([{
        "rlnOpticsGroup": g, "rlnOpticsGroupName": f"opticsGroup{g}", "rlnVoltage": k[0], "rlnSphericalAberration": k[1],
        "rlnAmplitudeContrast": k[2], "rlnImagePixelSize": k[3], "rlnImageDimensionality": 3,
    } for k, g in keys.items()])
    return optics, group_of


def particle_rows(t: TomoCtf, ctf_table_path: str, optics_group: int) -> list[dict]:
    """Particle rows (``particles_subtomo.star``) of one tomogram's picks.

    Parameters
    ----------
    t : TomoCtf
        The tomogram (P picks).
    ctf_table_path : str
        Project-relative path of its CTF table (for ``subtomoCtfModel``).
    optics_group : int
        Its optics group.

    Returns
    -------
    list of dict
        P rows: coordinates [px], particle id, subtomoCtfModel, pixel size [Å]. No ``rlnImageName``: the
        particles are not extracted yet (``subtomo extract`` names the subtomograms).
    """
    return [{
        "rlnMicrographName": t.tomogram, "rlnTomoName": t.name,
        "rlnCoordinateX": x, "rlnCoordinateY": y, "rlnCoordinateZ": z, "rlnTomoParticleId": i,
        CTF_MODEL: f"{i:06d}@{ctf_table_path}", TOMOGRAM_PIXEL_SIZE: t.pixel_size_A,
        "rlnOpticsGroup": optics_group,
    } for i, (x, y, z) in enumerate(t.coords_px, start=1)]
