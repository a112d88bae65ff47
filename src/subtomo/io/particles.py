"""Particle sets: the one place where particle STAR files become poses, paths and pixel sizes.

A :class:`ParticleSet` is what jobs, importers and cluster workers pass around. It holds the
particle rows (RELION labels, a DataFrame), the optics table of a RELION 3.1+ file (or None
for a 3.0-style single-block file) and the project directory that relative paths in the file
are resolved against. Everything that used to be re-derived in each job lives here, once:

* **pixel size**, by one written rule (:data:`PIXEL_SIZE_RULE`);
* **poses** as RELION rotation matrices A (``geometry.euler``; particle = reference rotated
  by A) and origin offsets in px and Å (RELION's ``rlnOrigin{X,Y,Z}Angst``: the particle
  centre sits at box centre minus the origin);
* **image references**, ``index@path`` (1-based index into a stack) or a plain path,
  resolved against the project directory;
* **3D CTF references**: a RELION volume (``rlnCtfImage``) or our compact model
  (``subtomoCtfModel``); files of older versions with the compact form in ``rlnCtfImage``
  are upgraded on reading (:func:`subtomo.io.relion.upgrade_ctf_column`);
* **validation** on reading: a row whose fields are missing (a truncated line) is an error
  that names the file and the row, never NaN poses downstream.

Writing is atomic and always RELION 3.1 style (``data_optics`` + ``data_particles``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from subtomo.errors import SubtomoError
from subtomo.geometry.euler import euler_to_matrix, matrix_to_euler
from subtomo.io.mrc import read_mrc_header
from subtomo.io.relion import CTF_MODEL, CTF_VOLUME, is_compact_ctf_ref, upgrade_ctf_column
from subtomo.io.star import read_star, table_of, write_particles

ANGLE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
ORIGIN_A_COLUMNS = ("rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginZAngst")
ORIGIN_PX_COLUMNS = ("rlnOriginX", "rlnOriginY", "rlnOriginZ")  # RELION 3.0, in pixels
PIXEL_SIZE_RULE = (
    "the pixel size of a particle is rlnImagePixelSize of its optics group; else rlnImagePixelSize or "
    "rlnPixelSize in its row; else rlnDetectorPixelSize * 1e4 / rlnMagnification (RELION 3.0); else the "
    "pixel size in the MRC header of the first particle image"
)
_RELATIVE_TOLERANCE = 1e-3  # particles whose pixel sizes differ by more are not one set


@dataclass(frozen=True)
class ImageRef:
    """One image of a particle: a stack index (1-based; None for a single-image file) and a path."""

    index: int | None
    path: Path


def parse_image_name(name: str) -> tuple[int | None, str]:
    """Split RELION's ``index@path`` image name.

    Parameters
    ----------
    name : str
        ``"3@Extract/job005/stack.mrcs"`` or a plain ``"Extract/job005/p1.mrc"``.

    Returns
    -------
    index : int or None
        1-based index into the stack, None for a plain path.
    path : str
        The path part, unchanged (relative paths stay relative).
    """
    name = str(name).strip()
    head, sep, tail = name.partition("@")
    if sep and head.isdigit():
        return int(head), tail
    return None, name


def resolve_project_path(project: str | Path, path: str | Path, *, source: str | Path | None = None,
                         row: int | None = None, column: str | None = None) -> Path:
    """An absolute path, or a path relative to the project directory made absolute.

    Paths read from a STAR file (``source`` given) are confined to the project: a relative
    path that leads out of it (``../../etc/passwd``) is refused; an absolute path written in
    the file, and any path the user gives on the command line (no ``source``), is taken as
    it is. The test is on the written path (``..`` components), so a project-relative
    symbolic link to data elsewhere stays valid.

    Parameters
    ----------
    project : str or Path
        The project directory (where ``default_pipeline.star`` lives).
    path : str or Path
        A path as written in a STAR file or given on the command line.
    source : str or Path, optional
        The STAR file the path was read from (turns the confinement on; named in the message).
    row : int, optional
        The 1-based row of the table it was read from, for the message.
    column : str, optional
        Its column (``rlnImageName``), for the message.

    Returns
    -------
    Path
        ``path`` if absolute, else ``project / path``.

    Raises
    ------
    SubtomoError
        ``source`` is given and the relative ``path`` leads out of the project.
    """
    p = Path(path)
    if p.is_absolute():
        return p
    if source is not None and _leaves_directory(str(path)):
        where = ", ".join(x for x in (f"row {row}" if row is not None else "", column or "") if x)
        raise SubtomoError(f"{source}: {where + ' ' if where else ''}{str(path)!r} is a relative path that leads out of "
                           f"the project ({project}); relative paths in STAR files are read inside the project. Give "
                           "an absolute path if the file really lives outside the project.")
    return Path(project) / p


def _leaves_directory(relative: str) -> bool:
    """Whether a relative path, normalised, starts with ``..`` (leaves the directory it is relative to)."""
    return os.path.normpath(relative.replace("\\", "/")).split(os.sep, 1)[0] == ".."


def path_component(name: object, label: str, source: str | Path) -> str:
    r"""A name from a STAR file (a tomogram, a micrograph) checked for use as one path component.

    Output paths are built from such names (``Subtomograms/<rlnTomoName>/...``); a name with a
    separator or ``..`` would write outside the job directory.

    Parameters
    ----------
    name : object
        The value from the file.
    label : str
        Its column, for the message (``rlnTomoName``).
    source : str or Path
        The file it came from, for the message.

    Returns
    -------
    str
        The name, unchanged.

    Raises
    ------
    SubtomoError
        The name is empty, contains ``/``, ``\\`` or a NUL byte, or is ``.``/``..``.
    """
    text = str(name).strip()
    if not text or text in (".", "..") or any(c in text for c in "/\\\0"):
        raise SubtomoError(f"{source}: {label} {str(name)!r} cannot be used as a file name (outputs are named after "
                           "it). Use a plain name without '/', '\\' or '..'.")
    return text


@dataclass(frozen=True)
class ParticleSet:
    """Particle rows + optics + the project they belong to.

    Attributes
    ----------
    table : pandas.DataFrame
        One row per particle, RELION labels; optics columns are not merged in.
    optics : pandas.DataFrame or None
        The ``data_optics`` block of a RELION 3.1+ file; None for a single-block file.
    project : Path
        Directory that relative paths in the file are resolved against.
    path : Path or None
        The file the set was read from (None for a set made in memory).
    """

    table: pd.DataFrame
    optics: pd.DataFrame | None = None
    project: Path = Path(".")
    path: Path | None = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def read(cls, path: str | Path, project: str | Path | None = None) -> "ParticleSet":
        """Read a particle STAR file (RELION 3.0 single block or 3.1+ optics + particles).

        Parameters
        ----------
        path : str or Path
            The STAR file; relative paths are taken relative to ``project``.
        project : str or Path, optional
            Project directory; default: the current directory.

        Returns
        -------
        ParticleSet

        Raises
        ------
        SubtomoError
            The file is missing, unparsable, has no particle table, or has rows with
            missing fields.
        """
        project = Path(project) if project is not None else Path(".")
        file = resolve_project_path(project, path)
        blocks = read_star(file)
        optics = blocks.get("optics")
        optics = table_of(optics) if optics is not None else None
        if "particles" in blocks:
            table = table_of(blocks["particles"])
        else:
            loops = [k for k, v in blocks.items() if k != "optics" and isinstance(v, pd.DataFrame)]
            if not loops:
                raise SubtomoError(f"{file}: no particle table (a loop_ block) in this STAR file. "
                                   "Give the particles STAR written by extract, select, refine3d or class3d.")
            table = table_of(blocks[loops[0]])
        _check_complete_rows(table, file)
        if optics is not None and "rlnOpticsGroup" in table.columns and "rlnOpticsGroup" in optics.columns:
            missing = set(table["rlnOpticsGroup"].astype(int)) - set(optics["rlnOpticsGroup"].astype(int))
            if missing:
                raise SubtomoError(f"{file}: particles refer to optics group(s) {sorted(missing)} that data_optics "
                                   "does not define. Add them to data_optics or fix rlnOpticsGroup.")
        return cls(upgrade_ctf_column(table).reset_index(drop=True), optics, project, file)

    @classmethod
    def from_table(cls, table: pd.DataFrame, optics: pd.DataFrame | None = None,
                   project: str | Path = Path(".")) -> "ParticleSet":
        """A set made in memory (importers, simulators, tests)."""
        return cls(upgrade_ctf_column(table).reset_index(drop=True), optics, Path(project), None)

    def _replace(self, table: pd.DataFrame) -> "ParticleSet":
        return ParticleSet(table.reset_index(drop=True), self.optics, self.project, self.path)

    # ------------------------------------------------------------------ tables

    def __len__(self) -> int:
        return len(self.table)

    @property
    def name(self) -> str:
        """The file name for messages (or ``<in memory>``)."""
        return str(self.path) if self.path is not None else "<particles in memory>"

    def merged(self) -> pd.DataFrame:
        """Particle rows with the columns of their optics group copied in (row order kept)."""
        if self.optics is None or "rlnOpticsGroup" not in self.table.columns:
            return self.table.copy()
        extra = [c for c in self.optics.columns if c not in self.table.columns or c == "rlnOpticsGroup"]
        merged = self.table.merge(self.optics[extra], on="rlnOpticsGroup", how="left")
        return merged.reset_index(drop=True)

    def column(self, label: str) -> pd.Series:
        """One column, from the rows or (per optics group) from the optics table."""
        if label in self.table.columns:
            return self.table[label]
        merged = self.merged()
        if label not in merged.columns:
            raise SubtomoError(f"{self.name}: no {label} column. {_hint(label)}")
        return merged[label]

    def has(self, *labels: str) -> bool:
        """Whether every label is a column of the rows or of the optics table."""
        cols = set(self.table.columns) | (set(self.optics.columns) if self.optics is not None else set())
        return all(label in cols for label in labels)

    def with_columns(self, **columns: Any) -> "ParticleSet":
        """A copy with columns set (scalars broadcast, arrays of length ``len(self)``)."""
        table = self.table.copy()
        for label, values in columns.items():
            table[label] = values
        return self._replace(table)

    def subset(self, which: Sequence[int] | np.ndarray | pd.Series) -> "ParticleSet":
        """The particles at integer positions, or where a boolean mask is true (order kept)."""
        which = np.asarray(which)
        if which.dtype == bool:
            if len(which) != len(self):
                raise ValueError(f"mask of length {len(which)} for {len(self)} particles")
            return self._replace(self.table[which])
        return self._replace(self.table.iloc[which.astype(int)])

    def write(self, path: str | Path) -> Path:
        """Write atomically as a RELION 3.1 file (``data_optics`` + ``data_particles``)."""
        return write_particles(path, self.table, self.optics)

    # ------------------------------------------------------------------ geometry

    @property
    def pixel_size_A(self) -> float:
        """The pixel size of the particle images [Å]; see :data:`PIXEL_SIZE_RULE`.

        Raises
        ------
        SubtomoError
            No rule gives a pixel size, or particles disagree (mixed pixel sizes must be
            separate sets: rescale first).
        """
        sizes = self.pixel_sizes_A()
        lo, hi = float(np.min(sizes)), float(np.max(sizes))
        if hi - lo > _RELATIVE_TOLERANCE * hi:
            raise SubtomoError(f"{self.name}: particles have different pixel sizes ({lo:.4f} to {hi:.4f} Å). "
                               "Process each pixel size as its own set (or re-extract at one pixel size).")
        return float(sizes[0])

    def pixel_sizes_A(self) -> np.ndarray:
        """Per-particle pixel size [Å], shape (n,), by :data:`PIXEL_SIZE_RULE`."""
        if len(self) == 0:
            raise SubtomoError(f"{self.name}: contains no particles.")
        merged = self.merged()
        for label in ("rlnImagePixelSize", "rlnPixelSize"):
            if label in merged.columns and merged[label].notna().all():
                return merged[label].to_numpy(dtype=np.float64)
        if {"rlnDetectorPixelSize", "rlnMagnification"} <= set(merged.columns):
            return (merged["rlnDetectorPixelSize"].to_numpy(dtype=np.float64) * 1e4
                    / merged["rlnMagnification"].to_numpy(dtype=np.float64))
        if "rlnImageName" in merged.columns:
            first = self.image_refs()[0].path
            if first.exists():
                _, px = read_mrc_header(first)
                if px > 0:
                    return np.full(len(self), float(px))
        raise SubtomoError(f"{self.name}: no pixel size ({PIXEL_SIZE_RULE}). Add rlnImagePixelSize to data_optics.")

    @property
    def box_px(self) -> int | None:
        """Edge length of the particle images [px]: rlnImageSize, else the first image's header."""
        merged = self.merged()
        if "rlnImageSize" in merged.columns and merged["rlnImageSize"].notna().all():
            return int(merged["rlnImageSize"].iloc[0])
        if "rlnImageName" in merged.columns:
            first = self.image_refs()[0].path
            if first.exists():
                shape, _ = read_mrc_header(first)
                return int(shape[-1])
        return None

    def has_angles(self) -> bool:
        """Whether every particle has rlnAngleRot/Tilt/Psi."""
        return all(c in self.table.columns for c in ANGLE_COLUMNS) and bool(
            self.table[list(ANGLE_COLUMNS)].notna().all().all())

    def rotations(self) -> np.ndarray | None:
        """RELION rotation matrices A (particle = reference rotated by A), shape (n, 3, 3) float64.

        None when the file carries no angles.
        """
        if not self.has_angles():
            return None
        return euler_to_matrix(*(self.table[c].to_numpy(dtype=np.float64) for c in ANGLE_COLUMNS))

    def offsets_A(self) -> np.ndarray:
        """Origin offsets (x, y, z) [Å], shape (n, 3); zeros when the file has none."""
        if all(c in self.table.columns for c in ORIGIN_A_COLUMNS):
            return self.table[list(ORIGIN_A_COLUMNS)].to_numpy(dtype=np.float64)
        if all(c in self.table.columns for c in ORIGIN_PX_COLUMNS):
            return self.table[list(ORIGIN_PX_COLUMNS)].to_numpy(dtype=np.float64) * self.pixel_sizes_A()[:, None]
        return np.zeros((len(self), 3))

    def offsets_px(self) -> np.ndarray:
        """Origin offsets (x, y, z) [px], shape (n, 3); zeros when the file has none."""
        if all(c in self.table.columns for c in ORIGIN_A_COLUMNS):
            return self.offsets_A() / self.pixel_sizes_A()[:, None]
        if all(c in self.table.columns for c in ORIGIN_PX_COLUMNS):
            return self.table[list(ORIGIN_PX_COLUMNS)].to_numpy(dtype=np.float64)
        return np.zeros((len(self), 3))

    def with_poses(self, rotations: np.ndarray | None, offsets_px: np.ndarray | None) -> "ParticleSet":
        """A copy with new poses.

        Parameters
        ----------
        rotations : (n, 3, 3) array or None
            RELION matrices A; written as rlnAngleRot/Tilt/Psi [deg]. None keeps the angles.
        offsets_px : (n, 3) array or None
            Origins (x, y, z) [px]; written as rlnOrigin{X,Y,Z}Angst [Å] (legacy pixel
            columns are dropped). None keeps the origins.
        """
        table = self.table.copy()
        if rotations is not None:
            rotations = np.asarray(rotations, dtype=np.float64).reshape(-1, 3, 3)
            _check_length(rotations, len(self), "rotations")
            angles = matrix_to_euler(rotations)
            for j, c in enumerate(ANGLE_COLUMNS):
                table[c] = angles[:, j]
        if offsets_px is not None:
            offsets_px = np.asarray(offsets_px, dtype=np.float64).reshape(-1, 3)
            _check_length(offsets_px, len(self), "offsets")
            offsets_A = offsets_px * self.pixel_sizes_A()[:, None]
            table = table.drop(columns=[c for c in ORIGIN_PX_COLUMNS if c in table.columns])
            for j, c in enumerate(ORIGIN_A_COLUMNS):
                table[c] = offsets_A[:, j]
        return self._replace(table)

    def halves(self) -> np.ndarray | None:
        """Gold-standard half-set of each particle (rlnRandomSubset: 1 or 2), shape (n,); None if absent."""
        if "rlnRandomSubset" not in self.table.columns:
            return None
        return self.table["rlnRandomSubset"].to_numpy().astype(int)

    # ------------------------------------------------------------------ images

    def image_refs(self, column: str = "rlnImageName") -> list[ImageRef]:
        """Parsed ``index@path`` references of a column, paths resolved against the project.

        Raises
        ------
        SubtomoError
            The column is missing, or a relative path leads out of the project (absolute paths
            are taken as written).
        """
        if column not in self.table.columns:
            raise SubtomoError(f"{self.name}: no {column} column. {_hint(column)}")
        refs: list[ImageRef] = []
        resolved: dict[str, Path] = {}
        for row, value in enumerate(self.table[column].astype(str), start=1):
            index, path = parse_image_name(value)
            if path not in resolved:  # relative paths that leave the project are refused (file, row, column named)
                resolved[path] = resolve_project_path(self.project, path, source=self.name, row=row, column=column)
            refs.append(ImageRef(index, resolved[path]))
        return refs

    def check_image_files(self, column: str = "rlnImageName") -> None:
        """Refuse missing, truncated or mismatched image files before anything is computed.

        Each file's header is read once: it must exist and hold its data (not truncated);
        single-image files must all have the box of the first one, and a stack index
        (``k@stack.mrcs``) must lie inside its stack.

        Parameters
        ----------
        column : str
            The column of image references (``rlnImageName``).

        Raises
        ------
        SubtomoError
            Naming the particle file, the row, the column and the image file.
        """
        first_row: dict[Path, int] = {}
        top_index: dict[Path, tuple[int, int]] = {}  # file -> (largest stack index, its row)
        for row, ref in enumerate(self.image_refs(column), start=1):
            first_row.setdefault(ref.path, row)
            if ref.index is not None and ref.index > top_index.get(ref.path, (0, 0))[0]:
                top_index[ref.path] = (ref.index, row)
        box: tuple[tuple[int, ...], Path] | None = None
        for path, row in first_row.items():
            where = f"{self.name}: row {row}, {column}"
            if not path.is_file():
                raise SubtomoError(f"{where}: {path} not found. Run the job that writes it again, or fix the path.")
            shape, _ = read_mrc_header(path)  # names the file if it is damaged or truncated
            if path in top_index and top_index[path][0] > shape[0]:
                index, at = top_index[path]
                raise SubtomoError(f"{self.name}: row {at}, {column}: image {index} of {path}, which holds {shape[0]}. "
                                   "The stack is incomplete or the STAR file belongs to another stack.")
            if path not in top_index:
                if box is not None and tuple(shape) != box[0]:
                    raise SubtomoError(f"{where}: {path} is {' x '.join(map(str, shape[::-1]))} px, {box[1]} is "
                                       f"{' x '.join(map(str, box[0][::-1]))} px; a particle set has one box size. "
                                       "Extract all particles with the same --box.")
                box = box or (tuple(shape), path)

    def has_ctf(self) -> bool:
        """Whether the particles name 3D CTFs (RELION volumes in ``rlnCtfImage`` or compact ``subtomoCtfModel``)."""
        return CTF_VOLUME in self.table.columns or CTF_MODEL in self.table.columns

    def ctf_refs(self) -> list[ImageRef]:
        """Each particle's 3D CTF: a RELION volume (index None) or a compact model (index = rlnTomoParticleId).

        A row's ``rlnCtfImage`` volume wins over its ``subtomoCtfModel`` (it is what RELION
        uses for the same particle); a compact value left in ``rlnCtfImage`` by an older
        version is read as a compact model.

        Returns
        -------
        list of ImageRef
            One per particle, paths resolved against the project.

        Raises
        ------
        SubtomoError
            No CTF column, a row without either reference, or a path that leaves the project.
        """
        if not self.has_ctf():
            raise SubtomoError(f"{self.name}: no {CTF_VOLUME} or {CTF_MODEL} column (no 3D CTF models). Run subtomo "
                               "prepare (Step 9) and extract from its particles_subtomo.star.")
        table = self.table
        volume = table[CTF_VOLUME].astype(str).tolist() if CTF_VOLUME in table.columns else [""] * len(self)
        model = table[CTF_MODEL].astype(str).tolist() if CTF_MODEL in table.columns else [""] * len(self)
        refs: list[ImageRef] = []
        resolved: dict[str, Path] = {}
        for row, (vol, mod) in enumerate(zip(volume, model), start=1):
            use_volume = vol.strip() not in ("", "nan", "None") and (not is_compact_ctf_ref(vol) or not mod.strip())
            column, value = (CTF_VOLUME, vol) if use_volume else (CTF_MODEL, mod)
            if value.strip() in ("", "nan", "None"):
                raise SubtomoError(f"{self.name}: row {row} has no 3D CTF ({CTF_VOLUME} or {CTF_MODEL}). Extract from "
                                   "subtomo prepare's particles_subtomo.star, or remove the row.")
            index, path = parse_image_name(value)
            if path not in resolved:
                resolved[path] = resolve_project_path(self.project, path, source=self.name, row=row, column=column)
            refs.append(ImageRef(index, resolved[path]))
        return refs

    def image_paths(self, column: str = "rlnImageName") -> list[Path]:
        """Resolved file of each particle's image (the stack index dropped)."""
        return [ref.path for ref in self.image_refs(column)]


