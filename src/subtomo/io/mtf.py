"""Detector MTF curves in RELION's STAR format (one reader for postprocessing and the simulator).

A RELION MTF file holds one loop with ``rlnResolutionInversePixel`` (spatial frequency in
cycles per *detector* pixel, 0..0.5) and ``rlnMtfValue`` (the MTF there).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from subtomo.errors import SubtomoError
from subtomo.io.star import read_star

MTF_COLUMNS = ("rlnResolutionInversePixel", "rlnMtfValue")


def read_mtf(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a RELION MTF STAR file.

    Parameters
    ----------
    path : str or Path
        The MTF STAR file (e.g. ``mtf_k3_standard_300kV_FL2.star``).

    Returns
    -------
    frequency : numpy.ndarray
        (n,) float64, cycles per detector pixel, increasing.
    mtf : numpy.ndarray
        (n,) float64, the MTF at those frequencies.

    Raises
    ------
    SubtomoError
        No loop with both columns, fewer than 2 points, or no positive value.
    """
    blocks = read_star(path)
    tables = [t for t in blocks.values() if isinstance(t, pd.DataFrame)]
    table = next((t for t in tables if set(MTF_COLUMNS) <= set(t.columns)), None)
    if table is None:
        raise SubtomoError(f"{path}: not an MTF STAR file (needs columns rlnResolutionInversePixel and rlnMtfValue). "
                           "Use a detector MTF curve as distributed for RELION.")
    x = table["rlnResolutionInversePixel"].to_numpy(float)
    y = table["rlnMtfValue"].to_numpy(float)
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    if len(x) < 2 or not np.all(np.isfinite(y)) or (y <= 0).all():
        raise SubtomoError(f"{path}: MTF curve has fewer than 2 points or no positive value. "
                           "Give the detector's MTF file as distributed for RELION.")
    return x, y
