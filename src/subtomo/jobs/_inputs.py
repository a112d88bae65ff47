"""Map and mask inputs shared by several jobs (one reader, one set of checks and messages).

A reference map, a solvent mask or a focus mask given on the command line must match the
particles' (or the half maps') box and pixel size; these helpers read it, check it and say
which option was wrong and how to fix it. Jobs never import each other; what they share
about inputs lives here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from subtomo.errors import SubtomoError
from subtomo.io.mrc import read_mrc
from subtomo.io.particles import resolve_project_path

_PIXEL_TOLERANCE = 0.01  # relative pixel-size mismatch accepted between a map and the particles


def _read(path: str | Path, project: Path, option: str) -> tuple[np.ndarray, float, Path]:
    file = resolve_project_path(project, path)
    if not file.exists():
        raise SubtomoError(f"{option} {path}: file not found (looked for {file}). Check the path; relative paths are "
                           "taken from the project directory.")
    arr, px = read_mrc(file)
    return arr, float(px), file


def load_map(path: str | Path, project: Path, box: int, pixel_size_A: float | None, option: str) -> torch.Tensor:
    """A cubic map of edge ``box`` px whose header pixel size matches ``pixel_size_A`` (1 %).

    Returns a float32 tensor (box, box, box) on the CPU.
    """
    arr, px, file = _read(path, project, option)
    if arr.shape != (box,) * 3:
        raise SubtomoError(f"{option} {file}: box {arr.shape} differs from the particles' {box}^3. Resample the map to "
                           "the particle box and pixel size first.")
    if pixel_size_A and px > 0 and abs(px - pixel_size_A) > _PIXEL_TOLERANCE * pixel_size_A:
        raise SubtomoError(f"{option} {file}: pixel size {px:.3f} Å differs from the particles' {pixel_size_A:.3f} Å. "
                           "Resample the map to the particles' pixel size first.")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


def load_mask(path: str | Path, project: Path, shape: tuple[int, ...], option: str,
              pixel_size_A: float | None = None) -> torch.Tensor:
    """A mask of the given shape with values clipped to 0..1 (float32 tensor on the CPU).

    An all-zero mask is refused: it would remove everything it is applied to.
    """
    arr, px, file = _read(path, project, option)
    if tuple(arr.shape) != tuple(shape):
        raise SubtomoError(f"{option} {file}: mask is {tuple(arr.shape)}, the maps are {tuple(shape)}. Make the mask "
                           "on the same box (subtomo mask --ref <map>).")
    if pixel_size_A and px > 0 and abs(px - pixel_size_A) > _PIXEL_TOLERANCE * pixel_size_A:
        raise SubtomoError(f"{option} {file}: pixel size {px:.3f} Å differs from the maps' {pixel_size_A:.3f} Å. "
                           "Make the mask at the maps' pixel size.")
    mask = np.clip(np.ascontiguousarray(arr, dtype=np.float32), 0.0, 1.0)
    if not mask.any():
        raise SubtomoError(f"{option} {file}: the mask is all black (zero everywhere). Check the threshold it was made with.")
    return torch.from_numpy(mask)
