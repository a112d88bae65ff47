"""Cutting subtomograms out of memory-mapped tomograms (protocol Steps 13-14).

Box placement (docs/conventions.md): a particle at coordinate ``c`` (pixels; voxel
``[z, y, x]`` is coordinate ``(x, y, z)``) is cut so that voxel ``floor(c)`` lands at box
index ``N//2``; the box spans ``floor(c) − N//2 … floor(c) + N//2 − 1``. The particle centre
therefore sits at box index ``N//2 + frac`` with ``frac = c − floor(c)``; in RELION's
meaning (centre = box centre − origin) the origin is ``−frac`` pixels, written as
``rlnOriginX/Y/ZAngst = −frac · pixel size``.

Only the box's slab of the tomogram is read, through a read-only memory map whose pages
are released after every box (``madvise(MADV_DONTNEED)``), so resident memory stays at a
few boxes whatever the tomogram size. Voxels of a box outside the tomogram are filled with
Gaussian noise of the box's background statistics and the box is flagged.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from subtomo.errors import SubtomoError
from subtomo.fourier import fourier_resize
from subtomo.io.mrc import open_tomogram, write_mrc


def box_start(coord_px: np.ndarray, box: int) -> tuple[np.ndarray, np.ndarray]:
    """First voxel of the box around a coordinate, and the coordinate's fractional part.

    Parameters
    ----------
    coord_px : numpy.ndarray
        (3,) coordinate (x, y, z) [px].
    box : int
        Box edge [px].

    Returns
    -------
    start : numpy.ndarray
        (3,) int64 first voxel index (x, y, z): floor(c) − box//2.
    frac : numpy.ndarray
        (3,) float64 ``c − floor(c)`` [px].
    """
    c = np.asarray(coord_px, dtype=np.float64)
    fl = np.floor(c)
    return fl.astype(np.int64) - box // 2, c - fl


def origin_angst(frac_xyz: np.ndarray, pixel_size_A: float) -> np.ndarray:
    """``rlnOriginX/Y/ZAngst`` of a box cut at floor(c): ``−frac · pixel`` (RELION: centre = box centre − origin).

    Parameters
    ----------
    frac_xyz : numpy.ndarray
        (3,) fractional part of the coordinate [px].
    pixel_size_A : float
        Pixel size [Å].

    Returns
    -------
    numpy.ndarray
        (3,) origin [Å].
    """
    return -np.asarray(frac_xyz, dtype=np.float64) * float(pixel_size_A)


def outside_sphere_mask(box: int, radius_px: float, ndim: int = 3) -> np.ndarray:
    """True for voxels farther than ``radius_px`` from the box centre N//2 (the background).

    Parameters
    ----------
    box : int
        Box edge N [px].
    radius_px : float
        Sphere radius [px].
    ndim : int
        2 or 3.

    Returns
    -------
    numpy.ndarray
        (N,)*ndim bool.
    """
    ax = np.arange(box, dtype=np.float64) - box // 2
    grids = np.meshgrid(*([ax] * ndim), indexing="ij")
    return np.asarray(sum(g * g for g in grids) > radius_px * radius_px, dtype=bool)


def read_box(data: np.ndarray, start_xyz: np.ndarray, box: int, release=None,
             planes_per_read: int | None = None) -> tuple[np.ndarray, tuple[slice, slice, slice] | None]:
    """Copy the box starting at voxel ``start_xyz`` out of a (z, y, x) array (memmap).

    With ``release`` (a callable) the box is read ``planes_per_read`` z-planes at a time and
    ``release()`` is called after each, bounding the memory mapped at any moment.

    Parameters
    ----------
    data : numpy.ndarray
        (Z, Y, X) tomogram.
    start_xyz : numpy.ndarray
        (3,) first voxel (x, y, z).
    box : int
        Box edge N [px].
    release : callable, optional
        Drops mapped pages.
    planes_per_read : int, optional
        z-planes per read.

    Returns
    -------
    tuple
        (box (N, N, N) float32 with zeros outside the tomogram, the slices of the box that
        hold tomogram data — None when the whole box is inside).
    """
    shape_zyx = data.shape
    start_zyx = [int(start_xyz[2]), int(start_xyz[1]), int(start_xyz[0])]
    src, dst = [], []
    inside = True
    for s, n in zip(start_zyx, shape_zyx):
        lo, hi = max(s, 0), min(s + box, n)
        if lo >= hi:
            return np.zeros((box,) * 3, dtype=np.float32), (slice(0, 0),) * 3
        inside &= lo == s and hi == s + box
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out = np.zeros((box,) * 3, dtype=np.float32) if not inside else np.empty((box,) * 3, dtype=np.float32)
    step = planes_per_read or (src[0].stop - src[0].start)
    for z in range(src[0].start, src[0].stop, step):
        z1 = min(z + step, src[0].stop)
        oz = z - src[0].start + dst[0].start
        out[oz:oz + z1 - z, dst[1], dst[2]] = data[z:z1, src[1], src[2]]
        if release is not None:
            release()
    return out, (None if inside else (dst[0], dst[1], dst[2]))


def fill_outside(vol: np.ndarray, valid: tuple[slice, slice, slice], background: np.ndarray,
                 rng: np.random.Generator) -> tuple[float, float]:
    """Fill voxels outside ``valid`` with noise of the background statistics (in place).

    The statistics are those of the valid voxels in ``background`` (or of all valid voxels
    when fewer than 100 background voxels are inside the tomogram).

    Parameters
    ----------
    vol : numpy.ndarray
        (N, N, N) box.
    valid : tuple of slice
        The part of the box inside the tomogram.
    background : numpy.ndarray
        (N, N, N) bool background mask.
    rng : numpy.random.Generator
        Noise source.

    Returns
    -------
    tuple of float
        (mean, std) used.
    """
    inside = np.zeros(vol.shape, dtype=bool)
    inside[valid] = True
    sel = inside & background
    if sel.sum() < 100:
        sel = inside
    if sel.any():
        mean, std = float(vol[sel].mean()), float(vol[sel].std())
    else:
        mean, std = 0.0, 1.0
    missing = ~inside
    vol[missing] = rng.normal(mean, std if std > 0 else 1.0, size=int(missing.sum())).astype(np.float32)
    return mean, std


def normalise(vol: np.ndarray, background: np.ndarray) -> np.ndarray:
    """(vol − mean) / std with the mean and std of the background voxels (RELION's normalisation).

    Parameters
    ----------
    vol : numpy.ndarray
        Box (any shape).
    background : numpy.ndarray
        Bool mask of the same shape.

    Returns
    -------
    numpy.ndarray
        Normalised float32 box.
    """
    bg = vol[background].astype(np.float64)
    mean, std = bg.mean(), bg.std()
    if not np.isfinite(std) or std <= 0:
        std = 1.0
    return ((vol - mean) / std).astype(np.float32)


def rescale(vol: np.ndarray, new_box: int, device=None) -> np.ndarray:
    """Fourier crop/pad a cubic box to ``new_box`` (the pixel size changes by old/new).

    Parameters
    ----------
    vol : numpy.ndarray
        (N, N, N) box.
    new_box : int
        New edge [px].
    device : torch.device or str, optional
        Where to compute.

    Returns
    -------
    numpy.ndarray
        (new_box,)*3 float32.
    """
    if new_box == vol.shape[-1]:
        return vol
    t = torch.from_numpy(np.ascontiguousarray(vol)).to(device or "cpu")
    return fourier_resize(t, new_box).cpu().numpy().astype(np.float32)


@dataclass
class ExtractionSettings:
    """What is done to each box, in this order: cut, invert, fill edges, rescale, normalise.

    Attributes
    ----------
    box : int
        Box cut from the tomogram [px].
    bg_radius_A : float
        Radius outside which the background statistics are taken [Å].
    pixel_size_A : float
        Tomogram pixel size [Å].
    invert, normalise, project : bool
        Invert the contrast, normalise, also make the z-projection.
    new_box : int or None
        Rescaled box [px].
    device : str or torch.device
        Where rescaling runs.
    """

    box: int
    bg_radius_A: float
    pixel_size_A: float  # of the tomogram
    invert: bool = True
    normalise: bool = True
    new_box: int | None = None
    project: bool = False
    device: str | torch.device = "cpu"

    @property
    def out_box(self) -> int:
        """Edge of the output box [px] (after rescaling)."""
        return self.new_box or self.box

    @property
    def out_pixel_size_A(self) -> float:
        """Pixel size of the output box [Å]."""
        return self.pixel_size_A * self.box / self.out_box


@dataclass
class Subtomogram:
    """One extracted particle: its box, z-projection, edge flag and origin offset [Å]."""

    volume: np.ndarray  # (N', N', N') float32
    projection: np.ndarray | None  # (N', N') float32
    crosses_edge: bool
    origin_A: np.ndarray  # (x, y, z)
    empty: bool = False  # the box lies completely outside the tomogram


# A page fault on a file mapping maps up to 64 KiB of cached pages around it (Linux
# "fault-around"), so each row of a box can bring that much into the resident set. Boxes
# are read a few z-planes at a time so that at most ~MAPPED_BUDGET_BYTES are mapped.
MAPPED_BYTES_PER_ROW = 64 * 1024
MAPPED_BUDGET_BYTES = 32 * 1024 * 1024


class TomogramBoxReader:
    """Reads boxes from one tomogram through a read-only memory map, releasing mapped pages as it goes.

    Attributes
    ----------
    path : Path
        The tomogram.
    shape_zyx : tuple of int
        Its size (z, y, x) [px].
    pixel_size_A : float
        Pixel size of its header [Å].
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._mrc = open_tomogram(self.path)  # MRC memory-mapped, or OME-Zarr read lazily
        self.data = self._mrc.data
        self.shape_zyx = tuple(int(n) for n in self.data.shape)
        self.pixel_size_A = float(self._mrc.voxel_size.x)
        self._mm = getattr(self.data, "_mmap", None)
        if self.data.ndim != 3:
            self.close()
            raise SubtomoError(f"{self.path}: not a 3D tomogram (shape {self.data.shape}).")

    def release(self) -> None:
        """Drop this process's mapping of the pages read so far (they stay in the page cache)."""
        if self._mm is not None and hasattr(self._mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            try:
                self._mm.madvise(mmap.MADV_DONTNEED)
            except (OSError, ValueError):
                self._mm = None

    def read(self, coord_px: np.ndarray, box: int) -> tuple[np.ndarray, tuple[slice, slice, slice] | None, np.ndarray]:
        """The box around a coordinate (:func:`box_start` for the arguments, :func:`read_box` for the box).

        Returns
        -------
        tuple
            (box (N, N, N) float32, valid slices or None, fractional part of the coordinate (3,) [px]).
        """
        start, frac = box_start(coord_px, box)
        row_cost = box * MAPPED_BYTES_PER_ROW
        planes = max(1, MAPPED_BUDGET_BYTES // row_cost)
        vol, valid = read_box(self.data, start, box, self.release, planes)
        return vol, valid, frac

    def close(self) -> None:
        """Close the memory map."""
        self.data = None
        self._mm = None
        self._mrc.close()

    def __enter__(self) -> "TomogramBoxReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def extract_one(reader: TomogramBoxReader, coord_px: np.ndarray, settings: ExtractionSettings,
                rng: np.random.Generator, masks: dict | None = None) -> Subtomogram:
    """Cut, invert, edge-fill, rescale and normalise one subtomogram (and its z-projection).

    Parameters
    ----------
    reader : TomogramBoxReader
        The tomogram.
    coord_px : numpy.ndarray
        (3,) coordinate (x, y, z) [px].
    settings : ExtractionSettings
        What to do.
    rng : numpy.random.Generator
        Noise for voxels outside the tomogram.
    masks : dict, optional
        Cache of background masks shared by the boxes of one tomogram.

    Returns
    -------
    Subtomogram
        The box, projection, edge flag and origin [Å].
    """
    n, n_out = settings.box, settings.out_box
    masks = masks if masks is not None else {}
    if "bg_in" not in masks:  # cached across the particles of one tomogram
        masks["bg_in"] = outside_sphere_mask(n, settings.bg_radius_A / settings.pixel_size_A)
        masks["bg_out"] = outside_sphere_mask(n_out, settings.bg_radius_A / settings.out_pixel_size_A)
    bg_in, bg_out = masks["bg_in"], masks["bg_out"]
    vol, valid, frac = reader.read(coord_px, n)
    empty = valid is not None and any(s.stop <= s.start for s in valid)
    if settings.invert:
        np.negative(vol, out=vol)
    crosses = valid is not None
    if valid is not None and not empty:
        fill_outside(vol, valid, bg_in, rng)
    elif empty:
        vol = rng.normal(0.0, 1.0, size=vol.shape).astype(np.float32)
    vol = rescale(vol, n_out, settings.device)
    proj = None
    if settings.project:
        proj = vol.sum(axis=0, dtype=np.float64).astype(np.float32)
        if settings.normalise:
            proj = normalise(proj, bg_out[n_out // 2])
    if settings.normalise:
        vol = normalise(vol, bg_out)
    return Subtomogram(vol, proj, crosses, origin_angst(frac, settings.pixel_size_A), empty)


@dataclass
class TomogramBoxes:
    """The particles of one tomogram to extract, and where their boxes go (one task of ``--cluster``)."""

    tomogram: Path
    coords_px: np.ndarray  # (n, 3) (x, y, z)
    file_names: list[str]  # (n,) output file names, in out_dir
    out_dir: Path
    settings: ExtractionSettings
    seed: tuple[int, ...]  # of the noise filling voxels outside the tomogram (the same wherever it runs)


@dataclass
class TomogramExtraction:
    """What :func:`extract_tomogram` made: per particle its file (None: box outside the tomogram), origin, edge flag."""

    paths: list[Path | None]
    origins_A: np.ndarray  # (n, 3) (x, y, z)
    crosses_edge: np.ndarray  # (n,) bool
    projections: list[np.ndarray | None]


def extract_tomogram(task: TomogramBoxes, progress=None) -> TomogramExtraction:
    """Extract and write every box of one tomogram (:func:`extract_one` each), reading it once through a map.

    Parameters
    ----------
    task : TomogramBoxes
        The tomogram, its particles' coordinates and output names, the settings and noise seed.
    progress : callable, optional
        ``progress(iterable, total, description)`` over the particles.

    Returns
    -------
    TomogramExtraction
        The written files and each particle's origin, edge flag and z-projection.
    """
    n = len(task.coords_px)
    rng, masks = np.random.default_rng(list(task.seed)), dict[str, np.ndarray]()
    out = TomogramExtraction([None] * n, np.zeros((n, 3)), np.zeros(n, dtype=bool), [None] * n)
    task.out_dir.mkdir(parents=True, exist_ok=True)
    with TomogramBoxReader(task.tomogram) as reader:
        for i in progress(range(n), n, "extracting subtomograms") if progress else range(n):
            sub = extract_one(reader, task.coords_px[i], task.settings, rng, masks)
            if sub.empty:
                continue
            out.paths[i] = write_mrc(task.out_dir / task.file_names[i], sub.volume, task.settings.out_pixel_size_A)
            out.origins_A[i], out.crosses_edge[i], out.projections[i] = sub.origin_A, sub.crosses_edge, sub.projection
    return out


def default_bg_radius_A(box: int, pixel_size_A: float) -> float:
    """RELION's default background radius: 75 % of half the box.

    Parameters
    ----------
    box : int
        Box edge [px].
    pixel_size_A : float
        Pixel size [Å].

    Returns
    -------
    float
        Radius [Å].
    """
    return 0.75 * box / 2 * pixel_size_A


def max_bg_radius_A(box: int, pixel_size_A: float) -> float:
    """Largest useful background radius: half the box (voxels beyond it exist only in the corners).

    Parameters
    ----------
    box, pixel_size_A
        Box edge [px] and pixel size [Å], as for :func:`default_bg_radius_A`.

    Returns
    -------
    float
        Radius [Å].
    """
    return box / 2 * pixel_size_A * (1 - 1e-9) if box else math.inf
