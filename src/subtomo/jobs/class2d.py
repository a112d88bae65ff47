"""``subtomo class2d`` (protocol Step 15): reference-free 2D classification of the z-projections.

Input: the 2D projections of the subtomograms (``subtomo_proj2d.star`` of ``subtomo extract
--project``; images ``000001@stack.mrcs``). No CTF model (as the protocol says: the
projections have none). Each iteration writes RELION's ``run_itNNN_classes.mrcs``,
``run_itNNN_model.star``, ``run_itNNN_data.star`` and the optimiser state
``run_itNNN_optimiser.pt`` (so ``--continue-job`` resumes after the last finished
iteration with the same result as an uninterrupted run); the last iteration also gets a
gallery PNG of the class averages, largest class first.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from pydantic import Field

from subtomo.em.class2d import Class2DSettings, IterationInfo, Poses2D, initialise, iterate
from subtomo.em.class2d_parallel import iterate_on
from subtomo.em.model import EMModel
from subtomo.errors import SubtomoError
from subtomo.io.particles import ParticleSet
from subtomo.io.run_files import latest_optimiser_state, run_root, save_optimiser_state, write_map, write_model_star
from subtomo.jobs._cluster import DaskRunner, check_cluster, open_runner
from subtomo.jobs.base import ComputeParams, JobContext, JobSpec
from subtomo.jobs.contracts import NodeType, OutputSpec, Source, particles_spec
from subtomo.plot.gallery import class_gallery
from subtomo.tomo.particle_source import read_particle_images


class Class2DParams(ComputeParams):
    i: str | None = Field(None, description="2D particles STAR (default: the latest Extract job's subtomo_proj2d.star).")
    K: int | None = Field(None, ge=1, description="Number of classes (default: about one per 30 particles, 2 to 50).")
    iter: int = Field(25, ge=1, description="Number of iterations.")
    tau2_fudge: float = Field(2.0, gt=0, description="Regularisation parameter T; RELION's 2D default is 2.")
    particle_diameter: float | None = Field(None, gt=0, description="Mask diameter: images are zero outside a soft circle of this diameter [Å] (default: 80 % of the box).")
    highres_limit: float | None = Field(15.0, gt=0, description="Highest resolution used in the E-step [Å] (protocol: 10-15 Å).")
    psi_step: float = Field(6.0, gt=0, le=90, description="In-plane angular sampling [deg] (the coarse pass uses twice this).")
    offset_range: float = Field(5.0, ge=0, description="Offset search range around the previous offset [px].")
    offset_step: float = Field(1.0, gt=0, description="Offset sampling step [px] (the coarse pass uses twice this).")
    batch_size: int = Field(256, ge=1, description="Particles per E-step batch (memory vs speed).")
    continue_job: str | None = Field(None, description="Class2D job directory to continue from its last finished iteration (a finished job: a new job, given a larger --iter).")


# ----------------------------------------------------------------------------- output


def _write_iteration(ctx: JobContext, it: int, model: EMModel, poses: Poses2D, info: IterationInfo | None,
                     particles: ParticleSet, settings: Class2DSettings, final: bool) -> dict[str, Path]:
    px = settings.pixel_size_A
    root = run_root(it)
    classes = write_map(ctx.path(f"{root}_classes.mrcs"), model.maps, px, stack=True)
    names = [f"{k + 1:06d}@{ctx.rel(classes)}" for k in range(model.n_classes)]
    class_res = info.class_resolution_A if info is not None else [model.current_resolution_A] * model.n_classes
    model_star = write_model_star(ctx.path(f"{root}_model.star"), model, names, class_resolutions_A=class_res,
                                  extra_general={"rlnCurrentIteration": it})
    data = particles.with_columns(
        rlnClassNumber=poses.cls + 1 if (poses.cls >= 0).all() else np.maximum(poses.cls + 1, 0),
        rlnAnglePsi=poses.psi_deg, rlnOriginXAngst=poses.origin_px[:, 0] * px, rlnOriginYAngst=poses.origin_px[:, 1] * px,
        rlnMaxValueProbDistribution=poses.max_prob, rlnLogLikeliContribution=poses.log_lik,
        rlnNrOfSignificantSamples=poses.n_sig)
    data_star = data.write(ctx.path(f"{root}_data.star"))
    save_optimiser_state(ctx.dir, it, {"iteration": it, "model": model.state(), "poses": poses.state(),
                                       "settings": settings.__dict__.copy()})
    out = {"classes": classes, "model": model_star, "data": data_star}
    if final:
        out["gallery"] = class_gallery(model.maps.cpu().numpy(), model.class_priors.cpu().numpy(),
                                       ctx.path(f"{root}_classes.png"), class_res,
                                       title=f"{ctx.name.rstrip('/')} iteration {it}: classes by size")
    return out


# ----------------------------------------------------------------------------- job


def _check(p: Class2DParams, project: Path) -> dict:
    """Inputs read and checked before the job directory is made (a bad input leaves nothing behind)."""
    check_cluster(p, project)
    star = SPEC.input("i").resolve(project, p.i)
    particles = ParticleSet.read(star, project)
    images_np = read_particle_images(particles)
    px = particles.pixel_size_A
    n_img, box = images_np.shape[0], images_np.shape[-1]
    k = p.K or int(min(50, max(2, round(n_img / 30))))
    if k > n_img:
        raise SubtomoError(f"--K {k}: more classes than particles ({n_img}) in {star}. Use fewer classes.")
    diameter = p.particle_diameter or 0.8 * box * px
    if diameter / px > box:
        raise SubtomoError(f"--particle-diameter {diameter:g} Å is larger than the box ({box} px x {px:g} Å = {box * px:g} Å).")
    return {"star": star, "particles": particles, "images": images_np, "px": px, "k": k, "diameter": diameter}


def _run(ctx: JobContext) -> None:
    with open_runner(ctx) as runner:  # --cluster: where the E-step's tasks run (None: here)
        _run_on(ctx, runner)


def _run_on(ctx: JobContext, runner: DaskRunner | None) -> None:
    p: Class2DParams = ctx.params
    src, particles, images_np, px, k, diameter = (ctx.state[key] for key in ("star", "particles", "images", "px", "k",
                                                                             "diameter"))
    ctx.add_input(src)
    n_img, box = images_np.shape[0], images_np.shape[-1]
    settings = Class2DSettings(n_classes=k, pixel_size_A=px, particle_diameter_A=diameter, tau2_fudge=p.tau2_fudge,
                               psi_step_deg=p.psi_step, offset_range_px=p.offset_range, offset_step_px=p.offset_step,
                               highres_limit_A=p.highres_limit, batch_size=p.batch_size, seed=p.seed)
    device = ctx.device
    images = torch.from_numpy(images_np).to(device)
    origin = None
    if {"rlnOriginXAngst", "rlnOriginYAngst"} <= set(particles.table.columns):  # 2D origins (no Z)
        origin = particles.table[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(float) / px
    start = 1
    resumed = latest_optimiser_state(ctx.dir, warn=ctx.warn) if p.continue_job else None
    if resumed is not None:
        last, state, _ = resumed
        saved = state["settings"]
        if saved["n_classes"] != k or len(state["poses"]["cls"]) != n_img:
            raise SubtomoError(f"--continue-job {p.continue_job}: saved state has {saved['n_classes']} classes and "
                               f"{len(state['poses']['cls'])} particles; this run has {k} and {n_img}. Use the same --K and input.")
        settings = Class2DSettings(**saved)
        model = EMModel.from_state(state["model"], device)
        poses = Poses2D.from_state(state["poses"])
        start = last + 1
        ctx.log(f"continuing after iteration {last}")
    else:
        ctx.log(f"{n_img} images of {box}x{box} px at {px:g} Å; K = {k}, T = {p.tau2_fudge:g}, mask diameter {diameter:.0f} Å, "
                f"E-step limit {p.highres_limit or 'none'} Å, psi step {p.psi_step:g} deg, offsets {p.offset_range:g}/{p.offset_step:g} px")
        model, poses = initialise(images, settings, origin)
        _write_iteration(ctx, 0, model, poses, None, particles, settings, final=False)
    outputs: dict[str, Path] = {}
    if start > p.iter:
        ctx.log(f"nothing to do: {start - 1} iterations already done (--iter {p.iter})")
        outputs = {"data": ctx.path(f"run_it{start - 1:03d}_data.star"), "model": ctx.path(f"run_it{start - 1:03d}_model.star"),
                   "classes": ctx.path(f"run_it{start - 1:03d}_classes.mrcs")}
    for it in range(start, p.iter + 1):
        if runner is None:
            model, poses, info = iterate(images, model, poses, settings, it,
                                         progress=lambda b, it=it: ctx.progress(b, description=f"iteration {it}"))
        else:  # --cluster: the batches as tasks ("E-step tasks: done/total" in the log)
            model, poses, info = iterate_on(runner, images, model, poses, settings, it)
        outputs = _write_iteration(ctx, it, model, poses, info, particles, settings, final=it == p.iter)
        sizes = np.sort(model.class_priors.cpu().numpy())[::-1]
        ctx.log(f"iteration {it:3d}: {info.seconds:6.1f} s, resolution {info.resolution_A:6.1f} Å (size {info.current_size}), "
                f"class changes {100 * info.class_change:5.1f} %, psi change {info.psi_change_deg:5.1f} deg, "
                f"offset change {info.offset_change_px:4.2f} px, <Pmax> {info.average_pmax:4.2f}, "
                f"<nr significant> {info.mean_significant:5.1f}, largest classes {', '.join(f'{100 * s:.0f}%' for s in sizes[:5])}")
    ctx.add_declared_outputs(iteration=max(p.iter, start - 1))
    if "gallery" in outputs:
        ctx.log(f"class gallery: {ctx.rel(outputs['gallery'])}")


SPEC = JobSpec(
    command="class2d", job_type="Class2D", params=Class2DParams, run=_run, check=_check,
    summary="Step 15: reference-free 2D classification of the subtomograms' z-projections (regularised likelihood, no CTF).",
    inputs=(particles_spec("i", (Source("Extract", ("subtomo_proj2d.star",)),),
                            "Run subtomo extract --project first, or pass --i."),),
    outputs=(
        OutputSpec("run_it{it:03d}_data.star", NodeType.PARTICLES, "class and in-plane pose of every image"),
        OutputSpec("run_it{it:03d}_model.star", NodeType.MODEL, "class distribution, resolution, noise spectra"),
        OutputSpec("run_it{it:03d}_classes.mrcs", NodeType.IMAGE_STACK, "class averages"),
        OutputSpec("run_it{it:03d}_classes.png", NodeType.IMAGE, "gallery of the class averages", optional=True),
    ),
)
