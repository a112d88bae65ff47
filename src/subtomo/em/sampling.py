"""Rotation and translation grids for the E-step (3D rotations; translations any ndim).

* Global 3D grid: HEALPix directions at ``order`` (asymmetric unit of the point group) x
  psi = 0, d, 2d, ... with d = 360/(6*2^order) (RELION §3.2); oversampled children: the 4
  NEST children of the direction at order+1 x psi -/+ d/4 (8 per coarse rotation).
* Local 3D grid: small rotations D (angle <= n_sigma*sigma) built from the directions of
  the same HEALPix order near the pole and psi steps, applied as A_prev @ D around each
  particle's previous pose, with a Gaussian prior on the angle of D (RELION's local
  searches with sigma_rot = sigma_tilt = sigma_psi).
* Every iteration all orientations are right-multiplied by one random rotation of at
  most half a step (RELION's ``--perturb``), derived from (seed, iteration).
* Translations: a ball of grid points of step ``step`` within ``range`` (px); oversampled
  children at +-step/4 per axis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from subtomo.em import healpix
from subtomo.geometry.euler import euler_to_matrix
from subtomo.geometry.symmetry import axis_rotation, symmetry_matrices


@dataclass
class RotationSet:
    """Coarse rotations (R, d, d), their oversampled children (R, C, d, d), log prior of each.

    ``log_prior`` (R,) and ``child_log_prior`` (R, C) are per-rotation orientation priors
    (zeros for global searches). ``per_particle`` is False: the same set for every particle;
    local searches produce per-particle sets by :func:`compose_local`.
    """

    matrices: torch.Tensor
    children: torch.Tensor
    log_prior: torch.Tensor
    child_log_prior: torch.Tensor
    step_deg: float
    fine_step_deg: float

    @property
    def n(self) -> int:
        """Number of coarse rotations R."""
        return int(self.matrices.shape[0])


def perturbation_matrix(step_deg: float, rng: np.random.Generator, amount: float = 0.5) -> np.ndarray:
    """RELION's random perturbation of the grids: a rotation about a random axis by up to ``amount`` * step.

    Parameters
    ----------
    step_deg : float
        Angular step [deg].
    rng : numpy.random.Generator
        Source of the axis and angle.
    amount : float
        Largest fraction of the step.

    Returns
    -------
    numpy.ndarray
        (3, 3) rotation matrix.
    """
    axis = rng.normal(size=3)
    angle = np.deg2rad(step_deg) * amount * rng.uniform(-1, 1)
    return axis_rotation(axis, angle)


def _psi_values(step_deg: float, lo: float = 0.0, hi: float = 360.0, centred: bool = False) -> np.ndarray:
    if centred:  # symmetric local window [-hi, hi]
        n = int(math.floor(hi / step_deg + 1e-9))
        return np.arange(-n, n + 1) * step_deg
    n = max(1, int(round((hi - lo) / step_deg)))
    return lo + np.arange(n) * (hi - lo) / n


def _oversampled_children(order: int, pix: np.ndarray, psi: np.ndarray, psi_step: float,
                          subtract_rot: bool) -> np.ndarray:
    """The 8 oversampled children (4 HEALPix children x 2 psi) of each (direction, psi) point.

    Returns (len(pix) * len(psi), 8, 3, 3). ``subtract_rot`` uses psi - rot (local grids
    centred on the identity) instead of psi.
    """
    ch = healpix.pix2ang_nest(order + 1, healpix.children(pix).reshape(-1)).reshape(len(pix), 4, 2)
    shape = (len(pix), len(psi), 4, 2)
    r = np.broadcast_to(ch[:, None, :, None, 0], shape)
    t = np.broadcast_to(ch[:, None, :, None, 1], shape)
    p = np.broadcast_to(np.stack([psi - psi_step / 4, psi + psi_step / 4], -1)[None, :, None, :], shape)
    return euler_to_matrix(r, t, p - r if subtract_rot else p).reshape(len(pix) * len(psi), 8, 3, 3)


def _perturbed_tensors(coarse: np.ndarray, fine: np.ndarray, step: float, rng: np.random.Generator | None,
                       perturb: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply RELION's random perturbation (right-multiplied) and move to torch float32."""
    if rng is not None and perturb > 0:
        pm = perturbation_matrix(step, rng, perturb)
        coarse = coarse @ pm
        fine = fine @ pm
    return (torch.as_tensor(coarse, dtype=torch.float32, device=device),
            torch.as_tensor(fine, dtype=torch.float32, device=device))


