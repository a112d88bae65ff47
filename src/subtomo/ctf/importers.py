"""Import per-tilt CTF results made by other programs (Step 10: "pre-estimated defocus").

* CTFFIND4 text output (``<name>.txt`` beside the diagnostic image): comment lines
  starting with ``#``, then one row per micrograph: micrograph number; defocus 1 (Å);
  defocus 2 (Å); azimuth of astigmatism (°); additional phase shift (rad); cross
  correlation; spacing (Å) up to which CTF rings were fit. Defocus 1/2/azimuth map
  directly onto RELION's DefocusU/V/Angle (RELION reads CTFFIND output the same way).
* IMOD ctfplotter ``.defocus`` files (ctfphaseflip's input). Defocus in **nm**, positive
  underfocus. Lines are ``startView endView tilt1 tilt2 defocus1 [defocus2 astigAngle]
  [phaseShift] [cutOn]`` with 1-based views; a line applies to every view of its range
  (several overlapping lines are averaged). Versions: no header (5 numbers per line);
  version 2 (the first line carries a 6th number, 2); version 3 (a first line
  ``flags 0 0. 0. 0 3``; flags = sum of 1 astigmatism, 2 astigmatism angle in radians,
  4 phase shift, 8 phase shift in radians, 16 inverted tilt angles, 32 cut-on frequency).
  **Astigmatism angle:** IMOD gives the axis of the *smaller* defocus, CTFFIND/RELION the
  axis of DefocusU (the larger), so RELION angle = IMOD angle − 90° (Dynamo wiki, "Angle of
  astigmatism convention"; IMOD angle = CTFFIND angle + 90°).
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from subtomo.ctf.estimate import CtfFit
from subtomo.errors import SubtomoError
from subtomo.io.particles import resolve_project_path

CTFFIND_COLUMNS = ["micrograph", "defocus_u_A", "defocus_v_A", "angle_deg", "phase_shift_rad", "cc", "fit_res_A"]


def read_ctffind4(path: str | Path) -> pd.DataFrame:
    """Rows of a CTFFIND4 output text file.

    Parameters
    ----------
    path : str or Path
        The ``.txt`` file CTFFIND4 writes beside its diagnostic image.

    Returns
    -------
    pandas.DataFrame
        One row per micrograph, ordered by micrograph number, columns :data:`CTFFIND_COLUMNS`
        (defocus in Å, azimuth in deg, phase shift in rad, fit resolution in Å).
    """
    path = Path(path)
    if not path.exists():
        raise SubtomoError(f"{path}: CTFFIND output not found.")
    rows = []
    for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        try:
            vals = [float(v) for v in parts]
        except ValueError:
            raise SubtomoError(f"{path}, line {lineno}: not a CTFFIND4 result row ({line[:60]!r}). Give the .txt "
                               f"file CTFFIND4 writes beside its diagnostic image.") from None
        if len(vals) < 7:
            raise SubtomoError(f"{path}, line {lineno}: {len(vals)} columns, CTFFIND4 rows have 7 (number, defocus 1, "
                               f"defocus 2, azimuth, phase shift, cross correlation, fit resolution).")
        rows.append(vals[:7])
    if not rows:
        raise SubtomoError(f"{path}: no result rows (only comments or empty).")
    df = pd.DataFrame(rows, columns=CTFFIND_COLUMNS)
    df["micrograph"] = df["micrograph"].round().astype(int)
    return df.sort_values("micrograph", kind="stable").reset_index(drop=True)


def ctffind_to_table(df: pd.DataFrame, n_images: int, path: Path | str) -> dict[str, np.ndarray]:
    """Per-image arrays (stack order) from CTFFIND rows; the row count must match the stack.

    Parameters
    ----------
    df : pandas.DataFrame
        Rows of :func:`read_ctffind4`.
    n_images : int
        Images in the tilt series.
    path : Path or str
        The file (for messages).

    Returns
    -------
    dict of str to numpy.ndarray
        (n_images,) arrays: defocus_u_A, defocus_v_A [Å], angle_deg, fom, max_res_A [Å],
        phase_shift_rad.
    """
    if len(df) != n_images:
        raise SubtomoError(f"{path}: {len(df)} CTFFIND rows but the tilt series has {n_images} images. Give the result "
                           f"of running CTFFIND on this exact aligned stack (one row per image).")
    return {
        "defocus_u_A": df["defocus_u_A"].to_numpy(float), "defocus_v_A": df["defocus_v_A"].to_numpy(float),
        "angle_deg": df["angle_deg"].to_numpy(float), "fom": df["cc"].to_numpy(float),
        "max_res_A": df["fit_res_A"].to_numpy(float), "phase_shift_rad": df["phase_shift_rad"].to_numpy(float),
    }


def _imod_rows(path: Path) -> tuple[int, list[list[float]]]:
    """(flags, data rows) of a .defocus file, handling the three header versions."""
    lines = []
    for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            lines.append((lineno, [float(v) for v in line.split()]))
        except ValueError:
            raise SubtomoError(f"{path}, line {lineno}: not numbers ({line.strip()[:60]!r}); not an IMOD .defocus file.") from None
    if not lines:
        raise SubtomoError(f"{path}: empty .defocus file.")
    first = lines[0][1]
    flags = 0
    if len(first) == 6 and first[5] == 3:
        flags = int(first[0])
        rows = [v for _, v in lines[1:]]
    elif len(first) == 6 and first[5] == 2:
        rows = [first[:5]] + [v for _, v in lines[1:]]
    else:
        rows = [v for _, v in lines]
    need = 5 + (2 if flags & 1 else 0) + (1 if flags & 4 else 0) + (1 if flags & 32 else 0)
    for (lineno, _), r in zip(lines[len(lines) - len(rows):], rows):
        if len(r) < need:
            raise SubtomoError(f"{path}, line {lineno}: {len(r)} numbers, expected {need} for flags {flags} "
                               f"(start view, end view, tilt 1, tilt 2, defocus{' 1, defocus 2, astigmatism angle' if flags & 1 else ''}).")
    if not rows:
        raise SubtomoError(f"{path}: header only, no defocus lines.")
    return flags, rows


def read_imod_defocus(path: str | Path, n_images: int) -> dict[str, Any]:
    """Per-image defocus from an IMOD ctfplotter ``.defocus`` file (module docstring: versions, angle).

    Views not covered by any line take the value of the nearest covered view.

    Parameters
    ----------
    path : str or Path
        The ``.defocus`` file.
    n_images : int
        Images in the tilt series (views are numbered from 1).

    Returns
    -------
    dict
        ``defocus_u_A``, ``defocus_v_A`` (n_images,) [Å] (RELION U >= V), ``angle_deg``
        (n_images,) [deg] (RELION convention), ``covered`` (n_images,) bool, ``flags`` int.
    """
    path = Path(path)
    if not path.exists():
        raise SubtomoError(f"{path}: IMOD .defocus file not found.")
    flags, rows = _imod_rows(path)
    sums = np.zeros((n_images, 3))
    counts = np.zeros(n_images)
    for r in rows:
        start, end = int(round(r[0])), int(round(r[1]))
        if start > end:
            start, end = end, start
        if start < 1 or end > n_images:
            raise SubtomoError(f"{path}: a line covers views {start}-{end} but the tilt series has {n_images} images "
                               f"(views are numbered from 1). Use the .defocus file made for this stack.")
        d1 = r[4] * 10.0
        if flags & 1:
            d2 = r[5] * 10.0
            ang = float(np.degrees(r[6])) if flags & 2 else r[6]
        else:
            d2, ang = d1, 0.0
        # IMOD's angle is the axis of the smaller defocus: the larger (U) lies 90 deg away
        mean, half = (d1 + d2) / 2, abs(d1 - d2) / 2
        phi_u = np.radians(ang - 90.0)
        sums[start - 1:end] += [mean, half * np.cos(2 * phi_u), half * np.sin(2 * phi_u)]
        counts[start - 1:end] += 1
    covered = counts > 0
    if not covered.any():
        raise SubtomoError(f"{path}: no view of the tilt series is covered.")
    vals = np.where(covered[:, None], sums / np.maximum(counts, 1)[:, None], np.nan)
    idx = np.flatnonzero(covered)
    for i in np.flatnonzero(~covered):
        vals[i] = vals[idx[np.argmin(np.abs(idx - i))]]
    amp = np.hypot(vals[:, 1], vals[:, 2])
    angle = 0.5 * np.degrees(np.arctan2(vals[:, 2], vals[:, 1]))
    return {"defocus_u_A": vals[:, 0] + amp, "defocus_v_A": vals[:, 0] - amp, "angle_deg": angle,
            "covered": covered, "flags": flags}


def find_result_file(spec: str, tomo_name: str, project: Path, suffixes: tuple[str, ...]) -> Path:
    """The result file of one tomogram from ``--import-ctffind``/``--import-imod``'s value.

    Parameters
    ----------
    spec : str
        A directory (searched for ``<t><suffix>``, ``<t>*<suffix>`` and ``<t>/<...>``), a
        pattern with ``{name}`` (the tomogram name), a glob pattern (the one match whose file
        name contains the tomogram name), or one file; relative to the project.
    tomo_name : str
        The tomogram.
    project : Path
        Project directory.
    suffixes : tuple of str
        File suffixes to look for in a directory.

    Returns
    -------
    Path
        The file.
    """
    base = resolve_project_path(project, spec)
    if "{name}" in spec:
        p = Path(str(base).replace("{name}", tomo_name))
        if not p.exists():
            raise SubtomoError(f"{p}: not found (from pattern {spec!r} for tomogram {tomo_name}).")
        return p
    if base.is_dir():
        cands: list[Path] = []
        for suf in suffixes:
            for pat in (f"{tomo_name}{suf}", f"{tomo_name}_*{suf}", f"{tomo_name}/*{suf}", f"{tomo_name}*{suf}"):
                cands.extend(sorted(base.glob(pat)))
        cands = list(dict.fromkeys(cands))
        if not cands:
            raise SubtomoError(f"{base}: no {' or '.join(suffixes)} file for tomogram {tomo_name} (looked for "
                               f"{tomo_name}{suffixes[0]}, {tomo_name}_*{suffixes[0]}, {tomo_name}/*{suffixes[0]}). "
                               f"Name the files after the tomograms, or give a pattern with {{name}}.")
        return cands[0]
    if any(ch in spec for ch in "*?["):
        matches = [Path(m) for m in sorted(glob.glob(str(base)))]
        mine = [m for m in matches if tomo_name in m.name or tomo_name in m.parent.name]
        if len(mine) == 1:
            return mine[0]
        raise SubtomoError(f"pattern {spec!r}: {len(mine)} files match tomogram {tomo_name} "
                           f"({', '.join(m.name for m in mine[:5]) or 'none'}). Use {{name}} in the pattern.")
    if base.is_file():
        return base
    raise SubtomoError(f"{spec}: no such file or directory.")


def imported_fit(path: Path, kind: str, n_images: int) -> tuple[CtfFit, str, list[str]]:
    """Per-image CTF of a tilt series from another program's result file.

    Parameters
    ----------
    path : Path
        A CTFFIND4 ``.txt`` (``kind`` ``ctffind``) or IMOD ``.defocus`` file (``imod``).
    kind : str
        ``ctffind`` or ``imod``.
    n_images : int
        Images in the tilt series (stack order).

    Returns
    -------
    fit : CtfFit
        n_images imported values (none flagged as failed; figure of merit and fit
        resolution 0 for IMOD).
    source : str
        ``subtomoCtfSource`` of the rows (= ``kind``).
    warnings : list of str
        Phase shifts ignored, views not covered.
    """
    warnings = []
    if kind == "ctffind":
        vals = ctffind_to_table(read_ctffind4(path), n_images, path)
        if np.any(np.abs(vals["phase_shift_rad"]) > 1e-3):
            warnings.append(f"{path}: non-zero phase shifts are ignored (phase-plate data: consider --skip-ctf).")
        fom, res = vals["fom"], vals["max_res_A"]
    else:
        vals = read_imod_defocus(path, n_images)
        if not vals["covered"].all():
            miss = np.flatnonzero(~vals["covered"]) + 1
            warnings.append(f"{path}: views {', '.join(map(str, miss))} are not covered; they take the nearest covered "
                            "view's defocus.")
        fom, res = np.zeros(n_images), np.zeros(n_images)
    fit = CtfFit(vals["defocus_u_A"], vals["defocus_v_A"], vals["angle_deg"], fom, res, np.zeros(n_images, bool),
                 np.zeros(n_images), [""] * n_images)
    return fit, kind, warnings