def read_particles(path: str | Path, project: str | Path | None = None) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Read a particle STAR as plain tables (for scripts and tests; jobs keep the :class:`ParticleSet`).

    Parameters
    ----------
    path : str or Path
        Particle STAR file (RELION 3.0 or 3.1+).
    project : str or Path, optional
        Directory relative paths are resolved against.

    Returns
    -------
    particles : pandas.DataFrame
        One row per particle with its optics group's columns copied in.
    optics : pandas.DataFrame or None
        The optics block, None for a single-block file.
    """
    particle_set = ParticleSet.read(path, project)
    return particle_set.merged(), particle_set.optics


def _check_complete_rows(table: pd.DataFrame, file: Path) -> None:
    """Refuse rows with missing fields (a damaged or truncated line reads as NaN)."""
    if table.empty:
        return
    filled = table.notna()
    partial = table.columns[filled.any(axis=0)]  # columns that some rows have
    broken = ~filled[partial].all(axis=1)
    if broken.any():
        rows = np.flatnonzero(broken.to_numpy())
        cols = [c for c in partial if table[c].isna().iloc[rows[0]]]
        shown = ", ".join(str(r + 1) for r in rows[:5]) + (" ..." if len(rows) > 5 else "")
        raise SubtomoError(f"{file}: {len(rows)} particle row(s) have missing fields (row {shown}; first one lacks "
                           f"{', '.join(cols[:4])}). The file is damaged or truncated: regenerate it with the job "
                           "that wrote it, or remove those rows.")


def _check_length(values: np.ndarray, n: int, what: str) -> None:
    if len(values) != n:
        raise ValueError(f"{len(values)} {what} for {n} particles")


def _hint(label: str) -> str:
    if label in ("rlnImageName", CTF_VOLUME, CTF_MODEL):
        return "Run subtomo extract first (it writes the subtomograms and rlnImageName)."
    return "Check that this is the particles STAR file of the right job."
