"""RELION's file layouts and labels: what carries the ``rln`` prefix, and older subtomo names.

Only real RELION labels, with RELION's meaning and units, carry the ``rln`` prefix
(``relion-labels.tsv`` of RELION 3.1.4 / 4.0.2 / 5.0.1). Labels of our own start with
``subtomo``. Files written by older subtomo versions used three invented ``rln`` labels and
RELION 4/5's ``rlnTomoTiltSeriesPixelSize`` for the tomogram's pixel size;
:func:`upgrade_legacy_labels` renames them on reading, so those files still work.

A particle's 3D CTF is either a RELION CTF volume (``rlnCtfImage = <file>.mrc``, RELION's
label and meaning) or one of our compact per-tilt models (``subtomoCtfModel =
NNNNNN@CtfModels/<t>_ctf.star``: the rows with ``rlnTomoParticleId`` NNNNNN), which RELION
cannot open. Older files put the compact form in ``rlnCtfImage``;
:func:`upgrade_ctf_column` moves it on reading.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from subtomo.errors import SubtomoError

#: Older subtomo label -> current label (read side only; nothing writes the old names).
LEGACY_LABELS: dict[str, str] = {
    "rlnCtfFindResultsStar": "subtomoCtfResultsStar",
    "rlnTomoHasTrials": "subtomoHasTrials",
    "rlnNumberOfParticles": "subtomoNumberOfParticles",
}
#: The tomogram's pixel size [Å] (RELION 4/5's rlnTomoTiltSeriesPixelSize is the unbinned tilt series').
TOMOGRAM_PIXEL_SIZE = "subtomoTomogramPixelSize"
TILT_SERIES_PIXEL_SIZE = "rlnTomoTiltSeriesPixelSize"
#: A RELION 3D CTF volume (centred N³ .mrc), as RELION means rlnCtfImage.
CTF_VOLUME = "rlnCtfImage"
#: Our compact per-tilt CTF model: ``NNNNNN@<path>_ctf.star`` (rows with rlnTomoParticleId NNNNNN).
CTF_MODEL = "subtomoCtfModel"


def is_compact_ctf_ref(value: object) -> bool:
    """Whether a CTF reference is our compact ``NNNNNN@<file>.star`` form (not a RELION volume).

    Parameters
    ----------
    value : object
        A value of ``rlnCtfImage`` or ``subtomoCtfModel``.

    Returns
    -------
    bool
        True for ``digits@path.star``.
    """
    head, sep, tail = str(value).strip().partition("@")
    return bool(sep) and head.isdigit() and tail.endswith(".star")


def upgrade_ctf_column(table: pd.DataFrame) -> pd.DataFrame:
    """Move compact CTF references written by older versions from ``rlnCtfImage`` to ``subtomoCtfModel``.

    Only a column whose every value is compact is moved (what older versions wrote); a
    mixed column stays, and :meth:`subtomo.io.particles.ParticleSet.ctf_refs` still reads
    its compact rows.

    Parameters
    ----------
    table : pandas.DataFrame
        Particle rows.

    Returns
    -------
    pandas.DataFrame
        The table with the column renamed, or the input itself when there is nothing to move.
    """
    if CTF_VOLUME not in table.columns or CTF_MODEL in table.columns or table.empty:
        return table
    if not all(is_compact_ctf_ref(v) for v in table[CTF_VOLUME]):
        return table
    return table.rename(columns={CTF_VOLUME: CTF_MODEL})


def upgrade_legacy_labels(table: Any) -> Any:
    """Rename the labels of older subtomo files to the current ones (where the new one is absent).

    Parameters
    ----------
    table : pandas.DataFrame or pandas.Series or dict
        A STAR loop, one of its rows, or a ``data_general``-style block.

    Returns
    -------
    Same type as ``table``
        A copy with :data:`LEGACY_LABELS` renamed (the input itself when nothing changes).
    """
    keys = table.columns if isinstance(table, pd.DataFrame) else table.keys()
    rename = {old: new for old, new in LEGACY_LABELS.items() if old in keys and new not in keys}
    if not rename:
        return table
    if isinstance(table, pd.DataFrame):
        return table.rename(columns=rename)
    if isinstance(table, pd.Series):
        return table.rename(index=rename)
    return {rename.get(k, k): v for k, v in table.items()}


def tomogram_pixel_size_label(keys) -> str | None:
    """Which label holds a tomogram's pixel size in a table with these labels (None: neither).

    Parameters
    ----------
    keys : iterable of str
        Column labels (or block keys).

    Returns
    -------
    str or None
        :data:`TOMOGRAM_PIXEL_SIZE`, else (files of older versions) :data:`TILT_SERIES_PIXEL_SIZE`.
    """
    keys = set(keys)
    for label in (TOMOGRAM_PIXEL_SIZE, TILT_SERIES_PIXEL_SIZE):
        if label in keys:
            return label
    return None


LABELS_FILE = Path(__file__).resolve().parents[1] / "data" / "relion_labels.tsv"


@lru_cache(maxsize=1)
def relion_labels() -> dict[str, str]:
    """Every STAR label of RELION 3.1.4, 4.0.2 and 5.0.1 with its type (``src/metadata_label.h``).

    Returns
    -------
    dict of str to str
        Label -> type (``int``, ``double``, ``bool``, ``string``, ``double_vector``, ...).
    """
    out: dict[str, str] = {}
    for line in LABELS_FILE.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 2 and not line.startswith("#") and parts[0] != "label":
            out[parts[0]] = parts[1]
    return out


def _type_ok(kind: str, values: pd.Series) -> bool:
    """Whether a column's values fit a RELION label type."""
    if kind in ("string", "unknown", "double_vector", "int_vector") or values.empty:
        return True
    num = pd.to_numeric(values, errors="coerce")
    if num.isna().any():
        return False
    if kind in ("int", "bool"):
        return bool(np.all(np.asarray(num, dtype=np.float64) == np.round(np.asarray(num, dtype=np.float64))))
    return True