def global_rotations(order: int, sym: str = "C1", rng: np.random.Generator | None = None,
                     perturb: float = 0.5, device=None) -> RotationSet:
    """RELION's global orientation grid at HEALPix ``order`` with oversampling 1.

    Parameters
    ----------
    order : int
        HEALPix order of the coarse grid (step 60 / 2^order deg).
    sym : str
        Point group; directions are restricted to its asymmetric unit.
    rng : numpy.random.Generator, optional
        Source of the random perturbation (none without it).
    perturb : float
        Largest perturbation as a fraction of the step.
    device : torch.device or str, optional
        Where the matrices live.

    Returns
    -------
    RotationSet
        Coarse rotations (R, 3, 3), children (R, 8, 3, 3), zero log priors, steps [deg].
    """
    step = healpix.angular_step_deg(order)
    vec = healpix.pix2vec_nest(order)
    keep = healpix.asymmetric_unit_mask(vec, symmetry_matrices(sym))
    pix = np.nonzero(keep)[0]
    dirs = healpix.pix2ang_nest(order, pix)  # (n, 2) rot, tilt
    n_psi = max(1, int(round(360.0 / step)))
    dpsi = 360.0 / n_psi
    psi = np.arange(n_psi) * dpsi
    rot = np.repeat(dirs[:, 0], n_psi)
    tilt = np.repeat(dirs[:, 1], n_psi)
    psis = np.tile(psi, len(pix))
    coarse = euler_to_matrix(rot, tilt, psis)
    fine = _oversampled_children(order, pix, psi, dpsi, subtract_rot=False)
    tc, tf = _perturbed_tensors(coarse, fine, step, rng, perturb, device)
    return RotationSet(tc, tf, torch.zeros(len(tc), device=device), torch.zeros(tf.shape[:2], device=device),
                       step, step / 2)


def rotation_angle_deg(m: torch.Tensor) -> torch.Tensor:
    """Rotation angle of rotation matrices.

    Parameters
    ----------
    m : torch.Tensor
        (..., 3, 3) rotation matrices.

    Returns
    -------
    torch.Tensor
        (...) angles [deg].
    """
    tr = m.diagonal(dim1=-2, dim2=-1).sum(-1)
    return torch.rad2deg(torch.arccos(((tr - 1) / 2).clamp(-1, 1)))


def local_rotations(order: int, sigma_deg: float, n_sigma: float = 3.0, rng: np.random.Generator | None = None,
                    perturb: float = 0.5, device=None) -> RotationSet:
    """Small rotations D (angle <= n_sigma * sigma) on the grid of ``order``, with a Gaussian log prior.

    Use with :func:`compose_local` to centre them on each particle's previous pose.

    Parameters
    ----------
    order : int
        HEALPix order of the grid.
    sigma_deg : float
        Width of the Gaussian prior on the angle of D [deg].
    n_sigma : float
        Largest angle of D in units of sigma (at least one step).
    rng : numpy.random.Generator, optional
        Source of the random perturbation.
    perturb : float
        Largest perturbation as a fraction of the step.
    device : torch.device or str, optional
        Where the matrices live.

    Returns
    -------
    RotationSet
        Deltas (R, 3, 3), children (R, 8, 3, 3) and their log priors (R,), (R, 8).
    """
    step = healpix.angular_step_deg(order)
    limit = max(n_sigma * sigma_deg, step)
    ang = healpix.pix2ang_nest(order)
    near = np.nonzero(ang[:, 1] <= limit + step)[0]
    psi = _psi_values(step, hi=limit + 1e-6, centred=True)
    dr = np.repeat(ang[near, 0], len(psi))
    dt = np.repeat(ang[near, 1], len(psi))
    pp = np.tile(psi, len(near))
    coarse = euler_to_matrix(dr, dt, pp - dr)
    fine = _oversampled_children(order, near, psi, step, subtract_rot=True)
    tc, tf = _perturbed_tensors(coarse, fine, step, rng, perturb, device)
    a_c = rotation_angle_deg(tc)
    keep = a_c <= limit
    tc, tf, a_c = tc[keep], tf[keep], a_c[keep]
    a_f = rotation_angle_deg(tf)
    s2 = 2 * sigma_deg ** 2
    return RotationSet(tc, tf, -(a_c ** 2) / s2, -(a_f ** 2) / s2, step, step / 2)


