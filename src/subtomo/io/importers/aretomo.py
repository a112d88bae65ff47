"""AreTomo / AreTomo2 / AreTomo3 alignment files (``.aln``).

Conventions of AreTomo (Zheng et al. 2022; the ``.aln`` it writes with ``-OutImod`` or
by default):

* Comment lines start with ``#``: ``# RawSize = nx ny nimages``, ``# NumPatches = k``,
  ``# DarkFrame = i j angle`` (images AreTomo excluded), ``# AlphaOffset = a``,
  ``# BetaOffset = b``, then the column header
  ``# SEC ROT GMAG TX TY SMEAN SFIT SCALE BASE TILT``.
* One row per image kept: ``SEC`` (0-based index in the raw stack), ``ROT`` (tilt-axis
  angle [deg], counter-clockwise from the image y axis), ``GMAG`` (magnification),
  ``TX TY`` (shift of the image [px of the raw stack] that centres it),
  ``SMEAN SFIT SCALE BASE`` (statistics), ``TILT`` (the refined tilt angle [deg],
  alpha offset included).
* With patch tracking (``# NumPatches = k`` > 0) a ``# Local Alignment`` section follows:
  one row per image and patch, ``SEC PATCH X Y SX SY GOOD`` (the patch centre and its extra
  shift [px], ``GOOD`` 1/0). It is counted, not applied: subtomo's geometry is the global
  single-axis one, so the importer warns that the local shifts are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from subtomo.errors import SubtomoError

FIX = "Give the .aln file AreTomo wrote for this tilt series."


@dataclass(frozen=True)
class AreTomoAlignment:
    """One AreTomo global alignment.

    Attributes
    ----------
    sections : numpy.ndarray
        0-based raw-stack index of each kept image, shape (n,).
    rotation_deg : numpy.ndarray
        Tilt-axis angle of each image [deg], shape (n,).
    shifts_px : numpy.ndarray
        (TX, TY) of each image [px of the raw stack], shape (n, 2).
    tilts_deg : numpy.ndarray
        Refined tilt angle of each image [deg], shape (n,).
    magnification : numpy.ndarray
        GMAG per image, shape (n,).
    raw_size : tuple of int or None
        (nx, ny, nimages) of the raw stack.
    dark_sections : list of int
        Raw-stack indices AreTomo excluded.
    alpha_offset_deg : float
        ``AlphaOffset`` [deg].
    num_patches : int
        ``NumPatches`` (0: no local alignment).
    local_rows : int
        Rows of the ``# Local Alignment`` section (not applied).
    """

    sections: np.ndarray
    rotation_deg: np.ndarray
    shifts_px: np.ndarray
    tilts_deg: np.ndarray
    magnification: np.ndarray
    raw_size: tuple[int, int, int] | None
    dark_sections: list[int]
    alpha_offset_deg: float
    num_patches: int = 0
    local_rows: int = 0


def read_aln(path: str | Path) -> AreTomoAlignment:
    """Read the global alignment of an AreTomo ``.aln``.

    Parameters
    ----------
    path : str or Path
        The ``.aln`` file.

    Returns
    -------
    AreTomoAlignment
    """
    path = Path(path)
    if not path.is_file():
        raise SubtomoError(f"{path}: file not found. {FIX}")
    rows: list[list[float]] = []
    raw_size, dark, alpha, patches, local = None, [], 0.0, 0, -1
    for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        text = line.strip()
        if not text:
            continue
        if local >= 0:  # rows of the local alignment: counted only
            local += 0 if text.startswith("#") else 1
            continue
        if text.startswith("#"):
            key, _, value = text[1:].partition("=")
            key = key.strip()
            if key.startswith("Local Alignment"):
                local = 0
            elif key == "NumPatches":
                patches = int(float(value))
            elif key == "RawSize":
                raw_size = tuple(int(v) for v in value.split()[:3])
            elif key == "DarkFrame":
                dark.append(int(value.split()[0]))
            elif key == "AlphaOffset":
                alpha = float(value)
            continue
        try:
            values = [float(v) for v in text.split()]
        except ValueError:
            raise SubtomoError(f"{path}:{lineno}: cannot read {text[:60]!r} as an alignment row. {FIX}") from None
        if len(values) < 10:
            raise SubtomoError(f"{path}:{lineno}: {len(values)} numbers; a row has 10 (SEC ROT GMAG TX TY SMEAN SFIT "
                               f"SCALE BASE TILT). {FIX}")
        rows.append(values[:10])
    if not rows:
        raise SubtomoError(f"{path}: no alignment rows. {FIX}")
    t = np.asarray(rows)
    return AreTomoAlignment(sections=t[:, 0].astype(int), rotation_deg=t[:, 1], shifts_px=t[:, 3:5], tilts_deg=t[:, 9],
                            magnification=t[:, 2], raw_size=raw_size,  # type: ignore[arg-type]
                            dark_sections=dark, alpha_offset_deg=alpha, num_patches=patches, local_rows=max(local, 0))
