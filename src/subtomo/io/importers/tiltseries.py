"""Tilt-series folders of other programs → the protocol's ``Tomograms/<name>/`` layout.

:func:`find_series` reads one program's folder (IMOD/etomo, AreTomo, WarpTools; the
readers are :mod:`.imod`, :mod:`.aretomo`, :mod:`.warp`, :mod:`.serialem`) into a
:class:`SeriesPlan`: the aligned stack, the tomogram, the refined tilts in stack order, the
dose each image received before it was taken, and notes on what was found.
:func:`write_layout` then makes ``Tomograms/<name>/``: the stack and the tomogram linked
(never copied or changed), ``<name>.tlt`` and ``<name>.order`` written, ``<name>.coords``
copied from a coordinates folder (``subtomo import-particles`` writes one).

Each program's files, as looked for in a series folder ``<dir>/<name>/`` (or ``<dir>``):

* IMOD/etomo: ``<name>.ali`` (aligned stack), ``<name>.tlt`` (refined tilts; else
  ``.rawtlt``), ``tilt.com`` (``OFFSET`` added to the tilts; thickness), ``<name>.rec`` or
  ``<name>_rec.mrc`` (tomogram, already rotated so that z is the thickness), ``<name>.xf``
  (reported), ``<name>.defocus`` (ctfplotter: reported for ``subtomo ctf --import-imod``),
  and the SerialEM ``.mdoc`` of the raw stack for doses.
* AreTomo: ``<name>.aln`` (refined tilts of the kept sections), the aligned stack
  ``<name>_ali.mrc``/``<name>.ali`` (written with ``-OutImod``/``-OutXF`` runs), the volume
  ``<name>_Vol.mrc``/``<name>_rec.mrc``, and the ``.mdoc`` (matched through ``SEC``).
* WarpTools: ``<name>.xml`` (tilts, doses, ``UseTilt``), a tomogram
  ``<name>*.mrc`` from ``reconstruction/`` and an aligned stack ``<name>.ali`` or
  ``<name>_aligned.mrc(s)`` (WarpTools itself keeps only movies and transforms).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment

from subtomo.errors import SubtomoError
from subtomo.io.importers._folders import item_folders
from subtomo.io.importers.aretomo import read_aln
from subtomo.io.importers.imod import geometry_columns, read_tilt_com, read_xf, xf_rotation_deg
from subtomo.io.importers.serialem import read_mdoc
from subtomo.io.importers.warp import read_warp_xml
from subtomo.io.mrc import read_mrc_header
from subtomo.io.text import read_tlt, write_text_rows

SOURCES = ("imod", "aretomo", "warp")


@dataclass
class SeriesPlan:
    """One tilt series of another program, ready to become ``Tomograms/<name>/``.

    Attributes
    ----------
    name : str
        Tomogram name.
    stack, tomogram : Path
        Aligned stack and tomogram (MRC).
    tilts_deg : numpy.ndarray
        Refined tilt of each image of ``stack`` [deg], shape (n,).
    pre_exposure : numpy.ndarray
        Dose before each image [e⁻/Å²], shape (n,), stack order.
    notes : list of str
        What was found (files, pixel sizes, alignment, CTF results).
    warnings : list of str
        What was found but is not used (e.g. AreTomo's local alignment).
    geometry : dict of str to float
        Tomogram-table columns placing the tomogram in the tilt geometry (IMOD's ``SHIFT`` and
        ``XAXISTILT``: :data:`subtomo.io.importers.imod.GEOMETRY_COLUMNS`); empty for the others.
    """

    name: str
    stack: Path
    tomogram: Path
    tilts_deg: np.ndarray
    pre_exposure: np.ndarray
    notes: list[str] = field(default_factory=list)
    geometry: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def _first(folder: Path, names: list[str]) -> Path | None:
    for n in names:
        hits = sorted(folder.glob(n))
        if hits:
            return hits[0]
    return None


def _need(path: Path | None, folder: Path, what: str, fix: str) -> Path:
    if path is None:
        raise SubtomoError(f"{folder}: no {what}. {fix}")
    return path


def _doses_from_mdoc(folder: Path, name: str, tilts: np.ndarray, sections: np.ndarray | None,
                     notes: list[str]) -> np.ndarray:
    mdoc_path = _need(_first(folder, [f"{name}.mdoc", f"{name}.*.mdoc", "*.mdoc"]), folder, "SerialEM .mdoc (dose and "
                      "acquisition order)", "Put the .mdoc of the raw tilt series in the folder.")
    m = read_mdoc(mdoc_path)
    if sections is not None and len(m.tilts_deg) > int(sections.max()):
        picked = sections
    else:
        _, picked = linear_sum_assignment(np.abs(tilts[:, None] - m.tilts_deg[None, :]))
    worst = float(np.max(np.abs(m.tilts_deg[picked] - tilts))) if len(tilts) else 0.0
    notes.append(f"{mdoc_path.name}: {len(m.tilts_deg)} images, {m.exposure_dose.sum():.1f} e/A^2 in all, pixel "
                 f"{m.pixel_size_A} A; {len(tilts)} matched to the stack (largest tilt difference {worst:.2f} deg)")
    return m.pre_exposure[picked]


def _pixel_notes(files: dict[str, Path], notes: list[str]) -> None:
    sizes = {k: read_mrc_header(p)[1] for k, p in files.items()}
    agree = max(sizes.values()) - min(sizes.values()) <= 1e-3 * max(sizes.values())
    notes.append("pixel sizes: " + ", ".join(f"{k} {v:.4f} A" for k, v in sizes.items())
                 + ("" if agree else " -- they differ: give --pixel-size if a header is wrong, or bin to one sampling"))


def _imod(folder: Path, name: str) -> SeriesPlan:
    notes: list[str] = []
    stack = _need(_first(folder, [f"{name}.ali", f"{name}_ali.mrc"]), folder, f"aligned stack {name}.ali",
                  "Run etomo's final aligned stack step (newstack), or give the folder that holds it.")
    tlt = _need(_first(folder, [f"{name}.tlt", f"{name}.rawtlt"]), folder, f"{name}.tlt", "etomo writes it with the "
                "fine alignment.")
    tilts = read_tlt(tlt)
    tomogram = _need(_first(folder, [f"{name}.rec", f"{name}_rec.mrc", f"{name}_full_rec.mrc"]), folder,
                     f"tomogram {name}.rec", f"Reconstruct it: subtomo reconstruct --i {stack}.")
    geometry: dict[str, float] = {}
    if (folder / "tilt.com").is_file():
        com = read_tilt_com(folder / "tilt.com")
        tilts = tilts + com.offset_deg
        geometry = geometry_columns(com)
        notes.append(f"tilt.com: thickness {com.thickness}, binned {com.binned}, OFFSET {com.offset_deg} (added to the "
                     f"tilts), SHIFT {com.shift[0]:g} {com.shift[1]:g} and XAXISTILT {com.x_axis_tilt_deg} (the "
                     "tomogram's place in the tilt geometry, used by prepare for the position-dependent defocus)")
        if com.x_axis_tilt_deg:
            notes.append(f"tilt.com: XAXISTILT {com.x_axis_tilt_deg} deg turns the missing wedge by as much about x; "
                         "the 3D CTF models keep it about y")
        notes.extend(f"tilt.com: {what} ignored: subtomo uses the global single-axis alignment" for what in com.ignored)
        shape = read_mrc_header(tomogram)[0]
        thick = com.thickness // max(com.binned, 1) if com.thickness else None  # THICKNESS is in unbinned pixels
        if com.perpendicular and thick and shape[1] == thick and shape[0] != thick:
            raise SubtomoError(f"{tomogram}: not rotated (y is the thickness, {shape}): rotate it with IMOD's "
                               f"'trimvol -rx', or reconstruct it with: subtomo reconstruct --i {stack}.")
    xf = _first(folder, [f"{name}.xf"])
    if xf is not None:
        t = read_xf(xf)
        notes.append(f"{xf.name}: {len(t)} transforms, rotation {np.median(xf_rotation_deg(t)):.2f} deg, largest shift "
                     f"{np.abs(t[:, 4:]).max():.1f} px (already applied in {stack.name})")
    defocus = _first(folder, [f"{name}.defocus", "*.defocus"])
    if defocus is not None:
        notes.append(f"{defocus.name}: ctfplotter defoci; use them with: subtomo ctf --import-imod {folder.parent}")
    dose = _doses_from_mdoc(folder, name, tilts, None, notes)
    _pixel_notes({stack.name: stack, tomogram.name: tomogram}, notes)
    return SeriesPlan(name, stack, tomogram, tilts, dose, notes, geometry)


def _aretomo(folder: Path, name: str) -> SeriesPlan:
    notes: list[str] = []
    aln_path = _need(_first(folder, [f"{name}.aln", "*.aln"]), folder, f"{name}.aln", "Give AreTomo's output folder.")
    aln = read_aln(aln_path)
    stack = _need(_first(folder, [f"{name}_ali.mrc", f"{name}.ali", f"{name}_ali.mrcs"]), folder, "aligned stack",
                  "Write it with AreTomo's -OutImod option (or newstack -xform with the .xf it writes).")
    tomogram = _need(_first(folder, [f"{name}_Vol.mrc", f"{name}_rec.mrc", f"{name}.rec"]), folder, "tomogram",
                     f"Reconstruct it: subtomo reconstruct --i {stack}.")
    notes.append(f"{name}.aln: {len(aln.tilts_deg)} images kept, {len(aln.dark_sections)} excluded, tilt axis "
                 f"{np.median(aln.rotation_deg):.2f} deg, alpha offset {aln.alpha_offset_deg} deg")
    n_stack = read_mrc_header(stack)[0][0]
    if n_stack != len(aln.tilts_deg):
        raise SubtomoError(f"{stack}: {n_stack} images but {name}.aln keeps {len(aln.tilts_deg)}. Give the aligned "
                           "stack written with this alignment.")
    dose = _doses_from_mdoc(folder, name, aln.tilts_deg, aln.sections, notes)
    _pixel_notes({stack.name: stack, tomogram.name: tomogram}, notes)
    warnings = []
    if aln.num_patches or aln.local_rows:
        warnings.append(f"{aln_path}: local alignment ({aln.num_patches} patches, {aln.local_rows} rows) ignored: subtomo "
                        "uses the global alignment (TILT, ROT, TX, TY) only. If "
                        f"{tomogram.name} was reconstructed with the local shifts, particle positions in the tilt images "
                        f"are off by up to those shifts; reconstruct without them: subtomo reconstruct --i {stack}.")
    return SeriesPlan(name, stack, tomogram, aln.tilts_deg.copy(), dose, notes, warnings=warnings)


def _warp(folder: Path, name: str) -> SeriesPlan:
    notes: list[str] = []
    xml = _need(_first(folder, [f"{name}.xml", f"*/{name}.xml"]), folder, f"{name}.xml", "Give the WarpTools "
                "processing folder of this tilt series.")
    w = read_warp_xml(xml)
    stack = _need(_first(folder, [f"{name}.ali", f"{name}_aligned.mrc", f"{name}_aligned.mrcs", f"*/{name}.ali"]),
                  folder, "aligned stack", "WarpTools keeps only movies and transforms: export an aligned stack "
                  "(e.g. IMOD newstack -xform with the series' .xf) into this folder.")
    tomogram = _need(_first(folder, [f"reconstruction/{name}*.mrc", f"{name}*Apx.mrc"]), folder, "tomogram",
                     "Reconstruct it with WarpTools ts_reconstruct, or: subtomo reconstruct --i " + str(stack))
    tilts, dose = w.tilts_deg[w.use], w.pre_exposure[w.use]
    notes.append(f"{xml.name}: {len(w.tilts_deg)} tilts, {int(w.use.sum())} used, axis {np.median(w.axis_angle_deg):.2f} "
                 f"deg, movie pixel {w.pixel_size_A} A" + (", per-tilt defoci" if w.defocus_u_A is not None else ""))
    n_stack = read_mrc_header(stack)[0][0]
    if n_stack != len(tilts):
        raise SubtomoError(f"{stack}: {n_stack} images but {xml.name} uses {len(tilts)} tilts. Export the stack with the "
                           "tilts Warp uses.")
    order = np.argsort(tilts)
    if not np.all(np.diff(tilts[order]) > 0):
        notes.append("repeated tilt angles: stack order assumed to follow <Angles>")
    _pixel_notes({stack.name: stack, tomogram.name: tomogram}, notes)
    return SeriesPlan(name, stack, tomogram, tilts, dose, notes)


def find_series(source: str, root: Path) -> list[SeriesPlan]:
    """Read every tilt-series folder of one program under ``root``.

    Parameters
    ----------
    source : str
        ``imod``, ``aretomo`` or ``warp``.
    root : Path
        A series folder, or a folder holding one sub-folder per series (named after it).

    Returns
    -------
    list of SeriesPlan
        Sorted by name.
    """
    folders = item_folders(root, f"{source} tilt series", lambda d: _has_series(source, d),
                           lambda d: d.name in ("reconstruction", "tomostar"))
    reader = {"imod": _imod, "aretomo": _aretomo, "warp": _warp}[source]
    plans = []
    for d in folders:
        plans.append(reader(d, d.name if d is not root else _series_name(source, root)))
    return plans


def _has_series(source: str, folder: Path) -> bool:
    pattern = {"imod": "*.ali", "aretomo": "*.aln", "warp": "*.xml"}[source]
    return any(folder.glob(pattern))


def _series_name(source: str, folder: Path) -> str:
    pattern = {"imod": "*.ali", "aretomo": "*.aln", "warp": "*.xml"}[source]
    hits = sorted(folder.glob(pattern))
    return hits[0].stem if hits else folder.name


def write_layout(plan: SeriesPlan, tomograms_dir: Path, coords: Path) -> Path:
    """Make ``<tomograms_dir>/<name>/`` in the protocol's layout (links, .tlt, .order, .coords).

    Parameters
    ----------
    plan : SeriesPlan
        The series.
    tomograms_dir : Path
        The project's ``Tomograms`` folder.
    coords : Path
        The ``.coords`` file to copy (positions [px] of this tomogram).

    Returns
    -------
    Path
        The new directory.
    """
    d = tomograms_dir / plan.name
    d.mkdir(parents=True)
    for src, ext in ((plan.tomogram, ".mrc"), (plan.stack, ".mrcs")):
        os.symlink(os.path.relpath(src.resolve(), d), d / f"{plan.name}{ext}")
    write_text_rows(d / f"{plan.name}.tlt", plan.tilts_deg, fmt="%.3f")
    rank = np.argsort(plan.pre_exposure, kind="stable")
    write_text_rows(d / f"{plan.name}.order", np.stack([plan.tilts_deg[rank], plan.pre_exposure[rank]], 1), fmt="%.3f")
    shutil.copyfile(coords, d / f"{plan.name}.coords")
    return d
