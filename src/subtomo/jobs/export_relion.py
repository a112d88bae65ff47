"""``subtomo export-relion`` (the issue's "export relion"): a particle set as a RELION 3.1 legacy subtomogram project.

From any particle set with subtomograms (after extract, select, refine3d, class3d) it writes,
inside its job directory (so every path is project-relative and RELION runs from the project
directory, as subtomo does):

* ``Subtomograms/<tomo>/<name>.mrc``: the subtomograms (copies);
* ``Subtomograms/<tomo>/<name>_ctf.mrc``: full centred N³ CTF volumes of the particles' box
  and pixel size, exactly as ``relion_reconstruct --reconstruct_ctf`` makes them from the
  per-tilt table written beside each (``<name>_ctf.star``, ``rlnAngleTilt = −θ``:
  docs/conventions.md), and ``do_all_reconstruct_ctfs.sh`` to remake them with RELION;
* ``particles_relion.star``: RELION 3.1 labels only (optics + particles), poses, halves;
* ``relion_commands.txt``: the RELION command lines of the protocol's steps for this set;
* ``reference.mrc`` when ``--ref`` is given.

Back from RELION: ``subtomo import-relion --i <RELION job>/run_data.star``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import Field

from subtomo.errors import SubtomoError
from subtomo.geometry.symmetry import symmetry_generators
from subtomo.io.mrc import read_mrc_header, write_mrc
from subtomo.io.particles import ParticleSet, path_component, resolve_project_path
from subtomo.io.relion import CTF_MODEL, relion31_tables, relion_commands
from subtomo.io.star import write_star
from subtomo.jobs.base import ComputeParams, JobContext, JobSpec
from subtomo.jobs.contracts import InputSpec, NodeType, OutputSpec, Source, particles_spec

SOURCES = (Source("Refine3D", ("run_data.star",)), Source("Class3D", ("_data.star",)),
           Source("Select", ("particles_selected.star", "output_2Dto3D.star")), Source("Extract", ("particles_subtomo.star",)))


class ExportRelionParams(ComputeParams):
    i: str | None = Field(None, description="Particle STAR with subtomograms (default: the newest of Refine3D/Class3D "
                                            "run_data.star, Select, Extract).")
    ref: str | None = Field(None, description="Reference map to copy beside the particles (named in relion_commands.txt).")
    particle_diameter: float | None = Field(None, gt=0, description="Particle diameter for the RELION commands [Å] "
                                                                    "(default: 75% of the box).")
    sym: str = Field("C1", description="Point group for the RELION commands.")


def _check(params: ExportRelionParams, project: Path):
    try:  # an unknown point group would go into RELION's commands
        symmetry_generators(params.sym)
    except SubtomoError as exc:
        raise SubtomoError(f"--sym {params.sym}: {exc}") from exc
    star = SPEC.input("i").resolve(project, params.i)
    assert star is not None
    particles = ParticleSet.read(star, project)
    if not particles.has("rlnImageName"):
        raise SubtomoError(f"{star}: no rlnImageName: these particles are not extracted. Run subtomo extract first "
                           "(RELION needs the subtomograms).")
    missing = [str(p) for p in dict.fromkeys(particles.image_paths()) if not p.exists()]
    if missing:
        raise SubtomoError(f"{star}: {len(missing)} subtomogram(s) not found", missing[:10])
    box = particles.box_px
    if box is None:
        raise SubtomoError(f"{star}: the box size is unknown (no rlnImageSize and the first image is unreadable).")
    if not particles.has_ctf():
        raise SubtomoError(f"{star}: no 3D CTF models (no subtomoCtfModel or rlnCtfImage column). Extract from subtomo "
                           "prepare's particles_subtomo.star.")
    from subtomo.tomo.ctf3d import ParticleCtfModels  # checks RELION volumes against the particles (box, pixel size)

    models = ParticleCtfModels.from_particle_set(particles)
    scopes = {(float(v), float(c), float(q)) for v, c, q in zip(models.voltage_kV, models.cs_mm, models.amplitude_contrast)}
    if len(scopes) > 1:
        raise SubtomoError(f"{star}: particles of {len(scopes)} microscopes (voltage, Cs, Q0); export each as its own set "
                           "(subtomo select) so that one RELION optics group describes them.")
    ref = resolve_project_path(project, params.ref) if params.ref else None
    if ref is not None:
        if not ref.exists():
            raise SubtomoError(f"--ref {params.ref}: file not found.")
        shape, _ = read_mrc_header(ref)
        if tuple(shape) != (box,) * 3:
            raise SubtomoError(f"--ref {ref}: {shape[::-1]} voxels but the particles are {box}^3. Give a map of the "
                               "particles' box (e.g. the refined map of these particles).")
    return star, particles, models, ref


def _names(particles: ParticleSet, star: Path) -> list[str]:
    """Output name (inside Subtomograms/) of each particle: <tomo>/<stem>, unique."""
    table = particles.table
    tomos = (table["rlnTomoName"].astype(str) if "rlnTomoName" in table
             else table.get("rlnMicrographName", pd.Series(["particles"] * len(table))).astype(str).map(lambda s: Path(s).stem))
    names, seen = [], set()
    for i, (tomo, ref) in enumerate(zip(tomos, particles.image_refs())):
        stem = f"{ref.path.stem}_{ref.index:06d}" if ref.index is not None else ref.path.stem
        name = f"{path_component(tomo, 'rlnTomoName', star)}/{path_component(stem, 'rlnImageName', star)}"
        name = name if name not in seen else f"{name}_{i + 1:06d}"
        seen.add(name)
        names.append(name)
    return names


def _ctf_volume(ctx: JobContext, models, row: int, box: int, px: float, root: Path) -> None:
    """Write the particle's RELION CTF volume (and its per-tilt table) at ``root``_ctf.mrc/.star."""
    from subtomo.tomo.ctf3d import relion_ctf_cube

    ok = np.isfinite(models.tilt_deg[row])
    per_tilt = [a[row][ok] for a in (models.defocus_u_A, models.defocus_v_A, models.astig_angle_deg, models.tilt_deg,
                                     models.bfactor_A2, models.scale)]
    skip = bool(models.skip_ctf[row])
    kv, cs, q0 = float(models.voltage_kV[row]), float(models.cs_mm[row]), float(models.amplitude_contrast[row])
    cube = relion_ctf_cube(*per_tilt, box, px, kv, cs, q0, skip_ctf=skip)
    write_mrc(root.with_name(root.name + "_ctf.mrc"), cube, px)
    write_star(root.with_name(root.name + "_ctf.star"), {"images": pd.DataFrame({
        "rlnDefocusU": 0.0 if skip else per_tilt[0], "rlnDefocusV": 0.0 if skip else per_tilt[1],
        "rlnDefocusAngle": per_tilt[2], "rlnVoltage": kv, "rlnSphericalAberration": 0.0 if skip else cs,
        "rlnAmplitudeContrast": 1.0 if skip else q0, "rlnAngleRot": 0.0, "rlnAngleTilt": -per_tilt[3],
        "rlnAnglePsi": 0.0, "rlnCtfBfactor": per_tilt[4], "rlnCtfScalefactor": per_tilt[5]})})


