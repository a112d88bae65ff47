"""Shared machinery of the 3D clients (refine, classify): particle sources, one E-step pass.

``ParticleSource`` hands out real-space subtomograms and their 3D CTFs (full-box rfft,
engine layout) by particle index; ``estep_pass`` runs the E-step and accumulates the
M-step sums for a set of particles against K references, in batches.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import threading
import uuid
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

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
    coarse_group_size,
    coarse_refs_bytes,
    coarse_scores,
    expectation_batch,
    precompute_stacked_refs,
)
from subtomo.em.maximisation import SufficientStats, accumulate
from subtomo.em.parallel import MapReduceCall, TaskRunner, contiguous_groups, to_device
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
                     device, use_ctf: bool = True,
                     memory_bytes: int = 512 * 2 ** 20) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked and unmasked particle transforms and CTFs of a batch at the components of ``comps``.

    Read and transformed in sub-batches whose full boxes (about 32 N^3 bytes per particle:
    volume, masked copy, shifted copies, two transforms, CTF) fit ``memory_bytes``.

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
    memory_bytes : int
        Bound on the full-box temporaries of one sub-batch [bytes].

    Returns
    -------
    x_masked, x_unmasked : torch.Tensor
        (B, M) complex64.
    ctf : torch.Tensor
        (B, M) float32.
    """
    step = max(1, memory_bytes // (32 * src.box ** 3))
    parts = []
    for s in range(0, len(idx), step):
        sub = idx[s:s + step]
        vols = src.volumes(sub, device)
        xu = comps.extract(fft_centered(vols, 3))
        xm = comps.extract(fft_centered(vols * mask, 3))
        del vols
        c = src.ctf(sub, device) if use_ctf else None
        parts.append((xm, xu, comps.extract(c) if c is not None else torch.ones(xu.shape, device=device)))
    if len(parts) == 1:
        return parts[0]
    xm_all, xu_all, ctf_all = (torch.cat([q[j] for q in parts]) for j in range(3))
    return xm_all, xu_all, ctf_all


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
    groups: "_CoarseGroups | None" = None


@dataclass
class _CoarseGroups:
    """Global search whose coarse references do not fit the pass budget: coarse scores per group of particles.

    Each rotation chunk is projected once for a group of ``size`` particles (the pass's
    particles ``idx`` in order, from the first batch not yet scored); the group's coarse
    scores (G, T, K, R) are held until its batches have been processed.
    """

    idx: np.ndarray
    size: int
    pos: dict
    rows: dict
    scores: torch.Tensor | None = None

    def held_bytes(self) -> int:
        """Bytes of the coarse scores held now."""
        return 0 if self.scores is None else self.scores.numel() * self.scores.element_size()


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
    coarse_refs, groups = None, None
    if not cfg.skip_align and not cfg.local and cfg.rotations is not None:
        # the references of every coarse rotation when they fit the pass budget, else groups of particles
        n_r, mc = cfg.rotations.matrices.shape[0], int(coarse_mask.sum())
        held = coarse_refs_bytes(k_cls, n_r, mc)
        if held <= cfg.estep.pass_memory_bytes:  # their power too (3/2 the bytes) within half the budget
            coarse_refs = precompute_stacked_refs(projectors, cfg.rotations.matrices.to(device), comps.k[coarse_mask],
                                                  with_power=3 * held <= cfg.estep.pass_memory_bytes)
        else:
            groups = _new_groups(idx, cfg, k_cls, mc)
    return _PassInputs(projectors, comps, inv_s2, coarse_mask, fine_mask, log_cls, coarse_refs, groups)


def _new_groups(idx: np.ndarray, cfg: PassConfig, k_cls: int, mc: int) -> _CoarseGroups:
    """Empty group bookkeeping for the particles ``idx`` of a pass (groups sized to the pass budget)."""
    assert cfg.rotations is not None
    size = coarse_group_size(cfg.estep.pass_memory_bytes, cfg.batch_size, len(idx), cfg.translations.points.shape[0],
                             k_cls, cfg.rotations.matrices.shape[0], mc)
    return _CoarseGroups(np.asarray(idx), size, {int(i): j for j, i in enumerate(idx)}, {})


def _group_scores(src: ParticleSource, bidx: np.ndarray, poses: PoseTable, prep: _PassInputs, cfg: PassConfig,
                  device, use_ctf: bool) -> torch.Tensor:
    """Coarse scores (B, T, K, R) of batch ``bidx``: from its group's, scoring the group (at Mc only) when new."""
    g = prep.groups
    assert g is not None
    if not all(int(i) in g.rows for i in bidx):
        g.scores, g.rows = None, {}  # the previous group's batches are done
        start = g.pos.get(int(bidx[0]), 0)
        gidx = g.idx[start:start + g.size]
        if not set(int(i) for i in bidx) <= set(int(i) for i in gidx):  # batches not cut from idx in order
            gidx = np.asarray(bidx)
        comps_c = prep.comps.select(prep.coarse_mask)
        xm, _, ctf = batch_transforms(src, gidx, comps_c, cfg.mask, device, use_ctf, cfg.estep.memory_bytes)
        t = lambda a: torch.as_tensor(a[gidx], dtype=torch.float32, device=device)  # noqa: E731
        batch = BatchData(xm, ctf, t(poses.offset_px), t(poses.prior_offset_px), t(poses.rot))
        orient, tpts, _ = _batch_orientations(cfg, t(poses.rot), device)
        g.scores = coarse_scores(batch, comps_c, prep.inv_s2[prep.coarse_mask], prep.projectors, orient, tpts,
                                 cfg.estep)
        g.rows = {int(i): j for j, i in enumerate(gidx)}
    assert g.scores is not None
    rows = torch.as_tensor([g.rows[int(i)] for i in bidx], dtype=torch.long, device=g.scores.device)
    return g.scores[rows]


def _batch_pass(src: ParticleSource, bidx: np.ndarray, poses: PoseTable, prep: _PassInputs, cfg: PassConfig,
                stats: SufficientStats, device, use_ctf: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """E-step of one batch, its sums added to ``stats``, its poses stored; (angle, offset changes, Pmax)."""
    comps = prep.comps
    xm, xu, ctf = batch_transforms(src, bidx, comps, cfg.mask, device, use_ctf, cfg.estep.memory_bytes)
    prev_rot = torch.as_tensor(poses.rot[bidx], dtype=torch.float32, device=device)
    prev_off = torch.as_tensor(poses.offset_px[bidx], dtype=torch.float32, device=device)
    prior_off = torch.as_tensor(poses.prior_offset_px[bidx], dtype=torch.float32, device=device)
    batch = BatchData(xm, ctf, prev_off, prior_off, prev_rot)
    orient, tpts, tch = _batch_orientations(cfg, prev_rot, device)
    scores = _group_scores(src, bidx, poses, prep, cfg, device, use_ctf) if prep.groups is not None else None
    post = expectation_batch(batch, comps, prep.coarse_mask, prep.inv_s2, prep.projectors, orient, tpts, tch,
                             prep.log_cls, cfg.estep, coarse_refs=prep.coarse_refs, fine_mask=prep.fine_mask,
                             coarse_scores=scores)
    accumulate(stats, post, xu, xm, ctf, prep.inv_s2, comps, prep.projectors, insert3d, prior_off,
               noise_stats=cfg.noise_stats, memory_bytes=cfg.estep.memory_bytes)
    ang, off = _store_best(poses, bidx, post, cfg.sym_mats)
    return ang, off, post.max_prob.cpu().numpy()


def estep_pass(src: ParticleSource, idx: np.ndarray, poses: PoseTable, maps: torch.Tensor, sigma2: torch.Tensor,
               comps: FourierComponents, cfg: PassConfig, device, pad: int = 2, use_ctf: bool = True,
               progress: Callable | None = None, runner: TaskRunner | None = None) -> tuple[SufficientStats, dict]:
    """E-step and M-step sums of particles ``idx`` against references ``maps``, in batches.

    Updates ``poses`` in place for those particles (best pose, class, Pmax, log-likelihood,
    number of significant samples). With a ``runner`` the batches go out in groups as tasks
    (a map-reduce, :func:`estep_map_reduce`): same batches, same poses; the sums are added in
    another order (float32 rounding, relative 1e-6).

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
        Wraps the list of batches (a progress bar); with a runner, the tasks as they finish.
    runner : TaskRunner, optional
        Runs the batches as tasks (:mod:`subtomo.em.parallel`); None: here, one batch after another.

    Returns
    -------
    stats : SufficientStats
        The additive M-step sums of these particles.
    summary : dict
        ``ang_change_deg`` (mean, deg), ``off_change_px`` (RMS, px), ``pmax`` (mean).
    """
    if runner is not None and len(idx):
        return estep_map_reduce(src, idx, poses, maps, sigma2, comps, cfg, device, runner, pad, use_ctf, progress)
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


@dataclass
class PassPayload:
    """What every task of one distributed pass reads (sent to each worker once per pass; tensors on cpu)."""

    maps: torch.Tensor  # (K, N, N, N) references
    sigma2: torch.Tensor  # (N//2 + 1,) noise power per shell
    comps: FourierComponents  # the pass's components, already cut to the measured ones (with CTF)
    cfg: PassConfig
    pad: int
    use_ctf: bool
    device_type: str  # "cpu" or "cuda" (a worker's own, pinned GPU)
    token: str  # names this pass in the workers' cache of prepared projectors


class _SubsetSource:
    """The particles ``idx`` of a source, as particles 0..len(idx)-1 (what one task sees)."""

    def __init__(self, src: ParticleSource, idx: np.ndarray) -> None:
        self.src, self.idx = src, np.asarray(idx)
        self.n, self.box, self.pixel_size_A = len(self.idx), src.box, src.pixel_size_A

    def volumes(self, idx, device) -> torch.Tensor:
        """(B, N, N, N) subtomograms of local particles ``idx``."""
        return self.src.volumes(self.idx[np.asarray(idx)], device)

    def ctf(self, idx, device):
        """(B, N, N, N//2+1) 3D CTFs of local particles ``idx``, or None."""
        return self.src.ctf(self.idx[np.asarray(idx)], device)


_PREPARED: dict[str, tuple[_PassInputs, PassConfig]] = {}  # per worker process: the passes now running
_PREPARED_LOCK = threading.Lock()


def _prepared(src: ParticleSource, pay: PassPayload, device: torch.device) -> tuple[_PassInputs, PassConfig]:
    """Projectors, masks and 1/sigma^2 of a pass, made once per worker process and pass (a pure cache).

    Passes that run at once (the two halves) are both kept while their held references fit the
    pass budget together; older passes go first, before a new one is made.
    """
    with _PREPARED_LOCK:
        if pay.token not in _PREPARED:
            cfg = to_device(pay.cfg, device)
            while _PREPARED and sum(_held_bytes(p) for p, _ in _PREPARED.values()) * 2 > cfg.estep.pass_memory_bytes:
                _PREPARED.pop(next(iter(_PREPARED)))
            while len(_PREPARED) >= 2:  # at most the two halves of a gold-standard pass
                _PREPARED.pop(next(iter(_PREPARED)))
            # the components are already the measured ones: use_ctf=False only skips selecting them again
            prep = _prepare_pass(src, np.zeros(0, dtype=np.int64), pay.maps.to(device), pay.sigma2.to(device),
                                 to_device(pay.comps, device), cfg, device, pay.pad, False)
            _PREPARED[pay.token] = (prep, cfg)
        return _PREPARED[pay.token]


def _held_bytes(prep: _PassInputs) -> int:
    """Bytes of a prepared pass's held coarse references (and their power)."""
    return sum(t.numel() * t.element_size() for t in (prep.coarse_refs or ()) if isinstance(t, torch.Tensor))


def estep_task(item: tuple[np.ndarray, PoseTable], src: ParticleSource,
               pay: PassPayload) -> tuple[SufficientStats, tuple]:
    """One task of a distributed E-step: whole batches of particles, read from ``src`` by index.

    Pure: ``src``, ``pay`` and the item's pose rows are only read (the rows are copied), so a
    task lost with its worker is rerun elsewhere with the same result.

    Parameters
    ----------
    item : tuple
        (B,) particle indices (whole batches of the pass, in order) and their :class:`PoseTable` rows.
    src : ParticleSource
        All particles (read by path on a shared file system, or held in memory).
    pay : PassPayload
        References, noise, components and settings of the pass.

    Returns
    -------
    stats : SufficientStats
        The task's sums (cpu).
    extra : tuple
        (new pose rows, angle changes [deg], offset changes [px], Pmax), each (B,).
    """
    idx, rows = item
    device = torch.device(pay.device_type)
    prep, cfg = _prepared(src, pay, device)
    local, poses = _SubsetSource(src, idx), rows.copy()
    if prep.groups is not None:
        # a global search scored in groups of particles fills its group bookkeeping batch by batch: each
        # task keeps its own, with its batches as the pass's particles (the shared prep, its projectors
        # included, is never changed)
        prep = dataclasses.replace(prep, groups=_new_groups(np.arange(len(idx)), cfg, len(prep.projectors),
                                                            int(prep.coarse_mask.sum())))
    stats = SufficientStats.zeros(pay.maps.shape[0], pay.maps.shape[-1], 3, device=device)
    out: list[list[np.ndarray]] = [[], [], []]
    for s in range(0, len(idx), cfg.batch_size):
        res = _batch_pass(local, np.arange(s, min(s + cfg.batch_size, len(idx))), poses, prep, cfg, stats, device,
                          pay.use_ctf)
        for lst, r in zip(out, res):
            lst.append(r)
    return stats.to("cpu"), (poses, *(np.concatenate(lst) for lst in out))


def measured_task(idx: np.ndarray, src: ParticleSource, args: tuple[FourierComponents, str, int]) -> tuple[torch.Tensor, None]:
    """Components where some particle of ``idx`` has a non-zero CTF: the map step of :func:`measured_components`.

    Parameters
    ----------
    idx : numpy.ndarray
        (B,) particle indices.
    src : ParticleSource
        All particles.
    args : tuple
        The M candidate components (cpu), the device type ("cpu" or "cuda") and the CTFs read at a time.

    Returns
    -------
    keep : torch.Tensor
        (M,) bool (cpu); reduced with ``|``.
    extra : None
    """
    comps, device_type, batch_size = args
    device = torch.device(device_type)
    keep = measured_components(_SubsetSource(src, idx), np.arange(len(idx)), to_device(comps, device), device,
                               batch_size)
    return keep.cpu(), None


def _task_items(idx: np.ndarray, poses: PoseTable, batch_size: int, n_tasks: int) -> list[tuple[np.ndarray, PoseTable]]:
    """Whole batches (the same split as in one process) in ``n_tasks`` contiguous groups, with their pose rows."""
    n_batches = -(-len(idx) // batch_size)
    items = []
    for a, b in contiguous_groups(n_batches, n_tasks):
        sel = idx[a * batch_size:b * batch_size]
        items.append((sel, PoseTable(*(getattr(poses, f)[sel].copy() for f in _POSE_FIELDS))))
    return items


_POSE_FIELDS = ("rot", "offset_px", "prior_offset_px", "cls", "max_prob", "log_lik", "n_sig")


def estep_map_reduce(src: ParticleSource, idx: np.ndarray, poses: PoseTable, maps: torch.Tensor,
                     sigma2: torch.Tensor, comps: FourierComponents, cfg: PassConfig, device, runner: TaskRunner,
                     pad: int = 2, use_ctf: bool = True, progress: Callable | None = None) -> tuple[SufficientStats, dict]:
    """:func:`estep_pass` as a map-reduce on ``runner``: groups of batches as tasks, their sums added in a tree.

    The measured components (CTF != 0 somewhere) are found by a first map-reduce (an OR), the
    references and settings go to the workers once per pass, each task returns its sums and the
    new poses of its particles, which are written back into ``poses``.

    Parameters
    ----------
    src, idx, poses, maps, sigma2, comps, cfg, device, pad, use_ctf, progress
        As :func:`estep_pass`.
    runner : TaskRunner
        Where the tasks run.

    Returns
    -------
    stats : SufficientStats
        The sums of particles ``idx`` (on ``device``).
    summary : dict
        As :func:`estep_pass`.
    """
    return estep_passes(src, [(idx, maps, sigma2)], poses, comps, cfg, device, runner, pad, use_ctf, progress)[0]


def estep_passes(src: ParticleSource, passes: Sequence[tuple[np.ndarray, torch.Tensor, torch.Tensor]], poses: PoseTable,
                 comps: FourierComponents, cfg: PassConfig, device, runner: TaskRunner | None, pad: int = 2,
                 use_ctf: bool = True, progress: Callable | None = None) -> list[tuple[SufficientStats, dict]]:
    """Independent passes (disjoint particles, own references), e.g. the two halves of a gold-standard E-step.

    With a ``runner`` they run at once (:meth:`TaskRunner.map_reduce_many`): each pass on its own
    share of the workers, so a worker projects one pass's references, not every pass's; without
    one, one :func:`estep_pass` after another. The results are those of :func:`estep_pass` per pass.

    Parameters
    ----------
    src, poses, comps, cfg, device, pad, use_ctf, progress
        As :func:`estep_pass`.
    passes : sequence of (numpy.ndarray, torch.Tensor, torch.Tensor)
        Per pass: (n_sel,) particle indices, (K, N, N, N) references, (N//2 + 1,) noise power.
    runner : TaskRunner or None
        Where the tasks run; None: here.

    Returns
    -------
    list of (SufficientStats, dict)
        Per pass, in order: its sums and summary (as :func:`estep_pass`).
    """
    if runner is None or not all(len(p[0]) for p in passes):
        return [estep_pass(src, idx, poses, maps, s2, comps, cfg, device, pad, use_ctf, progress, runner)
                for idx, maps, s2 in passes]
    n_tasks = max(1, 4 * int(runner.workers) // len(passes))
    dev_type = torch.device(device).type
    comps_cpu = to_device(comps, "cpu")
    comps_of = [comps_cpu] * len(passes)
    if use_ctf:
        args = (comps_cpu, dev_type, cfg.batch_size)  # one object: sent to each worker once for all passes
        calls = [MapReduceCall(measured_task, [idx[a:b] for a, b in contiguous_groups(len(idx), n_tasks)],
                               (src, args), operator.or_) for idx, _, _ in passes]
        comps_of = [comps_cpu.select(keep) for keep, _ in runner.map_reduce_many(calls)]
    calls, items_of = [], []
    for (idx, maps, sigma2), comps_p in zip(passes, comps_of):
        pay = PassPayload(maps.detach().cpu(), sigma2.detach().cpu(), comps_p, to_device(cfg, "cpu"), pad, use_ctf,
                          dev_type, uuid.uuid4().hex)
        items_of.append(_task_items(np.asarray(idx), poses, cfg.batch_size, n_tasks))
        calls.append(MapReduceCall(estep_task, items_of[-1], (src, pay), operator.add))
    out = []
    for items, (stats, extras) in zip(items_of, runner.map_reduce_many(calls, progress)):
        for (sel, _), (rows, *_rest) in zip(items, extras):
            for f in _POSE_FIELDS:
                getattr(poses, f)[sel] = getattr(rows, f)
        out.append((stats.to(device), _pass_summary(*([e[j] for e in extras] for j in (1, 2, 3)))))
    return out


def delta_task(item: tuple[np.ndarray, PoseTable], src: ParticleSource, args: tuple) -> tuple[SufficientStats, None]:
    """:func:`delta_stats` of one group of particles (a task of :func:`delta_stats_on`).

    Parameters
    ----------
    item : tuple
        (B,) particle indices and their :class:`PoseTable` rows.
    src : ParticleSource
        All particles.
    args : tuple
        Number of classes K, (N//2 + 1,) sigma^2, components (cpu), device type, batch size, use_ctf.

    Returns
    -------
    stats : SufficientStats
        The sums of these particles (cpu).
    extra : None
    """
    idx, rows = item
    n_classes, sigma2, comps, device_type, batch_size, use_ctf = args
    device = torch.device(device_type)
    st = delta_stats(_SubsetSource(src, idx), np.arange(len(idx)), rows, n_classes, sigma2.to(device),
                     to_device(comps, device), device, batch_size, use_ctf)
    return st.to("cpu"), None


def delta_stats_on(runner: TaskRunner | None, src: ParticleSource, idx: np.ndarray, poses: PoseTable, n_classes: int,
                   sigma2: torch.Tensor, comps: FourierComponents, device, batch_size: int = 16,
                   use_ctf: bool = True) -> SufficientStats:
    """:func:`delta_stats` with its batches as tasks on ``runner`` (None: here); the sums added in a tree.

    Parameters
    ----------
    runner : TaskRunner or None
        Where the tasks run.
    src, idx, poses, n_classes, sigma2, comps, device, batch_size, use_ctf
        As :func:`delta_stats`.

    Returns
    -------
    SufficientStats
        On ``device``.
    """
    if runner is None or not len(idx):
        return delta_stats(src, idx, poses, n_classes, sigma2, comps, device, batch_size, use_ctf)
    items = _task_items(np.asarray(idx), poses, batch_size, 4 * int(runner.workers))
    args = (n_classes, sigma2.detach().cpu(), to_device(comps, "cpu"), torch.device(device).type, batch_size, use_ctf)
    stats, _ = runner.map_reduce(delta_task, items, (src, args), operator.add)
    return stats.to(device)


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