def pose_change_deg(prev: np.ndarray, new: np.ndarray, sym_mats: np.ndarray | None = None) -> np.ndarray:
    """Angle between poses, the smallest over the point group's operators.

    Poses A and A g (g in the group) describe the same particle of a symmetric reference, so
    the change from A to B is min_g angle((A g)^T B); trace((A g)^T B) = sum_ij g_ij (A^T B)_ij.

    Parameters
    ----------
    prev, new : numpy.ndarray
        (n, 3, 3) rotation matrices.
    sym_mats : numpy.ndarray, optional
        (G, 3, 3) point group; None or C1: the plain angle of A^T B.

    Returns
    -------
    numpy.ndarray
        (n,) angles [deg].
    """
    rel = np.einsum("nji,njk->nik", np.asarray(prev, dtype=np.float64), np.asarray(new, dtype=np.float64))
    g = np.eye(3)[None] if sym_mats is None or len(sym_mats) == 0 else np.asarray(sym_mats, dtype=np.float64)
    tr = np.einsum("nij,gij->ng", rel, g).max(axis=1)
    return np.rad2deg(np.arccos(np.clip((tr - 1) / 2, -1, 1)))


def compose_local(prev: torch.Tensor, local: RotationSet) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-particle rotations A_prev @ D of a local search.

    Parameters
    ----------
    prev : torch.Tensor
        (B, 3, 3) previous poses.
    local : RotationSet
        Deltas D from :func:`local_rotations`.

    Returns
    -------
    coarse : torch.Tensor
        (B, R, 3, 3).
    children : torch.Tensor
        (B, R, C, 3, 3).
    """
    coarse = torch.matmul(prev[:, None], local.matrices[None])
    fine = torch.matmul(prev[:, None, None], local.children[None])
    return coarse, fine


@dataclass
class TranslationSet:
    """Coarse translations (T, ndim) px and their oversampled children (T, C, ndim) px."""

    points: torch.Tensor
    children: torch.Tensor
    step_px: float
    range_px: float


def translation_grid(range_px: float, step_px: float, ndim: int = 3, device=None,
                     children_contain_centre: bool = False) -> TranslationSet:
    """Coarse translations inside the ball |t| <= ``range_px`` (always containing 0) and their children.

    Default (RELION): the oversampled children of a coarse point t are t +- step/4 on each
    axis (2^ndim children, a lattice of step/2), so the search centre (the previous offset) is
    never a candidate and every particle moves by sqrt(ndim) step/4 every iteration (0.87 px at
    a 2 px coarse step). ``children_contain_centre``: t + {-step/3, 0, +step/3} on each axis
    (3^ndim children, a lattice of step/3): the children of the coarse points tile space without
    overlap, symmetrically around each coarse point, and the search centre is a candidate; the
    coarse points are those with a child in the ball, so that the fine lattice covers it. Once
    the posterior is sharp (Pmax ~ 1) RELION's forced move costs more log-likelihood than the
    difference between two similar classes (issue 22: about 2400 against 800 at box 32), so the
    class is decided by which reference tolerates the displacement best; 3D classification
    uses the centred layout.

    Parameters
    ----------
    range_px : float
        Search range [px].
    step_px : float
        Coarse step [px]; the children are on a lattice of step ``step_px``/2 (default) or
        ``step_px``/3 (``children_contain_centre``).
    ndim : int
        2 or 3.
    device : torch.device or str, optional
        Where the points live.
    children_contain_centre : bool
        Three children per axis, one on the coarse point (see above).

    Returns
    -------
    TranslationSet
        Points (T, ndim) and children (T, 2^ndim or 3^ndim, ndim) [px].
    """
    step_px = float(max(step_px, 1e-3))
    n = int(math.floor(range_px / step_px + 1e-9)) + int(children_contain_centre)
    axis = torch.arange(-n, n + 1, dtype=torch.float32) * step_px
    grid = torch.stack(torch.meshgrid(*([axis] * ndim), indexing="ij"), -1).reshape(-1, ndim)
    signs = [-1 / 3, 0.0, 1 / 3] if children_contain_centre else [-0.25, 0.25]
    corners = torch.stack(torch.meshgrid(*([torch.tensor(signs)] * ndim), indexing="ij"), -1).reshape(-1, ndim)
    ch = grid[:, None, :] + corners[None] * step_px
    if children_contain_centre:  # every coarse point with a child in the ball: the fine lattice covers the ball
        keep = ch.norm(dim=-1).min(dim=1).values <= range_px + 1e-6
    else:  # RELION: the coarse points in the ball
        keep = grid.norm(dim=-1) <= range_px + 1e-6
    return TranslationSet(grid[keep].to(device), ch[keep].to(device), step_px, float(range_px))


def children_per_axis(children_contain_centre: bool) -> int:
    """Oversampled translations per axis and coarse point: the coarse step is this times the fine step.

    Parameters
    ----------
    children_contain_centre : bool
        The layout of :func:`translation_grid`.

    Returns
    -------
    int
        3 for the centred layout, 2 for RELION's.
    """
    return 3 if children_contain_centre else 2


def order_for_step(step_deg: float) -> int:
    """HEALPix coarse order whose oversampled step (half the coarse one) is closest to ``step_deg``.

    Parameters
    ----------
    step_deg : float
        Wanted angular step [deg] (RELION's GUI values: 30, 15, 7.5, 3.7, 1.8, ...).

    Returns
    -------
    int
        HEALPix order 0..7.
    """
    return int(min(range(0, 8), key=lambda o: abs(np.log(healpix.angular_step_deg(o) / 2 / step_deg))))


# ----------------------------------------------------------------------------- auto-sampling (refinement)


@dataclass(frozen=True)
class AutoSamplingRules:
    """What decides when auto-refine's sampling becomes finer (RELION §3.6/3.7).

    ``auto_ignore_angles``: poses count as settled at average Pmax >= 0.8 whatever the
    orientation changes (pseudo-symmetric particles refined in C1 jump between equivalent poses).
    """

    particle_diameter_A: float
    auto_local_order: int
    max_order: int
    auto_ignore_angles: bool = False


@dataclass
class SamplingState:
    """The sampling of an auto-refinement and the convergence counters that move it on.

    ``order``: HEALPix order of the coarse grid; offsets in px (``offset_step_px`` is the
    coarse step, twice the oversampled one); ``local`` with ``sigma_rot_deg`` once searches
    are local; the rest are RELION's counters of iterations without resolution gain or
    large pose changes.
    """

    order: int
    offset_range_px: float
    offset_step_px: float
    local: bool = False
    sigma_rot_deg: float = 0.0
    best_shell: int = 0
    iters_no_res_gain: int = 0
    iters_no_large_change: int = 0
    smallest_ang_change: float = 1e9
    smallest_off_change: float = 1e9
    fine_enough: bool = False
    converged: bool = False


def _count_stalls(samp: SamplingState, rules: AutoSamplingRules, res_shell: int, ang_change: float,
                  off_change: float, pmax: float) -> None:
    """Update the counters of iterations without resolution gain and without large pose changes."""
    if res_shell > samp.best_shell:
        samp.best_shell = res_shell
        samp.iters_no_res_gain = 0
    else:
        samp.iters_no_res_gain += 1
    fine_step = healpix.angular_step_deg(samp.order) / 2
    # "no large change": the changes stopped decreasing (within 3 % of the smallest so far)
    # or are below 40 % of the current steps (RELION's updateOverallChangesInHiddenVariables)
    ang_small = ang_change >= 0.97 * samp.smallest_ang_change or ang_change < 0.4 * fine_step
    off_small = off_change >= 0.97 * samp.smallest_off_change or off_change < 0.4 * samp.offset_step_px / 2
    small = (ang_small and off_small) or (rules.auto_ignore_angles and pmax >= 0.8)
    samp.smallest_ang_change = min(samp.smallest_ang_change, ang_change)
    samp.smallest_off_change = min(samp.smallest_off_change, off_change)
    samp.iters_no_large_change = samp.iters_no_large_change + 1 if small else 0


def _finer(samp: SamplingState, rules: AutoSamplingRules, off_change: float) -> None:
    """One HEALPix order finer, a smaller translational grid; local searches from ``auto_local_order``."""
    samp.order += 1
    new_step = max(samp.offset_step_px / 2, 0.5)
    new_range = min(max(3 * off_change, 1.5 * new_step), 1.3 * samp.offset_range_px)
    if new_range > 4 * new_step:  # RELION: keep the translational grid small (~4 steps of range)
        new_range /= 2
        if new_range > 4 * new_step:
            new_step = min(new_range / 4, samp.offset_step_px)  # never coarser than before
    samp.offset_step_px, samp.offset_range_px = new_step, max(new_range, new_step)
    if samp.local or samp.order >= rules.auto_local_order:  # local from the start (given poses) stays local
        sigma = 2 * healpix.angular_step_deg(samp.order) / 2
        # a prior narrower than that (a user's --sigma-ang) is kept
        samp.sigma_rot_deg = min(samp.sigma_rot_deg, sigma) if samp.local and samp.sigma_rot_deg > 0 else sigma
        samp.local = True
    samp.iters_no_res_gain = 0
    samp.iters_no_large_change = 0
    samp.smallest_ang_change = 1e9
    samp.smallest_off_change = 1e9


def update_sampling(samp: SamplingState, rules: AutoSamplingRules, res_shell: int, ang_change: float,
                    off_change: float, box: int, px: float, pmax: float = 0.0,
                    acc_rot_deg: float | None = None) -> None:
    """RELION's auto-sampling (§3.6/3.7): finer sampling, or convergence, after a stall (in place).

    Only local searches (or the finest order) can be fine enough: an early stall at low
    resolution, where the global sampling is trivially fine enough, moves on to local
    searches instead of ending the run.

    Parameters
    ----------
    samp : SamplingState
        Updated in place.
    rules : AutoSamplingRules
        Particle diameter and the orders of local searches and of the end.
    res_shell : int
        Current resolution shell [Fourier px].
    ang_change, off_change : float
        Mean pose changes of this iteration [deg] and [px].
    box : int
        Box size N [px].
    px : float
        Pixel size [Å].
    pmax : float
        Average maximum posterior probability of this iteration.
    acc_rot_deg : float, optional
        Expected angular accuracy [deg] (RELION's criterion); None: the resolution-limited step rule.
    """
    _count_stalls(samp, rules, res_shell, ang_change, off_change, pmax)
    fine_step = healpix.angular_step_deg(samp.order) / 2
    res_A = box * px / max(res_shell, 1)
    needed = 360.0 / math.ceil(math.pi * rules.particle_diameter_A / res_A)  # resolution-limited step
    # global searches are never final: the run goes through local searches (or the finest order) first
    if acc_rot_deg is not None:  # RELION: the current (oversampled) step below 0.75 x the expected accuracy
        samp.fine_enough = (fine_step < 0.75 * acc_rot_deg and samp.local) or samp.order >= rules.max_order
    else:
        samp.fine_enough = (fine_step <= 0.5 * needed and samp.local) or samp.order >= rules.max_order
    if samp.iters_no_res_gain >= 1 and samp.iters_no_large_change >= 1:
        if samp.fine_enough:
            samp.converged = True
            return
        _finer(samp, rules, off_change)
