"""The oracle: a gold-standard reconstruction with given (true) poses, the ceiling of a refinement.

Same CTF model, the same halves and the same final-iteration formulas as
:func:`subtomo.em.refine.auto_refine`, without any search.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from subtomo.em import reconstruct as rc
from subtomo.em.components import fourier_components
from subtomo.em.gold_standard import symmetrised_grids
from subtomo.em.iteration import ParticleSource, PoseTable, delta_stats, initial_sigma2
from subtomo.em.maps import particle_mask
from subtomo.fourier import threshold_shell
from subtomo.geometry.symmetry import symmetry_matrices


@dataclass
class OracleResult:
    """Reconstruction with given poses.

    Attributes
    ----------
    resolution_A : float
        Gold-standard FSC 0.143 resolution [Å].
    fsc : numpy.ndarray
        (N//2 + 1,) FSC of the two half reconstructions.
    map : torch.Tensor
        (N, N, N) MAP reconstruction of both halves (cpu).
    half_maps : list of torch.Tensor
        Two (N, N, N) unregularised half maps (cpu).
    """

    resolution_A: float
    fsc: np.ndarray
    map: torch.Tensor
    half_maps: list[torch.Tensor]


def oracle_reconstruction(src: ParticleSource, rot: np.ndarray, offset_px: np.ndarray, halves: np.ndarray, *,
                          use_ctf: bool = True, sym: str = "C1", diameter_A: float | None = None, device=None,
                          batch_size: int = 16) -> OracleResult:
    """Gold-standard reconstruction of the particles at the given poses.

    Parameters
    ----------
    src : ParticleSource
        The particles (n subtomograms of N^3 px) and their 3D CTFs.
    rot : numpy.ndarray
        (n, 3, 3) rotation matrices A (RELION convention).
    offset_px : numpy.ndarray
        (n, 3) origins (x, y, z) [px].
    halves : numpy.ndarray
        (n,) half of each particle, 1 or 2.
    use_ctf : bool
        Weight by the particles' 3D CTFs.
    sym : str
        Point group (C1, Dn, ...).
    diameter_A : float, optional
        Particle diameter [Å] of the mask of the initial noise estimate (default: the box).
    device : torch.device or str, optional
        Where to compute.
    batch_size : int
        Particles per batch.

    Returns
    -------
    OracleResult
    """
    device = torch.device(device or "cpu")
    n, box, px = src.n, src.box, src.pixel_size_A
    mask = particle_mask(box, diameter_A or box * px, px, device)
    sig0 = initial_sigma2(src, np.arange(n), mask, device, use_ctf)
    poses = PoseTable.new(n, np.asarray(rot, dtype=np.float64), np.asarray(offset_px, dtype=np.float64))
    comps = fourier_components(box, box, 3, device=device)
    sym_mats = torch.as_tensor(symmetry_matrices(sym), dtype=torch.float32, device=device)
    grids = []
    for h in (1, 2):
        st = delta_stats(src, np.nonzero(np.asarray(halves) == h)[0], poses, 1, sig0, comps, device, batch_size, use_ctf)
        grids.append(symmetrised_grids(st, sym_mats))
    fsc = rc.fsc_halves(grids[0][0], grids[0][1], grids[1][0], grids[1][1], 3)
    dsum, wsum = grids[0][0] + grids[1][0], grids[0][1] + grids[1][1]
    tau2, _, _ = rc.tau2_from_fsc(fsc, wsum, 3, joined=True)
    vol = rc.reconstruct(dsum, wsum, 3, tau2=tau2)
    return OracleResult(rc.resolution_A(threshold_shell(fsc, 0.143), box, px), fsc.cpu().numpy(), vol.cpu(),
                        [rc.reconstruct(g[0], g[1], 3).cpu() for g in grids])
