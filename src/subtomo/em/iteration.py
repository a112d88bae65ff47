"""Shared machinery of the 3D clients (refine, classify): particle sources, one E-step pass.

``ParticleSource`` hands out real-space subtomograms and their 3D CTFs (full-box rfft,
engine layout) by particle index; ``estep_pass`` runs the E-step and accumulates the
M-step sums for a set of particles against K references, in batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch

from subtomo.em import reconstruct as rc
from subtomo.em import sampling
from subtomo.em.components import FourierComponents, fourier_components
from subtomo.em.expectation import (
    BatchData,
    BatchPosterior,
    EStepOptions,
    Orientations,
    expectation_batch,
    precompute_stacked_refs,
)
from subtomo.em.maximisation import SufficientStats, accumulate
from subtomo.em.projector3d import Projector3D, insert3d
from subtomo.fourier import fft_centered
from subtomo.geometry.symmetry import axis_rotation


class ParticleSource(Protocol):
    """What the engine reads particles from: n subtomograms of N^3 px at ``pixel_size_A`` Å, and their 3D CTFs."""

    n: int
    box: int
    pixel_size_A: float

    def volumes(self, idx: np.ndarray, device) -> torch.Tensor:
        """(B, N, N, N) float32 real-space subtomograms."""
        ...

    def ctf(self, idx: np.ndarray, device) -> torch.Tensor | None:
        """(B, N, N, N//2+1) 3D CTFs at the full box in the engine's rfft layout, or None (CTF = 1)."""
        ...


class InMemorySource:
    """Particles and CTFs held as tensors (tests, benchmarks, cached job data)."""

    def __init__(self, volumes: torch.Tensor, pixel_size_A: float, ctfs: torch.Tensor | None = None) -> None:
        self.vols = volumes
        self.ctfs = ctfs
        self.n = int(volumes.shape[0])
        self.box = int(volumes.shape[-1])
        self.pixel_size_A = float(pixel_size_A)

    def volumes(self, idx, device) -> torch.Tensor:
        """(B, N, N, N) float32 subtomograms of particles ``idx``."""
        return self.vols[torch.as_tensor(np.asarray(idx), dtype=torch.long)].to(device).float()

    def ctf(self, idx, device):
        """(B, N, N, N//2+1) float32 3D CTFs of particles ``idx``, or None."""
        if self.ctfs is None:
            return None
        return self.ctfs[torch.as_tensor(np.asarray(idx), dtype=torch.long)].to(device).float()


@dataclass
class PoseTable:
    """Per-particle state carried between iterations (numpy, float64)."""

    rot: np.ndarray  # (n, 3, 3)
    offset_px: np.ndarray  # (n, 3)
    prior_offset_px: np.ndarray  # (n, 3)
    cls: np.ndarray  # (n,) 0-based
    max_prob: np.ndarray
    log_lik: np.ndarray
    n_sig: np.ndarray

    @staticmethod
    def new(n: int, rot: np.ndarray, offset_px: np.ndarray) -> "PoseTable":
        """Poses (n, 3, 3) and origins (n, 3) px of ``n`` particles; the origins are also the offset prior centres."""
        return PoseTable(rot.copy(), offset_px.copy(), offset_px.copy(), np.zeros(n, dtype=np.int64),
                         np.zeros(n), np.zeros(n), np.zeros(n, dtype=np.int64))

    def copy(self) -> "PoseTable":
        """A deep copy."""
        return PoseTable(*(getattr(self, f).copy() for f in ("rot", "offset_px", "prior_offset_px", "cls",
                                                              "max_prob", "log_lik", "n_sig")))


@dataclass
class PassConfig:
    """What one E-step pass does."""

    size: int  # current image size (even)
    coarse_size: int
    mask: torch.Tensor  # (N, N, N) soft particle mask used in the E-step (zero outside)
    rotations: sampling.RotationSet | None  # global grid (shared), or the local deltas
    local: bool
    translations: sampling.TranslationSet
    estep: EStepOptions
    batch_size: int = 16
    noise_stats: bool = True
    skip_align: bool = False  # poses fixed (only class and nothing else searched)
    class_prior: torch.Tensor | None = None  # (K,) probabilities
    sym_mats: np.ndarray | None = None  # (G, 3, 3) point group: pose changes are measured modulo it


def batch_transforms(src: ParticleSource, idx: np.ndarray, comps: FourierComponents, mask: torch.Tensor,
                     device, use_ctf: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked and unmasked particle transforms and CTFs of a batch at the components of ``comps``.

    Parameters
    ----------
    src : ParticleSource
        n subtomograms (N^3 px) and their 3D CTFs.
    idx : numpy.ndarray
        (B,) particle indices.
    comps : FourierComponents
        The M components of the current size.
    mask : torch.Tensor
        (N, N, N) soft particle mask (zero outside).
    device : torch.device or str
        Where the batch goes.
    use_ctf : bool
        Read the CTFs (else ones).

    Returns
    -------
    x_masked, x_unmasked : torch.Tensor
        (B, M) complex64.
    ctf : torch.Tensor
        (B, M) float32.
    """
    vols = src.volumes(idx, device)
    xu = comps.extract(fft_centered(vols, 3))
    xm = comps.extract(fft_centered(vols * mask, 3))
    c = src.ctf(idx, device) if use_ctf else None
    ctf = comps.extract(c) if c is not None else torch.ones(xu.shape, device=device)
    return xm, xu, ctf


def _batch_orientations(cfg: PassConfig, prev_rot: torch.Tensor,
                        device) -> tuple[Orientations, torch.Tensor, torch.Tensor]:
    """The orientations and translations (T, 3), (T, C, 3) searched for one batch with previous poses (B, 3, 3).

    Fixed poses (``skip_align``): only each particle's own pose; local: the deltas around it; else the global grid.
    """
    if cfg.skip_align:
        orient = Orientations(prev_rot[:, None], prev_rot[:, None, None], torch.zeros(1, device=device),
                              torch.zeros(1, 1, device=device))
        return orient, torch.zeros(1, 3, device=device), torch.zeros(1, 1, 3, device=device)
    rot_set = cfg.rotations
    assert rot_set is not None, "a search needs a rotation set"
    tr = cfg.translations
    if cfg.local:
        co, ch = sampling.compose_local(prev_rot, _to(rot_set, device))
        orient = Orientations(co, ch, rot_set.log_prior.to(device), rot_set.child_log_prior.to(device))
    else:
        orient = Orientations(rot_set.matrices.to(device), rot_set.children.to(device),
                              rot_set.log_prior.to(device), rot_set.child_log_prior.to(device))
    return orient, tr.points.to(device), tr.children.to(device)


def _store_best(poses: PoseTable, bidx: np.ndarray, post: BatchPosterior,
                sym_mats: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Keep each particle's best pose and E-step summaries; return its angular (deg) and offset (px) changes."""
    br, bo, bc = post.best()
    br_np = br.double().cpu().numpy()
    ang = sampling.pose_change_deg(poses.rot[bidx], br_np, sym_mats)
    off = np.linalg.norm(bo.double().cpu().numpy() - poses.offset_px[bidx], axis=1)
    poses.rot[bidx] = br_np
    poses.offset_px[bidx] = bo.double().cpu().numpy()
    poses.cls[bidx] = bc.cpu().numpy()
    poses.max_prob[bidx] = post.max_prob.double().cpu().numpy()
    poses.log_lik[bidx] = post.log_lik.double().cpu().numpy()
    poses.n_sig[bidx] = post.n_significant.cpu().numpy()
    return ang, off


@dataclass
class _PassInputs:
    """What every batch of a pass shares: projectors, components and their masks, 1/sigma^2, class priors."""

    projectors: list[Projector3D]
    comps: FourierComponents
    inv_s2: torch.Tensor
    coarse_mask: torch.Tensor
    fine_mask: torch.Tensor
    log_cls: torch.Tensor
    coarse_refs: tuple | None


def _prepare_pass(src: ParticleSource, idx: np.ndarray, maps: torch.Tensor, sigma2: torch.Tensor,
                  comps: FourierComponents, cfg: PassConfig, device, pad: int, use_ctf: bool) -> _PassInputs:
    k_cls = maps.shape[0]
    projectors = [Projector3D(maps[k].to(device), pad=pad) for k in range(k_cls)]
    if use_ctf:
        # components with no data in any particle (missing wedge) add nothing to scores or sums
        comps = comps.select(measured_components(src, idx, comps, device, cfg.batch_size))
    inv_s2 = 1.0 / sigma2.to(device).float().clamp(min=1e-30)[comps.shell.clamp(max=len(sigma2) - 1)]
    coarse_mask, fine_mask = _pass_masks(maps, comps, cfg.coarse_size)
    prior = cfg.class_prior if cfg.class_prior is not None else torch.full((k_cls,), 1.0 / k_cls)
    log_cls = torch.log(prior.to(device).float().clamp(min=1e-30))
    coarse_refs = None
    if not cfg.skip_align and not cfg.local and cfg.rotations is not None:
        coarse_refs = precompute_stacked_refs(projectors, cfg.rotations.matrices.to(device), comps.k[coarse_mask])
    return _PassInputs(projectors, comps, inv_s2, coarse_mask, fine_mask, log_cls, coarse_refs)


def _batch_pass(src: ParticleSource, bidx: np.ndarray, poses: PoseTable, prep: _PassInputs, cfg: PassConfig,
                stats: SufficientStats, device, use_ctf: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """E-step of one batch, its sums added to ``stats``, its poses stored; (angle, offset changes, Pmax)."""
    comps = prep.comps
    xm, xu, ctf = batch_transforms(src, bidx, comps, cfg.mask, device, use_ctf)
    prev_rot = torch.as_tensor(poses.rot[bidx], dtype=torch.float32, device=device)
    prev_off = torch.as_tensor(poses.offset_px[bidx], dtype=torch.float32, device=device)
    prior_off = torch.as_tensor(poses.prior_offset_px[bidx], dtype=torch.float32, device=device)
    batch = BatchData(xm, ctf, prev_off, prior_off, prev_rot)
    orient, tpts, tch = _batch_orientations(cfg, prev_rot, device)
    post = expectation_batch(batch, comps, prep.coarse_mask, prep.inv_s2, prep.projectors, orient, tpts, tch,
                             prep.log_cls, cfg.estep, coarse_refs=prep.coarse_refs, fine_mask=prep.fine_mask)
    accumulate(stats, post, xu, xm, ctf, prep.inv_s2, comps, prep.projectors, insert3d, prior_off,
               noise_stats=cfg.noise_stats)
    ang, off = _store_best(poses, bidx, post, cfg.sym_mats)
    return ang, off, post.max_prob.cpu().numpy()


def estep_pass(src: ParticleSource, idx: np.ndarray, poses: PoseTable, maps: torch.Tensor, sigma2: torch.Tensor,
               comps: FourierComponents, cfg: PassConfig, device, pad: int = 2, use_ctf: bool = True,
               progress: Callable | None = None) -> tuple[SufficientStats, dict]:
    """E-step and M-step sums of particles ``idx`` against references ``maps``, in batches.

    Updates ``poses`` in place for those particles (best pose, class, Pmax, log-likelihood,
    number of significant samples).

    Parameters
    ----------
    src : ParticleSource
        n subtomograms (N^3 px) and their 3D CTFs.
    idx : numpy.ndarray
        (n_sel,) indices of the particles of this pass.
    poses : PoseTable
        Per-particle state (previous poses: search centres and local-search priors).
    maps : torch.Tensor
        (K, N, N, N) references.
    sigma2 : torch.Tensor
        (N//2 + 1,) noise power per shell.
    comps : FourierComponents
        The components of the current size.
    cfg : PassConfig
        Sizes, mask, rotations and translations, E-step settings.
    device : torch.device or str
        Where to compute.
    pad : int
        Padding factor of the reference transforms.
    use_ctf : bool
        Weight by the particles' 3D CTFs.
    progress : callable, optional
        Wraps the list of batches (a progress bar).

    Returns
    -------
    stats : SufficientStats
        The additive M-step sums of these particles.
    summary : dict
        ``ang_change_deg`` (mean, deg), ``off_change_px`` (RMS, px), ``pmax`` (mean).
    """
    prep = _prepare_pass(src, idx, maps, sigma2, comps, cfg, device, pad, use_ctf)
    stats = SufficientStats.zeros(maps.shape[0], maps.shape[-1], 3, device=device)
    changes_ang, changes_off, pmax = [], [], []
    batches = [idx[s:s + cfg.batch_size] for s in range(0, len(idx), cfg.batch_size)]
    for bidx in (progress(batches) if progress else batches):
        ang, off, pm = _batch_pass(src, bidx, poses, prep, cfg, stats, device, use_ctf)
        changes_ang.append(ang)
        changes_off.append(off)
        pmax.append(pm)
    return stats, _pass_summary(changes_ang, changes_off, pmax)


def _pass_masks(maps: torch.Tensor, comps: FourierComponents, coarse_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Components of the coarse pass (below the coarse size) and of the fine pass: none where every reference is zero."""
    support = reference_support_shell(maps)
    return (comps.shell < coarse_size / 2) & (comps.shell < support), comps.shell < support


def _pass_summary(changes_ang: list, changes_off: list, pmax: list) -> dict:
    """Mean angular change [deg], RMS offset change [px] and mean Pmax of a pass."""
    ca = np.concatenate(changes_ang) if changes_ang else np.zeros(0)
    co_ = np.concatenate(changes_off) if changes_off else np.zeros(0)
    return {"ang_change_deg": float(np.mean(ca)) if len(ca) else 0.0,
            "off_change_px": float(np.sqrt(np.mean(co_ ** 2))) if len(co_) else 0.0,
            "pmax": float(np.mean(np.concatenate(pmax))) if pmax else 0.0}


def measured_components(src: ParticleSource, idx: np.ndarray, comps: FourierComponents, device,
                        batch_size: int = 64) -> torch.Tensor:
    """Components where at least one particle's 3D CTF is non-zero (outside the missing wedge).

    Parameters
    ----------
    src : ParticleSource
        n subtomograms (N^3 px) and their 3D CTFs.
    idx : numpy.ndarray
        (n_sel,) particle indices.
    comps : FourierComponents
        The M candidate components.
    device : torch.device or str
        Where to compute.
    batch_size : int
        CTFs read at a time (at least 64).

    Returns
    -------
    torch.Tensor
        (M,) bool.
    """
    keep = torch.zeros(comps.m, dtype=torch.bool, device=device)
    for s in range(0, len(idx), max(batch_size, 64)):
        c = src.ctf(idx[s:s + max(batch_size, 64)], device)
        if c is None:
            return torch.ones(comps.m, dtype=torch.bool, device=device)
        keep |= (comps.extract(c).abs() > 1e-4).any(0)
    return keep


def reference_support_shell(maps: torch.Tensor, rel: float = 1e-7) -> int:
    """1 + the last shell where some reference has power above ``rel`` x its largest non-DC shell power.

    Parameters
    ----------
    maps : torch.Tensor
        (K, N^ndim) references.
    rel : float
        Relative power threshold.

    Returns
    -------
    int
        Shell index [Fourier px]; N//2 for all-zero references.
    """
    n = maps.shape[-1]
    ndim = maps.ndim - 1
    pw = torch.stack([rc.shell_mean(rc.fourier_from_map(m.float(), ndim).abs() ** 2, rc.full_shells(n, ndim, maps.device),
                                    n // 2 + 1) for m in maps])
    pw[:, 0] = 0
    top = pw.max(1, keepdim=True).values.clamp(min=1e-30)
    live = torch.nonzero((pw > rel * top).any(0))
    return int(live.max()) + 1 if len(live) else n // 2


def _to(rs: sampling.RotationSet, device) -> sampling.RotationSet:
    return sampling.RotationSet(rs.matrices.to(device), rs.children.to(device), rs.log_prior.to(device),
                                rs.child_log_prior.to(device), rs.step_deg, rs.fine_step_deg)


def delta_stats(src: ParticleSource, idx: np.ndarray, poses: PoseTable, n_classes: int, sigma2: torch.Tensor,
                comps: FourierComponents, device, batch_size: int = 16, use_ctf: bool = True) -> SufficientStats:
    """M-step sums for fixed poses (weight 1 at each particle's pose and class): iteration 0, the oracle.

    Parameters
    ----------
    src : ParticleSource
        n subtomograms (N^3 px) and their 3D CTFs.
    idx : numpy.ndarray
        (n_sel,) particle indices.
    poses : PoseTable
        Rotations, origins [px] and classes (0-based) to insert at.
    n_classes : int
        Number of classes K of the sums.
    sigma2 : torch.Tensor
        (N//2 + 1,) noise power per shell.
    comps : FourierComponents
        The components to insert (usually the full box).
    device : torch.device or str
        Where to compute.
    batch_size : int
        Particles per batch.
    use_ctf : bool
        Weight by the particles' 3D CTFs.

    Returns
    -------
    SufficientStats
    """
    n = src.box
    stats = SufficientStats.zeros(n_classes, n, 3, device=device)
    inv_s2 = 1.0 / sigma2.to(device).float().clamp(min=1e-30)[comps.shell.clamp(max=len(sigma2) - 1)]
    ones_mask = torch.ones((n,) * 3, device=device)
    for s in range(0, len(idx), batch_size):
        bidx = idx[s:s + batch_size]
        b = len(bidx)
        _, xu, ctf = batch_transforms(src, bidx, comps, ones_mask, device, use_ctf)
        rot = torch.as_tensor(poses.rot[bidx], dtype=torch.float32, device=device)[:, None]
        off = torch.as_tensor(poses.offset_px[bidx], dtype=torch.float32, device=device)[:, None]
        cls = torch.as_tensor(poses.cls[bidx], dtype=torch.long, device=device)[:, None]
        post = BatchPosterior(rot, off, cls, torch.ones(b, 1, device=device), torch.ones(b, device=device),
                              torch.zeros(b, device=device), torch.ones(b, dtype=torch.long, device=device))
        accumulate(stats, post, xu, xu, ctf, inv_s2, comps, [], insert3d,
                   torch.as_tensor(poses.prior_offset_px[bidx], dtype=torch.float32, device=device), noise_stats=False)
    return stats


def initial_sigma2(src: ParticleSource, idx: np.ndarray, mask: torch.Tensor, device, use_ctf: bool = True,
                   batch_size: int = 16, max_particles: int = 200) -> torch.Tensor:
    """RELION's starting noise: sigma^2(r) = 1/2 (mean |X|^2 - |mean X|^2) over components with CTF != 0.

    Parameters
    ----------
    src : ParticleSource
        n subtomograms (N^3 px) and their 3D CTFs.
    idx : numpy.ndarray
        Particle indices (the first ``max_particles`` are used).
    mask : torch.Tensor
        (N, N, N) particle mask.
    device : torch.device or str
        Where to compute.
    use_ctf : bool
        Count only components the CTF measures.
    batch_size : int
        Particles per batch.
    max_particles : int
        Particles used at most.

    Returns
    -------
    torch.Tensor
        (N//2 + 1,) float32, positive.
    """
    n = src.box
    comps = fourier_components(n, n, 3, device=device)
    sel = idx[:max_particles]
    n_shells = n // 2 + 1
    s1 = torch.zeros(comps.m, dtype=torch.complex128, device=device)
    s2 = torch.zeros(comps.m, dtype=torch.float64, device=device)
    cnt = torch.zeros(comps.m, dtype=torch.float64, device=device)
    for s in range(0, len(sel), batch_size):
        xm, _, ctf = batch_transforms(src, sel[s:s + batch_size], comps, mask, device, use_ctf)
        ok = (ctf.abs() > 1e-4).double()
        s1 += (xm.to(torch.complex128) * ok).sum(0)
        s2 += ((xm.abs() ** 2).double() * ok).sum(0)
        cnt += ok.sum(0)
    mean_pow = s2 / cnt.clamp(min=1)
    avg = s1 / cnt.clamp(min=1)
    var = (mean_pow - avg.abs() ** 2).clamp(min=0) / 2
    out = torch.zeros(n_shells, dtype=torch.float64, device=device)
    c = torch.zeros(n_shells, dtype=torch.float64, device=device)
    out.index_add_(0, comps.shell, var * (cnt > 0))
    c.index_add_(0, comps.shell, (cnt > 0).double())
    res = out / c.clamp(min=1)
    res[0] = res[1]
    res = torch.where(res > 0, res, res[res > 0].min() if (res > 0).any() else torch.ones_like(res))
    return res.float()


def coarse_size_for(step_deg: float, diameter_A: float, box: int, pixel_size_A: float, current_size: int) -> int:
    """RELION §3.3: coarse_size = 2 ceil(N p / ((step/360) pi D / 1.2)), capped by the current size.

    Parameters
    ----------
    step_deg : float
        Coarse angular step [deg].
    diameter_A : float
        Particle diameter [Å].
    box : int
        Box size N [px].
    pixel_size_A : float
        Pixel size p [Å].
    current_size : int
        Current image size [px].

    Returns
    -------
    int
        Coarse image size [px], at least 8.
    """
    rotated = (step_deg / 360.0) * math.pi * diameter_A
    res = rotated / 1.2
    size = 2 * int(math.ceil(box * pixel_size_A / max(res, 1e-6)))
    return int(min(current_size, max(size, 8)))


def expected_angular_accuracy_deg(src: ParticleSource, idx: np.ndarray, poses: PoseTable, ref: torch.Tensor,
                                  sigma2: torch.Tensor, comps: FourierComponents, device, use_ctf: bool = True,
                                  pad: int = 2, n_particles: int = 10, seed: int = 0) -> float:
    """RELION's ``calculateExpectedAngularErrors`` (rotations only) [deg].

    The mean over ``n_particles`` particles of the smallest rotation of the best pose (about
    a random axis) whose model difference sum C^2 |A(R) - A(R')|^2 / (2 sigma^2) exceeds ln(100).
    The rotations tried are 48 angles from 0.05 to 30 deg, geometrically spaced.

    Parameters
    ----------
    src : ParticleSource
        The particles (N^3 px) and their 3D CTFs.
    idx : numpy.ndarray
        (n,) particle indices; the first ``n_particles`` are used.
    poses : PoseTable
        Current poses; ``rot`` (n, 3, 3) RELION matrices A.
    ref : torch.Tensor
        (N, N, N) real reference map.
    sigma2 : torch.Tensor
        (n_shells,) noise power per shell (e.g. N//2+1 shells); shells beyond use the last.
    comps : FourierComponents
        The 3D components the difference is summed over (current size).
    device : torch.device or str
        Where to compute.
    use_ctf : bool
        Weight by the particles' 3D CTFs (C^2); False: C = 1.
    pad : int
        Padding factor of the reference projector.
    n_particles : int
        Number of particles averaged.
    seed : int
        Seed of the random axes.

    Returns
    -------
    float
        Expected angular accuracy [deg]; 30 for a particle whose difference never exceeds ln(100),
        999.0 when ``idx`` is empty.
    """
    sel = np.asarray(idx)[:n_particles]
    if len(sel) == 0:
        return 999.0
    rng = np.random.default_rng(seed)
    proj = Projector3D(ref.to(device), pad=pad)
    inv_s2 = 1.0 / sigma2.to(device).float().clamp(min=1e-30)[comps.shell.clamp(max=len(sigma2) - 1)]
    c = src.ctf(sel, device) if use_ctf else None
    ctf = comps.extract(c) if c is not None else torch.ones(len(sel), comps.m, device=device)
    angles = np.geomspace(0.05, 30.0, 48)
    out = []
    for j, i in enumerate(sel):
        axis = rng.normal(size=3)
        a = poses.rot[i]
        mats = np.stack([a] + [a @ axis_rotation(axis, np.deg2rad(d)) for d in angles])
        f = proj.project(torch.as_tensor(mats, dtype=torch.float32, device=device), comps.k)  # (1 + D, M)
        diff = 0.5 * ((f[1:] - f[:1]).abs() ** 2 * (ctf[j] ** 2 * inv_s2)[None]).sum(-1)
        above = torch.nonzero(diff > math.log(100.0))
        out.append(float(angles[int(above[0])]) if len(above) else float(angles[-1]))
    return float(np.mean(out))
