"""Small synthetic subtomogram sets with known poses (tests and benchmarks of the engine).

A random asymmetric reference (sum of Gaussian blobs), particles = reference rotated by
known poses (particle(r) = ref(A^T r)), shifted so that rlnOrigin = ``offset`` recentres
them, multiplied in Fourier space by a missing-wedge (+-``max_tilt_deg`` about y) x CTF
model, plus white noise restricted to the measured wedge. CTF volumes are returned in the
engine's rfft layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from subtomo.em.components import fourier_components
from subtomo.em.iteration import InMemorySource, initial_sigma2
from subtomo.em.projector3d import Projector3D
from subtomo.fourier import fft_centered, ifft_centered, phase_shift, rfft_frequencies
from subtomo.geometry.euler import angular_distance_deg, random_rotations
from subtomo.io.mrc import write_mrc
from subtomo.io.particles import ParticleSet


@dataclass
class SyntheticSet:
    volumes: torch.Tensor  # (n, N, N, N)
    ctfs: torch.Tensor  # (n, N, N, N//2+1)
    rot: np.ndarray  # (n, 3, 3) true poses
    offset_px: np.ndarray  # (n, 3) true rlnOrigin (px)
    reference: torch.Tensor  # (N, N, N)
    pixel_size_A: float
    diameter_A: float


def blob_reference(box: int, rng: np.random.Generator, n_blobs: int = 12, radius_px: float | None = None,
                   sym_mats: np.ndarray | None = None) -> torch.Tensor:
    """Random asymmetric density: Gaussian blobs inside a sphere (optionally symmetrised)."""
    radius_px = radius_px or box * 0.3
    ax = torch.arange(box, dtype=torch.float32) - box // 2
    z, y, x = torch.meshgrid(ax, ax, ax, indexing="ij")
    vol = torch.zeros(box, box, box)
    centres = []
    while len(centres) < n_blobs:
        c = rng.uniform(-radius_px, radius_px, 3)
        if np.linalg.norm(c) < radius_px:
            centres.append(c)
    ops = sym_mats if sym_mats is not None else np.eye(3)[None]
    for c in centres:
        s = rng.uniform(0.06, 0.12) * box
        amp = rng.uniform(0.5, 1.5)
        for g in ops:
            gc = g @ c
            vol += amp * torch.exp(-((x - gc[0]) ** 2 + (y - gc[1]) ** 2 + (z - gc[2]) ** 2) / (2 * s * s))
    return vol / vol.std()


def wedge_ctf(box: int, n: int, max_tilt_deg: float = 60.0, pixel_size_A: float = 4.0,
              defocus_A: np.ndarray | None = None, device=None) -> torch.Tensor:
    """(n, N, N, N//2+1) missing wedge about y (tilts +-max_tilt) x |phase-contrast CTF| sign-flipping model."""
    k = rfft_frequencies((box,) * 3, device=device)  # cycles/px (x, y, z)
    kx, kz = k[..., 0], k[..., 2]
    wedge = (kz.abs() <= math.tan(math.radians(max_tilt_deg)) * kx.abs() + 1e-6).float()
    wedge[0, 0, 0] = 1.0
    if defocus_A is None:
        return wedge[None].expand(n, *wedge.shape).clone()
    s2 = (k ** 2).sum(-1) / pixel_size_A ** 2
    lam = 0.0197  # 300 kV
    out = []
    for d in defocus_A:
        chi = math.pi * lam * float(d) * s2
        ctf = -(0.995 * torch.sin(chi) + 0.1 * torch.cos(chi))
        out.append(wedge * ctf)
    return torch.stack(out)


def make_set(n: int = 40, box: int = 32, pixel_size_A: float = 8.0, snr: float = 1.0, seed: int = 0,
             max_tilt_deg: float = 60.0, ctf: bool = True, max_offset_px: float = 1.5,
             reference: torch.Tensor | None = None, rot: np.ndarray | None = None,
             sym_mats: np.ndarray | None = None) -> SyntheticSet:
    """Particles of one reference at random poses; ``snr`` = signal variance / noise variance in the mask."""
    rng = np.random.default_rng(seed)
    ref = reference if reference is not None else blob_reference(box, rng, sym_mats=sym_mats)
    rot = rot if rot is not None else random_rotations(n, rng)
    off = rng.uniform(-max_offset_px, max_offset_px, (n, 3))
    defoci = rng.uniform(20000, 40000, n) if ctf else None
    ctfs = wedge_ctf(box, n, max_tilt_deg, pixel_size_A, defoci)
    comps = fourier_components(box, box, 3)
    proj = Projector3D(ref, pad=2)
    vols = torch.zeros(n, box, box, box)
    shape = (box,) * 3
    rt = torch.as_tensor(rot, dtype=torch.float32)
    for s in range(0, n, 16):
        a = proj.project(rt[s:s + 16], comps.k)  # (b, M)
        f = torch.zeros(a.shape[0], box * box * (box // 2 + 1), dtype=torch.complex64)
        f[:, comps.idx] = a
        f = f.reshape(a.shape[0], box, box, box // 2 + 1)
        # Hermitian mates of the kx = 0 plane (only one of each pair is a component)
        full = ifft_centered(f, shape)
        f = fft_centered(full, 3)
        # content at centre - origin: translate by -origin
        shifts = -torch.as_tensor(off[s:s + 16], dtype=torch.float32)
        f = phase_shift(f, shifts, shape) * ctfs[s:s + 16]
        sig = ifft_centered(f, shape)
        noise = torch.as_tensor(rng.normal(size=sig.shape), dtype=torch.float32)
        wedge = (ctfs[s:s + 16] != 0).float()
        noise = ifft_centered(fft_centered(noise, 3) * wedge, shape)
        sig_std = float(sig.std())
        vols[s:s + 16] = sig + noise * (sig_std / math.sqrt(max(snr, 1e-9)) / float(noise.std()))
    diameter = 2 * 0.3 * box * pixel_size_A + 4 * pixel_size_A
    return SyntheticSet(vols, ctfs, np.asarray(rot), off, ref, pixel_size_A, diameter)


def align_to_reference(est_rot: np.ndarray, true_rot: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Global rotation G (est ~ true @ G^T? ) removing the arbitrary frame; returns (G, per-particle errors deg).

    Refinement from random orientations recovers poses up to one global rotation:
    est_i = true_i @ G. G is estimated as the chordal mean of true_i^T est_i.
    """
    m = np.einsum("nji,njk->ik", true_rot, est_rot)
    u, _, vt = np.linalg.svd(m)
    d = np.sign(np.linalg.det(u @ vt))
    g = u @ np.diag([1, 1, d]) @ vt
    pred = true_rot @ g
    return g, angular_distance_deg(est_rot, pred)


def write_star_project(ds: SyntheticSet, root: str | Path) -> Path:
    """Write the set as a small project: ``Particles/pNNNNNN.mrc`` + ``particles.star`` (no CTF; RELION 3.1 optics)."""
    root = Path(root)
    (root / "Particles").mkdir(parents=True, exist_ok=True)
    names = []
    for i, v in enumerate(ds.volumes):
        write_mrc(root / "Particles" / f"p{i:06d}.mrc", v.numpy(), ds.pixel_size_A)
        names.append(f"Particles/p{i:06d}.mrc")
    n = len(names)
    particles = pd.DataFrame({"rlnImageName": names, "rlnTomoName": ["t1"] * n, "rlnTomoParticleId": range(1, n + 1),
                              "rlnOpticsGroup": [1] * n})
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                           "rlnImagePixelSize": [ds.pixel_size_A], "rlnImageSize": [ds.volumes.shape[-1]],
                           "rlnImageDimensionality": [3]})
    return ParticleSet.from_table(particles, optics, root).write(root / "particles.star")


def two_class_set(n_per: int = 24, box: int = 24, pixel_size_A: float = 10.0, snr: float = 2.0,
                  seed: int = 21) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray, float]:
    """Two conformations (two random references), ``n_per`` particles each, no offsets.

    Returns volumes (2 n_per, N, N, N), CTFs, true rotations (2 n_per, 3, 3), true classes
    (0/1) and the particle diameter [Å].
    """
    rng = np.random.default_rng(seed)
    a = blob_reference(box, rng)
    b = blob_reference(box, rng)
    sa = make_set(n=n_per, box=box, pixel_size_A=pixel_size_A, snr=snr, seed=1, reference=a, max_offset_px=0.0)
    sb = make_set(n=n_per, box=box, pixel_size_A=pixel_size_A, snr=snr, seed=2, reference=b, max_offset_px=0.0)
    vols = torch.cat([sa.volumes, sb.volumes])
    ctfs = torch.cat([sa.ctfs, sb.ctfs])
    rot = np.concatenate([sa.rot, sb.rot])
    truth = np.array([0] * n_per + [1] * n_per)
    return vols, ctfs, rot, truth, sa.diameter_A


@dataclass
class EStepCase:
    """A small E-step case: the particles of ``make_set`` (class 1), a spherical mask, the noise model, K = 2 maps."""

    data: SyntheticSet
    source: InMemorySource
    mask: torch.Tensor
    sigma2: torch.Tensor
    maps: torch.Tensor


def two_reference_estep_case(n: int, box: int, seed: int = 5) -> EStepCase:
    """``n`` particles of one reference and the maps (reference, its mirror): the E-step equivalence tests' case."""
    ds = make_set(n=n, box=box, pixel_size_A=10.0, snr=3.0, seed=seed)
    src = InMemorySource(ds.volumes, ds.pixel_size_A, ds.ctfs)
    ax = torch.arange(box, dtype=torch.float32) - box // 2
    z, y, x = torch.meshgrid(ax, ax, ax, indexing="ij")
    mask = ((x ** 2 + y ** 2 + z ** 2).sqrt() < 0.45 * box).float()
    sigma2 = initial_sigma2(src, np.arange(n), mask, "cpu")
    return EStepCase(ds, src, mask, sigma2, torch.stack([ds.reference, ds.reference.flip(0)]))
