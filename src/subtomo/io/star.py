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
    """Read every block of a STAR file as {block name: DataFrame or dict}."""
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
    """A STAR block as a DataFrame: starfile returns a dict for a block of single values."""
    if isinstance(block, pd.DataFrame):
        return block.reset_index(drop=True)
    return pd.DataFrame([block])


def read_star_table(path: str | Path, block: str | None = None) -> pd.DataFrame:
    """Read one loop block as a DataFrame.

    With ``block=None`` the particle-like block is chosen: ``particles`` if present,
    else the only block, else the first loop that is not ``optics``.
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


def read_particles(path: str | Path) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Read a particle STAR: (particles with optics columns merged in, optics table or None).

    Works for 3.0-style single-block files (optics None) and 3.1+ files; optics columns
    missing from the particle rows are copied in by ``rlnOpticsGroup``.
    """
    blocks = read_star(path)
    optics = blocks.get("optics")
    particles = read_star_table(path)
    if isinstance(optics, pd.DataFrame) and "rlnOpticsGroup" in particles.columns:
        extra = [c for c in optics.columns if c not in particles.columns or c == "rlnOpticsGroup"]
        particles = particles.merge(optics[extra], on="rlnOpticsGroup", how="left")
    return particles, optics if isinstance(optics, pd.DataFrame) else None


def write_star(path: str | Path, blocks: Mapping[str, pd.DataFrame | dict] | pd.DataFrame) -> Path:
    """Write blocks atomically; a single DataFrame becomes one block named ``data_``."""
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
