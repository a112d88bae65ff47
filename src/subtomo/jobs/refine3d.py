"""``subtomo refine3d`` (protocol Step 18): gold-standard 3D auto-refinement of subtomograms.

Input: particles STAR (default: the latest Select job's ``particles_selected.star`` (Step 21, a
3D class selection) or ``output_2Dto3D.star`` (Step 17), else the
latest Extract job's ``particles_subtomo.star``). Subtomograms are read from rlnImageName,
their 3D CTFs from ``subtomo.tomo.ctf3d.ParticleCtfModels``. Without ``--ref`` iteration
0 reconstructs the particles in random orientations (the protocol's de novo path), or with
``--from-input-angles`` each half at the STAR's poses, then searched locally (``jobs._refine_start``).
Outputs RELION's run_itNNN_* and final run_* files (written by ``subtomo.jobs._em_runs`` through
``subtomo.io.run_files``; the engine, ``subtomo.em.refine``, only computes).

De novo with a symmetry (``--sym`` other than C1, no ``--ref``) follows RELION's recommended
route by default (``--denovo-symmetry c1-then-align``): refine in C1 from random orientations
(all its files in ``c1_stage/``), put the C1 map's symmetry axes along the group's standard
axes (:func:`subtomo.em.symmetry_align.align_symmetry`, like relion_align_symmetry; written
as ``c1_stage/run_class001_symaligned.mrc``), then refine with the symmetry from that map
(the usual outputs in the job directory). A symmetric refinement from random orientations
(``direct``) can settle in a wrong self-consistent solution.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from subtomo.em.gold_standard import split_halves
from subtomo.em.oracle import oracle_reconstruction
from subtomo.em.refine import RefineOptions, RefineResult, RefineState, auto_refine
from subtomo.em.sampling import order_for_step
from subtomo.em.symmetry_align import align_symmetry
from subtomo.errors import SubtomoError
from subtomo.fourier import threshold_shell
from subtomo.geometry.euler import matrix_to_euler
from subtomo.io.mrc import read_mrc
from subtomo.io.particles import ParticleSet
from subtomo.io.run_files import write_map
from subtomo.io.star import read_star_table, write_star
from subtomo.jobs._cluster import DaskRunner, check_cluster, open_runner
from subtomo.jobs._em_runs import RefineFiles, check_symmetry, resume_state
from subtomo.jobs._inputs import load_map, load_mask
from subtomo.jobs._refine_start import check_input_angles, input_angles_start
from subtomo.jobs.base import ComputeParams, JobContext, JobSpec
from subtomo.jobs.contracts import SELECTED_OR_EXTRACTED, InputSpec, NodeType, OutputSpec, particles_spec
from subtomo.simulate.scoring import oracle_poses
from subtomo.tomo.particle_source import SubtomogramSource


class Refine3DParams(ComputeParams):
    i: str | None = Field(None, description="Particles STAR (default: particles_selected.star or output_2Dto3D.star of the latest Select job, else particles_subtomo.star of the latest Extract job).")
    ref: str | None = Field(None, description="Initial reference map (.mrc); none: start from a reconstruction in random orientations (with --from-input-angles: of each half at the input poses).")
    ini_high: float = Field(60.0, gt=0, description="Low-pass filter of the initial reference [Å].")
    ref_on_absolute_greyscale: bool = Field(False, description="The reference is on the particles' grey scale (else the first iteration uses normalised cross-correlation).")
    ref_ctf_corrected: bool = Field(True, description="The reference has been CTF-corrected.")
    ctf: bool = Field(True, description="Use the 3D CTF model (missing wedge, CTF, dose/tilt weights) of each particle.")
    particle_diameter: float = Field(..., gt=0, description="Particle diameter for the soft spherical mask [Å].")
    solvent_mask: str | None = Field(None, description="Solvent mask (.mrc, 0..1) applied to the references after each iteration.")
    from_input_angles: bool = Field(False, description="Start from the STAR's rlnAngleRot/Tilt/Psi and origins (imported "
                                    "picks, an earlier refinement) with local searches from iteration 1 (RELION: "
                                    "--auto_local_healpix_order = --healpix_order with --sigma_ang); without --ref each "
                                    "half is reconstructed at the input poses.")
    sigma_ang: float = Field(0.0, ge=0, description="With --from-input-angles: width of the Gaussian prior around each "
                             "pose [deg], searched to 3 sigma; 0: 3 x --healpix-step.")
    healpix_step: float = Field(7.5, gt=0, le=60, description="Initial (oversampled) angular sampling [deg]: 30, 15, 7.5, 3.75, 1.8.")
    offset_range: float = Field(3.0, ge=0, description="Initial translational search range [px] (subtomograms are centred on their picks; RELION's GUI default is 5, at 4x the cost of 3).")
    offset_step: float = Field(1.0, gt=0, description="Initial (oversampled) translational step [px].")
    sym: str = Field("C1", description="Point-group symmetry: C<n>, D<n>, T, O or I.")
    denovo_symmetry: Literal["c1-then-align", "direct"] = Field(
        "c1-then-align", description="De novo refinement (no --ref) with a symmetry: c1-then-align = RELION's route: "
        "refine in C1 (in c1_stage/), align the C1 map's symmetry axes with the standard frame, then refine with the "
        "symmetry from that map; direct = impose the symmetry from random orientations (can converge to a wrong "
        "self-consistent solution).")
    sym_align_lowpass: float = Field(0.0, ge=0, description="Low-pass of the C1 map for the symmetry-axis search of "
                                     "c1-then-align [Å]; 0: the C1 map's gold-standard resolution (at least 20 Å and 3 px).")
    auto_local_healpix_step: float = Field(3.7, gt=0, le=60, description="Angular step from which searches become local [deg] (RELION's GUI default 1.8 makes the 3.75 deg step a global search, 8x the cost of 7.5 deg).")
    max_iter: int = Field(50, ge=1, description="Maximum number of iterations.")
    auto_ignore_angles: bool = Field(False, description="Count the poses as settled once the average Pmax is >= 0.8, whatever the orientation changes (like RELION's --auto_ignore_angles: pseudo-symmetric particles refined in C1 keep jumping between near-equivalent poses).")
    pad: int = Field(2, ge=1, le=3, description="Padding factor of the reference transforms.")
    batch_size: int = Field(32, ge=1, description="Particles per batch.")
    max_memory_gb: float = Field(3.0, gt=0, description="Memory a global-search pass may hold for the projected references [GB]; above it, groups of particles share each chunk of projections (same results, particles read twice).")
    oracle: str | None = Field(None, description="Ground-truth picks.star: also reconstruct with the true poses (the ceiling) and report it.")
    continue_job: str | None = Field(None, description="Job directory to continue from its last finished iteration (a finished job: a new job, given a larger --max-iter).")


def _check(p: Refine3DParams, project: Path) -> dict:
    """Inputs read and checked before the job directory is made (a bad input leaves nothing behind)."""
    check_cluster(p, project)
    check_symmetry(p.sym)
    star = SPEC.input("i").resolve(project, p.i)
    particles = ParticleSet.read(star, project)
    particles.check_image_files()  # missing, truncated or mixed boxes: refused here
    check_input_angles(star, particles, p.from_input_angles, p.sigma_ang)
    src = SubtomogramSource(particles, p.ctf)
    box_A = src.box * src.pixel_size_A
    if p.particle_diameter > box_A:
        raise SubtomoError(f"--particle-diameter {p.particle_diameter:g} Å exceeds the box ({src.box} px x "
                           f"{src.pixel_size_A:.3g} Å = {box_A:.0f} Å). Give the particle's diameter, or extract in a larger box.")
    ref = load_map(p.ref, project, src.box, src.pixel_size_A, "--ref") if p.ref else None
    solvent = load_mask(p.solvent_mask, project, (src.box,) * 3, "--solvent-mask") if p.solvent_mask else None
    return {"star": star, "particles": particles, "src": src, "ref": ref, "solvent": solvent}


def _run(ctx: JobContext) -> None:
    with open_runner(ctx) as runner:  # --cluster: where the E-step's tasks run (None: here)
        _run_on(ctx, runner)


def _run_on(ctx: JobContext, runner: DaskRunner | None) -> None:
    p: Refine3DParams = ctx.params
    star, particles, src, ref, solvent = (ctx.state[k] for k in ("star", "particles", "src", "ref", "solvent"))
    ctx.add_input(star)
    ctx.log(f"{len(particles)} particles from {ctx.rel(star)}; box {src.box}, {src.pixel_size_A:.3f} A/px; "
            f"CTF {'on' if p.ctf else 'off'}")
    opts = RefineOptions(
        particle_diameter_A=p.particle_diameter, healpix_order=order_for_step(p.healpix_step),
        offset_range_px=p.offset_range, offset_step_px=2 * p.offset_step, sym=p.sym,
        auto_local_order=order_for_step(p.auto_local_healpix_step), max_iter=p.max_iter,
        auto_ignore_angles=p.auto_ignore_angles, ini_high_A=p.ini_high,
        firstiter_cc=bool(ref is not None and not p.ref_on_absolute_greyscale), ref_ctf_corrected=p.ref_ctf_corrected,
        pad=p.pad, batch_size=p.batch_size, use_ctf=p.ctf, seed=p.seed, solvent_mask=solvent, runner=runner,
        pass_memory_bytes=int(p.max_memory_gb * 2 ** 30))
    halves = split_halves(particles.halves(), len(particles), p.seed)
    offsets = particles.offsets_px()
    initial_rot = None
    if p.from_input_angles:
        opts, initial_rot = input_angles_start(ctx, star, particles, opts, p.sigma_ang, ref is not None)
    elif ref is None and p.sym.strip().upper() != "C1" and p.denovo_symmetry == "c1-then-align":
        ref, initial_rot, offsets, halves = _c1_then_align(ctx, src, particles, opts, offsets, halves)
        opts = replace(opts, firstiter_cc=False)  # the aligned C1 map is on the particles' grey scale
        ctx.log(f"stage 2: refinement with {p.sym} symmetry from the aligned C1 map (low-pass {p.ini_high:.0f} A)")
    res = _refine(ctx, src, particles, opts, ctx.dir, ctx.log, initial_ref=ref, initial_rot=initial_rot,
                  initial_offset_px=offsets, halves=halves)
    ctx.log(f"final resolution (gold-standard FSC 0.143): {res.resolution_A:.2f} A after {res.iterations} iterations "
            f"({res.seconds:.0f} s)")
    if p.oracle:
        _oracle(ctx, particles, src, res)
    ctx.add_declared_outputs()


def _refine(ctx: JobContext, src: SubtomogramSource, particles: ParticleSet, opts: RefineOptions, out_dir: Path,
            log, **start) -> RefineResult:
    """One auto-refinement writing its run files into ``out_dir`` (continued there with --continue-job)."""
    resume = resume_state(out_dir, RefineState.from_dict, ctx.device, log) if ctx.params.continue_job else None
    return auto_refine(src, opts, resume=resume, device=ctx.device, log=log,
                       on_iteration=RefineFiles(out_dir, particles, src.pixel_size_A), **start)


def _oracle(ctx: JobContext, particles: ParticleSet, src: SubtomogramSource, res: RefineResult) -> None:
    """Reconstruct with the true poses (--oracle) and report refined / oracle resolution."""
    p: Refine3DParams = ctx.params
    truth = oracle_poses(particles.table, p.oracle, ctx.project, src.pixel_size_A)
    orc = oracle_reconstruction(src, truth[0], truth[1], res.halves, use_ctf=p.ctf, sym=p.sym,
                                diameter_A=p.particle_diameter, device=ctx.device, batch_size=p.batch_size)
    ctx.log(f"oracle (true poses) resolution: {orc.resolution_A:.2f} A; ratio refined/oracle "
            f"{res.resolution_A / orc.resolution_A:.3f}")
    write_map(ctx.path("oracle_class001.mrc"), orc.map, src.pixel_size_A)
    write_star(ctx.path("oracle.star"), {"oracle": {
        "rlnFinalResolution": float(orc.resolution_A), "subtomoRefinedResolution": float(res.resolution_A),
        "subtomoRefinedOverOracle": float(res.resolution_A / orc.resolution_A), "subtomoGroundTruth": p.oracle}})


def _c1_stage(ctx: JobContext, src: SubtomogramSource, particles: ParticleSet, opts: RefineOptions,
              offsets: np.ndarray, halves: np.ndarray) -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray, float]:
    """Stage 1: the C1 refinement in c1_stage/ (or its files from an earlier run with --continue-job).

    Returns the C1 map, poses, origins [px], halves and gold-standard resolution [Å].
    """
    c1_dir = ctx.dir / "c1_stage"
    done = (c1_dir / "run_class001.mrc").exists() and (c1_dir / "run_data.star").exists()
    if ctx.params.continue_job and done:
        ctx.log("stage 1 (C1) finished earlier: using c1_stage/run_class001.mrc and run_data.star")
        vol, _ = read_mrc(c1_dir / "run_class001.mrc")
        data = ParticleSet.read(c1_dir / "run_data.star", ctx.project)
        if len(data) != src.n:
            raise SubtomoError(f"{ctx.rel(c1_dir / 'run_data.star')}: {len(data)} particles, the input has {src.n}. "
                               "Continue with the same --i, or start a new job.")
        fsc = read_star_table(c1_dir / "run_model.star", "model_class_1")["rlnGoldStandardFsc"].to_numpy(dtype=np.float64)
        res_A = src.box * src.pixel_size_A / max(threshold_shell(torch.from_numpy(fsc.copy()), 0.143), 1)
        rot, halves_1 = data.rotations(), data.halves()
        assert rot is not None and halves_1 is not None
        return torch.from_numpy(np.ascontiguousarray(vol, dtype=np.float32)), rot, data.offsets_px(), halves_1, res_A
    ctx.log(f"stage 1: refinement in C1 from random orientations (c1_stage/), then alignment of the {opts.sym} axes")
    # poses of a symmetric particle refined in C1 keep jumping between equivalent ones: count them as
    # settled once Pmax is high (RELION's --auto_ignore_angles)
    res1 = _refine(ctx, src, particles, replace(opts, sym="C1", auto_ignore_angles=True), c1_dir,
                   lambda m: ctx.log(f"[C1] {m}"), initial_offset_px=offsets, halves=halves)
    ctx.log(f"stage 1 (C1): gold-standard resolution {res1.resolution_A:.2f} A after {res1.iterations} iterations "
            f"({res1.seconds:.0f} s)")
    return res1.final_map, res1.poses.rot, res1.poses.offset_px, res1.halves, float(res1.resolution_A)


def _c1_then_align(ctx: JobContext, src: SubtomogramSource, particles: ParticleSet, opts: RefineOptions,
                   offsets: np.ndarray, halves: np.ndarray) -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray]:
    """Stage 1 (C1 refinement in c1_stage/) and the symmetry alignment of its map.

    Returns the aligned map (stage 2's reference), the C1 poses and origins moved into the
    aligned frame (pose A R^T, origin o + A shift) and the halves of stage 1.
    """
    p: Refine3DParams = ctx.params
    px = src.pixel_size_A
    final_map, rot, off, halves, res_A = _c1_stage(ctx, src, particles, opts, offsets, halves)
    t0 = time.time()
    lp = p.sym_align_lowpass or max(res_A, 20.0, 3 * px)
    al = align_symmetry(final_map.to(ctx.device), p.sym, px, lowpass_A=lp)
    out = write_map(ctx.dir / "c1_stage" / "run_class001_symaligned.mrc", al.volume, px)
    ang = matrix_to_euler(al.rotation[None])[0]
    ctx.log(f"symmetry alignment ({p.sym}, low-pass {lp:.1f} A, {al.coarse_candidates} coarse candidates, "
            f"{time.time() - t0:.1f} s): score {al.score:.3f} (correlation with the {p.sym}-symmetrised map), rotation "
            f"(rot, tilt, psi) = ({ang[0]:.1f}, {ang[1]:.1f}, {ang[2]:.1f}) deg, shift ({al.shift_px[0]:.2f}, "
            f"{al.shift_px[1]:.2f}, {al.shift_px[2]:.2f}) px -> {ctx.rel(out)}")
    if al.score < 0.8:
        ctx.warn(f"the C1 map is not clearly {p.sym}-symmetric (score {al.score:.3f} < 0.8): check --sym, or use a "
                 "better C1 map.")
    new_rot = np.einsum("nij,kj->nik", np.asarray(rot), al.rotation)  # A R^T
    new_off = np.asarray(off) + np.einsum("nij,j->ni", np.asarray(rot), al.shift_px)  # o + A shift
    return al.volume.cpu(), new_rot, new_off, np.asarray(halves)


SPEC = JobSpec(
    command="refine3d", job_type="Refine3D", params=Refine3DParams, run=_run, check=_check,
    summary="Step 18: gold-standard 3D auto-refinement (de novo from random orientations or from --ref; "
            "--from-input-angles: local searches around the particles' imported or refined angles).",
    inputs=(
        particles_spec("i", SELECTED_OR_EXTRACTED, "Run subtomo extract (or select) first, or pass --i."),
        InputSpec("ref", NodeType.DENSITY_MAP, hint="Without --ref the refinement starts from random orientations.",
                  required=False),
        InputSpec("solvent_mask", NodeType.MASK, required=False),
        InputSpec("oracle", NodeType.GROUND_TRUTH_PICKS, required=False),
    ),
    outputs=(
        OutputSpec("run_class001.mrc", NodeType.DENSITY_MAP, "the refined map (both halves joined)"),
        OutputSpec("run_half1_class001_unfil.mrc", NodeType.DENSITY_MAP, "unfiltered half map 1"),
        OutputSpec("run_half2_class001_unfil.mrc", NodeType.DENSITY_MAP, "unfiltered half map 2"),
        OutputSpec("run_data.star", NodeType.PARTICLES, "refined poses and half-set of every particle"),
        OutputSpec("run_model.star", NodeType.MODEL, "gold-standard FSC, resolution, noise and signal spectra"),
        OutputSpec("c1_stage/run_class001_symaligned.mrc", NodeType.DENSITY_MAP,
                   "the C1 map with its symmetry axes aligned (de novo with --sym)", optional=True),
        OutputSpec("oracle_class001.mrc", NodeType.DENSITY_MAP, "reconstruction with the true poses (--oracle)",
                   optional=True),
        OutputSpec("oracle.star", NodeType.FILE, "refined against oracle resolution (--oracle)", optional=True),
    ),
)
