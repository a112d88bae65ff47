"""MRC images, stacks and volumes through mrcfile.

Arrays are (z, y, x) float32. Pixel sizes are in Å and live in the header's voxel size.
Writes are atomic (temporary name, then rename), so a killed job leaves no half file.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import mrcfile
import numpy as np

from subtomo.errors import SubtomoError
from subtomo.io.importers.omezarr import OmeZarrTomogram, open_ome_zarr

_BITS_PER_VOXEL = {0: 8, 1: 16, 2: 32, 3: 32, 4: 64, 6: 16, 12: 16, 101: 4}  # MRC mode -> bits


def _check_complete(path: Path, header: np.recarray) -> None:
    """Refuse a file shorter than its header says (an interrupted copy): the data would be garbage or None."""
    mode = int(header.mode)
    bits = _BITS_PER_VOXEL.get(mode)
    if bits is None:
        raise SubtomoError(f"{path}: MRC mode {mode} is not supported. Convert it to float32 (mode 2), e.g. with "
                           "IMOD's newstack -mode 2.")
    voxels = int(header.nx) * int(header.ny) * int(header.nz)
    expected = 1024 + int(header.nsymbt) + (voxels * bits + 7) // 8
    actual = path.stat().st_size
    if actual < expected:
        raise SubtomoError(f"{path}: the file is truncated ({actual} bytes; its header ({int(header.nx)} x "
                           f"{int(header.ny)} x {int(header.nz)}, mode {mode}) needs {expected}). Copy or write it again.")


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_mrc(path: str | Path, data: np.ndarray, pixel_size_A: float = 1.0, *, stack: bool = False) -> Path:
    """Write ``data`` as float32 MRC with the pixel size in the header (atomic).

    The file is written under a temporary name and renamed, so a killed job leaves no half file;
    missing parent directories are created.

    Parameters
    ----------
    path : str or Path
        Output file (``.mrc`` or ``.mrcs``); an existing file is replaced.
    data : array_like
        (y, x) image, (z, y, x) volume or (n, y, x) image stack; converted to float32.
    pixel_size_A : float
        Pixel (voxel) size [Å], written as the header's voxel size.
    stack : bool
        ``True`` marks a 3D array as an image stack (``.mrcs``: ispg 0, nz = images).

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.ascontiguousarray(np.asarray(data, dtype=np.float32))
    tmp = _tmp_name(path)
    try:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(arr)
            if stack and arr.ndim == 3:
                mrc.set_image_stack()
            mrc.voxel_size = float(pixel_size_A)
            mrc.update_header_stats()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_mrc(path: str | Path) -> tuple[np.ndarray, float]:
    """Read a whole MRC file into memory.

    Parameters
    ----------
    path : str or Path
        The MRC file.

    Returns
    -------
    data : numpy.ndarray
        float32 copy of the data, (z, y, x) for a volume or stack, (y, x) for a single image (nz = 1,
        also a one-image stack).
    pixel_size_A : float
        Pixel size [Å] (the header's voxel size along x).

    Raises
    ------
    SubtomoError
        The file is missing, not a valid MRC file, in an unsupported mode, truncated, or has no data.
    """
    path = Path(path)
    read_mrc_header(path)  # missing, unreadable or truncated: a message that names the file
    try:
        with mrcfile.open(path, permissive=True) as mrc:
            if mrc.data is None:
                raise SubtomoError(f"{path}: not a readable MRC file (no data). Re-write it with IMOD or mrcfile.")
            return np.asarray(mrc.data, dtype=np.float32).copy(), float(mrc.voxel_size.x)
    except (ValueError, OSError) as exc:
        raise SubtomoError(f"{path}: not a valid MRC file ({exc}). Re-write it with IMOD or mrcfile.") from exc


def open_mrc_mmap(path: str | Path) -> mrcfile.mrcmemmap.MrcMemmap:
    """Open an MRC file memory-mapped read-only (tomograms: never load them whole).

    Parameters
    ----------
    path : str or Path
        The MRC file.

    Returns
    -------
    mrcfile.mrcmemmap.MrcMemmap
        The open file; use it as a context manager. ``.data`` is a read-only numpy memmap in (z, y, x),
        in the file's own dtype (not converted to float32); ``.voxel_size`` holds the pixel size [Å].

    Raises
    ------
    SubtomoError
        The file is missing, not a valid MRC file, in an unsupported mode, or truncated.
    """
    path = Path(path)
    if not path.exists():
        raise SubtomoError(f"{path}: file not found.")
    read_mrc_header(path)  # refuses truncated files before mapping them
    try:
        return mrcfile.mmap(path, mode="r", permissive=True)
    except (ValueError, OSError) as exc:
        raise SubtomoError(f"{path}: not a valid MRC file ({exc}).") from exc


def is_ome_zarr(path: str | Path) -> bool:
    """Whether ``path`` names an OME-Zarr image (a ``.zarr`` directory) rather than an MRC file.

    Parameters
    ----------
    path : str or Path
        A tomogram path.

    Returns
    -------
    bool
    """
    p = Path(path)
    return p.suffix == ".zarr" or (p.is_dir() and ((p / ".zattrs").is_file() or (p / "zarr.json").is_file()))


