"""``subtomo select`` (protocol Steps 16, 17 and 21): keep the particles of chosen classes.

Input is a classification result (``run_itNNN_data.star`` or ``run_itNNN_model.star`` of
class2d or class3d). Classes are chosen by number (``--classes``), by rules (class
fraction, estimated resolution, the N largest) and/or automatically (``--auto``, 2D only:
each class average is scored for contrast, fine detail and concentration inside the
particle diameter, so gold beads, smooth blobs and noise/edge classes are rejected and
small low-resolution particle classes kept; see :mod:`subtomo.em.class_selection`; the
scores go to ``class_scores.star`` and onto ``selected_classes.png``). The criteria given
are combined (a class must pass all of them).

* 2D input (z-projections of subtomograms): the selected 2D rows are written as
  ``subtomo_proj2d_sel.star`` (Step 16) and mapped back to the 3D subtomograms
  (Step 17, RELION's ``relion_2Dto3D_star.py``): through ``rlnImageOriginalName`` (the 3D
  image each projection was made from), else through tomogram name + particle number as
  the original script did. The 3D rows keep every column and the optics block:
  ``output_2Dto3D.star``.
* 3D input (class3d): the selected rows with all their columns go to
  ``particles_selected.star`` (Step 21).

Everything is computed and validated before the job directory is made, so an unknown class
number, an empty selection or a 2D row without its subtomogram leaves nothing behind.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import Field

from subtomo.em.class_selection import (
    ClassScores,
    ClassTable,
    choose_classes,
    class_table,
    image_dimensionality,
    map_2d_to_3d,
    score_classes,
    scores_table,
)
from subtomo.errors import SubtomoError
from subtomo.io.particles import ParticleSet, resolve_project_path
from subtomo.io.star import write_star
from subtomo.jobs._class_results import class_images, data_and_model_paths, latest_class2d_data, read_model_classes
from subtomo.jobs.base import JobContext, JobParams, JobSpec
from subtomo.jobs.contracts import NodeType, OutputSpec, Source, particles_spec


class SelectParams(JobParams):
    i: str | None = Field(None, description="Classification result: run_itNNN_data.star or run_itNNN_model.star of class2d/class3d (default: the last iteration of the latest Class2D job).")
    classes: list[int] | None = Field(None, description="Class numbers to keep (1-based), e.g. 1,3,4.")
    min_class_fraction: float | None = Field(None, ge=0, le=1, description="Keep only classes holding at least this fraction of the particles (rlnClassDistribution) [fraction].")
    max_class_resolution: float | None = Field(None, gt=0, description="Keep only classes whose estimated resolution is this or better (rlnEstimatedResolution) [Å].")
    top_n_classes: int | None = Field(None, ge=1, description="Keep only the N largest classes (by rlnClassDistribution).")
    particles3d: str | None = Field(None, description="3D particles STAR to map a 2D selection onto (default: the latest Extract job's particles_subtomo.star).")
    map3d: bool = Field(True, description="For 2D input, also write output_2Dto3D.star with the selected subtomograms (Step 17).")
    auto: bool = Field(False, description="Automatic 2D class selection: each class average gets a score 0..1, the product of three tests, and is kept at >= 0.5. Contrast (RMS inside the particle diameter) against the particle classes' median: >= 3x scores 0 (a gold bead), <= 2x scores 1. Fine detail (power beyond 3/diameter) against the median: a smooth blob has none (clear classes: <= 0.2x scores 0, >= 0.3x 1). Concentration (power inside the diameter, 0 = spread like noise): <= 0.2 scores 0 (empty/noise, edges), >= 0.4 scores 1. Class size and resolution are reported, not used. Scores in class_scores.star and on selected_classes.png (see subtomo.em.class_selection). Combined with any other criterion given.")
    particle_diameter: float | None = Field(None, gt=0, description="--auto: particle (mask) diameter [Å] (default: the one class2d was run with).")


# ----------------------------------------------------------------------------- inputs


@dataclass
class Selection:
    dimensionality: int
    classes: list[int]
    particles: ParticleSet  # the input rows (optics kept)
    selected: ParticleSet  # selected rows, all columns
    data_path: Path
    table: ClassTable  # statistics of every class of the input
    images: np.ndarray | None = None  # class averages/maps, in table order
    scores: ClassScores | None = None  # --auto
    particles3d_path: Path | None = None
    selected3d: ParticleSet | None = None
    notes: list[str] = field(default_factory=list)


def _diameter_A(params: SelectParams, data_path: Path) -> float:
    """--particle-diameter, else the particle_diameter the classification job was run with."""
    if params.particle_diameter:
        return params.particle_diameter
    job = data_path.parent / "job.json"
    value = json.loads(job.read_text()).get("parameters", {}).get("particle_diameter") if job.exists() else None
    if not value:
        raise SubtomoError(f"--auto: no --particle-diameter given and none recorded in {job}. Give the particle "
                           "diameter in Å (the mask diameter used for class2d).")
    return float(value)


def _auto_scores(params: SelectParams, sel: Selection, pixel_size_A: float) -> list[int]:
    """Score the class averages (--auto); the class numbers kept."""
    if sel.images is None or sel.dimensionality != 2:
        raise SubtomoError(f"--auto: {sel.data_path} needs its run_itNNN_model.star and 2D class averages beside it "
                           "(automatic selection scores 2D class averages; select 3D classes with --classes).")
    counts = sel.particles.column("rlnClassNumber").astype(int).value_counts()
    diameter = _diameter_A(params, sel.data_path)
    sel.scores = score_classes(sel.images, np.array([counts.get(int(k), 0) for k in sel.table.number]), pixel_size_A,
                               diameter)
    kept = [int(k) for k, keep in zip(sel.table.number, sel.scores.keep) if keep]
    sel.notes.append(f"--auto (particle diameter {diameter:g} A): " + "; ".join(
        f"class {int(k)} {v} (score {sc:.2f}: contrast {c:.1f}x, detail {d:.2f}x, concentration {q:.2f})"
        for k, v, sc, c, d, q in zip(sel.table.number, sel.scores.verdict, sel.scores.score, sel.scores.contrast_ratio,
                                     sel.scores.detail_ratio, sel.scores.concentration) if v != "empty"))
    return kept


def compute_selection(params: SelectParams, project: Path) -> Selection:
    """Everything select writes, computed and validated (no file touched)."""
    src = resolve_project_path(project, params.i) if params.i else latest_class2d_data(project)
    if not src.exists():
        raise SubtomoError(f"--i {params.i}: file not found.")
    data_path, model_path = data_and_model_paths(src)
    particles = ParticleSet.read(data_path, project)
    if "rlnClassNumber" not in particles.table.columns:
        raise SubtomoError(f"{data_path}: no rlnClassNumber column; it is not a classification result. Give a run_itNNN_data.star of class2d or class3d.")
    model_classes = read_model_classes(model_path)
    table = class_table(model_classes, particles.table["rlnClassNumber"].to_numpy(int))
    found = class_images(model_classes, model_path, project) if model_path is not None else None
    sel = Selection(image_dimensionality(particles.optics, particles.table), [], particles, particles, data_path, table,
                    found[0] if found else None)
    rules = (params.classes, params.min_class_fraction, params.max_class_resolution, params.top_n_classes)
    chosen = choose_classes(table, *rules) if params.auto is False or any(r is not None for r in rules) \
        else [int(k) for k in table.number]
    if params.auto:
        kept = set(_auto_scores(params, sel, found[1] if found else 0.0))
        chosen = [k for k in chosen if k in kept]
    if not chosen:
        raise SubtomoError("empty selection: no class passes all the given criteria "
                           f"(classes: {params.classes}, auto: {params.auto}, min fraction {params.min_class_fraction}, "
                           f"max resolution {params.max_class_resolution} Å, top {params.top_n_classes}). Relax a criterion.")
    mask = particles.table["rlnClassNumber"].astype(int).isin(chosen).to_numpy()
    if not mask.any():
        raise SubtomoError(f"empty selection: class(es) {', '.join(map(str, chosen))} hold no particles in {data_path.name}. Choose other classes.")
    sel.classes, sel.selected = chosen, particles.subset(mask)
    sel.notes.insert(0, f"input {data_path} ({len(particles)} particles, {len(table.number)} classes)"
                     + (f"; class statistics from {model_path}" if model_path is not None else ""))
    if sel.dimensionality == 2 and params.map3d:
        p3 = SPEC.input("particles3d").resolve(project, params.particles3d)
        parts3 = ParticleSet.read(p3, project)
        rows, how = map_2d_to_3d(sel.selected.table, parts3.table)
        sel.particles3d_path, sel.selected3d = p3, parts3.subset(rows)
        sel.notes.append(f"mapped {len(sel.selected)} projections to {len(rows)} of {len(parts3)} subtomograms in {p3} by {how}")
    return sel


# ----------------------------------------------------------------------------- job


def _check(params: SelectParams, project: Path) -> Selection:
    return compute_selection(params, project)


def _plot_selection(ctx: JobContext, sel: Selection) -> None:
    """``selected_classes.png``: the class gallery with the kept classes framed in green (and --auto's scores)."""
    # imported here to keep `subtomo --help` fast (matplotlib)
    from subtomo.plot.gallery import class_gallery

    if sel.images is None:
        return
    table = sel.table
    notes = None
    if sel.scores is not None:
        sc = sel.scores
        notes = [f"{v} {s:.2f}\nc{c:.1f} d{d:.2f} q{q:.2f}" for v, s, c, d, q in
                 zip(sc.verdict, sc.score, sc.contrast_ratio, sc.detail_ratio, sc.concentration)]
    path = class_gallery(sel.images, table.fraction, ctx.path("selected_classes.png"), table.resolution_A,
                         title=f"kept (green): classes {', '.join(map(str, sel.classes))}"
                         + ("  [auto: score; c contrast, d detail (x median), q concentration]" if notes else ""),
                         class_numbers=table.number, selected=sel.classes, notes=notes)
    ctx.add_output(path, "Image")
    ctx.log(f"wrote {ctx.rel(path)}")


def _write(ctx: JobContext, name: str, particles: ParticleSet, what: str) -> None:
    out = particles.write(ctx.path(name))
    ctx.add_output(out, "ParticlesData")
    ctx.log(f"wrote {ctx.rel(out)}: {len(particles)} {what}")


def _run(ctx: JobContext) -> None:
    sel: Selection = ctx.state
    for note in sel.notes:
        ctx.log(note)
    ctx.add_input(sel.data_path)
    counts = sel.selected.table["rlnClassNumber"].astype(int).value_counts()
    ctx.log("kept classes: " + ", ".join(f"{k} ({counts.get(k, 0)})" for k in sel.classes)
            + f"; {len(sel.selected)} particles")
    _plot_selection(ctx, sel)
    if sel.scores is not None:
        out = write_star(ctx.path("class_scores.star"), {"class_scores": scores_table(sel.table.number, sel.table, sel.scores)})
        ctx.add_output(out, "File")
        ctx.log(f"wrote {ctx.rel(out)}: per-class scores of --auto")
    if sel.dimensionality != 2:
        _write(ctx, "particles_selected.star", sel.selected, "subtomograms")
        return
    _write(ctx, "subtomo_proj2d_sel.star", sel.selected, "projections")
    if sel.selected3d is not None and sel.particles3d_path is not None:
        ctx.add_input(sel.particles3d_path)
        _write(ctx, "output_2Dto3D.star", sel.selected3d, "subtomograms")


SPEC = JobSpec(
    command="select", job_type="Select", params=SelectParams, run=_run, check=_check,
    summary="Steps 16, 17, 21: keep the particles of chosen classes (by number, rules or --auto scores); map a 2D selection back to the subtomograms (output_2Dto3D.star).",
    inputs=(
        particles_spec("i", (Source("Class2D", ("_data.star",)), Source("Class3D", ("_data.star",))),
                        "Run subtomo class2d or class3d first, or pass --i."),
        particles_spec("particles3d", (Source("Extract", ("particles_subtomo.star",)),),
                        "Run subtomo extract first, or pass --particles3d.", when="2D input"),
    ),
    outputs=(
        OutputSpec("subtomo_proj2d_sel.star", NodeType.PARTICLES, "the selected 2D projections (Step 16)", optional=True),
        OutputSpec("output_2Dto3D.star", NodeType.PARTICLES, "their subtomograms (Step 17)", optional=True),
        OutputSpec("particles_selected.star", NodeType.PARTICLES, "the selected subtomograms (Step 21)", optional=True),
        OutputSpec("selected_classes.png", NodeType.IMAGE, "class gallery, kept classes framed", optional=True),
        OutputSpec("class_scores.star", NodeType.FILE, "per-class scores of --auto and the verdict", optional=True),
    ),
)