def _run(ctx: JobContext) -> None:
    p: ExportRelionParams = ctx.params
    star, particles, models, ref = ctx.state
    ctx.add_input(star)
    box, px = int(particles.box_px), float(particles.pixel_size_A)
    names = _names(particles, star)
    images, ctfs, script = [], [], []
    ctf_refs = particles.ctf_refs()
    for i in ctx.progress(range(len(particles)), description=f"RELION subtomograms and CTF volumes (box {box})"):
        root = ctx.path(f"Subtomograms/{names[i]}")
        root.parent.mkdir(parents=True, exist_ok=True)
        src = particles.image_refs()[i]
        if src.index is not None:
            raise SubtomoError(f"{star}: particle {i + 1} is image {src.index} of a stack; RELION 3D particles are one "
                               "MRC file each. Export the 3D particles (not the 2D projections).")
        shutil.copyfile(src.path, root.with_suffix(".mrc"))
        if ctf_refs[i].index is None:  # already a RELION volume of this box and pixel size (checked)
            shutil.copyfile(ctf_refs[i].path, root.with_name(root.name + "_ctf.mrc"))
        else:
            _ctf_volume(ctx, models, i, box, px, root)
            script.append(f"relion_reconstruct --i {ctx.rel(root)}_ctf.star --o {ctx.rel(root)}_ctf.mrc "
                          f"--reconstruct_ctf {box} --angpix {px:g}")
        images.append(ctx.rel(root.with_suffix(".mrc")))
        ctfs.append(ctx.rel(root.with_name(root.name + "_ctf.mrc")))
    table = particles.table.drop(columns=[CTF_MODEL], errors="ignore").assign(rlnImageName=images, rlnCtfImage=ctfs)
    table = table.assign(rlnOpticsGroup=1, rlnGroupNumber=table.get("rlnGroupNumber", 1))
    optics = pd.DataFrame([{"rlnOpticsGroup": 1, "rlnOpticsGroupName": "opticsGroup1",
                            "rlnVoltage": float(models.voltage_kV[0]), "rlnSphericalAberration": float(models.cs_mm[0]),
                            "rlnAmplitudeContrast": float(models.amplitude_contrast[0]), "rlnImagePixelSize": px,
                            "rlnImageSize": box, "rlnImageDimensionality": 3}])
    rows, opt = relion31_tables(table, optics)
    out = ParticleSet.from_table(rows, opt, ctx.project).write(ctx.path("particles_relion.star"))
    ref_rel = None
    if ref is not None:
        shutil.copyfile(ref, ctx.path("reference.mrc"))
        ctx.add_input(ref)
        ref_rel = ctx.rel(ctx.path("reference.mrc"))
    (ctx.path("do_all_reconstruct_ctfs.sh")).write_text("\n".join(["#!/bin/sh", *script]) + "\n")
    diameter = p.particle_diameter or 0.75 * box * px
    ctx.path("relion_commands.txt").write_text(relion_commands(ctx.rel(out), ref_rel, diameter, px, p.sym,
                                                               f"{ctx.rel(ctx.dir)}/relion"))
    ctx.add_declared_outputs()
    ctx.log(f"wrote {ctx.rel(out)}: {len(rows)} particles (box {box} px, {px:.3f} A) with RELION 3.1 CTF volumes; "
            f"RELION command lines in {ctx.rel(ctx.path('relion_commands.txt'))}; run them from the project directory")


SPEC = JobSpec(
    command="export-relion", job_type="ExportRelion", params=ExportRelionParams, run=_run, check=_check,
    summary="Export to RELION 3.1 ('export relion'): subtomograms, CTF volumes and a particle STAR that relion_refine "
            "runs on unchanged, with the RELION command lines.",
    inputs=(particles_spec("i", SOURCES, "Run subtomo extract first, or pass --i."),
            InputSpec("ref", NodeType.DENSITY_MAP, hint="Optional reference map to copy.", required=False)),
    outputs=(
        OutputSpec("particles_relion.star", NodeType.PARTICLES, "RELION 3.1 particles with CTF volumes"),
        OutputSpec("relion_commands.txt", NodeType.FILE, "RELION command lines of the protocol's steps"),
        OutputSpec("do_all_reconstruct_ctfs.sh", NodeType.FILE, "relion_reconstruct --reconstruct_ctf per particle"),
        OutputSpec("reference.mrc", NodeType.DENSITY_MAP, "the reference map (--ref)", optional=True),
    ),
)