def open_tomogram(path: str | Path, pixel_size_A: float | None = None) -> mrcfile.mrcmemmap.MrcMemmap | OmeZarrTomogram:
    """Open a tomogram lazily: an MRC file memory-mapped, or one level of an OME-Zarr image.

    Parameters
    ----------
    path : str or Path
        ``.mrc``/``.rec`` file or ``.zarr`` directory.
    pixel_size_A : float, optional
        OME-Zarr only: the level with this pixel size [Å] (default: the finest).

    Returns
    -------
    mrcfile.mrcmemmap.MrcMemmap or OmeZarrTomogram
        Either way ``.data`` is (z, y, x), sliced without reading the rest, ``.voxel_size.x``
        is the pixel size [Å], and the object is a context manager with ``close()``.
    """
    if is_ome_zarr(path):
        return open_ome_zarr(path, pixel_size_A)
    return open_mrc_mmap(path)


def read_tomogram_header(path: str | Path) -> tuple[tuple[int, int, int], float]:
    """Shape and pixel size of an MRC or OME-Zarr tomogram (finest level), without reading the data.

    Parameters
    ----------
    path : str or Path
        ``.mrc`` file or ``.zarr`` directory.

    Returns
    -------
    shape : tuple of int
        (nz, ny, nx) [px].
    pixel_size_A : float
        Pixel size [Å].
    """
    if is_ome_zarr(path):
        with open_ome_zarr(path) as t:
            return (int(t.data.shape[0]), int(t.data.shape[1]), int(t.data.shape[2])), float(t.voxel_size.x)
    return read_mrc_header(path)


def read_mrc_header(path: str | Path) -> tuple[tuple[int, int, int], float]:
    """Shape and pixel size from the header only (the data are not read).

    Parameters
    ----------
    path : str or Path
        The MRC file.

    Returns
    -------
    shape : tuple of int
        (nz, ny, nx) [px]; nz = 1 for a single image, the number of images for a stack.
    pixel_size_A : float
        Pixel size [Å] (the header's voxel size along x).

    Raises
    ------
    SubtomoError
        The file is missing, not a valid MRC file, in an unsupported mode, or shorter than its header
        says (an interrupted copy).
    """
    path = Path(path)
    if not path.exists():
        raise SubtomoError(f"{path}: file not found. Check the path, or run the step that writes it.")
    try:
        with mrcfile.open(path, header_only=True, permissive=True) as mrc:
            h = mrc.header
            shape, pixel_size_A = (int(h.nz), int(h.ny), int(h.nx)), float(mrc.voxel_size.x)
    except (ValueError, OSError) as exc:
        raise SubtomoError(f"{path}: not a valid MRC file ({exc}).") from exc
    _check_complete(path, h)
    return shape, pixel_size_A


def read_tilt_angles_from_header(path: str | Path) -> np.ndarray | None:
    """Tilt angles from an MRC stack's extended header, or None if absent.

    Understands FEI1/FEI2 headers (via mrcfile's indexed extended header, field
    ``Alpha tilt``) and SerialEM/IMOD ``SERI``/``AGAR`` headers, whose per-section
    records are ``nint`` bytes long and start with the tilt angle as an int16 in
    hundredths of a degree when bit 1 of ``nreal`` is set (IMOD's convention).

    Parameters
    ----------
    path : str or Path
        The tilt-series stack (``.mrcs``/``.st``).

    Returns
    -------
    numpy.ndarray or None
        (nz,) float64 tilt angles [deg], one per section in stack order; None when there is no
        extended header, it holds no tilt angles, or a SerialEM/IMOD header is shorter than nz records.
    """
    path = Path(path)
    with mrcfile.open(path, header_only=True, permissive=True) as mrc:
        h = mrc.header
        exttyp = bytes(h.exttyp).decode("ascii", errors="replace").strip("\x00 ")
        nz = int(h.nz)
        nsymbt = int(h.nsymbt)
        if nsymbt == 0:
            return None
        if exttyp in ("FEI1", "FEI2"):
            try:
                ext = mrc.indexed_extended_header
            except AttributeError:
                ext = None
            if ext is None or "Alpha tilt" not in ext.dtype.names:
                return None
            return np.asarray(ext["Alpha tilt"][:nz], dtype=np.float64)
        # IMOD/SerialEM: nint and nreal are int16 at bytes 128-131 (inside mrcfile's extra2)
        nint, nreal = struct.unpack_from("<hh", bytes(h.extra2), 128 - 112)
    if exttyp in ("SERI", "AGAR") or (nint == 0 and nreal > 0 and exttyp == ""):
        if not (nreal & 1):
            return None
        record = nint if nint > 0 else _serialem_record_bytes(nreal)
        if record <= 0:
            return None
        with open(path, "rb") as fh:
            fh.seek(1024)
            raw = fh.read(nsymbt)
        angles = []
        for i in range(nz):
            off = i * record
            if off + 2 > len(raw):
                return None
            (val,) = struct.unpack_from("<h", raw, off)
            angles.append(val / 100.0)
        return np.asarray(angles, dtype=np.float64)
    return None


def _serialem_record_bytes(nreal: int) -> int:
    """Bytes per section of a SerialEM extended header from its ``nreal`` bit flags."""
    sizes = {1: 2, 2: 6, 4: 4, 8: 2, 16: 2, 32: 4}  # tilt, piece coords, stage, mag, intensity, exposure
    return sum(nbytes for bit, nbytes in sizes.items() if nreal & bit)
