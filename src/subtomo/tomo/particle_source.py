"""Subtomograms and their 3D CTFs of a particle set, by particle index (the engine's particle source).

The refinement and classification engine (:mod:`subtomo.em`) asks a particle source for
real-space subtomograms and their 3D CTFs (full-box rfft, engine layout) of a batch of
particle indices; :class:`SubtomogramSource` answers from the files a :class:`ParticleSet`
names (``rlnImageName`` maps, ``subtomoCtfModel``/``rlnCtfImage`` CTF models), caching them
in memory when the whole set fits. :func:`read_particle_images` reads the 2D images of a set (the
z-projections that 2D classification works on).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from subtomo.errors import SubtomoError
from subtomo.io.mrc import open_mrc_mmap, read_mrc, read_mrc_header
from subtomo.io.particles import ParticleSet
from subtomo.tomo.ctf3d import ParticleCtfModels


class SubtomogramSource:
    """Subtomograms (``rlnImageName`` .mrc) and their 3D CTFs, cached in memory after the first read.

    Parameters
    ----------
    particles : ParticleSet
        The particles; image paths resolve against its project.
    use_ctf : bool
        Build each particle's 3D CTF from ``subtomoCtfModel`` or ``rlnCtfImage`` (else :meth:`ctf` returns None).
    cache_limit_bytes : int
        Keep volumes and CTFs in memory when all of them fit in this many bytes.

    Attributes
    ----------
    n : int
        Number of particles.
    box : int
        Edge of the cubic subtomograms [px].
    pixel_size_A : float
        Pixel size [Å] (:attr:`ParticleSet.pixel_size_A`).
    """

    def __init__(self, particles: ParticleSet, use_ctf: bool, cache_limit_bytes: int = 3 * 2 ** 30) -> None:
        self.particles = particles
        self.n = len(particles)
        if "rlnImageName" not in particles.table.columns:
            raise SubtomoError(f"{particles.name}: no rlnImageName column. Run subtomo extract first.")
        self._paths = particles.image_paths()
        first, _ = read_mrc(self._paths[0])
        if first.ndim != 3 or len(set(first.shape)) != 1:
            raise SubtomoError(f"{self._paths[0]}: subtomograms must be cubic 3D maps (got shape {first.shape}). "
                               "Give the particles STAR of subtomo extract (3D subtomograms).")
        self.box = int(first.shape[0])
        self.pixel_size_A = particles.pixel_size_A
        self._vols: dict[int, torch.Tensor] = {}
        self._ctfs: dict[int, torch.Tensor] = {}
        self.cache = self.n * self.box ** 3 * 4 * 2 <= cache_limit_bytes
        self.ctf_models = ParticleCtfModels.from_particle_set(particles) if use_ctf else None

    def __getstate__(self) -> dict:
        """Pickled without the in-memory cache: a copy sent to a cluster worker reads its particles by path."""
        state = dict(self.__dict__)
        state["_vols"], state["_ctfs"] = {}, {}
        return state

    def volumes(self, idx: np.ndarray, device) -> torch.Tensor:
        """Subtomograms of particles ``idx``.

        Parameters
        ----------
        idx : numpy.ndarray
            (B,) particle indices (0-based).
        device : torch.device or str
            Where the batch goes.

        Returns
        -------
        torch.Tensor
            (B, N, N, N) float32 real-space subtomograms.
        """
        out = []
        for i in np.asarray(idx):
            v = self._vols.get(int(i))
            if v is None:
                v = self._read(int(i))
                if self.cache:
                    self._vols[int(i)] = v
            out.append(v)
        return torch.stack(out).to(device)

    def _read(self, i: int) -> torch.Tensor:
        arr, _ = read_mrc(self._paths[i])
        if arr.shape != (self.box,) * 3:
            raise SubtomoError(f"{self._paths[i]}: box {arr.shape} differs from the first subtomogram's {self.box}. "
                               "Re-extract all particles with one --box.")
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))

    def ctf(self, idx: np.ndarray, device) -> torch.Tensor | None:
        """3D CTFs of particles ``idx``, or None without CTF.

        Parameters
        ----------
        idx : numpy.ndarray
            (B,) 0-based indices of the particles whose CTFs are wanted.
        device : torch.device or str
            Device of the returned tensor.

        Returns
        -------
        torch.Tensor or None
            (B, N, N, N//2 + 1) float32 in the engine's rfft layout.
        """
        if self.ctf_models is None:
            return None
        idx = np.asarray(idx)
        missing = [int(i) for i in idx if int(i) not in self._ctfs]
        if missing:
            vols = self.ctf_models.volumes(missing, self.box, self.box, "cpu", pixel_size_A=self.pixel_size_A)
            if not self.cache:
                got = dict(zip(missing, vols))
                return torch.stack([got[int(i)] for i in idx]).to(device)
            for j, i in enumerate(missing):
                self._ctfs[i] = vols[j]
        return torch.stack([self._ctfs[int(i)] for i in idx]).to(device)


def read_particle_images(particles: ParticleSet, column: str = "rlnImageName") -> np.ndarray:
    """All 2D images a particle set lists as ``index@stack`` (1-based) or single files, in row order.

    Each stack is opened once (memory-mapped) whatever the order of the rows.

    Parameters
    ----------
    particles : ParticleSet
        The particles; paths resolve against its project.
    column : str
        The image column.

    Returns
    -------
    numpy.ndarray
        (n, N, N) float32 images.

    Raises
    ------
    SubtomoError
        A stack is missing, an index is outside its stack, or images are not square or differ in size.
    """
    by_file: dict[Path, list[tuple[int, int]]] = defaultdict(list)
    for row, ref in enumerate(particles.image_refs(column)):
        by_file[ref.path].append((row, (ref.index or 1) - 1))
    first = next(iter(by_file))
    if not first.exists():
        raise SubtomoError(f"{first}: image stack listed in {particles.name} is missing. Re-run subtomo extract --project.")
    (_, ny, nx), _ = read_mrc_header(first)
    if ny != nx:
        raise SubtomoError(f"{first}: images are {nx}x{ny}; 2D classification needs square images. "
                           "Re-extract with a square box.")
    out = np.zeros((len(particles), ny, nx), np.float32)
    for path, rows in by_file.items():
        if not path.exists():
            raise SubtomoError(f"{path}: image stack listed in {particles.name} is missing. Re-run subtomo extract --project.")
        with open_mrc_mmap(path) as mrc:
            data = mrc.data if mrc.data.ndim == 3 else mrc.data[None]
            if data.shape[1:] != (ny, nx):
                raise SubtomoError(f"{path}: images are {data.shape[2]}x{data.shape[1]}, others are {nx}x{ny}. "
                                   "Give one particle set of one image size.")
            for row, idx in rows:
                if not 0 <= idx < data.shape[0]:
                    raise SubtomoError(f"{path}: image {idx + 1} requested by {particles.name}, the stack has "
                                       f"{data.shape[0]}. Re-run subtomo extract --project.")
                out[row] = data[idx]
    return out
