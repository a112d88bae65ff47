"""OME-Zarr tomograms (CryoET Data Portal, NGFF 0.4), read lazily chunk by chunk.

Conventions of OME-NGFF 0.4 (the Data Portal writes tomograms this way):

* A ``.zarr`` directory: a group whose attributes hold ``multiscales[0]`` with ``axes``
  (``z``, ``y``, ``x``, each with a ``unit``: ``angstrom`` or ``nanometer``) and
  ``datasets``: one array per resolution level (``path`` ``"0"``, ``"1"``, ...) with a
  ``scale`` coordinate transformation = the voxel size of that level along (z, y, x).
* Arrays are (z, y, x), the same order and origin as our MRC tomograms; level 0 is full
  resolution, each further level usually binned by 2.

:func:`open_ome_zarr` chooses the level whose voxel size matches a requested pixel size
(default: level 0) and returns an object used like an ``mrcfile`` memory map (``.data``
sliced lazily, ``.voxel_size.x``, ``close()``, a context manager). Reading needs the
``zarr`` package (``pip install zarr``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from subtomo.errors import SubtomoError

UNIT_TO_A = {"angstrom": 1.0, "nanometer": 10.0, "micrometer": 1e4}


@dataclass(frozen=True)
class VoxelSize:
    """Voxel size [Å] along x, y, z (the attribute names of ``mrcfile``'s voxel_size)."""

    x: float
    y: float
    z: float


def _zarr() -> Any:
    try:
        import zarr
    except ImportError:
        raise SubtomoError("Reading OME-Zarr tomograms needs the zarr package: pip install zarr "
                           "(or convert the tomogram to MRC).") from None
    return zarr


def _attrs(path: Path) -> dict:
    for name in (".zattrs", "zarr.json"):
        f = path / name
        if f.is_file():
            data = json.loads(f.read_text())
            return data.get("attributes", data).get("ome", data.get("attributes", data))
    raise SubtomoError(f"{path}: not an OME-Zarr group (no .zattrs or zarr.json). Give the tomogram's .zarr directory.")


def ome_zarr_levels(path: str | Path) -> list[tuple[str, float]]:
    """The resolution levels of an OME-Zarr image.

    Parameters
    ----------
    path : str or Path
        The ``.zarr`` directory.

    Returns
    -------
    list of (str, float)
        (array path inside the group, voxel size along x [Å]) per level, finest first.
    """
    path = Path(path)
    attrs = _attrs(path)
    try:
        ms = attrs["multiscales"][0]
        axes = [a["name"] if isinstance(a, dict) else a for a in ms["axes"]]
        units = [a.get("unit", "angstrom") if isinstance(a, dict) else "angstrom" for a in ms["axes"]]
        ix = axes.index("x")
        levels = []
        for ds in ms["datasets"]:
            scale = next(t["scale"] for t in ds["coordinateTransformations"] if t["type"] == "scale")
            levels.append((str(ds["path"]), float(scale[ix]) * UNIT_TO_A.get(units[ix], 1.0)))
    except (KeyError, IndexError, ValueError, StopIteration, TypeError) as exc:
        raise SubtomoError(f"{path}: damaged OME-Zarr multiscales metadata ({exc!r}). Give an OME-NGFF 0.4 image.") from None
    return sorted(levels, key=lambda lv: lv[1])


class OmeZarrTomogram:
    """One level of an OME-Zarr tomogram, used like an ``mrcfile`` memory map.

    Attributes
    ----------
    data : zarr.Array
        (z, y, x); slicing reads only the chunks it touches.
    voxel_size : VoxelSize
        Pixel size of the level [Å].
    path : Path
        The ``.zarr`` directory.
    level : str
        The array path of the level.
    """

    def __init__(self, path: Path, level: str, pixel_size_A: float) -> None:
        zarr = _zarr()
        self.path, self.level = path, level
        try:
            self.data = zarr.open_group(str(path), mode="r")[level]
        except Exception as exc:  # zarr raises several types for missing or damaged stores
            raise SubtomoError(f"{path}: cannot open level {level} ({exc}). Give a complete OME-Zarr image.") from None
        if self.data.ndim != 3:
            raise SubtomoError(f"{path}: level {level} has shape {self.data.shape}, not a 3D tomogram.")
        self.voxel_size = VoxelSize(pixel_size_A, pixel_size_A, pixel_size_A)

    def close(self) -> None:
        """Nothing to release (chunks are read on demand)."""

    def __enter__(self) -> "OmeZarrTomogram":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_ome_zarr(path: str | Path, pixel_size_A: float | None = None) -> OmeZarrTomogram:
    """Open one level of an OME-Zarr tomogram lazily.

    Parameters
    ----------
    path : str or Path
        The ``.zarr`` directory.
    pixel_size_A : float, optional
        Wanted pixel size [Å]: the level within 0.1 % of it; default the finest level.

    Returns
    -------
    OmeZarrTomogram
    """
    path = Path(path)
    if not path.is_dir():
        raise SubtomoError(f"{path}: not found. Give the tomogram's .zarr directory.")
    levels = ome_zarr_levels(path)
    if pixel_size_A is None:
        level, px = levels[0]
    else:
        close = [lv for lv in levels if abs(lv[1] - pixel_size_A) <= 1e-3 * pixel_size_A]
        if not close:
            raise SubtomoError(f"{path}: no level at {pixel_size_A} A (levels: "
                               f"{', '.join(f'{p:.3f}' for _, p in levels)} A). Give one of these pixel sizes.")
        level, px = close[0]
    return OmeZarrTomogram(path, level, px)


def write_ome_zarr(path: str | Path, volume: np.ndarray, pixel_size_A: float, levels: int = 1,
                   chunks: int = 64) -> Path:
    """Write a tomogram as OME-Zarr (NGFF 0.4, zarr format 2), levels binned by 2.

    Parameters
    ----------
    path : str or Path
        The ``.zarr`` directory to create.
    volume : numpy.ndarray
        (z, y, x) float32 tomogram.
    pixel_size_A : float
        Its pixel size [Å].
    levels : int
        Number of levels (each the previous one averaged in 2 × 2 × 2 blocks).
    chunks : int
        Chunk edge [voxels].

    Returns
    -------
    Path
    """
    zarr = _zarr()
    path = Path(path)
    group = zarr.open_group(str(path), mode="w-", zarr_format=2)
    datasets, level = [], np.asarray(volume, dtype=np.float32)
    for i in range(levels):
        arr = group.create_array(str(i), shape=level.shape, dtype="float32", chunks=(chunks,) * 3)
        arr[...] = level
        s = pixel_size_A * 2 ** i
        datasets.append({"path": str(i), "coordinateTransformations": [{"type": "scale", "scale": [s, s, s]}]})
        nz, ny, nx = (n // 2 * 2 for n in level.shape)
        level = level[:nz, :ny, :nx].reshape(nz // 2, 2, ny // 2, 2, nx // 2, 2).mean(axis=(1, 3, 5))
    group.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": a, "type": "space", "unit": "angstrom"}
                                                              for a in "zyx"], "datasets": datasets}]
    return path