def label_problems(blocks: dict[str, Any], source: str = "") -> list[str]:
    """Labels of STAR blocks that are not RELION's (with RELION's type) and do not start with ``subtomo``.

    Parameters
    ----------
    blocks : dict of str to (pandas.DataFrame or dict)
        Blocks as read by :func:`subtomo.io.star.read_star`.
    source : str
        File name for the messages.

    Returns
    -------
    list of str
        One message per offending label (empty: the file is clean).
    """
    known = relion_labels()
    problems = []
    for name, block in blocks.items():
        table = block if isinstance(block, pd.DataFrame) else pd.DataFrame([block]) if isinstance(block, dict) else None
        if table is None:
            continue
        for label in table.columns:
            if str(label).startswith("subtomo"):
                continue
            if label not in known:
                problems.append(f"{source} data_{name}: {label} is not a RELION label (use the subtomo prefix)")
            elif not _type_ok(known[label], table[label]):
                problems.append(f"{source} data_{name}: {label} should be {known[label]} in RELION")
    return problems


# ----------------------------------------------------------------------------------------
# RELION 3.1 legacy subtomogram particle files (what relion_refine 3.1 reads unchanged).

#: Optics columns RELION 3.1 needs for 3D subtomograms.
RELION31_OPTICS = ("rlnOpticsGroup", "rlnOpticsGroupName", "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast",
                   "rlnImagePixelSize", "rlnImageSize", "rlnImageDimensionality", "rlnCtfDataAreCtfPremultiplied")


