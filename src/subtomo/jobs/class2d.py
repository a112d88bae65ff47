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

import os
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from subtomo.em.class2d import Class2DSettings, IterationInfo, Poses2D, initialise, iterate
from subtomo.em.model import EMModel, write_model_star
from subtomo.errors import SubtomoError
from subtomo.io.mrc import open_mrc_mmap, read_mrc_header, write_mrc
from subtomo.io.star import read_star, write_star
from subtomo.jobs.base import ComputeParams, JobContext, JobSpec, default_input
from subtomo.plot.gallery import class_gallery

_OPT_RE = re.compile(r"run_it(\d{3})_optimiser\.pt$")


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
    continue_job: str | None = Field(None, description="Class2D job directory to continue from its last finished iteration.")


# ----------------------------------------------------------------------------- input


def load_images(particles: pd.DataFrame, project: Path) -> tuple[np.ndarray, float | None]:
    """All images listed as ``index@stack`` (1-based) in file order: (n, N, N) float32, header pixel size."""
    if "rlnImageName" not in particles.columns:
        raise SubtomoError("the particles STAR has no rlnImageName column.")
    refs = []
    for name in particles["rlnImageName"].astype(str):
        if "@" in name:
            idx, path = name.split("@", 1)
            refs.append((int(idx) - 1, path))
        else:
            refs.append((0, name))
    by_file: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for row, (idx, path) in enumerate(refs):
        by_file[path].append((row, idx))
    first = next(iter(by_file))
    full = project / first if not Path(first).is_absolute() else Path(first)
    (nz, ny, nx), px = read_mrc_header(full)
    if ny != nx:
        raise SubtomoError(f"{full}: images are {nx}x{ny}; 2D classification needs square images.")
    out = np.zeros((len(refs), ny, nx), np.float32)
    for path, rows in by_file.items():
        full = project / path if not Path(path).is_absolute() else Path(path)
        if not full.exists():
            raise SubtomoError(f"{full}: image stack listed in the particles STAR is missing. Re-run subtomo extract --project.")
        with open_mrc_mmap(full) as mrc:
            data = mrc.data if mrc.data.ndim == 3 else mrc.data[None]
            if data.shape[1:] != (ny, nx):
                raise SubtomoError(f"{full}: images are {data.shape[2]}x{data.shape[1]}, others are {nx}x{ny}.")
            for row, idx in rows:
                if not 0 <= idx < data.shape[0]:
                    raise SubtomoError(f"{full}: image {idx + 1} requested, the stack has {data.shape[0]}.")
                out[row] = data[idx]
    return out, px


def _blocks(path: Path) -> tuple[dict, str, pd.DataFrame]:
    blocks = read_star(path)
    name = "particles" if "particles" in blocks else next(k for k, v in blocks.items() if isinstance(v, pd.DataFrame) and k != "optics")
    table = blocks[name]
    if isinstance(table, dict):
        table = pd.DataFrame([table])
    return blocks, name, table.reset_index(drop=True)


def _pixel_size(blocks: dict, particles: pd.DataFrame, header_px: float | None) -> float:
    optics = blocks.get("optics")
    for t in (particles, optics if isinstance(optics, pd.DataFrame) else None):
        if t is not None and "rlnImagePixelSize" in t.columns:
            return float(t["rlnImagePixelSize"].iloc[0])
    if header_px and header_px > 0:
        return float(header_px)
    raise SubtomoError("no pixel size: neither rlnImagePixelSize in the STAR file nor a voxel size in the MRC header.")


# ----------------------------------------------------------------------------- output


