"""3D classification (and focused classification) with the shared engine (relion-internals §3.8-3.9).

K references; no halves; tau^2_k from the power spectrum of the current reference and
data_vs_prior_k = mean(weight) T tau^2_k (T default 4); class priors pi_k = sum of
posterior class weights; fixed number of iterations. Initial references: the given map
(low-passed) for every class with each particle assigned to a random class in the first
iteration, or reconstructions of random subsets (input poses if present, else random).
Orientation search: global (HEALPix), local around the input poses (Gaussian prior of
width ``sigma_ang_deg``), or none (``skip_align``: poses fixed, only classes are searched -
focused classification with a mask white over the region of interest).
"""

from __future__ import annotations

import dataclasses
import glob
import math
import time
from dataclasses import dataclass, field
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
from subtomo.em.iteration import ParticleSource, PassConfig, PoseTable, coarse_size_for, delta_stats, estep_pass, initial_sigma2
from subtomo.em.maximisation import SufficientStats, sigma2_from_stats, sigma_offset_from_stats
from subtomo.em.model import EMModel, write_model_star
from subtomo.em.projector3d import symmetrise3d
from subtomo.em.refine import RelionWriter, _lowpass_map, even, particle_mask
from subtomo.geometry.euler import random_rotations
from subtomo.geometry.symmetry import symmetry_matrices


@dataclass
class ClassifyOptions:
    n_classes: int
    particle_diameter_A: float
    n_iter: int = 25
    tau2_fudge: float = 4.0
    healpix_order: int = 2
    offset_range_px: float = 5.0
    offset_step_px: float = 2.0
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
    max_keep: int = 12
    sigma_offset_px: float = 3.0
    memory_bytes: int = 512 * 2 ** 20
    focus_mask: torch.Tensor | None = field(default=None, repr=False)  # E-step mask (focused classification)
    solvent_mask: torch.Tensor | None = field(default=None, repr=False)


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


