"""The protocol's input layout (Steps 1-7) and its validation.

``Tomograms/<name>/`` holds ``<name>.mrc`` (tomogram), ``<name>.coords`` (particle
centres, pixels), ``<name>.mrcs`` (aligned tilt series), ``<name>.tlt`` (refined tilt
angles; optional if the stack's extended header has them), ``<name>.order`` (tilt and
accumulated dose) and optionally ``<name>.trial`` (two CTF trial images per tilt). The
tomogram may instead be an OME-Zarr image ``<name>.zarr`` (read lazily, finest level).
:func:`scan_layout` collects *every* problem before failing, each naming the file, the
problem and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from subtomo.errors import SubtomoError
from subtomo.io.mrc import is_ome_zarr, read_mrc_header, read_tilt_angles_from_header, read_tomogram_header
from subtomo.io.text import match_order_to_tilts, read_coords, read_order, read_tlt

PIXEL_SIZE_TOLERANCE = 1e-3  # relative


@dataclass
class TomogramInputs:
    """One tomogram's validated inputs (paths relative to the project)."""

    name: str
    tomogram: Path
    tilt_series: Path
    coords_file: Path
    order_file: Path
    tlt_file: Path | None
    trial: Path | None
    shape_zyx: tuple[int, int, int]
    pixel_size_A: float
    tilts_deg: np.ndarray
    dose_e_per_A2: np.ndarray
    coords_xyz: np.ndarray
    notes: list[str] = field(default_factory=list)


def scan_layout(project: Path, pixel_size_A: float | None = None) -> list[TomogramInputs]:
    """Validate ``project/Tomograms`` and return its tomograms; raise with all problems.

    Every tomogram directory is checked (files present, MRC headers readable, tilt angles from
    ``.tlt`` or the stack's extended header matching the image count, ``.trial`` holding two images
    per tilt, pixel sizes consistent, coordinates inside the tomogram, ``.order`` angles matched to
    the refined tilts) before anything fails.

    Parameters
    ----------
    project : Path
        Project directory holding ``Tomograms/<name>/``.
    pixel_size_A : float, optional
        Pixel size [Å] to use for every tomogram instead of the MRC headers' (the headers are then
        not compared); default: from the headers, which must agree within 0.1 %.

    Returns
    -------
    list of TomogramInputs
        One per sub-directory, sorted by name; paths relative to ``project``, tilts [deg] and
        accumulated dose [e⁻/Å²] per image in stack order, coordinates (n, 3) [px].

    Raises
    ------
    SubtomoError
        ``Tomograms`` is missing or empty, or any problem was found (all are listed in ``.problems``,
        each naming the file, the problem and the fix).
    """
    root = project / "Tomograms"
    if not root.is_dir():
        raise SubtomoError(f"{root}: directory not found. Steps 1-2: make Tomograms/<name>/ in the project "
                           f"directory holding <name>.mrc, .coords, .mrcs, .tlt and .order, then run subtomo import there.")
    problems: list[str] = []
    found: list[TomogramInputs] = []
    dirs = sorted(d for d in root.iterdir() if d.is_dir())
    if not dirs:
        raise SubtomoError(f"{root}: no tomogram sub-directories. Step 2: put each tomogram in Tomograms/<name>/<name>.mrc.")
    for d in dirs:
        item = _scan_one(project, d, pixel_size_A, problems)
        if item is not None:
            found.append(item)
    if found and pixel_size_A is None:
        sizes = {t.name: t.pixel_size_A for t in found}
        ref = next(iter(sizes.values()))
        odd = [n for n, s in sizes.items() if abs(s - ref) > PIXEL_SIZE_TOLERANCE * ref]
        if odd:
            problems.append(f"inconsistent pixel sizes between tomograms ({', '.join(f'{n}: {s:.3f} A' for n, s in sizes.items())}). "
                            f"Fix: rescale them to one sampling, or give --pixel-size if the headers are wrong.")
    if problems:
        raise SubtomoError(f"the input layout in {root} has {len(problems)} problem(s); nothing was written", problems)
    return found


def _rel(project: Path, p: Path) -> Path:
    try:
        return p.relative_to(project)
    except ValueError:
        return p


