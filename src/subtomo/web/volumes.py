"""Maps for the display: orthogonal slices as PNG, and an isosurface mesh by marching cubes.

Maps are read once and kept in a small cache keyed by path and modification time, so moving
a slider only cuts and encodes one slice. The isosurface is computed on the server with
scikit-image's ``marching_cubes`` (Lewiner; tested, fast, BSD) and sent as one binary blob
(:func:`mesh_bytes`) that the page draws with WebGL.
"""

from __future__ import annotations

import io
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from skimage.measure import marching_cubes

from subtomo.io.mrc import read_mrc

AXES = ("z", "y", "x")
MESH_MAGIC = b"SMSH"
MAX_MESH_EDGE = 128  # larger maps are meshed on a coarser grid (step_size) so a surface stays interactive


@dataclass(frozen=True)
class MapInfo:
    """What the page needs to set up its sliders and contrast."""

    shape: tuple[int, int, int]  # (z, y, x) voxels
    pixel_size_A: float
    minimum: float
    maximum: float
    mean: float
    std: float
    display_low: float  # default contrast: 0.5 and 99.8 percentiles (robust to a few extreme voxels)
    display_high: float


class MapCache:
    """The last few maps read, keyed by (path, mtime, size); thread-safe."""

    def __init__(self, capacity: int = 4) -> None:
        self.capacity = capacity
        self._maps: OrderedDict[tuple[str, float, int], tuple[np.ndarray, float]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: Path) -> tuple[np.ndarray, float]:
        """The map as a (z, y, x) float32 array (a 2D image becomes one section) and its pixel size [Å]."""
        stat = path.stat()
        key = (str(path), stat.st_mtime, stat.st_size)
        with self._lock:
            if key in self._maps:
                self._maps.move_to_end(key)
                return self._maps[key]
        data, pixel = read_mrc(path)
        volume = np.asarray(data, dtype=np.float32)
        volume = volume[None] if volume.ndim == 2 else volume
        with self._lock:
            self._maps[key] = (volume, pixel)
            while len(self._maps) > self.capacity:
                self._maps.popitem(last=False)
        return volume, pixel


def map_info(volume: np.ndarray, pixel_size_A: float) -> MapInfo:
    """Shape, pixel size and grey-value statistics of a map."""
    step = max(1, round((volume.size / 2e6) ** (1 / 3)))  # percentiles from at most ~2 million voxels
    low, high = np.percentile(volume[::step, ::step, ::step], [0.5, 99.8])
    return MapInfo(tuple(int(n) for n in volume.shape), float(pixel_size_A), float(volume.min()),  # type: ignore[arg-type]
                   float(volume.max()), float(volume.mean()), float(volume.std()), float(low), float(high))


def slice_png(volume: np.ndarray, axis: str, index: int, low: float, high: float) -> bytes:
    """One orthogonal slice as an 8-bit PNG, grey values ``low``..``high`` mapped to black..white.

    ``axis`` is the axis the slice is perpendicular to ("z": an (y, x) section). The image's
    first array axis is drawn upwards (IMOD's lower-left origin), as the other PNGs are.
    """
    if axis not in AXES:
        raise ValueError(f"axis must be one of {AXES}")
    n = volume.shape[AXES.index(axis)]
    index = int(np.clip(index, 0, n - 1))
    section = np.take(volume, index, axis=AXES.index(axis))
    span = high - low if high > low else 1.0
    grey = np.clip((section - low) / span * 255.0, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.flipud(grey)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def isosurface(volume: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Marching-cubes surface of a map at grey value ``level``.

    Returns
    -------
    vertices : (v, 3) float32, x, y, z centred on the box and scaled so the box spans -1..1
    normals : (v, 3) float32, unit normals (the page lights both sides)
    faces : (f, 3) uint32 vertex indices
    A level outside the map's range gives empty arrays.
    """
    if volume.ndim != 3 or min(volume.shape) < 2 or not (volume.min() < level < volume.max()):
        return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.float32), np.zeros((0, 3), np.uint32)
    step = max(1, int(np.ceil(max(volume.shape) / MAX_MESH_EDGE)))
    verts, faces, normals, _ = marching_cubes(volume, level=level, step_size=step, allow_degenerate=False)
    centre = (np.asarray(volume.shape, np.float32) - 1) / 2
    scale = 2.0 / max(volume.shape)
    xyz = ((verts - centre) * scale)[:, ::-1].astype(np.float32)
    return xyz, (-normals[:, ::-1]).astype(np.float32), faces.astype(np.uint32)


def mesh_bytes(vertices: np.ndarray, normals: np.ndarray, faces: np.ndarray) -> bytes:
    """The mesh as ``SMSH``, uint32 vertex and face counts, float32 vertices, float32 normals, uint32 faces."""
    header = MESH_MAGIC + struct.pack("<II", len(vertices), len(faces))
    return header + vertices.astype("<f4").tobytes() + normals.astype("<f4").tobytes() + faces.astype("<u4").tobytes()


def read_mesh_bytes(blob: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of :func:`mesh_bytes` (used by the tests and by scripts)."""
    if blob[:4] != MESH_MAGIC:
        raise ValueError("not a subtomo mesh")
    nv, nf = struct.unpack("<II", blob[4:12])
    offset = 12
    vertices = np.frombuffer(blob, "<f4", nv * 3, offset).reshape(nv, 3)
    offset += nv * 12
    normals = np.frombuffer(blob, "<f4", nv * 3, offset).reshape(nv, 3)
    offset += nv * 12
    faces = np.frombuffer(blob, "<u4", nf * 3, offset).reshape(nf, 3)
    return vertices, normals, faces
