"""3D classification (and focused classification) with the shared engine (relion-internals §3.8-3.9).

K references; no halves; tau^2_k from the power spectrum of the current reference and
data_vs_prior_k = mean(weight) T tau^2_k (T default 4); class priors pi_k = sum of
posterior class weights; fixed number of iterations. Initial references: the given map
(low-passed) for every class with each particle assigned to a random class in the first
iteration, or reconstructions of random subsets (input poses if present, else random).
Orientation search: global (HEALPix), local around the input poses (Gaussian prior of
width ``sigma_ang_deg``), or none (``skip_align``: poses fixed, only classes are searched -
focused classification with a mask white over the region of interest).

Phases: :func:`initialise_classification`, :func:`classify_iteration` (one E/M iteration,
a typed :class:`ClassifyIteration`) and :func:`classify3d` (the loop). Nothing here writes
or draws: the job gets every iteration through ``on_iteration``.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from subtomo.em import reconstruct as rc
from subtomo.em import sampling
from subtomo.em.components import fourier_components
from subtomo.em.expectation import EStepOptions
from subtomo.em.healpix import angular_step_deg
from subtomo.em.iteration import (
    ParticleSource,
    PassConfig,
    PoseTable,
    coarse_size_for,
    delta_stats_on,
    estep_pass,
    initial_sigma2,
)
from subtomo.em.maps import even_size, lowpass_map, particle_mask
from subtomo.em.maximisation import SufficientStats, sigma2_from_stats, sigma_offset_from_stats
from subtomo.em.model import EMModel
from subtomo.em.parallel import TaskRunner
from subtomo.em.projector3d import symmetrise3d
from subtomo.geometry.euler import random_rotations
from subtomo.geometry.symmetry import symmetry_matrices


@dataclass
class ClassifyOptions:
    """Settings of a 3D classification (RELION's names; sizes px, angles deg, resolutions Å)."""

    n_classes: int
    particle_diameter_A: float
    n_iter: int = 25
    tau2_fudge: float = 4.0
    healpix_order: int = 2
    offset_range_px: float = 5.0
    offset_step_px: float = 3.0  # the coarse step: children_per_axis times the fine (oversampled) step
    sym: str = "C1"
    local: bool = False
    sigma_ang_deg: float = 5.0
    skip_align: bool = False
    ini_high_A: float = 60.0
    pad: int = 2
    batch_size: int = 16
    use_ctf: bool = True
    seed: int = 0
    incr_size: int = 10
    fraction: float = 0.999
    max_significant: int = 48
    # Issue 22: fine translations on a step/3 lattice through each particle's current offset (3 children per
    # axis; RELION: 2 at coarse +- step/4, which never contain the current offset and push every converged
    # particle sqrt(3) step/4 off its optimum every other iteration). On by default: better or equal in every
    # case measured over seeds (issue-22 note): asymmetric particle K = 2 at 7.5 deg 0.997-1.000 instead of
    # 0.97-1.0; K = 3 mean last accuracy 0.84 (5 seeds) instead of 0.72; proteasome local 0.94 (3 seeds)
    # instead of 0.93, global 0.960 instead of 0.955.
    translations_through_centre: bool = True
    # Issue 22: where the class is decided. True: the significant coarse points are chosen within each
    # class (at least min_significant each), so the fine pass decides; False: RELION's joint choice, so
    # the coarse pass decides. A pass whose angular step does not resolve the resolution it compares at
    # favours blurred classes (a class with few particles): a particle half a step off its pose fits
    # them better than its own sharp class, and a spare class fills up. None (auto): within each class
    # when the fine step resolves the box by RELION's coarse-size rule, else joint
    # (:func:`class_decided_in_fine_pass`). Measured (issue-22 note, last accuracy, joint -> per class):
    # asymmetric K = 3 at 7.5 deg seeds 0-4 0.728/1.0/1.0/0.672/0.822 -> 0.994/1.0/0.989/0.989/0.872;
    # proteasome local 7.5 deg 0.83/1.0/1.0 -> 1.0/1.0/1.0; proteasome global 15 deg (fine step too
    # coarse for its box) 0.960 -> 0.565 at iteration 16 (auto: joint). Per class costs up to K times
    # the fine pass.
    significant_per_class: bool | None = None
    min_significant: int = 1
    max_keep: int = 12
    sigma_offset_px: float = 3.0
    memory_bytes: int = 512 * 2 ** 20
    pass_memory_bytes: int = 3 * 2 ** 30  # what a pass may hold across batches (held coarse references)
    focus_mask: torch.Tensor | None = field(default=None, repr=False)  # E-step mask (focused classification)
    solvent_mask: torch.Tensor | None = field(default=None, repr=False)
    # where the E-step's tasks run (--cluster); None: in this process
    runner: TaskRunner | None = field(default=None, repr=False, compare=False)


@dataclass
class ClassRecord:
    """One line of the classification history (class priors, resolutions Å, mean Pmax, time s)."""

    iteration: int
    class_priors: list[float]
    resolution_A: list[float]
    pmax: float
    seconds: float
    size: int = 0
    ang_change_deg: float = 0.0
    off_change_px: float = 0.0


@dataclass
class ClassifyState:
    """Everything a classification needs to continue after an iteration.

    ``random_first``: the next iteration puts each particle in its random class (first
    iteration from one given reference with K > 1).
    """

    iteration: int
    model: EMModel
    poses: PoseTable
    history: list[ClassRecord] = field(default_factory=list)
    random_first: bool = False

    def to_dict(self) -> dict:
        """Plain contents for ``torch.save`` (``run_itNNN_optimiser.pt``)."""
        return {"iteration": self.iteration, "model": self.model.state(), "poses": self.poses,
                "history": [dataclasses.asdict(r) for r in self.history]}

    @staticmethod
    def from_dict(state: dict, device=None) -> "ClassifyState":
        """Inverse of :meth:`to_dict`, the model moved to ``device``."""
        return ClassifyState(state["iteration"], EMModel.from_state(state["model"], device), state["poses"],
                             [ClassRecord(**r) for r in state.get("history", [])])


@dataclass
class ClassifyIteration:
    """What one iteration produced (handed to ``on_iteration``): the model (K maps), poses, resolutions."""

    iteration: int
    model: EMModel
    poses: PoseTable
    record: ClassRecord
    state: ClassifyState

    @property
    def class_resolutions_A(self) -> list[float]:
        """Estimated resolution of each class [Å]."""
        return self.record.resolution_A


@dataclass
class ClassifyResult:
    """Result of :func:`classify3d`: the last model (``maps`` (K, N, N, N), ``class_priors`` (K,), cpu)."""

    iterations: int
    model: EMModel
    poses: PoseTable
    history: list[ClassRecord]
    stopped: bool = False

    @property
    def maps(self) -> torch.Tensor:
        """(K, N, N, N) class maps (cpu)."""
        return self.model.maps.cpu()

    @property
    def class_priors(self) -> torch.Tensor:
        """(K,) class distribution (cpu)."""
        return self.model.class_priors.cpu()


@dataclass
class _Setup:
    """Fixed during a run: E-step mask, focus mask (reference frame), solvent mask, symmetry."""

    emask: torch.Tensor
    focus: torch.Tensor | None
    solvent: torch.Tensor
    sym_mats: torch.Tensor
    device: torch.device


def _setup(src: ParticleSource, opts: ClassifyOptions, device: torch.device) -> _Setup:
    sphere = particle_mask(src.box, opts.particle_diameter_A, src.pixel_size_A, device)
    # focused classification (RELION): the references are compared only over the focus region
    # (masked in the reference frame, so the mask follows every pose); the particles keep the
    # spherical mask. Masking the particles with the focus mask instead would put a
    # reference-frame mask on unrotated particles and mismatch masked data and unmasked references.
    focus = opts.focus_mask.to(device).float() if opts.focus_mask is not None else None
    solvent = opts.solvent_mask.to(device) if opts.solvent_mask is not None else sphere
    sym_mats = torch.as_tensor(symmetry_matrices(opts.sym), dtype=torch.float32, device=device)
    return _Setup(sphere, focus, solvent, sym_mats, device)


def _class_stats_into(total: SufficientStats, part: SufficientStats, k: int) -> None:
    total.data[k] += part.data[0]
    total.weight[k] += part.weight[0]
    total.sigma2_num += part.sigma2_num
    total.sigma2_den += part.sigma2_den
    total.class_weight[k] += part.class_weight[0]
    total.offset2 += part.offset2
    total.offset_w += part.offset_w
    total.log_lik += part.log_lik
    total.n_particles += part.n_particles


def _symmetrised_class(stats: SufficientStats, k: int, sym_mats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d, w = rc.hermitian_symmetrise(stats.data[k], stats.weight[k], 3)
    return symmetrise3d(d, w, sym_mats)


def _initial_maps(src: ParticleSource, opts: ClassifyOptions, setup: _Setup, poses: PoseTable, sig0: torch.Tensor,
                  initial_ref: torch.Tensor | None, ini_shell: int) -> tuple[torch.Tensor, bool]:
    """Starting references (K, N, N, N) and whether the first iteration uses random classes."""
    kc, box, device, solvent = opts.n_classes, src.box, setup.device, setup.solvent
    if initial_ref is not None and initial_ref.ndim == 4:  # one reference per class
        if initial_ref.shape[0] != kc:
            raise ValueError(f"{initial_ref.shape[0]} initial references for {kc} classes")
        return torch.stack([lowpass_map(r.to(device).float() * solvent, ini_shell) for r in initial_ref]), False
    if initial_ref is not None:
        return lowpass_map(initial_ref.to(device).float() * solvent, ini_shell)[None].repeat(kc, 1, 1, 1), kc > 1
    comps = fourier_components(box, box, 3, device=device)
    st0 = delta_stats_on(opts.runner, src, np.arange(src.n), poses, kc, sig0, comps, device, opts.batch_size, opts.use_ctf)
    maps = []
    for k in range(kc):
        d, w = _symmetrised_class(st0, k, setup.sym_mats)
        maps.append(lowpass_map(rc.reconstruct(d, w, 3) * solvent, ini_shell))
    return torch.stack(maps), False


def initialise_classification(src: ParticleSource, opts: ClassifyOptions, *, initial_ref: torch.Tensor | None = None,
                              initial_rot: np.ndarray | None = None, initial_offset_px: np.ndarray | None = None,
                              device=None) -> ClassifyState:
    """Iteration 0: random classes, initial poses, noise spectrum and the K starting references.

    Parameters
    ----------
    src : ParticleSource
        The n particles to classify (N^3 px subtomograms, 3D CTFs).
    opts : ClassifyOptions
        Classification settings.
    initial_ref : torch.Tensor, optional
        (N, N, N) one map for every class, or (K, N, N, N) one per class; None:
        reconstructions of random subsets.
    initial_rot : numpy.ndarray, optional
        (n, 3, 3) input poses; None: random rotations (seeded).
    initial_offset_px : numpy.ndarray, optional
        (n, 3) input origins [px]; None: zeros.
    device : torch.device or str, optional
        Device of the computation (default cpu).

    Returns
    -------
    ClassifyState
    """
    device = torch.device(device or "cpu")
    setup = _setup(src, opts, device)
    n, box, px, kc = src.n, src.box, src.pixel_size_A, opts.n_classes
    n_shells = box // 2 + 1
    rng = np.random.default_rng([opts.seed, 11])
    rot0 = initial_rot if initial_rot is not None else random_rotations(n, rng)
    off0 = initial_offset_px if initial_offset_px is not None else np.zeros((n, 3))
    poses = PoseTable.new(n, np.asarray(rot0, dtype=np.float64), np.asarray(off0, dtype=np.float64))
    poses.cls = rng.integers(0, kc, n)
    sig0 = initial_sigma2(src, np.arange(n), setup.emask, device, opts.use_ctf)
    ini_shell = max(1, int(round(box * px / opts.ini_high_A)))
    maps, random_first = _initial_maps(src, opts, setup, poses, sig0, initial_ref, ini_shell)
    tau2 = torch.stack([rc.tau2_from_power(m, 3) for m in maps])
    model = EMModel(maps, sig0, tau2, torch.zeros(kc, n_shells), torch.zeros(kc, n_shells),
                    torch.full((kc,), 1.0 / kc), px, opts.tau2_fudge, opts.sigma_offset_px, ini_shell,
                    min(box, even_size(2 * (ini_shell + opts.incr_size))))
    return ClassifyState(0, model, poses, random_first=random_first)


def class_decided_in_fine_pass(opts: ClassifyOptions, box: int, pixel_size_A: float) -> bool:
    """Whether the significant coarse points are chosen within each class (``opts.significant_per_class``).

    Auto (None): yes when the fine (oversampled) angular step resolves the whole box by RELION's
    coarse-size rule (:func:`subtomo.em.iteration.coarse_size_for`), the size the classes reach;
    otherwise a per-class choice would decide the class at poses too coarse for the compared
    resolution, where blurred classes win (issue 22: the proteasome at 15 deg in a 40 px box).
    One choice for the whole run.

    Parameters
    ----------
    opts : ClassifyOptions
        The settings (healpix order, local search, particle diameter).
    box : int
        Box size [px].
    pixel_size_A : float
        Pixel size [Å].

    Returns
    -------
    bool
    """
    if opts.significant_per_class is not None:
        return opts.significant_per_class
    order = max(opts.healpix_order, 1) if opts.local else opts.healpix_order
    fine_step = angular_step_deg(order) / 2
    return coarse_size_for(fine_step, opts.particle_diameter_A, box, pixel_size_A, box) >= box


def _pass_config(src: ParticleSource, opts: ClassifyOptions, setup: _Setup, model: EMModel,
                 it: int) -> PassConfig:
    """Rotation and translation grids and E-step settings of iteration ``it``."""
    size, device = model.current_size, setup.device
    rng = np.random.default_rng([opts.seed, it])
    order = opts.healpix_order
    if opts.local:
        order = max(order, 1)
        rot_set = sampling.local_rotations(order, opts.sigma_ang_deg, rng=rng, device=device)
    else:
        rot_set = sampling.global_rotations(order, opts.sym, rng=rng, device=device)
    trans = sampling.translation_grid(opts.offset_range_px, opts.offset_step_px, 3, device=device,
                                      children_contain_centre=opts.translations_through_centre)
    csize = coarse_size_for(angular_step_deg(order), opts.particle_diameter_A, src.box, src.pixel_size_A, size)
    eo = EStepOptions(opts.fraction, opts.max_significant, opts.max_keep, model.sigma_offset_px,
                      memory_bytes=opts.memory_bytes, pass_memory_bytes=opts.pass_memory_bytes,
                      significant_per_class=class_decided_in_fine_pass(opts, src.box, src.pixel_size_A),
                      min_significant=opts.min_significant)
    return PassConfig(size, csize, setup.emask, rot_set, opts.local, trans, eo, opts.batch_size,
                      skip_align=opts.skip_align, class_prior=model.class_priors)


def _expectation(src: ParticleSource, opts: ClassifyOptions, setup: _Setup, state: ClassifyState,
                 it: int) -> tuple[SufficientStats, dict]:
    """E-step of all particles against the K references (poses and classes updated in place)."""
    model, poses, device = state.model, state.poses, setup.device
    kc, box = opts.n_classes, src.box
    comps = fourier_components(box, model.current_size, 3, device=device)
    cfg = _pass_config(src, opts, setup, model, it)
    emaps = model.maps * setup.focus if setup.focus is not None else model.maps  # what the E-step compares
    if not state.random_first:
        return estep_pass(src, np.arange(src.n), poses, emaps, model.sigma2, comps, cfg, device,
                          pad=opts.pad, use_ctf=opts.use_ctf, runner=opts.runner)
    # first iteration with one reference: each particle in its random class
    stats = SufficientStats.zeros(kc, box, 3, device=device)
    # one reference per pass: the class prior must be that single class's (K-long priors
    # broadcast the scores to K classes and break the flat (T, K, R) index decomposition)
    cfg1 = dataclasses.replace(cfg, class_prior=None)
    for k in range(kc):
        sel = np.nonzero(poses.cls == k)[0]
        if len(sel):
            s, _ = estep_pass(src, sel, poses, emaps[k:k + 1], model.sigma2, comps, cfg1, device,
                              pad=opts.pad, use_ctf=opts.use_ctf, runner=opts.runner)
            poses.cls[sel] = k
            _class_stats_into(stats, s, k)
    state.random_first = False
    return stats, {"ang_change_deg": 0.0, "off_change_px": 0.0, "pmax": float(np.mean(poses.max_prob))}


def _maximisation(src: ParticleSource, opts: ClassifyOptions, setup: _Setup, model: EMModel,
                  stats: SufficientStats, summ: dict) -> tuple[EMModel, list[int]]:
    """M-step: per-class MAP maps with the previous tau^2_k, new tau^2_k, class priors, sigma^2, resolution."""
    kc, box, px = opts.n_classes, src.box, src.pixel_size_A
    n_shells = box // 2 + 1
    cur = model.current_size // 2
    maps, tau2s, dvps = [], [], []
    for k in range(kc):
        d, w = _symmetrised_class(stats, k, setup.sym_mats)
        t2 = model.tau2[k]
        vol = rc.reconstruct(d, w, 3, tau2=t2, tau2_fudge=opts.tau2_fudge, max_shell=cur) * setup.solvent
        maps.append(vol)
        dvps.append(rc.data_vs_prior(w, t2, opts.tau2_fudge, 3))
        tau2s.append(rc.tau2_from_power(vol, 3))
    total = stats.class_weight.sum().clamp(min=1e-30)
    priors = (stats.class_weight / total).float()
    res_shells = [min(rc.resolution_shell(dv.masked_fill(torch.arange(n_shells, device=dv.device) >= cur, 0.0)), cur - 1)
                  for dv in dvps]
    sig = sigma2_from_stats(stats, model.sigma2, cur)
    best = max(res_shells)
    new = EMModel(torch.stack(maps), sig, torch.stack(tau2s), torch.stack(dvps), torch.zeros(kc, n_shells), priors, px,
                  opts.tau2_fudge, sigma_offset_from_stats(stats, 3, model.sigma_offset_px), best,
                  min(box, even_size(2 * (best + opts.incr_size))), log_lik=float(stats.log_lik),
                  extra={"average_pmax": summ["pmax"], "n_particles": src.n})
    return new, res_shells


def classify_iteration(src: ParticleSource, opts: ClassifyOptions, state: ClassifyState,
                       device=None) -> ClassifyIteration:
    """One iteration of 3D classification: E-step, M-step (``state`` advanced in place).

    Parameters
    ----------
    src : ParticleSource
        The particles (as at initialisation).
    opts : ClassifyOptions
        The settings the run started with.
    state : ClassifyState
        The state after the previous iteration.
    device : torch.device or str, optional
        Device of the computation (default cpu).

    Returns
    -------
    ClassifyIteration
    """
    setup = _setup(src, opts, torch.device(device or "cpu"))
    t0 = time.time()
    state.iteration += 1
    size = state.model.current_size
    stats, summ = _expectation(src, opts, setup, state, state.iteration)
    state.model, res_shells = _maximisation(src, opts, setup, state.model, stats, summ)
    res_A = [rc.resolution_A(s, src.box, src.pixel_size_A) for s in res_shells]
    priors = state.model.class_priors
    record = ClassRecord(state.iteration, priors.cpu().numpy().tolist(), res_A, summ["pmax"], time.time() - t0, size,
                         summ["ang_change_deg"], summ["off_change_px"])
    state.history.append(record)
    return ClassifyIteration(state.iteration, state.model, state.poses, record, state)


def describe_iteration(result: ClassifyIteration) -> str:
    """One log line of an iteration (class sizes, resolution, size, pose changes, time).

    Parameters
    ----------
    result : ClassifyIteration
        The iteration; its ``record`` is used.

    Returns
    -------
    str
        Class priors (fractions), the best class resolution [Å], the current size [px], the mean
        angular change [deg] and RMS offset change [px] of the poses, mean Pmax and the time [s].
    """
    r = result.record
    return (f"iteration {r.iteration:3d}: classes " + " ".join(f"{p:.3f}" for p in r.class_priors)
            + f", resolution {min(r.resolution_A):.1f} A, size {r.size}, changes {r.ang_change_deg:.2f} deg "
            f"{r.off_change_px:.2f} px, Pmax {r.pmax:.3f}, {r.seconds:.1f} s")


def classify3d(src: ParticleSource, opts: ClassifyOptions, *, initial_ref: torch.Tensor | None = None,
               initial_rot: np.ndarray | None = None, initial_offset_px: np.ndarray | None = None,
               resume: ClassifyState | None = None, device=None, log: Callable[[str], None] = print,
               on_iteration: Callable[[ClassifyIteration], None] | None = None,
               stop_after: int | None = None) -> ClassifyResult:
    """Run ``opts.n_iter`` iterations of 3D (or focused) classification.

    Parameters
    ----------
    src : ParticleSource
        n subtomograms (N^3 px, pixel size Å) with their 3D CTFs.
    opts : ClassifyOptions
        Number of classes, T, sampling, masks.
    initial_ref : torch.Tensor, optional
        (N, N, N) or (K, N, N, N) starting map(s); None: reconstructions of random subsets.
    initial_rot, initial_offset_px : numpy.ndarray, optional
        (n, 3, 3) input poses and (n, 3) origins [px].
    resume : ClassifyState, optional
        Continue from this state instead of initialising.
    device : torch.device or str, optional
        Device of the computation (default cpu).
    log : callable
        Receives one line per iteration.
    on_iteration : callable, optional
        Receives every :class:`ClassifyIteration` (the job writes the run files from it).
    stop_after : int, optional
        Stop after this iteration.

    Returns
    -------
    ClassifyResult
    """
    device = torch.device(device or "cpu")
    if resume is not None:
        state = resume
        log(f"continuing from iteration {state.iteration}")
    else:
        state = initialise_classification(src, opts, initial_ref=initial_ref, initial_rot=initial_rot,
                                          initial_offset_px=initial_offset_px, device=device)
    while state.iteration < opts.n_iter:
        result = classify_iteration(src, opts, state, device)
        log(describe_iteration(result))
        if on_iteration is not None:
            on_iteration(result)
        if stop_after is not None and state.iteration >= stop_after:
            return ClassifyResult(state.iteration, state.model, state.poses, state.history, stopped=True)
    return ClassifyResult(state.iteration, state.model, state.poses, state.history)
