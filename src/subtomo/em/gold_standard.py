"""Gold-standard half sets: the split, symmetrised half grids and the low-resolution join.

Two random halves are refined independently (relion-internals §3.4-§3.5); their FSC gives
the resolution and tau^2. Below ``low_resol_join_halves`` the halves' sums are averaged so
that both stay in one frame, as RELION does.
"""

from __future__ import annotations

import numpy as np
import torch

from subtomo.em import reconstruct as rc
from subtomo.em.maximisation import SufficientStats
from subtomo.em.projector3d import symmetrise3d
from subtomo.errors import SubtomoError


def split_halves(subsets: np.ndarray | None, n: int, seed: int) -> np.ndarray:
    """The half (1 or 2) of each particle: the given subsets if all set, else random halves.

    Parameters
    ----------
    subsets : numpy.ndarray or None
        (n,) int, RELION's rlnRandomSubset of each particle (0 = not set), or None.
    n : int
        Number of particles.
    seed : int
        Random seed of the split when no subsets are given (or all are 0).

    Returns
    -------
    numpy.ndarray
        (n,) int, 1 or 2 (sizes differ by at most one for a random split).

    Raises
    ------
    SubtomoError
        Subsets other than 1/2, or set for some particles and 0 for others.
    """
    if subsets is not None:
        s = np.asarray(subsets).astype(int)
        if np.all(s > 0):
            if not set(np.unique(s)) <= {1, 2}:
                raise SubtomoError("rlnRandomSubset must be 1 or 2 for every particle.")
            return s
        if np.any(s > 0):
            raise SubtomoError("rlnRandomSubset is set for some particles and 0 for others; set it for all (1/2) "
                               "or remove the column to split at random.")
    rng = np.random.default_rng([seed, 7])
    s = np.ones(n, dtype=int)
    perm = rng.permutation(n)
    s[perm[n // 2:]] = 2
    return s


def half_indices(halves: np.ndarray) -> list[np.ndarray]:
    """Particle indices of half 1 and half 2.

    Parameters
    ----------
    halves : numpy.ndarray
        (n,) int, 1 or 2.

    Returns
    -------
    list of numpy.ndarray
        [indices of half 1, indices of half 2].

    Raises
    ------
    SubtomoError
        A half is empty.
    """
    idx = [np.nonzero(np.asarray(halves) == h)[0] for h in (1, 2)]
    if min(len(i) for i in idx) < 1:
        raise SubtomoError("each random half needs at least one particle.")
    return idx


def symmetrised_grids(stats: SufficientStats, sym_mats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Data and weight grids of class 0, Hermitian-completed and averaged over the point group.

    Parameters
    ----------
    stats : SufficientStats
        Sums of one half (class 0 is used).
    sym_mats : torch.Tensor
        (G, 3, 3) float32 symmetry operators.

    Returns
    -------
    data, weight : torch.Tensor
        (N, N, N) complex and real full centred Fourier grids.
    """
    d, w = rc.hermitian_symmetrise(stats.data[0], stats.weight[0], 3)
    return symmetrise3d(d, w, sym_mats)


def join_low_resolution(s1: SufficientStats, s2: SufficientStats, shell: int) -> None:
    """Average both halves' data and weight for |q| <= ``shell`` (in place).

    Parameters
    ----------
    s1, s2 : SufficientStats
        The halves' sums (full centred grids).
    shell : int
        Last joined shell [Fourier pixels].
    """
    n = s1.data.shape[-1]
    low = rc.full_shells(n, 3, s1.data.device) <= shell
    for a, b in ((s1.data, s2.data), (s1.weight, s2.weight)):
        avg = (a + b) / 2
        a[:, low] = avg[:, low]
        b[:, low] = avg[:, low]
