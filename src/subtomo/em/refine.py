"""3D auto-refine (RELION's gold-standard auto-refinement, relion-internals §3.4-§3.7).

Two random halves are refined independently (each its own model: reference, sigma^2);
each iteration: E-step of every half against its own reference, low-resolution joining of
the halves' sums below ``low_resol_join_halves_A`` (keeps both halves in one frame, as
RELION), gold-standard FSC -> tau^2 and current resolution, MAP reconstruction of each
half, solvent flattening; then the current size and the sampling are updated
(auto-sampling: finer HEALPix order and translations when resolution and poses stop
improving; local searches from ``auto_local_order``). At convergence one last iteration
at full size sums both halves (joined-FSC tau^2) and writes the final maps. Without an
initial reference, iteration 0 reconstructs each half from random orientations.

Every iteration writes RELION's run_itNNN_* files and an optimiser state
(``run_itNNN_optimiser.pt``) from which :func:`auto_refine` continues.
"""

from __future__ import annotations

import glob
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from subtomo.em import reconstruct as rc
from subtomo.em import sampling
from subtomo.em.components import fourier_components
from subtomo.em.expectation import EStepOptions
from subtomo.em.healpix import angular_step_deg
from subtomo.em.iteration import (ParticleSource, PassConfig, PoseTable, coarse_size_for, delta_stats, estep_pass,
                                  expected_angular_accuracy_deg, initial_sigma2)
from subtomo.em.maximisation import SufficientStats, sigma2_from_stats, sigma_offset_from_stats
from subtomo.em.model import EMModel, write_model_star
from subtomo.em.projector3d import symmetrise3d
from subtomo.errors import SubtomoError
from subtomo.geometry.euler import matrix_to_euler, random_rotations
from subtomo.geometry.symmetry import symmetry_matrices
from subtomo.io.mrc import write_mrc
from subtomo.io.star import write_star


@dataclass
class RefineOptions:
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
    # local searches: the coarse pass (which only picks the significant points whose children the
    # fine pass rescores at the current size) runs at most at the current resolution, 2 (shell + 2)
    # px, instead of RELION's step-based coarse size; like a RELION --coarse_size cap.
    local_coarse_cap: bool = True
    # sampling fine enough when the oversampled step < 0.75 x the expected angular accuracy (RELION
    # §3.6, from 10 particles, computed in local searches); False: the resolution-limited step rule
    accuracy_criterion: bool = True
    solvent_mask: torch.Tensor | None = field(default=None, repr=False)


@dataclass
class SamplingState:
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


def particle_mask(box: int, diameter_A: float, pixel_size_A: float, device, edge_px: float = 5.0) -> torch.Tensor:
    """RELION's E-step mask: soft sphere of the particle diameter (zero outside)."""
    radius = min(diameter_A / (2 * pixel_size_A), box / 2 - 1)
    return rc.soft_sphere(box, 3, max(radius - edge_px / 2, 1.0), edge_px, device)


def even(v: float) -> int:
    return int(2 * math.ceil(v / 2))


def split_halves(df: pd.DataFrame | None, n: int, seed: int) -> np.ndarray:
    """rlnRandomSubset (1/2) if all set, random halves with the seed if all 0/absent; error on a mix."""
    if df is not None and "rlnRandomSubset" in df.columns:
        s = df["rlnRandomSubset"].to_numpy().astype(int)
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


class RelionWriter:
    """Writes run_itNNN_* / run_* files of a refinement or classification."""

    def __init__(self, out_dir: Path, particles: pd.DataFrame | None, pixel_size_A: float, rel: Callable[[Path], str] | None = None):
        self.dir = Path(out_dir)
        self.df = particles
        self.px = pixel_size_A
        self.rel = rel or (lambda p: str(p))

    def data_star(self, path: Path, poses: PoseTable, halves: np.ndarray | None, optics: pd.DataFrame | None = None) -> Path:
        n = len(poses.rot)
        df = self.df.copy() if self.df is not None else pd.DataFrame(index=range(n))
        df = df.reset_index(drop=True)
        ang = matrix_to_euler(poses.rot)
        df["rlnAngleRot"], df["rlnAngleTilt"], df["rlnAnglePsi"] = ang[:, 0], ang[:, 1], ang[:, 2]
        for j, a in enumerate("XYZ"):
            df[f"rlnOrigin{a}Angst"] = poses.offset_px[:, j] * self.px
        if halves is not None:
            df["rlnRandomSubset"] = halves.astype(int)
        df["rlnClassNumber"] = poses.cls.astype(int) + 1
        df["rlnMaxValueProbDistribution"] = poses.max_prob
        df["rlnLogLikeliContribution"] = poses.log_lik
        df["rlnNrOfSignificantSamples"] = poses.n_sig.astype(int)
        if optics is not None:
            return write_star(path, {"optics": optics, "particles": df})
        return write_star(path, {"particles": df})

    def map(self, path: Path, vol: torch.Tensor) -> Path:
        return write_mrc(path, vol.detach().cpu().numpy().astype(np.float32), self.px)