def _write_iteration(ctx: JobContext, it: int, model: EMModel, poses: Poses2D, info: IterationInfo | None,
                     blocks: dict, block_name: str, particles: pd.DataFrame, settings: Class2DSettings,
                     final: bool) -> dict[str, Path]:
    px = settings.pixel_size_A
    root = f"run_it{it:03d}"
    classes = write_mrc(ctx.path(f"{root}_classes.mrcs"), model.maps.cpu().numpy(), px, stack=True)
    names = [f"{k + 1:06d}@{ctx.rel(classes)}" for k in range(model.n_classes)]
    class_res = info.class_resolution_A if info is not None else [model.current_resolution_A] * model.n_classes
    model_star = write_model_star(ctx.path(f"{root}_model.star"), model, names, class_resolutions_A=class_res,
                                  extra_general={"rlnCurrentIteration": it})
    data = particles.copy()
    data["rlnClassNumber"] = poses.cls + 1 if (poses.cls >= 0).all() else np.maximum(poses.cls + 1, 0)
    data["rlnAnglePsi"] = poses.psi_deg
    data["rlnOriginXAngst"] = poses.origin_px[:, 0] * px
    data["rlnOriginYAngst"] = poses.origin_px[:, 1] * px
    data["rlnMaxValueProbDistribution"] = poses.max_prob
    data["rlnLogLikeliContribution"] = poses.log_lik
    data["rlnNrOfSignificantSamples"] = poses.n_sig
    out_blocks = {**({"optics": blocks["optics"]} if "optics" in blocks else {}), block_name: data}
    data_star = write_star(ctx.path(f"{root}_data.star"), out_blocks)
    state = {"iteration": it, "model": model.state(), "poses": poses.state(), "settings": settings.__dict__.copy()}
    tmp = ctx.path(f".{root}_optimiser.pt.tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, ctx.path(f"{root}_optimiser.pt"))
    out = {"classes": classes, "model": model_star, "data": data_star}
    if final:
        out["gallery"] = class_gallery(model.maps.cpu().numpy(), model.class_priors.cpu().numpy(),
                                       ctx.path(f"{root}_classes.png"), class_res,
                                       title=f"{ctx.name.rstrip('/')} iteration {it}: classes by size")
    return out


def _last_state(job_dir: Path) -> tuple[int, dict] | None:
    found = [(int(m.group(1)), f) for f in job_dir.glob("run_it*_optimiser.pt") if (m := _OPT_RE.search(f.name))]
    if not found:
        return None
    it, f = max(found)
    return it, torch.load(f, weights_only=False)


# ----------------------------------------------------------------------------- job


def _run(ctx: JobContext) -> None:
    p: Class2DParams = ctx.params
    src = default_input(ctx.project, p.i, ("Extract",), "subtomo_proj2d.star", "--i",
                        "Run subtomo extract --project first, or pass --i.")
    ctx.add_input(src)
    blocks, block_name, particles = _blocks(src)
    images_np, header_px = load_images(particles, ctx.project)
    px = _pixel_size(blocks, particles, header_px)
    n_img, box = images_np.shape[0], images_np.shape[-1]
    k = p.K or int(min(50, max(2, round(n_img / 30))))
    if k > n_img:
        raise SubtomoError(f"--K {k}: more classes than particles ({n_img}). Use fewer classes.")
    diameter = p.particle_diameter or 0.8 * box * px
    if diameter / px > box:
        raise SubtomoError(f"--particle-diameter {diameter:g} Å is larger than the box ({box} px x {px:g} Å = {box * px:g} Å).")
    settings = Class2DSettings(n_classes=k, pixel_size_A=px, particle_diameter_A=diameter, tau2_fudge=p.tau2_fudge,
                               psi_step_deg=p.psi_step, offset_range_px=p.offset_range, offset_step_px=p.offset_step,
                               highres_limit_A=p.highres_limit, batch_size=p.batch_size, seed=p.seed)
    device = ctx.device
    images = torch.from_numpy(images_np).to(device)
    origin = None
    if {"rlnOriginXAngst", "rlnOriginYAngst"} <= set(particles.columns):
        origin = particles[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(float) / px
    start = 1
    resumed = _last_state(ctx.dir) if p.continue_job else None
    if resumed is not None:
        last, state = resumed
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
        _write_iteration(ctx, 0, model, poses, None, blocks, block_name, particles, settings, final=False)
    outputs: dict[str, Path] = {}
    if start > p.iter:
        ctx.log(f"nothing to do: {start - 1} iterations already done (--iter {p.iter})")
        outputs = {"data": ctx.path(f"run_it{start - 1:03d}_data.star"), "model": ctx.path(f"run_it{start - 1:03d}_model.star"),
                   "classes": ctx.path(f"run_it{start - 1:03d}_classes.mrcs")}
    for it in range(start, p.iter + 1):
        model, poses, info = iterate(images, model, poses, settings, it,
                                     progress=lambda b, it=it: ctx.progress(b, description=f"iteration {it}"))
        outputs = _write_iteration(ctx, it, model, poses, info, blocks, block_name, particles, settings,
                                   final=it == p.iter)
        sizes = np.sort(model.class_priors.cpu().numpy())[::-1]
        ctx.log(f"iteration {it:3d}: {info.seconds:6.1f} s, resolution {info.resolution_A:6.1f} Å (size {info.current_size}), "
                f"class changes {100 * info.class_change:5.1f} %, psi change {info.psi_change_deg:5.1f} deg, "
                f"offset change {info.offset_change_px:4.2f} px, <Pmax> {info.average_pmax:4.2f}, "
                f"<nr significant> {info.mean_significant:5.1f}, largest classes {', '.join(f'{100 * s:.0f}%' for s in sizes[:5])}")
    ctx.add_output(outputs["data"], "ParticlesData")
    ctx.add_output(outputs["model"], "ModelStar")
    ctx.add_output(outputs["classes"], "ImageStack")
    if "gallery" in outputs:
        ctx.add_output(outputs["gallery"], "Image")
        ctx.log(f"class gallery: {ctx.rel(outputs['gallery'])}")


SPEC = JobSpec(
    command="class2d", job_type="Class2D", params=Class2DParams, run=_run,
    summary="Step 15: reference-free 2D classification of the subtomograms' z-projections (regularised likelihood, no CTF).",
)