def classify3d(src: ParticleSource, opts: ClassifyOptions, out_dir: Path, *, particles: pd.DataFrame | None = None,
               optics: pd.DataFrame | None = None, initial_ref: torch.Tensor | None = None,
               initial_rot: np.ndarray | None = None, initial_offset_px: np.ndarray | None = None, device=None,
               log: Callable[[str], None] = print, continue_run: bool = False, stop_after: int | None = None) -> dict:
    """Run the classification; returns {"maps", "class_priors", "poses", "history"}."""
    device = torch.device(device or "cpu")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n, box, px = src.n, src.box, src.pixel_size_A
    n_shells = box // 2 + 1
    kc = opts.n_classes
    writer = RelionWriter(out_dir, particles, px)
    sphere = particle_mask(box, opts.particle_diameter_A, px, device)
    # focused classification (RELION): the references are compared only over the focus region
    # (masked in the reference frame, so the mask follows every pose); the particles keep the
    # spherical mask. Masking the particles with the focus mask instead would put a
    # reference-frame mask on unrotated particles and mismatch masked data and unmasked references.
    emask = sphere
    focus = opts.focus_mask.to(device).float() if opts.focus_mask is not None else None
    solvent = opts.solvent_mask.to(device) if opts.solvent_mask is not None else sphere
    sym_mats = torch.as_tensor(symmetry_matrices(opts.sym), dtype=torch.float32, device=device)
    all_idx = np.arange(n)
    history: list[dict] = []
    files = sorted(glob.glob(str(out_dir / "run_it*_optimiser.pt"))) if continue_run else []
    random_first = False
    if files:
        st = torch.load(files[-1], weights_only=False)
        it = st["iteration"]
        model = EMModel.from_state(st["model"], device)
        poses = st["poses"]
        history = st["history"]
        log(f"continuing from {Path(files[-1]).name}")
    else:
        it = 0
        rng = np.random.default_rng([opts.seed, 11])
        rot0 = initial_rot if initial_rot is not None else random_rotations(n, rng)
        off0 = initial_offset_px if initial_offset_px is not None else np.zeros((n, 3))
        poses = PoseTable.new(n, np.asarray(rot0, dtype=np.float64), np.asarray(off0, dtype=np.float64))
        poses.cls = rng.integers(0, kc, n)
        sig0 = initial_sigma2(src, all_idx, emask, device, opts.use_ctf)
        ini_shell = max(1, int(round(box * px / opts.ini_high_A)))
        if initial_ref is not None and initial_ref.ndim == 4:  # one reference per class
            if initial_ref.shape[0] != kc:
                raise ValueError(f"{initial_ref.shape[0]} initial references for {kc} classes")
            maps = torch.stack([_lowpass_map(r.to(device).float() * solvent, ini_shell) for r in initial_ref])
        elif initial_ref is not None:
            maps = _lowpass_map(initial_ref.to(device).float() * solvent, ini_shell)[None].repeat(kc, 1, 1, 1)
            random_first = kc > 1
        else:
            comps = fourier_components(box, box, 3, device=device)
            st0 = delta_stats(src, all_idx, poses, kc, sig0, comps, device, opts.batch_size, opts.use_ctf)
            maps = []
            for k in range(kc):
                d, w = rc.hermitian_symmetrise(st0.data[k], st0.weight[k], 3)
                d, w = symmetrise3d(d, w, sym_mats)
                maps.append(_lowpass_map(rc.reconstruct(d, w, 3) * solvent, ini_shell))
            maps = torch.stack(maps)
        tau2 = torch.stack([rc.tau2_from_power(m, 3) for m in maps])
        model = EMModel(maps, sig0, tau2, torch.zeros(kc, n_shells), torch.zeros(kc, n_shells),
                        torch.full((kc,), 1.0 / kc), px, opts.tau2_fudge, opts.sigma_offset_px, ini_shell,
                        min(box, even(2 * (ini_shell + opts.incr_size))))
    while it < opts.n_iter:
        it += 1
        ti = time.time()
        size = model.current_size
        comps = fourier_components(box, size, 3, device=device)
        rng = np.random.default_rng([opts.seed, it])
        order = opts.healpix_order
        if opts.local:
            order = max(order, 1)
            rot_set = sampling.local_rotations(order, opts.sigma_ang_deg, rng=rng, device=device)
        else:
            rot_set = sampling.global_rotations(order, opts.sym, rng=rng, device=device)
        trans = sampling.translation_grid(opts.offset_range_px, opts.offset_step_px, 3, device=device)
        csize = coarse_size_for(angular_step_deg(order), opts.particle_diameter_A, box, px, size)
        eo = EStepOptions(opts.fraction, opts.max_significant, opts.max_keep, model.sigma_offset_px,
                          memory_bytes=opts.memory_bytes)
        cfg = PassConfig(size, csize, emask, rot_set, opts.local, trans, eo, opts.batch_size,
                         skip_align=opts.skip_align, class_prior=model.class_priors)
        emaps = model.maps * focus if focus is not None else model.maps  # what the E-step compares
        if random_first:  # first iteration with one reference: each particle in its random class
            stats = SufficientStats.zeros(kc, box, 3, device=device)
            # one reference per pass: the class prior must be that single class's (K-long priors
            # broadcast the scores to K classes and break the flat (T, K, R) index decomposition)
            cfg1 = dataclasses.replace(cfg, class_prior=None)
            for k in range(kc):
                sel = np.nonzero(poses.cls == k)[0]
                if len(sel):
                    s, _ = estep_pass(src, sel, poses, emaps[k:k + 1], model.sigma2, comps, cfg1, device,
                                      pad=opts.pad, use_ctf=opts.use_ctf)
                    poses.cls[sel] = k
                    _class_stats_into(stats, s, k)
            summ = {"ang_change_deg": 0.0, "off_change_px": 0.0, "pmax": float(np.mean(poses.max_prob))}
            random_first = False
        else:
            stats, summ = estep_pass(src, all_idx, poses, emaps, model.sigma2, comps, cfg, device,
                                     pad=opts.pad, use_ctf=opts.use_ctf)
        cur = size // 2
        maps, tau2s, dvps = [], [], []
        for k in range(kc):
            d, w = rc.hermitian_symmetrise(stats.data[k], stats.weight[k], 3)
            d, w = symmetrise3d(d, w, sym_mats)
            t2 = model.tau2[k]
            vol = rc.reconstruct(d, w, 3, tau2=t2, tau2_fudge=opts.tau2_fudge, max_shell=cur) * solvent
            maps.append(vol)
            dvps.append(rc.data_vs_prior(w, t2, opts.tau2_fudge, 3))
            tau2s.append(rc.tau2_from_power(vol, 3))
        maps = torch.stack(maps)
        total = stats.class_weight.sum().clamp(min=1e-30)
        priors = (stats.class_weight / total).float()
        res_shells = [min(rc.resolution_shell(dv.masked_fill(torch.arange(n_shells, device=dv.device) >= cur, 0.0)), cur - 1)
                      for dv in dvps]
        sig = sigma2_from_stats(stats, model.sigma2, cur)
        best = max(res_shells)
        model = EMModel(maps, sig, torch.stack(tau2s), torch.stack(dvps), torch.zeros(kc, n_shells), priors, px,
                        opts.tau2_fudge, sigma_offset_from_stats(stats, 3, model.sigma_offset_px), best,
                        min(box, even(2 * (best + opts.incr_size))), log_lik=float(stats.log_lik),
                        extra={"average_pmax": summ["pmax"], "n_particles": n})
        res_A = [rc.resolution_A(s, box, px) for s in res_shells]
        dt = time.time() - ti
        history.append({"iteration": it, "class_priors": priors.cpu().numpy().tolist(), "resolution_A": res_A,
                        "pmax": summ["pmax"], "seconds": dt})
        log(f"iteration {it:3d}: classes " + " ".join(f"{p:.3f}" for p in priors.tolist())
            + f", resolution {min(res_A):.1f} A, size {size}, changes {summ['ang_change_deg']:.2f} deg "
            f"{summ['off_change_px']:.2f} px, Pmax {summ['pmax']:.3f}, {dt:.1f} s")
        tag = f"run_it{it:03d}"
        names = [f"{tag}_class{k + 1:03d}.mrc" for k in range(kc)]
        for k in range(kc):
            writer.map(out_dir / names[k], maps[k])
        writer.data_star(out_dir / f"{tag}_data.star", poses, None, optics)
        write_model_star(out_dir / f"{tag}_model.star", model, names, class_resolutions_A=res_A)
        torch.save({"iteration": it, "model": model.state(), "poses": poses, "history": history},
                   out_dir / f"{tag}_optimiser.pt")
        if stop_after is not None and it >= stop_after:
            return {"stopped": True, "iterations": it}
    try:
        from subtomo.plot.maps import plot_class_slices

        plot_class_slices([m.cpu().numpy() for m in model.maps], out_dir / f"run_it{it:03d}_classes.png",
                          [f"class {k + 1}: {p:.2f}" for k, p in enumerate(model.class_priors.tolist())])
    except Exception:
        pass
    return {"maps": model.maps.cpu(), "class_priors": model.class_priors.cpu(), "poses": poses,
            "history": history, "iterations": it}
