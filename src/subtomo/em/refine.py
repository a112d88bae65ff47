"""3D auto-refine (RELION's gold-standard auto-refinement, relion-internals §3.4-§3.7).

Two random halves are refined independently (each its own model: reference, sigma^2);
each iteration: E-step of every half against its own reference, low-resolution joining of
the halves' sums below ``low_resol_join_halves_A`` (keeps both halves in one frame, as
RELION), gold-standard FSC -> tau^2 and current resolution, MAP reconstruction of each
half, solvent flattening; then the current size and the sampling are updated
(auto-sampling, :func:`subtomo.em.sampling.update_sampling`). At convergence one last
iteration at full size sums both halves (joined-FSC tau^2) into the final map. Without an
initial reference, iteration 0 reconstructs the particles in random orientations, or, given
initial poses, each half from its own particles at those poses (``initial_sigma_ang_deg``
then makes the searches local around them from iteration 1, as RELION's ``--sigma_ang``).

The phases are :func:`initialise_refinement`, :func:`refine_iteration` (one iteration, a
typed :class:`RefineIteration`) and :func:`auto_refine` (the loop). Nothing here writes a
file: the caller gets every iteration through ``on_iteration`` (RELION's run_itNNN_*
files are written by the job, :mod:`subtomo.io.run_files`) and continues a run from a
:class:`RefineState`.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch

from subtomo.em import reconstruct as rc
from subtomo.em import sampling
from subtomo.em.components import FourierComponents, fourier_components
from subtomo.em.expectation import EStepOptions
from subtomo.em.gold_standard import half_indices, join_low_resolution, split_halves, symmetrised_grids
from subtomo.em.healpix import angular_step_deg
from subtomo.em.iteration import (
    ParticleSource,
    PassConfig,
    PoseTable,
    coarse_size_for,
    delta_stats_on,
    estep_passes,
    expected_angular_accuracy_deg,
    initial_sigma2,
)
from subtomo.em.maps import even_size, lowpass_map, particle_mask
from subtomo.em.maximisation import SufficientStats, sigma2_from_stats, sigma_offset_from_stats
from subtomo.em.model import EMModel
from subtomo.em.parallel import TaskRunner
from subtomo.em.sampling import AutoSamplingRules, SamplingState, update_sampling
from subtomo.fourier import threshold_shell
from subtomo.geometry.euler import random_rotations
from subtomo.geometry.symmetry import symmetry_matrices


@dataclass
class RefineOptions:
    """Settings of an auto-refinement (RELION's names; sizes in px, angles in deg, resolutions in Å)."""

    particle_diameter_A: float
    healpix_order: int = 2  # coarse order; the oversampled step is half of it (7.5 deg for order 2)
    offset_range_px: float = 3.0
    offset_step_px: float = 2.0
    sym: str = "C1"
    auto_local_order: int = 3  # local searches from the 3.75 deg step (RELION GUI: 1.8 deg)
    max_iter: int = 50
    ini_high_A: float = 60.0
    firstiter_cc: bool = False
    ref_ctf_corrected: bool = True
    pad: int = 2
    batch_size: int = 32
    use_ctf: bool = True
    seed: int = 0
    low_resol_join_halves_A: float = 40.0
    incr_size: int = 10
    fraction: float = 0.999
    max_significant: int = 48
    max_keep: int = 12
    sigma_offset_px: float = 3.0
    max_order: int = 6
    # poses count as settled at average Pmax >= 0.8 even if orientations keep changing (in the spirit of
    # RELION's --auto_ignore_angles: pseudo-symmetric particles refined in C1 jump between equivalent poses)
    auto_ignore_angles: bool = False
    memory_bytes: int = 512 * 2 ** 20
    pass_memory_bytes: int = 3 * 2 ** 30  # what a pass may hold across batches (held coarse references)
    # local searches: the coarse pass (which only picks the significant points whose children the
    # fine pass rescores at the current size) runs at most at the current resolution, 2 (shell + 2)
    # px, instead of RELION's step-based coarse size; like a RELION --coarse_size cap.
    local_coarse_cap: bool = True
    # sampling fine enough when the oversampled step < 0.75 x the expected angular accuracy (RELION
    # §3.6, from 10 particles, computed in local searches); False: the resolution-limited step rule
    accuracy_criterion: bool = True
    # searches local from iteration 1 around the initial poses with this Gaussian prior width [deg]
    # (RELION: --sigma_ang with --auto_local_healpix_order = --healpix_order); None: global first
    initial_sigma_ang_deg: float | None = None
    solvent_mask: torch.Tensor | None = field(default=None, repr=False)
    # where the E-step's tasks run (--cluster); None: in this process
    runner: TaskRunner | None = field(default=None, repr=False, compare=False)

    @property
    def sampling_rules(self) -> AutoSamplingRules:
        """The settings that drive :func:`subtomo.em.sampling.update_sampling`."""
        return AutoSamplingRules(self.particle_diameter_A, self.auto_local_order, self.max_order,
                                 self.auto_ignore_angles)


@dataclass
class IterationRecord:
    """One line of the refinement history (resolutions Å, sizes px, angles deg, time s)."""

    iteration: int
    resolution_A: float
    fsc0143_A: float
    size: int
    coarse_size: int
    order: int
    angular_step_deg: float
    offset_range_px: float
    offset_step_px: float
    local: bool
    ang_change_deg: float
    off_change_px: float
    pmax: float
    acc_rot_deg: float | None
    seconds: float
    estep_seconds: float = 0.0  # of ``seconds``: the E-step of both halves (what a cluster spreads)


@dataclass
class RefineState:
    """Everything a refinement needs to continue after an iteration (the optimiser state).

    ``models``: one :class:`EMModel` per half; ``halves`` (n,) 1/2; ``incr``: RELION's
    size increment [px]; ``first_cc``: the next iteration scores by cross-correlation.
    """

    iteration: int
    models: list[EMModel]
    poses: PoseTable
    sampling: SamplingState
    incr: int
    halves: np.ndarray
    history: list[IterationRecord] = field(default_factory=list)
    first_cc: bool = False

    def to_dict(self) -> dict:
        """Plain contents (tensors on cpu) for ``torch.save`` (``run_itNNN_optimiser.pt``)."""
        return {"iteration": self.iteration, "models": [m.state() for m in self.models], "poses": self.poses,
                "sampling": asdict(self.sampling), "incr": self.incr, "halves": self.halves,
                "history": [asdict(r) for r in self.history]}

    @staticmethod
    def from_dict(state: dict, device=None) -> "RefineState":
        """Inverse of :meth:`to_dict`, models moved to ``device``."""
        return RefineState(state["iteration"], [EMModel.from_state(m, device) for m in state["models"]],
                           state["poses"], SamplingState(**state["sampling"]), state["incr"], state["halves"],
                           [IterationRecord(**r) for r in state.get("history", [])])


@dataclass
class FinalMaps:
    """The final iteration's reconstructions (cpu tensors, (N, N, N)) and model.

    ``map``: both halves joined (MAP, joined-FSC tau^2); ``unfiltered``: the two
    unregularised half maps; ``model``: the joined model (final map, FSC, tau^2, SSNR).
    """

    map: torch.Tensor
    unfiltered: list[torch.Tensor]
    model: EMModel


@dataclass
class RefineIteration:
    """What one iteration produced; handed to ``on_iteration``.

    Iteration 0 (only when the initial references were reconstructed from the particles)
    carries the two starting half references and no record. ``state`` is set
    on every iteration a run can continue from (not on the final one); ``final`` only on
    the final one.
    """

    iteration: int
    models: list[EMModel]
    poses: PoseTable
    halves: np.ndarray
    record: IterationRecord | None = None
    state: RefineState | None = None
    final: FinalMaps | None = None

    @property
    def half_maps(self) -> list[torch.Tensor]:
        """The two half references (N, N, N) of this iteration."""
        return [m.maps[0] for m in self.models]


@dataclass
class RefineResult:
    """Result of :func:`auto_refine` (``final`` is None when the run stopped early)."""

    iterations: int
    resolution_A: float
    fsc: np.ndarray
    poses: PoseTable
    halves: np.ndarray
    history: list[IterationRecord]
    seconds: float
    final: FinalMaps | None = None

    @property
    def stopped(self) -> bool:
        """True when the run stopped before its final iteration (``stop_after``)."""
        return self.final is None

    @property
    def final_map(self) -> torch.Tensor:
        """The final (N, N, N) map (cpu)."""
        if self.final is None:
            raise ValueError("the refinement stopped before its final iteration")
        return self.final.map


@dataclass
class _Setup:
    """What stays fixed during a run: masks (N, N, N), symmetry operators, device."""

    mask: torch.Tensor
    solvent: torch.Tensor
    sym_np: np.ndarray
    sym_mats: torch.Tensor
    device: torch.device


@dataclass
class _EStepOutcome:
    stats: list[SufficientStats]
    summaries: list[dict]
    size: int
    coarse_size: int
    comps: FourierComponents
    rotations: sampling.RotationSet
    translations: sampling.TranslationSet
    local: bool


def _setup(src: ParticleSource, opts: RefineOptions, device: torch.device) -> _Setup:
    mask = particle_mask(src.box, opts.particle_diameter_A, src.pixel_size_A, device)
    solvent = opts.solvent_mask.to(device) if opts.solvent_mask is not None else particle_mask(
        src.box, opts.particle_diameter_A, src.pixel_size_A, device)
    sym_np = symmetry_matrices(opts.sym)
    return _Setup(mask, solvent, sym_np, torch.as_tensor(sym_np, dtype=torch.float32, device=device), device)


def initialise_refinement(src: ParticleSource, opts: RefineOptions, halves: np.ndarray, *,
                          initial_ref: torch.Tensor | None = None, initial_rot: np.ndarray | None = None,
                          initial_offset_px: np.ndarray | None = None, device=None) -> RefineState:
    """Iteration 0: initial poses, noise spectrum and the (low-passed, masked) half references.

    Parameters
    ----------
    src : ParticleSource
        n subtomograms (N^3 px) and their 3D CTFs.
    opts : RefineOptions
        Settings.
    halves : numpy.ndarray
        (n,) half of each particle, 1 or 2.
    initial_ref : torch.Tensor, optional
        (N, N, N) starting map; None: reconstruct the particles at ``initial_rot`` (each half
        its own), or without it all particles in random orientations.
    initial_rot : numpy.ndarray, optional
        (n, 3, 3) starting poses; None: random rotations (seeded).
    initial_offset_px : numpy.ndarray, optional
        (n, 3) starting origins [px]; None: zeros.
    device : torch.device or str, optional
        Where to compute.

    Returns
    -------
    RefineState
        The state at iteration 0.
    """
    device = torch.device(device or "cpu")
    setup = _setup(src, opts, device)
    n, box, px = src.n, src.box, src.pixel_size_A
    rng = np.random.default_rng([opts.seed, 1])
    rot0 = initial_rot if initial_rot is not None else random_rotations(n, rng)
    off0 = initial_offset_px if initial_offset_px is not None else np.zeros((n, 3))
    poses = PoseTable.new(n, np.asarray(rot0, dtype=np.float64), np.asarray(off0, dtype=np.float64))
    sig0 = initial_sigma2(src, np.arange(n), setup.mask, device, opts.use_ctf)
    ini_shell = max(1, int(round(box * px / opts.ini_high_A)))
    if initial_ref is not None:
        refs = [initial_ref.to(device).float()] * 2
    else:
        refs = _reconstructed_references(src, opts, setup, poses, sig0, np.asarray(halves), initial_rot is not None)
    n_shells = box // 2 + 1
    models = []
    for ref0 in refs:
        ref = lowpass_map(ref0 * setup.solvent, ini_shell)  # low-pass last: no leakage above ini_high
        models.append(EMModel(ref[None], sig0.clone(), torch.zeros(1, n_shells), torch.zeros(1, n_shells),
                              torch.zeros(1, n_shells), torch.ones(1), px, 1.0, opts.sigma_offset_px,
                              ini_shell, min(box, even_size(2 * (ini_shell + opts.incr_size)))))
    local = opts.initial_sigma_ang_deg is not None
    samp = SamplingState(opts.healpix_order, opts.offset_range_px, opts.offset_step_px, local=local,
                         sigma_rot_deg=float(opts.initial_sigma_ang_deg or 0.0))
    return RefineState(0, models, poses, samp, opts.incr_size, np.asarray(halves), first_cc=opts.firstiter_cc)


def _reconstructed_references(src: ParticleSource, opts: RefineOptions, setup: _Setup, poses: PoseTable,
                              sig0: torch.Tensor, halves: np.ndarray, per_half: bool) -> list[torch.Tensor]:
    """The two starting references reconstructed from the particles at ``poses`` (unfiltered, (N, N, N)).

    ``per_half`` (given poses): each half from its own particles, as gold-standard halves must be.
    Otherwise (random orientations) one map from all particles, shared by both halves (as a given
    --ref is): halves started from their own random maps converge in different frames.
    """
    box, device = src.box, setup.device
    comps = fourier_components(box, box, 3, device=device)
    groups = half_indices(halves) if per_half else [np.arange(src.n)]
    refs = []
    for idx in groups:
        st0 = delta_stats_on(opts.runner, src, idx, poses, 1, sig0, comps, device, opts.batch_size, opts.use_ctf)
        d, w = symmetrised_grids(st0, setup.sym_mats)
        refs.append(rc.reconstruct(d, w, 3))
    return refs if per_half else refs * 2


def _expectation(src: ParticleSource, opts: RefineOptions, setup: _Setup, state: RefineState, it: int,
                 final: bool) -> _EStepOutcome:
    """The E-step of both halves against their own references (poses updated in place)."""
    samp, models, device = state.sampling, state.models, setup.device
    box = src.box
    size = box if final else models[0].current_size
    comps = fourier_components(box, size, 3, device=device)
    rng = np.random.default_rng([opts.seed, it])
    local_search = samp.local  # this iteration's mode (the sampling update may change samp)
    if local_search:
        rot_set = sampling.local_rotations(samp.order, samp.sigma_rot_deg, rng=rng, device=device)
    else:
        rot_set = sampling.global_rotations(samp.order, opts.sym, rng=rng, device=device)
    trans = sampling.translation_grid(samp.offset_range_px, samp.offset_step_px, 3, device=device)
    csize = coarse_size_for(angular_step_deg(samp.order), opts.particle_diameter_A, box, src.pixel_size_A, size)
    if samp.local and opts.local_coarse_cap:
        csize = min(csize, max(16, even_size(2 * (models[0].current_shell + 2))))
    estep_opts = EStepOptions(opts.fraction, opts.max_significant, opts.max_keep, models[0].sigma_offset_px,
                              cc=state.first_cc, memory_bytes=opts.memory_bytes,
                              pass_memory_bytes=opts.pass_memory_bytes)
    cfg = PassConfig(size, csize, setup.mask, rot_set, samp.local, trans, estep_opts, opts.batch_size,
                     sym_mats=setup.sym_np)
    # the halves at once on a cluster (each on its own share of the workers), else one after the other
    passes = [(idx, models[h].maps, models[h].sigma2) for h, idx in enumerate(half_indices(state.halves))]
    results = estep_passes(src, passes, state.poses, comps, cfg, device, opts.runner, opts.pad, opts.use_ctf)
    stats, summaries = [r[0] for r in results], [r[1] for r in results]
    state.first_cc = False
    return _EStepOutcome(stats, summaries, size, csize, comps, rot_set, trans, local_search)


def _final_maps(grids: list, fsc: torch.Tensor, model: EMModel, res_shell: int, box: int) -> FinalMaps:
    """Both halves joined (joined-FSC tau^2) and the unregularised half maps."""
    dsum, wsum = grids[0][0] + grids[1][0], grids[0][1] + grids[1][1]
    tau2, ssnr, _ = rc.tau2_from_fsc(fsc, wsum, 3, joined=True)
    final_map = rc.reconstruct(dsum, wsum, 3, tau2=tau2, tau2_fudge=1.0)
    unfil = [rc.reconstruct(g[0], g[1], 3) for g in grids]
    joined = EMModel(final_map[None], model.sigma2, tau2[None], ssnr[None], fsc[None], torch.ones(1),
                     model.pixel_size_A, 1.0, model.sigma_offset_px, res_shell, box, extra=model.extra)
    return FinalMaps(final_map.cpu(), [u.cpu() for u in unfil], joined)


def _maximisation(opts: RefineOptions, setup: _Setup, state: RefineState, est: _EStepOutcome, box: int,
                  final: bool) -> tuple[list[EMModel], torch.Tensor, torch.Tensor, list]:
    """Gold-standard FSC, low-resolution join, MAP reconstruction of each half.

    Returns the new half models, the FSC (n_shells,), the SSNR of the second half and the
    symmetrised half grids.
    """
    stats, cur_shell_data = est.stats, est.size // 2
    # gold-standard FSC of the independent halves (before joining them at low resolution,
    # which would make it 1 up to the join shell and hide halves that disagree)
    grids = [symmetrised_grids(s, setup.sym_mats) for s in stats]
    fsc = rc.fsc_halves(grids[0][0], grids[0][1], grids[1][0], grids[1][1], 3)
    fsc[cur_shell_data:] = 0.0
    px = state.models[0].pixel_size_A
    if not final:
        join_shell = int(math.floor(box * px / max(opts.low_resol_join_halves_A, 1e-6)))
        join_shell = min(join_shell, int(math.ceil(box * px * 1.0 / max(state.models[0].current_resolution_A, 1e-6))))
        join_low_resolution(stats[0], stats[1], join_shell)
        grids = [symmetrised_grids(s, setup.sym_mats) for s in stats]
    new_models = []
    for h, idx in enumerate(half_indices(state.halves)):
        tau2_h, ssnr_h, _ = rc.tau2_from_fsc(fsc, grids[h][1], 3)
        vol = rc.reconstruct(grids[h][0], grids[h][1], 3, tau2=tau2_h, tau2_fudge=1.0, max_shell=cur_shell_data)
        vol = vol * setup.solvent
        m = state.models[h]
        sig = sigma2_from_stats(stats[h], m.sigma2, cur_shell_data)
        sig_off = sigma_offset_from_stats(stats[h], 3, m.sigma_offset_px)
        new_models.append(EMModel(vol[None], sig, tau2_h[None], ssnr_h[None], fsc[None].clone(), torch.ones(1), px,
                                  1.0, sig_off, m.current_shell, m.current_size, log_lik=float(stats[h].log_lik),
                                  extra={"average_pmax": est.summaries[h]["pmax"], "n_particles": len(idx)}))
    return new_models, fsc, ssnr_h, grids


def _next_size(state: RefineState, fsc: torch.Tensor, res_shell: int, pmax: float, size: int, box: int) -> None:
    """RELION's next current size: resolution shell + the increment (box/8 while the FSC is high at the edge)."""
    n_shells = box // 2 + 1
    cur_shell_data = size // 2
    state.incr = max(state.incr, threshold_shell(fsc, 0.143) - threshold_shell(fsc, 0.5) + 5)
    fsc_at_edge = float(fsc[min(cur_shell_data - 1, n_shells - 1)])
    r_img = res_shell + (box // 8 if (pmax > 0.1 and fsc_at_edge > 0.2) else state.incr)
    for m in state.models:
        m.current_shell = res_shell
        m.current_size = min(box, even_size(2 * r_img))


def refine_iteration(src: ParticleSource, opts: RefineOptions, state: RefineState, *, final: bool = False,
                     device=None) -> RefineIteration:
    """One iteration: E-step of both halves, M-step, resolution, next size and sampling (``state`` updated).

    Parameters
    ----------
    src : ParticleSource
        The particles (n subtomograms of N^3 px) and their 3D CTFs.
    opts : RefineOptions
        Settings.
    state : RefineState
        The state after the previous iteration; advanced in place to this iteration.
    final : bool
        The final iteration: full size, both halves joined into the final map.
    device : torch.device or str, optional
        Where to compute.

    Returns
    -------
    RefineIteration
    """
    device = torch.device(device or "cpu")
    setup = _setup(src, opts, device)
    t0 = time.time()
    state.iteration += 1
    it, box, px = state.iteration, src.box, src.pixel_size_A
    n_shells = box // 2 + 1
    est = _expectation(src, opts, setup, state, it, final)
    estep_s = time.time() - t0
    models, fsc, ssnr_h, grids = _maximisation(opts, setup, state, est, box, final)
    state.models = models
    cur_shell_data = est.size // 2
    res_shell = rc.resolution_shell(ssnr_h.clone().masked_fill(torch.arange(n_shells) >= cur_shell_data, 0.0),
                                    scan_from_top=True)
    res_shell = min(res_shell, cur_shell_data - 1) if not final else res_shell
    ang_change = float(np.mean([s["ang_change_deg"] for s in est.summaries]))
    off_change = float(np.mean([s["off_change_px"] for s in est.summaries]))
    pmax = float(np.mean([s["pmax"] for s in est.summaries]))
    acc_rot = None
    if not final and state.sampling.local and opts.accuracy_criterion:
        acc_rot = expected_angular_accuracy_deg(src, half_indices(state.halves)[0], state.poses, models[0].maps[0],
                                                models[0].sigma2, est.comps, device, opts.use_ctf, opts.pad,
                                                seed=opts.seed + it)
    if not final:
        update_sampling(state.sampling, opts.sampling_rules, res_shell, ang_change, off_change, box, px, pmax, acc_rot)
        _next_size(state, fsc, res_shell, pmax, est.size, box)
    record = IterationRecord(it, rc.resolution_A(res_shell, box, px), rc.resolution_A(threshold_shell(fsc, 0.143), box, px),
                             est.size, est.coarse_size, state.sampling.order, est.rotations.fine_step_deg,
                             est.translations.range_px, est.translations.step_px / 2, state.sampling.local,
                             ang_change, off_change, pmax, acc_rot, time.time() - t0, estep_s)
    state.history.append(record)
    out = RefineIteration(it, models, state.poses, state.halves, record)
    if final:
        out.final = _final_maps(grids, fsc, models[0], res_shell, box)
    else:
        out.state = state
    return out


def describe_iteration(result: RefineIteration, local_search: bool | None = None) -> str:
    """One log line of an iteration (resolutions, sizes, sampling, changes, time).

    Parameters
    ----------
    result : RefineIteration
        The iteration; without a record (iteration 0) only its number is given.
    local_search : bool, optional
        Whether to mark the angular step as local; default: the record's ``local``.

    Returns
    -------
    str
        Resolution and FSC 0.143 resolution [Å], current and coarse size [px], angular step [deg],
        offset range/step [px], mean angular [deg] and offset [px] changes, mean Pmax, expected
        angular accuracy [deg] when computed, and the time [s] (of it the E-step's).
    """
    r = result.record
    if r is None:
        return f"iteration {result.iteration}"
    local = r.local if local_search is None else local_search
    return (f"iteration {r.iteration:3d}{' (final)' if result.final is not None else ''}: resolution "
            f"{r.resolution_A:.1f} A (FSC 0.143: {r.fsc0143_A:.1f} A), size {r.size} (coarse {r.coarse_size}), "
            f"angular step {r.angular_step_deg:.2f} deg{' local' if local else ''}, offsets "
            f"{r.offset_range_px:.1f}/{r.offset_step_px:.2f} px, changes {r.ang_change_deg:.2f} deg "
            f"{r.off_change_px:.2f} px, Pmax {r.pmax:.3f}"
            f"{f', accuracy {r.acc_rot_deg:.2f} deg' if r.acc_rot_deg is not None else ''}, {r.seconds:.1f} s "
            f"(E-step {r.estep_seconds:.1f} s)")


def _describe_start(src: ParticleSource, opts: RefineOptions, state: RefineState, given_ref: bool,
                    given_rot: bool) -> str:
    idx_h = half_indices(state.halves)
    start = ("initial reference" if given_ref else "each half reconstructed at the initial poses" if given_rot
             else "reconstruction from random orientations")
    local = (f"; local searches from iteration 1 (sigma {opts.initial_sigma_ang_deg:g} deg around the initial poses)"
             if opts.initial_sigma_ang_deg is not None else "")
    return (f"iteration 0: {start}, {len(idx_h[0])}+{len(idx_h[1])} particles, box {src.box}, "
            f"{src.pixel_size_A:.3f} A/px, low-pass {opts.ini_high_A:.0f} A{local}")


def auto_refine(src: ParticleSource, opts: RefineOptions, *, initial_ref: torch.Tensor | None = None,
                initial_rot: np.ndarray | None = None, initial_offset_px: np.ndarray | None = None,
                halves: np.ndarray | None = None, resume: RefineState | None = None, device=None,
                log: Callable[[str], None] = print, on_iteration: Callable[[RefineIteration], None] | None = None,
                stop_after: int | None = None) -> RefineResult:
    """Run the gold-standard auto-refinement to convergence (or ``max_iter``).

    Parameters
    ----------
    src : ParticleSource
        n subtomograms (N^3 px, pixel size Å) and their 3D CTFs.
    opts : RefineOptions
        Settings.
    initial_ref : torch.Tensor, optional
        (N, N, N) starting map; None: reconstructed at ``initial_rot`` (each half its own) or random poses.
    initial_rot, initial_offset_px : numpy.ndarray, optional
        (n, 3, 3) starting poses and (n, 3) origins [px].
    halves : numpy.ndarray, optional
        (n,) half of each particle (1/2); default: a random split with ``opts.seed``.
    resume : RefineState, optional
        Continue from this state (an earlier run's last iteration) instead of initialising.
    device : torch.device or str, optional
        Where to compute.
    log : callable
        Receives one line per iteration.
    on_iteration : callable, optional
        Receives every :class:`RefineIteration` (iteration 0 too when the reference was
        reconstructed); the job writes the run files from it.
    stop_after : int, optional
        Stop after this iteration (its state can be continued).

    Returns
    -------
    RefineResult
    """
    device = torch.device(device or "cpu")
    t0 = time.time()
    if resume is not None:
        state = resume
        log(f"continuing from iteration {state.iteration}")
    else:
        halves = split_halves(None, src.n, opts.seed) if halves is None else np.asarray(halves)
        state = initialise_refinement(src, opts, halves, initial_ref=initial_ref, initial_rot=initial_rot,
                                      initial_offset_px=initial_offset_px, device=device)
        if initial_ref is None and on_iteration is not None:
            on_iteration(RefineIteration(0, state.models, state.poses, state.halves))
        log(_describe_start(src, opts, state, initial_ref is not None, initial_rot is not None))
    while True:
        final = state.sampling.converged or state.iteration + 1 > opts.max_iter
        local_search = state.sampling.local
        result = refine_iteration(src, opts, state, final=final, device=device)
        log(describe_iteration(result, local_search))
        if on_iteration is not None:
            on_iteration(result)
        done = result.final is not None or (stop_after is not None and state.iteration >= stop_after)
        if done:
            fsc = result.models[0].fsc[0].cpu().numpy()
            res_A = result.record.fsc0143_A if result.record is not None else float("inf")
            return RefineResult(state.iteration, res_A, fsc, state.poses, state.halves, state.history,
                                time.time() - t0, result.final)