def _sym_stats(stats: SufficientStats, sym_mats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d, w = rc.hermitian_symmetrise(stats.data[0], stats.weight[0], 3)
    return symmetrise3d(d, w, sym_mats)


def _join_low_res(s1: SufficientStats, s2: SufficientStats, shell: int) -> None:
    """Average both halves' data/weight for |q| <= shell (in place)."""
    n = s1.data.shape[-1]
    low = rc.full_shells(n, 3, s1.data.device) <= shell
    for a, b in ((s1.data, s2.data), (s1.weight, s2.weight)):
        avg = (a + b) / 2
        a[:, low] = avg[:, low]
        b[:, low] = avg[:, low]


def _latest_state(out_dir: Path) -> Path | None:
    files = sorted(glob.glob(str(Path(out_dir) / "run_it*_optimiser.pt")))
    return Path(files[-1]) if files else None


def auto_refine(src: ParticleSource, opts: RefineOptions, out_dir: Path, *, particles: pd.DataFrame | None = None,
                optics: pd.DataFrame | None = None, initial_ref: torch.Tensor | None = None,
                initial_rot: np.ndarray | None = None, initial_offset_px: np.ndarray | None = None,
                halves: np.ndarray | None = None, device=None, log: Callable[[str], None] = print,
                continue_run: bool = False, stop_after: int | None = None) -> dict:
    """Run the auto-refinement; returns a summary dict (resolutions, iterations, files)."""
    device = torch.device(device or "cpu")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n, box, px = src.n, src.box, src.pixel_size_A
    n_shells = box // 2 + 1
    writer = RelionWriter(out_dir, particles, px)
    halves = split_halves(particles, n, opts.seed) if halves is None else np.asarray(halves)
    idx_h = [np.nonzero(halves == h)[0] for h in (1, 2)]
    if min(len(i) for i in idx_h) < 1:
        raise SubtomoError("each random half needs at least one particle.")
    mask = particle_mask(box, opts.particle_diameter_A, px, device)
    solvent = opts.solvent_mask.to(device) if opts.solvent_mask is not None else particle_mask(
        box, opts.particle_diameter_A, px, device)
    sym_np = symmetry_matrices(opts.sym)
    sym_mats = torch.as_tensor(sym_np, dtype=torch.float32, device=device)
    t0 = time.time()
    history: list[dict] = []

    state_file = _latest_state(out_dir) if continue_run else None
    if state_file is not None:
        st = torch.load(state_file, weights_only=False)
        it0 = st["iteration"]
        models = [EMModel.from_state(m, device) for m in st["models"]]
        poses = st["poses"]
        samp = SamplingState(**st["sampling"])
        incr = st["incr"]
        halves = st["halves"]
        idx_h = [np.nonzero(halves == h)[0] for h in (1, 2)]
        history = st.get("history", [])
        first_cc = False
        log(f"continuing from {state_file.name} (iteration {it0})")
    else:
        it0 = 0
        rng = np.random.default_rng([opts.seed, 1])
        rot0 = initial_rot if initial_rot is not None else random_rotations(n, rng)
        off0 = initial_offset_px if initial_offset_px is not None else np.zeros((n, 3))
        poses = PoseTable.new(n, np.asarray(rot0, dtype=np.float64), np.asarray(off0, dtype=np.float64))
        sig0 = initial_sigma2(src, np.arange(n), mask, device, opts.use_ctf)
        ini_shell = max(1, int(round(box * px / opts.ini_high_A)))
        models = []
        if initial_ref is not None:
            ref0 = initial_ref.to(device).float()
        else:
            # one reference from all particles in random orientations, shared by both halves (as a
            # given --ref is): halves started from their own random maps converge in different frames
            comps = fourier_components(box, box, 3, device=device)
            st0 = delta_stats(src, np.arange(n), poses, 1, sig0, comps, device, opts.batch_size, opts.use_ctf)
            d, w = _sym_stats(st0, sym_mats)
            ref0 = rc.reconstruct(d, w, 3)
        for h in range(2):
            ref = _lowpass_map(ref0 * solvent, ini_shell)  # low-pass last: no leakage above ini_high
            models.append(EMModel(ref[None], sig0.clone(), torch.zeros(1, n_shells), torch.zeros(1, n_shells),
                                  torch.zeros(1, n_shells), torch.ones(1), px, 1.0, opts.sigma_offset_px,
                                  ini_shell, min(box, even(2 * (ini_shell + opts.incr_size)))))
        samp = SamplingState(opts.healpix_order, opts.offset_range_px, opts.offset_step_px)
        incr = opts.incr_size
        first_cc = opts.firstiter_cc
        if initial_ref is None:
            for h in range(2):
                writer.map(out_dir / f"run_it000_half{h + 1}_class001.mrc", models[h].maps[0])
        log(f"iteration 0: {'initial reference' if initial_ref is not None else 'reconstruction from random orientations'}, "
            f"{len(idx_h[0])}+{len(idx_h[1])} particles, box {box}, {px:.3f} A/px, low-pass {opts.ini_high_A:.0f} A")

    it = it0
    final = False
    while True:
        it += 1
        if samp.converged or it > opts.max_iter:
            final = True
        ti = time.time()
        size = box if final else models[0].current_size
        comps = fourier_components(box, size, 3, device=device)
        step = angular_step_deg(samp.order)
        rng = np.random.default_rng([opts.seed, it])
        local_search = samp.local  # this iteration's mode (the sampling update below may change samp)
        if local_search:
            rot_set = sampling.local_rotations(samp.order, samp.sigma_rot_deg, rng=rng, device=device)
        else:
            rot_set = sampling.global_rotations(samp.order, opts.sym, rng=rng, device=device)
        trans = sampling.translation_grid(samp.offset_range_px, samp.offset_step_px, 3, device=device)
        csize = coarse_size_for(step, opts.particle_diameter_A, box, px, size)
        if samp.local and opts.local_coarse_cap:
            csize = min(csize, max(16, even(2 * (models[0].current_shell + 2))))
        estep_opts = EStepOptions(opts.fraction, opts.max_significant, opts.max_keep, models[0].sigma_offset_px,
                                  cc=first_cc, memory_bytes=opts.memory_bytes)
        cfg = PassConfig(size, csize, mask, rot_set, samp.local, trans, estep_opts, opts.batch_size,
                         sym_mats=sym_np)
        prev_poses = poses.copy()
        stats, summaries = [], []
        for h in range(2):
            s, summ = estep_pass(src, idx_h[h], poses, models[h].maps, models[h].sigma2, comps, cfg, device,
                                 pad=opts.pad, use_ctf=opts.use_ctf)
            stats.append(s)
            summaries.append(summ)
        first_cc = False
        cur_shell_data = size // 2
        # gold-standard FSC of the independent halves (before joining them at low resolution,
        # which would make it 1 up to the join shell and hide halves that disagree)
        grids = [_sym_stats(s, sym_mats) for s in stats]
        fsc = rc.fsc_halves(grids[0][0], grids[0][1], grids[1][0], grids[1][1], 3)
        fsc[cur_shell_data:] = 0.0
        if not final:
            join_shell = int(math.floor(box * px / max(opts.low_resol_join_halves_A, 1e-6)))
            join_shell = min(join_shell, int(math.ceil(box * px * 1.0 / max(models[0].current_resolution_A, 1e-6))))
            _join_low_res(stats[0], stats[1], join_shell)
            grids = [_sym_stats(s, sym_mats) for s in stats]
        if final:
            dsum, wsum = grids[0][0] + grids[1][0], grids[0][1] + grids[1][1]
            tau2, ssnr, _ = rc.tau2_from_fsc(fsc, wsum, 3, joined=True)
            final_map = rc.reconstruct(dsum, wsum, 3, tau2=tau2, tau2_fudge=1.0)
            unfil = [rc.reconstruct(g[0], g[1], 3) for g in grids]
        new_models = []
        for h in range(2):
            tau2_h, ssnr_h, _ = rc.tau2_from_fsc(fsc, grids[h][1], 3)
            vol = rc.reconstruct(grids[h][0], grids[h][1], 3, tau2=tau2_h, tau2_fudge=1.0, max_shell=cur_shell_data)
            vol = vol * solvent
            m = models[h]
            sig = sigma2_from_stats(stats[h], m.sigma2, cur_shell_data)
            sig_off = sigma_offset_from_stats(stats[h], 3, m.sigma_offset_px)
            new_models.append(EMModel(vol[None], sig, tau2_h[None], ssnr_h[None], fsc[None].clone(), torch.ones(1), px,
                                      1.0, sig_off, m.current_shell, m.current_size,
                                      log_lik=float(stats[h].log_lik),
                                      extra={"average_pmax": summaries[h]["pmax"], "n_particles": len(idx_h[h])}))
        models = new_models
        res_shell = rc.resolution_shell(ssnr_h.clone().masked_fill(torch.arange(n_shells) >= cur_shell_data, 0.0),
                                        scan_from_top=True)
        res_shell = min(res_shell, cur_shell_data - 1) if not final else res_shell
        res_0143 = rc.resolution_A(fsc_threshold_shell(fsc, 0.143), box, px)
        ang_change = float(np.mean([s["ang_change_deg"] for s in summaries]))
        off_change = float(np.mean([s["off_change_px"] for s in summaries]))
        pmax = float(np.mean([s["pmax"] for s in summaries]))
        acc_rot = None
        if not final and samp.local and opts.accuracy_criterion:
            acc_rot = expected_angular_accuracy_deg(src, idx_h[0], poses, models[0].maps[0], models[0].sigma2,
                                                    comps, device, opts.use_ctf, opts.pad, seed=opts.seed + it)
        if not final:
            _update_sampling(samp, opts, res_shell, ang_change, off_change, box, px, pmax, acc_rot)
            for m in models:
                m.current_shell = res_shell
                shell_05 = fsc_threshold_shell(fsc, 0.5)
                shell_0143 = fsc_threshold_shell(fsc, 0.143)
                incr = max(incr, shell_0143 - shell_05 + 5)
                fsc_at_edge = float(fsc[min(cur_shell_data - 1, n_shells - 1)])
                r_img = res_shell + (box // 8 if (pmax > 0.1 and fsc_at_edge > 0.2) else incr)
                m.current_size = min(box, even(2 * r_img))
        dt = time.time() - ti
        rec = {"iteration": it, "resolution_A": rc.resolution_A(res_shell, box, px), "fsc0143_A": res_0143,
               "size": size, "coarse_size": csize, "order": samp.order, "angular_step_deg": rot_set.fine_step_deg,
               "offset_range_px": trans.range_px, "offset_step_px": trans.step_px / 2, "local": samp.local,
               "ang_change_deg": ang_change, "off_change_px": off_change, "pmax": pmax, "acc_rot_deg": acc_rot,
               "seconds": dt}
        history.append(rec)
        log(f"iteration {it:3d}{' (final)' if final else ''}: resolution {rec['resolution_A']:.1f} A (FSC 0.143: "
            f"{res_0143:.1f} A), size {size} (coarse {csize}), angular step {rot_set.fine_step_deg:.2f} deg"
            f"{' local' if local_search else ''}, offsets {trans.range_px:.1f}/{trans.step_px / 2:.2f} px, "
            f"changes {ang_change:.2f} deg {off_change:.2f} px, Pmax {pmax:.3f}"
            f"{f', accuracy {acc_rot:.2f} deg' if acc_rot is not None else ''}, {dt:.1f} s")
        tag = f"run_it{it:03d}"
        for h in range(2):
            writer.map(out_dir / f"{tag}_half{h + 1}_class001.mrc", models[h].maps[0])
        writer.data_star(out_dir / f"{tag}_data.star", poses, halves, optics)
        write_model_star(out_dir / f"{tag}_model.star", models[0], [f"{tag}_half1_class001.mrc"],
                         accuracy_rot_deg=acc_rot)
        if final:
            writer.map(out_dir / "run_class001.mrc", final_map)
            for h in range(2):
                writer.map(out_dir / f"run_half{h + 1}_class001_unfil.mrc", unfil[h])
            writer.data_star(out_dir / "run_data.star", poses, halves, optics)
            fm = models[0]
            fm_final = EMModel(final_map[None], fm.sigma2, tau2[None], ssnr[None], fsc[None], torch.ones(1), px,
                               1.0, fm.sigma_offset_px, res_shell, box, extra=fm.extra)
            write_model_star(out_dir / "run_model.star", fm_final, ["run_class001.mrc"])
            _plots(out_dir, final_map, fsc, box, px)
            return {"iterations": it, "resolution_A": res_0143, "fsc": fsc.cpu().numpy(), "history": history,
                    "seconds": time.time() - t0, "final_map": final_map.cpu(), "poses": poses, "halves": halves,
                    "unfil": [u.cpu() for u in unfil]}
        torch.save({"iteration": it, "models": [m.state() for m in models], "poses": poses,
                    "sampling": asdict(samp), "incr": incr, "halves": halves, "history": history},
                   out_dir / f"{tag}_optimiser.pt")
        if stop_after is not None and it >= stop_after:
            return {"iterations": it, "stopped": True, "history": history}


def fsc_threshold_shell(fsc: torch.Tensor, thr: float) -> int:
    """Index of the last shell before ``fsc`` first drops below ``thr`` (the resolution shell)."""
    v = fsc.cpu()
    below = torch.nonzero(v[1:] < thr)
    return int(below[0]) if len(below) else len(v) - 1


def _lowpass_map(vol: torch.Tensor, shell: float) -> torch.Tensor:
    from subtomo.fourier import raised_cosine_lowpass, fft_centered, ifft_centered

    shape = tuple(vol.shape)
    filt = raised_cosine_lowpass(shape, shell, 2.0, device=vol.device)
    return ifft_centered(fft_centered(vol, 3) * filt, shape)


def _update_sampling(samp: SamplingState, opts: RefineOptions, res_shell: int, ang_change: float, off_change: float,
                     box: int, px: float, pmax: float = 0.0, acc_rot_deg: float | None = None) -> None:
    """RELION §3.6/3.7 (simplified: the needed accuracy from the resolution, not from perturbations).

    With ``auto_ignore_angles`` the poses count as settled once the average Pmax is >= 0.8 (a
    pseudo-symmetric particle refined in C1 keeps jumping between equivalent poses, so its
    orientation changes never become small). Only local searches (or the finest order) can be
    fine enough: an early stall at low resolution, where the global sampling is trivially fine
    enough, moves on to local searches instead of ending the run.
    """
    if res_shell > samp.best_shell:
        samp.best_shell = res_shell
        samp.iters_no_res_gain = 0
    else:
        samp.iters_no_res_gain += 1
    fine_step = angular_step_deg(samp.order) / 2
    # "no large change": the changes stopped decreasing (within 3 % of the smallest so far)
    # or are below 40 % of the current steps (RELION's updateOverallChangesInHiddenVariables)
    ang_small = ang_change >= 0.97 * samp.smallest_ang_change or ang_change < 0.4 * fine_step
    off_small = off_change >= 0.97 * samp.smallest_off_change or off_change < 0.4 * samp.offset_step_px / 2
    small = (ang_small and off_small) or (opts.auto_ignore_angles and pmax >= 0.8)
    samp.smallest_ang_change = min(samp.smallest_ang_change, ang_change)
    samp.smallest_off_change = min(samp.smallest_off_change, off_change)
    samp.iters_no_large_change = samp.iters_no_large_change + 1 if small else 0
    res_A = box * px / max(res_shell, 1)
    needed = 360.0 / math.ceil(math.pi * opts.particle_diameter_A / res_A)  # resolution-limited step
    # global searches are never final: the run goes through local searches (or the finest order) first
    if acc_rot_deg is not None:  # RELION: the current (oversampled) step below 0.75 x the expected accuracy
        samp.fine_enough = (fine_step < 0.75 * acc_rot_deg and samp.local) or samp.order >= opts.max_order
    else:
        samp.fine_enough = (fine_step <= 0.5 * needed and samp.local) or samp.order >= opts.max_order
    if samp.iters_no_res_gain >= 1 and samp.iters_no_large_change >= 1:
        if samp.fine_enough:
            samp.converged = True
            return
        samp.order += 1
        new_step = max(samp.offset_step_px / 2, 0.5)
        new_range = min(max(3 * off_change, 1.5 * new_step), 1.3 * samp.offset_range_px)
        if new_range > 4 * new_step:  # RELION: keep the translational grid small (~4 steps of range)
            new_range /= 2
            if new_range > 4 * new_step:
                new_step = min(new_range / 4, samp.offset_step_px)  # never coarser than before
        samp.offset_step_px, samp.offset_range_px = new_step, max(new_range, new_step)
        if samp.order >= opts.auto_local_order:
            samp.local = True
            samp.sigma_rot_deg = 2 * angular_step_deg(samp.order) / 2
        samp.iters_no_res_gain = 0
        samp.iters_no_large_change = 0
        samp.smallest_ang_change = 1e9
        samp.smallest_off_change = 1e9


def _plots(out_dir: Path, vol: torch.Tensor, fsc: torch.Tensor, box: int, px: float) -> None:
    try:
        from subtomo.plot.maps import plot_fsc, plot_slices
    except Exception:  # plotting is optional for the engine
        return
    plot_slices(vol.cpu().numpy(), out_dir / "run_class001_slices.png", title="run_class001.mrc")
    plot_fsc(fsc.cpu().numpy(), box, px, out_dir / "run_fsc.png")


def oracle(src: ParticleSource, rot: np.ndarray, offset_px: np.ndarray, halves: np.ndarray, *, use_ctf: bool = True,
           sym: str = "C1", diameter_A: float | None = None, device=None, batch_size: int = 16) -> dict:
    """Gold-standard reconstruction with given (true) poses: the ceiling of a refinement.

    Same CTF model, same halves and the same final-iteration formulas as :func:`auto_refine`.
    Returns {"resolution_A", "fsc", "map", "half_maps"}.
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
        grids.append(_sym_stats(st, sym_mats))
    fsc = rc.fsc_halves(grids[0][0], grids[0][1], grids[1][0], grids[1][1], 3)
    dsum, wsum = grids[0][0] + grids[1][0], grids[0][1] + grids[1][1]
    tau2, _, _ = rc.tau2_from_fsc(fsc, wsum, 3, joined=True)
    vol = rc.reconstruct(dsum, wsum, 3, tau2=tau2)
    return {"resolution_A": rc.resolution_A(fsc_threshold_shell(fsc, 0.143), box, px), "fsc": fsc.cpu().numpy(),
            "map": vol.cpu(), "half_maps": [rc.reconstruct(g[0], g[1], 3).cpu() for g in grids]}


def rotate_map(vol: torch.Tensor, matrix: np.ndarray, pad: int = 2) -> torch.Tensor:
    """Map rotated by A (particle convention: out(r) = vol(A^T r)), via Fourier sampling.

    Band-limited to the Nyquist sphere (corners of the cube are dropped); the mean is kept.
    """
    from subtomo.em.projector3d import Projector3D
    from subtomo.fourier import ifft_centered

    box = vol.shape[-1]
    comps = fourier_components(box, box, 3, device=vol.device)
    a = Projector3D(vol, pad=pad).project(torch.as_tensor(matrix, dtype=torch.float32, device=vol.device)[None], comps.k)[0]
    f = torch.zeros(box * box * (box // 2 + 1), dtype=torch.complex64, device=vol.device)
    # components with kx > 0 stand for their mate too (the inverse rfft adds it); on the
    # kx = 0 plane only one member of each pair is set, and the inverse keeps half of it
    f[comps.idx] = a * torch.where(comps.k[:, 0] == 0, 2.0, 1.0).to(a.dtype)
    f = f.reshape(box, box, box // 2 + 1)
    out = ifft_centered(f, (box,) * 3)
    return out - out.mean() + vol.mean()  # the DC component is not among the components
