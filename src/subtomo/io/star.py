"""STAR files with RELION labels, through ``starfile``.

Reading accepts RELION 3.0-style single-block files and 3.1+ files with an optics
block. Writing is atomic and always uses an explicit float format (starfile's default
``%.6f`` would write 1e-9 as 0). DataFrame columns keep RELION's full label names
(``rlnCoordinateX``), exactly as ``starfile`` reads them.
"""

from __future__ import annotations

import gzip
import os
import tempfile
from pathlib import Path
from typing import Mapping

import pandas as pd
import starfile

from subtomo.errors import SubtomoError

FLOAT_FORMAT = "%.8g"


def read_star(path: str | Path) -> dict[str, pd.DataFrame | dict]:
    """Read every block of a STAR file.

    Parameters
    ----------
    path : str or Path
        The STAR file; a ``.gz`` file is decompressed first.

    Returns
    -------
    dict
        {block name without ``data_`` (``"optics"``, ``"particles"``, ``""``): DataFrame for a loop
        block (columns = full RELION labels) or dict for a block of single values}, in file order.

    Raises
    ------
    SubtomoError
        The file is missing or cannot be parsed.
    """
    path = Path(path)
    if not path.exists():
        raise SubtomoError(f"{path}: STAR file not found. Check the path, or run the job that writes it.")
    try:
        if path.suffix == ".gz":
            blocks = _read_gzipped(path)
        else:
            blocks = starfile.read(path, always_dict=True)
    except Exception as exc:  # starfile raises a variety of parser errors
        raise SubtomoError(f"{path}: cannot parse as a STAR file ({exc}). Check the file with a text editor.") from exc
    return dict(blocks)


def _read_gzipped(path: Path) -> dict:
    """Decompress to a temporary file first (starfile reads plain text only)."""
    with gzip.open(path, "rt") as src, tempfile.NamedTemporaryFile("w", suffix=".star", delete=False) as dst:
        dst.write(src.read())
    try:
        return starfile.read(dst.name, always_dict=True)
    finally:
        os.unlink(dst.name)


def table_of(block: pd.DataFrame | dict) -> pd.DataFrame:
    """A STAR block as a DataFrame: starfile returns a dict for a block of single values.

    Parameters
    ----------
    block : pandas.DataFrame or dict
        A value of :func:`read_star`'s result.

    Returns
    -------
    pandas.DataFrame
        The loop with a fresh 0..n-1 index, or one row holding the dict's values.
    """
    if isinstance(block, pd.DataFrame):
        return block.reset_index(drop=True)
    return pd.DataFrame([block])


def read_star_table(path: str | Path, block: str | None = None) -> pd.DataFrame:
    """Read one loop block as a DataFrame.

    Parameters
    ----------
    path : str or Path
        The STAR file.
    block : str, optional
        Block name without ``data_``. With ``block=None`` the particle-like block is chosen:
        ``particles`` if present, else the only block, else the first loop that is not ``optics``.

    Returns
    -------
    pandas.DataFrame
        The block (:func:`table_of`: fresh index; a single-value block becomes one row).

    Raises
    ------
    SubtomoError
        The file is missing or unparsable, the named block is absent, or (``block=None``) the file
        has no loop block other than ``optics``.
    """
    blocks = read_star(path)
    if block is not None:
        if block not in blocks:
            raise SubtomoError(f"{path}: has no data_{block} block (blocks: {', '.join(blocks) or 'none'}).")
        table = blocks[block]
    elif "particles" in blocks:
        table = blocks["particles"]
    else:
        loops = [(k, v) for k, v in blocks.items() if isinstance(v, pd.DataFrame) and k != "optics"]
        if not loops:
            raise SubtomoError(f"{path}: contains no table (loop_) block.")
        table = loops[0][1]
    return table_of(table)


def write_star(path: str | Path, blocks: Mapping[str, pd.DataFrame | dict] | pd.DataFrame) -> Path:
    """Write blocks atomically; a single DataFrame becomes one block named ``data_``.

    Floats are written with ``%.8g`` (:data:`FLOAT_FORMAT`); missing parent directories are created.

    Parameters
    ----------
    path : str or Path
        Output STAR file; an existing file is replaced.
    blocks : Mapping or pandas.DataFrame
        {block name without ``data_``: DataFrame (a loop) or dict (single values)}, written in
        order, or one DataFrame.

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(blocks, pd.DataFrame):
        blocks = {"": blocks}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        starfile.write(dict(blocks), tmp, float_format=FLOAT_FORMAT, overwrite=True)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


OPTICS_COLUMNS = (
    "rlnOpticsGroupName",
    "rlnVoltage",
    "rlnSphericalAberration",
    "rlnAmplitudeContrast",
    "rlnImagePixelSize",
    "rlnImageSize",
    "rlnImageDimensionality",
)


def write_particles(path: str | Path, particles: pd.DataFrame, optics: pd.DataFrame | None = None) -> Path:
    """Write a RELION 3.1+ particle STAR (``data_optics`` + ``data_particles``).

    Optics columns present in ``particles`` are moved into the optics block (one row per
    ``rlnOpticsGroup``); with neither optics nor optics columns, a single-block file is
    written.

    Parameters
    ----------
    path : str or Path
        Output STAR file (written atomically by :func:`write_star`).
    particles : pandas.DataFrame
        One row per particle, RELION labels; without an ``rlnOpticsGroup`` column every row gets group 1
        (unless a single-block file is written).
    optics : pandas.DataFrame, optional
        The optics table; default: built from the :data:`OPTICS_COLUMNS` found in ``particles``
        (first row of each group). ``rlnOpticsGroupName`` is added (``opticsGroup<n>``) if missing.

    Returns
    -------
    Path
        ``path``.
    """
    particles = particles.reset_index(drop=True).copy()
    if optics is None:
        cols = [c for c in OPTICS_COLUMNS if c in particles.columns]
        if not cols:
            return write_star(path, {"particles": particles})
        if "rlnOpticsGroup" not in particles.columns:
            particles["rlnOpticsGroup"] = 1
        optics = particles[["rlnOpticsGroup", *cols]].drop_duplicates("rlnOpticsGroup").reset_index(drop=True)
    if "rlnOpticsGroup" not in particles.columns:
        particles["rlnOpticsGroup"] = 1
    if "rlnOpticsGroupName" not in optics.columns:
        optics = optics.copy()
        optics.insert(0, "rlnOpticsGroupName", [f"opticsGroup{int(g)}" for g in optics["rlnOpticsGroup"]])
    drop = [c for c in optics.columns if c in particles.columns and c != "rlnOpticsGroup"]
    particles = particles.drop(columns=drop)
    return write_star(path, {"optics": optics, "particles": particles})