def _scan_one(project: Path, d: Path, pixel_size_A: float | None, problems: list[str]) -> TomogramInputs | None:
    name = d.name
    files = {ext: d / f"{name}{ext}" for ext in (".mrc", ".coords", ".mrcs", ".tlt", ".order", ".trial")}
    if not files[".mrc"].exists() and is_ome_zarr(d / f"{name}.zarr"):
        files[".mrc"] = d / f"{name}.zarr"  # an OME-Zarr tomogram (read lazily, finest level)
    n_before = len(problems)
    for ext, what, protocol_step in ((".mrc", "tomogram", "Step 2"), (".coords", "particle coordinates", "Step 3"),
                            (".mrcs", "aligned tilt series", "Step 4"), (".order", "tilt angle / accumulated dose list", "Step 6")):
        if not files[ext].exists():
            problems.append(f"{_rel(project, files[ext])}: file not found ({what}). Fix: {protocol_step} of the protocol; "
                            f"the file must be named after its directory.")
    if len(problems) > n_before:
        return None
    try:
        tomo_shape, tomo_px = read_tomogram_header(files[".mrc"])
        ts_shape, ts_px = read_mrc_header(files[".mrcs"])
    except SubtomoError as exc:
        problems.append(str(exc))
        return None
    n_images = ts_shape[0]
    tilts = None
    tlt_file = files[".tlt"] if files[".tlt"].exists() else None
    try:
        if tlt_file is not None:
            tilts = read_tlt(tlt_file)
        else:
            tilts = read_tilt_angles_from_header(files[".mrcs"])
            if tilts is None:
                problems.append(f"{_rel(project, files['.tlt'])}: file not found and {_rel(project, files['.mrcs'])} has no tilt "
                                f"angles in its extended header. Fix: Step 5, write the refined tilt angles (one per image) to the .tlt file.")
    except SubtomoError as exc:
        problems.extend(exc.problems or [str(exc)])
    coords = order = None
    for key, reader in ((".coords", read_coords), (".order", read_order)):
        try:
            value = reader(files[key])
        except SubtomoError as exc:
            problems.extend(exc.problems or [str(exc)])
            continue
        if key == ".coords":
            coords = value
        else:
            order = value
    if tilts is not None and len(tilts) != n_images:
        src = _rel(project, tlt_file) if tlt_file else f"extended header of {_rel(project, files['.mrcs'])}"
        problems.append(f"{src}: the number of tilt angles ({len(tilts)}) and the number of images in "
                        f"{_rel(project, files['.mrcs'])} ({n_images}) are different. Possible reason: some images were "
                        f"omitted in the tomogram reconstruction but the tilt angles were not updated. Fix: use only the "
                        f"tilt angles of the images that are in the aligned tilt series.")
        tilts = None
    if files[".trial"].exists():
        try:
            trial_shape, _ = read_mrc_header(files[".trial"])
            if trial_shape[0] != 2 * n_images:
                problems.append(f"{_rel(project, files['.trial'])}: holds {trial_shape[0]} images but must hold exactly "
                                f"twice the {n_images} images of the tilt series (two trials per tilt, in tilt-series order). "
                                f"Fix: Step 11, or remove the .trial file.")
        except SubtomoError as exc:
            problems.append(str(exc))
    px = pixel_size_A
    if px is None:
        if abs(tomo_px - ts_px) > PIXEL_SIZE_TOLERANCE * max(tomo_px, ts_px):
            problems.append(f"{_rel(project, files['.mrc'])}: pixel size {tomo_px:.4f} A differs from that of "
                            f"{_rel(project, files['.mrcs'])} ({ts_px:.4f} A); the protocol needs tomogram, coordinates and "
                            f"tilt series at one sampling. Fix: reconstruct at the tilt series' sampling, or give --pixel-size "
                            f"if a header is wrong.")
        if tomo_px <= 0 or abs(tomo_px - 1.0) < 1e-9 and ts_px <= 0:
            problems.append(f"{_rel(project, files['.mrc'])}: no pixel size in the header. Fix: give --pixel-size.")
        px = tomo_px
    notes: list[str] = []
    if coords is not None:
        nz, ny, nx = tomo_shape
        bad = np.nonzero((coords[:, 0] < 0) | (coords[:, 0] > nx) | (coords[:, 1] < 0) | (coords[:, 1] > ny)
                         | (coords[:, 2] < 0) | (coords[:, 2] > nz))[0]
        for i in bad[:20]:
            x, y, z = coords[i]
            problems.append(f"{_rel(project, files['.coords'])}:{i + 1}: coordinate ({x:g}, {y:g}, {z:g}) lies outside the "
                            f"tomogram ({nx} x {ny} x {nz} pixels). Fix: coordinates are in pixels of this tomogram, origin "
                            f"at the lower left (IMOD); check binning and axis order.")
        if len(bad) > 20:
            problems.append(f"{_rel(project, files['.coords'])}: {len(bad) - 20} more coordinates outside the tomogram.")
        if len(coords) == 0:
            problems.append(f"{_rel(project, files['.coords'])}: no particles. Fix: Step 3, one line x y z per particle.")
    dose = np.zeros(0)
    if tilts is not None and order is not None and len(order) and len(order) != len(tilts):
        problems.append(f"{_rel(project, files['.order'])}: {len(order)} lines for the {len(tilts)} images of the tilt "
                        f"series ({_rel(project, files['.tlt'])}). Fix: Step 6, one line per image (tilt angle and "
                        "accumulated dose), no more and no fewer.")
    elif tilts is not None and order is not None and len(order):
        dose, diff = match_order_to_tilts(tilts, order)
        step = float(np.ptp(tilts) / max(len(tilts) - 1, 1)) if len(tilts) > 1 else 0.0
        worst = int(np.argmax(diff)) if len(diff) else 0
        if len(diff) and diff[worst] > step + 0.25:
            problems.append(f"{_rel(project, files['.order'])}: no line with a tilt angle within {step + 0.25:.2f} deg of the "
                            f"refined tilt {tilts[worst]:.2f} deg (image {worst + 1}). Fix: Step 6, list every image's tilt "
                            f"angle and accumulated dose.")
        elif len(diff) and diff.max() > 0.01:
            notes.append(f"{name}: .order angles matched to the closest refined tilt (largest difference {diff.max():.2f} deg)")
    elif order is not None and len(order) == 0:
        problems.append(f"{_rel(project, files['.order'])}: empty. Fix: Step 6, two columns: tilt angle and accumulated dose.")
    if len(problems) > n_before or tilts is None or coords is None:
        return None
    return TomogramInputs(
        name=name, tomogram=_rel(project, files[".mrc"]), tilt_series=_rel(project, files[".mrcs"]),
        coords_file=_rel(project, files[".coords"]), order_file=_rel(project, files[".order"]),
        tlt_file=_rel(project, tlt_file) if tlt_file else None,
        trial=_rel(project, files[".trial"]) if files[".trial"].exists() else None,
        shape_zyx=tomo_shape, pixel_size_A=float(px), tilts_deg=np.asarray(tilts, dtype=np.float64),
        dose_e_per_A2=dose, coords_xyz=coords, notes=notes,
    )