def relion31_tables(table: pd.DataFrame, optics: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Particle rows and optics reduced to labels that RELION 3.1.4 defines (others dropped).

    Parameters
    ----------
    table : pandas.DataFrame
        Particle rows (any labels); ``rlnImageName``/``rlnCtfImage`` (CTF volumes) already project-relative.
    optics : pandas.DataFrame
        The optics table; must hold :data:`RELION31_OPTICS` except the premultiplied flag (set to 0).

    Returns
    -------
    particles, optics : pandas.DataFrame
        Tables for ``data_particles`` and ``data_optics`` of a RELION 3.1 file.
    """
    rel31 = _labels_of_release("3.1.4")
    optics = optics.assign(rlnCtfDataAreCtfPremultiplied=0)
    optics = optics[[c for c in RELION31_OPTICS if c in optics.columns]]
    in_optics = set(optics.columns) - {"rlnOpticsGroup"}
    keep = [c for c in table.columns if c in rel31 and c not in in_optics]
    return table[keep].copy(), optics.copy()


@lru_cache(maxsize=4)
def _labels_of_release(release: str) -> frozenset[str]:
    out = set()
    for line in LABELS_FILE.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and release in parts[2].split(","):
            out.add(parts[0])
    return frozenset(out)


def relion_commands(particles: str, reference: str | None, diameter_A: float, pixel_size_A: float, sym: str = "C1",
                    out_root: str = "RelionRefine") -> str:
    """The RELION 3.1 command lines of the protocol's steps for an exported particle set.

    Parameters
    ----------
    particles : str
        Project-relative particle STAR.
    reference : str or None
        Project-relative reference map (None: a placeholder the user fills in).
    diameter_A : float
        Particle diameter [Å].
    pixel_size_A : float
        Pixel size [Å].
    sym : str
        Point group.
    out_root : str
        Directory (project-relative) the commands write into.

    Returns
    -------
    str
        Commands, one per line, each preceded by a comment; run them from the project directory.
    """
    ref = reference or "<reference.mrc>"
    common = (f"--i {particles} --ctf --particle_diameter {diameter_A:.0f} --flatten_solvent --zero_mask --oversampling 1 "
              "--pad 2 --dont_combine_weights_via_disc --pool 3 --j 1")
    return "\n".join([
        "# run from the project directory; RELION 3.1 (relion_*_mpi with mpirun -n 3 for several ranks)",
        "# CTF volumes again from the per-tilt tables (optional: the exported ones are identical)",
        "# bash do_all_reconstruct_ctfs.sh",
        "# Step 18: gold-standard 3D auto-refinement (--ctf_corrected_ref: subtomo's maps are CTF-corrected; drop it "
        "for a map made by averaging raw subtomograms)",
        f"mkdir -p {out_root}/refine3d && relion_refine --o {out_root}/refine3d/run --auto_refine --split_random_halves "
        f"--ref {ref} --ctf_corrected_ref --ini_high 40 {common} --sym {sym} --healpix_order 2 --auto_local_healpix_order 4 "
        "--offset_range 5 --offset_step 2 --low_resol_join_halves 40 --norm --scale",
        "# Steps 19-20: 3D classification (3 classes)",
        f"mkdir -p {out_root}/class3d && relion_refine --o {out_root}/class3d/run --K 3 --iter 25 --tau2_fudge 4 "
        f"--ref {ref} --ctf_corrected_ref --ini_high 40 {common} --sym {sym} --healpix_order 2 --offset_range 5 "
        "--offset_step 2 --norm --scale",
        "# reconstruction with the poses in the file",
        f"relion_reconstruct --i {particles} --o {out_root}/reconstruct.mrc --ctf --3d_rot --sym {sym} "
        f"--angpix {pixel_size_A:g}",
        "# Step 23: postprocessing (after refine3d)",
        f"relion_postprocess --i {out_root}/refine3d/run_half1_class001_unfil.mrc --angpix {pixel_size_A:g} "
        f"--auto_bfac --autob_lowres 10 --mask <mask.mrc> --o {out_root}/postprocess",
        "",
    ])


# ----------------------------------------------------------------------------------------
# Reading RELION projects back: 3.1 legacy subtomograms, 4/5 tomography particle sets.

CENTERED_A = ("rlnCenteredCoordinateXAngst", "rlnCenteredCoordinateYAngst", "rlnCenteredCoordinateZAngst")
COORDS_PX = ("rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ")
SUBTOMO_ANGLES = ("rlnTomoSubtomogramRot", "rlnTomoSubtomogramTilt", "rlnTomoSubtomogramPsi")


def relocate_paths(table: pd.DataFrame, relion_project: Path, project: Path,
                   columns: tuple[str, ...] = ("rlnImageName", CTF_VOLUME, CTF_MODEL, "rlnMicrographName")) -> pd.DataFrame:
    """Paths written relative to RELION's project directory, made relative to ours (absolute when outside it).

    Parameters
    ----------
    table : pandas.DataFrame
        Particle rows (``index@path`` names kept as such).
    relion_project : Path
        The directory RELION ran in.
    project : Path
        Our project directory.
    columns : tuple of str
        Columns holding file names.

    Returns
    -------
    pandas.DataFrame
        A copy with those columns rewritten.
    """
    rp, ours = Path(relion_project).resolve(), Path(project).resolve()
    if rp == ours:
        return table
    out = table.copy()

    def move(name: str) -> str:
        index, sep, file = name.rpartition("@") if "@" in name else ("", "", name)
        path = (rp / file).resolve() if not Path(file).is_absolute() else Path(file)
        try:
            rel = str(path.relative_to(ours))
        except ValueError:
            rel = str(path)
        return f"{index}{sep}{rel}"

    for c in columns:
        if c in out.columns:
            out[c] = [move(str(v)) for v in out[c]]
    return out


def tomo_particles_to_legacy(table: pd.DataFrame, tomograms: pd.DataFrame | None, source: str) -> tuple[pd.DataFrame, list[str]]:
    """RELION 4/5 tomography particle rows -> rows with tomogram pixel coordinates (``rlnCoordinateX/Y/Z``).

    RELION 5 gives ``rlnCenteredCoordinate{X,Y,Z}Angst`` (from the tomogram centre); RELION 4
    gives ``rlnCoordinate{X,Y,Z}`` in unbinned tilt-series pixels. With the tomogram table
    (``rlnTomoName``, ``rlnTomoSizeX/Y/Z`` unbinned, ``rlnTomoTiltSeriesPixelSize``,
    ``rlnTomoTomogramBinning``) coordinates become pixels of the reconstructed tomogram
    (``c = centred / (p·b) + size / (2b)``), and ``rlnMicrographName`` its file.

    Parameters
    ----------
    table : pandas.DataFrame
        Particle rows with ``rlnTomoName``.
    tomograms : pandas.DataFrame or None
        RELION's ``tomograms.star`` global table (None: RELION 4 pixel coordinates kept).
    source : str
        File name for messages.

    Returns
    -------
    rows : pandas.DataFrame
        A copy with ``rlnCoordinateX/Y/Z`` [px] (and ``rlnMicrographName`` when known).
    notes : list of str
        What was converted, and the defocus handedness (``rlnTomoHand``) of each tomogram.
    """
    rows, notes = table.copy(), []
    if all(c in rows for c in SUBTOMO_ANGLES) and np.abs(rows[list(SUBTOMO_ANGLES)].to_numpy(float)).max() > 1e-6:
        raise SubtomoError(f"{source}: rlnTomoSubtomogramRot/Tilt/Psi are set (subtomograms written in a rotated frame); "
                           "this importer reads particles whose subtomograms are in the tomogram frame. Re-extract in "
                           "RELION without the subtomogram orientations, or import the particle coordinates only.")
    if tomograms is None:
        if all(c in rows for c in CENTERED_A):
            raise SubtomoError(f"{source}: RELION 5 centred coordinates (Å) need the tomogram sizes and pixel sizes. "
                               "Give RELION's tomograms.star with --tomograms.")
        return rows, ["no tomograms.star: coordinates kept as written"]
    tomos = tomograms.set_index(tomograms["rlnTomoName"].astype(str))
    unknown = sorted(set(rows["rlnTomoName"].astype(str)) - set(tomos.index))
    if unknown:
        raise SubtomoError(f"{source}: tomograms {', '.join(unknown)} are not in the tomograms.star given.")
    t = tomos.loc[rows["rlnTomoName"].astype(str).tolist()]
    binning = t["rlnTomoTomogramBinning"].to_numpy(float) if "rlnTomoTomogramBinning" in t else np.ones(len(t))
    px = t["rlnTomoTiltSeriesPixelSize"].to_numpy(float)
    for axis, (centred, coord) in enumerate(zip(CENTERED_A, COORDS_PX)):
        size = t[f"rlnTomoSize{'XYZ'[axis]}"].to_numpy(float)
        if centred in rows:
            rows[coord] = rows[centred].to_numpy(float) / (px * binning) + size / (2 * binning)
        else:
            rows[coord] = rows[coord].to_numpy(float) / binning
    if "rlnTomoReconstructedTomogram" in t:
        rows["rlnMicrographName"] = t["rlnTomoReconstructedTomogram"].astype(str).to_numpy()
    notes.append("coordinates converted to tomogram pixels (binning " + ", ".join(f"{b:g}" for b in np.unique(binning)) + ")")
    if "rlnTomoHand" in tomos:
        hands = {str(k): int(v) for k, v in tomos["rlnTomoHand"].items()}
        notes.append("RELION defocus handedness (rlnTomoHand) " + ", ".join(f"{k}: {v:+d}" for k, v in hands.items())
                     + " = subtomo --defocus-handedness of the same value (docs/conventions.md)")
    return rows, notes


def relion_tilt_table(table: pd.DataFrame, source: str) -> tuple[pd.DataFrame, list[str]]:
    """One tilt series' per-tilt CTF table of RELION 4/5, in our labels and tilt convention.

    RELION 5 writes one STAR file per tilt series (``rlnTomoTiltSeriesStarFile``): per image
    ``rlnTomoYTilt`` (the aligned tilt; RELION projects with ``Rz·Ry(YTilt)·Rx``, so image x =
    x cos θ + z sin θ, our θ), ``rlnTomoNominalStageTiltAngle``, ``rlnDefocusU/V/Angle``,
    ``rlnMicrographPreExposure`` and ``rlnCtfScalefactor``. RELION 4 writes a block per tilt
    series inside ``tomograms.star`` with projection matrices: the tilt is
    ``asin(−rlnTomoProjZ[0])`` (the Y angle RELION 5 itself reads from such a matrix).

    Parameters
    ----------
    table : pandas.DataFrame
        The tilt series' RELION table (one row per tilt image).
    source : str
        Where it was read, for messages.

    Returns
    -------
    tilts : pandas.DataFrame
        rlnTomoNominalStageTiltAngle (our θ [deg]), rlnDefocusU/V [Å], rlnDefocusAngle [deg],
        rlnMicrographPreExposure [e/Å²], rlnCtfScalefactor, and rlnCtfBfactor [Å²] when RELION has it.
    notes : list of str
        Where the tilt came from, and what our model leaves out (an x tilt).

    Raises
    ------
    SubtomoError
        No tilt angle or no defocus in the table.
    """
    notes: list[str] = []
    if "rlnTomoYTilt" in table:
        tilt = table["rlnTomoYTilt"].to_numpy(float)
        notes.append(f"{source}: tilt angles from rlnTomoYTilt (aligned)")
    elif "rlnTomoProjZ" in table:
        proj_z = np.array([[float(v) for v in str(s).strip("[]").split(",")[:3]] for s in table["rlnTomoProjZ"]])
        tilt = np.rad2deg(np.arcsin(np.clip(-proj_z[:, 0], -1.0, 1.0)))
        notes.append(f"{source}: tilt angles from the projection matrices (asin(-rlnTomoProjZ[0]))")
    elif "rlnTomoNominalStageTiltAngle" in table:
        tilt = table["rlnTomoNominalStageTiltAngle"].to_numpy(float)
        notes.append(f"{source}: nominal stage tilt angles (no aligned ones in the file)")
    else:
        raise SubtomoError(f"{source}: no tilt angle (rlnTomoYTilt, rlnTomoProjZ or rlnTomoNominalStageTiltAngle). Give "
                           "the tilt-series STAR files of RELION's tomograms.star.")
    if "rlnDefocusU" not in table:
        raise SubtomoError(f"{source}: no rlnDefocusU (RELION's CTF estimation has not run on this tilt series). Run "
                           "RELION's CTF estimation first, or import without --tomograms (no 3D CTF models).")
    if "rlnTomoXTilt" in table and np.abs(table["rlnTomoXTilt"].to_numpy(float)).max() > 1.0:
        notes.append(f"{source}: x tilts up to {np.abs(table['rlnTomoXTilt'].to_numpy(float)).max():.1f} deg are not "
                     "part of our 3D CTF model (tilt axis = y)")
    du = table["rlnDefocusU"].to_numpy(float)
    out = pd.DataFrame({
        "rlnTomoNominalStageTiltAngle": tilt, "rlnDefocusU": du,
        "rlnDefocusV": table["rlnDefocusV"].to_numpy(float) if "rlnDefocusV" in table else du,
        "rlnDefocusAngle": table["rlnDefocusAngle"].to_numpy(float) if "rlnDefocusAngle" in table else 0.0,
        "rlnMicrographPreExposure": (table["rlnMicrographPreExposure"].to_numpy(float)
                                     if "rlnMicrographPreExposure" in table else 0.0),
        "rlnCtfScalefactor": (table["rlnCtfScalefactor"].to_numpy(float) if "rlnCtfScalefactor" in table
                              else np.cos(np.deg2rad(tilt))),
    })
    if "rlnCtfBfactor" in table:
        out["rlnCtfBfactor"] = table["rlnCtfBfactor"].to_numpy(float)
    if "rlnMicrographPreExposure" not in table:
        notes.append(f"{source}: no rlnMicrographPreExposure: dose 0 (no dose B-factor)")
    return out, notes
