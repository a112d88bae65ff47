"""``subtomo import-relion`` (the issue's "import relion"): continue here from RELION's output.

Reads

* a RELION 3.1 legacy subtomogram particle set: ``particles.star`` with ``rlnCtfImage``
  volumes, or a refinement's ``run_data.star`` (poses, origins, halves) with its
  ``run_model.star`` (``--model``: resolution in Å, as RELION writes it);
* a RELION 4/5 tomography particle set (``particles.star`` with ``rlnTomo*`` labels) with
  its ``tomograms.star`` (``--tomograms``): RELION 5 centred coordinates in Å (or RELION 4
  unbinned pixels) become tomogram pixel coordinates; ``rlnTomoHand`` is reported as the
  ``--defocus-handedness`` to use here. Each tilt series' per-tilt CTF (RELION 5's
  ``rlnTomoTiltSeriesStarFile``, or RELION 4's block in ``tomograms.star``: defocus, dose,
  scale, tilt) becomes our compact CTF model table ``CtfModels/<t>_ctf.star`` (the ``exact``
  position-dependent defocus with RELION's hand, B = rlnCtfBfactor or ``--bfactor-per-dose``
  × pre-exposure), so the imported particles have 3D CTFs (``subtomoCtfModel``).

Paths in RELION's files are relative to the directory RELION ran in (``--relion-project``,
default this project); they are rewritten relative to this project. The particle set is
checked like every reader's: images present, CTF volumes of the particles' box and pixel
size. Output: ``particles.star`` (subtomo's particle set), which refine3d, class3d, select,
export-relion and the others take with ``--i``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import Field

from subtomo.errors import SubtomoError
from subtomo.io.particles import ParticleSet, path_component, resolve_project_path
from subtomo.io.relion import CTF_MODEL, TOMOGRAM_PIXEL_SIZE, relion_tilt_table, relocate_paths, tomo_particles_to_legacy
from subtomo.io.star import read_star, read_star_table, table_of, write_star
from subtomo.jobs.base import JobContext, JobParams, JobSpec
from subtomo.jobs.contracts import InputSpec, NodeType, OutputSpec


class ImportRelionParams(JobParams):
    i: str = Field(..., description="RELION particle STAR: a 3.1 particles.star / run_data.star, or a RELION 4/5 "
                                    "tomography particles.star.")
    model: str | None = Field(None, description="RELION run_model.star of that refinement (its resolution is reported).")
    tomograms: str | None = Field(None, description="RELION 4/5 tomograms.star (needed for RELION 5 centred coordinates).")
    relion_project: str | None = Field(None, description="Directory RELION ran in, which its paths are relative to "
                                                         "(default: this project).")
    bfactor_per_dose: float = Field(4.0, ge=0, description="Dose B-factor [Å² per e/Å²] × rlnMicrographPreExposure for "
                                                           "tilts without RELION's rlnCtfBfactor (RELION 4/5 CTF models).")


def _check(params: ImportRelionParams, project: Path):
    rp = resolve_project_path(project, params.relion_project) if params.relion_project else project
    star = resolve_project_path(project, params.i)
    if not star.exists():
        raise SubtomoError(f"--i {params.i}: file not found.")
    raw = ParticleSet.read(star, rp)
    notes: list[str] = []
    table = raw.table
    ctfs: list = []
    if "rlnTomoName" in table and ("rlnCenteredCoordinateXAngst" in table or params.tomograms):
        tomos, blocks = None, {}
        if params.tomograms:
            tpath = resolve_project_path(project, params.tomograms)
            if not tpath.exists():
                raise SubtomoError(f"--tomograms {params.tomograms}: file not found.")
            blocks = read_star(tpath)
            tomos = table_of(blocks["global"]) if "global" in blocks else read_star_table(tpath)
        table, notes = tomo_particles_to_legacy(table, tomos, str(star))
        if tomos is not None:
            ctfs = _tilt_ctfs(table, tomos, blocks, tpath, rp, params.bfactor_per_dose, notes)
    table = relocate_paths(table, rp, project)
    particles = ParticleSet.from_table(table, raw.optics, project)
    if particles.has("rlnImageName"):
        missing = [str(p) for p in dict.fromkeys(particles.image_paths()) if not p.exists()]
        if missing:
            raise SubtomoError(f"{star}: {len(missing)} image(s) not found (paths relative to {rp}; give "
                               "--relion-project DIR if RELION ran elsewhere)", missing[:10])
    if particles.has_ctf():
        from subtomo.tomo.ctf3d import check_ctf_volumes

        check_ctf_volumes(particles)
    model = None
    if params.model:
        mpath = resolve_project_path(project, params.model)
        if not mpath.exists():
            raise SubtomoError(f"--model {params.model}: file not found.")
        general = read_star(mpath).get("model_general")
        if not isinstance(general, dict) or "rlnCurrentResolution" not in general:
            raise SubtomoError(f"{mpath}: no data_model_general block with rlnCurrentResolution; give RELION's "
                               "run_model.star.")
        model = (mpath, general)
    return star, particles, notes, model, ctfs


def _tilt_ctfs(table, tomos, blocks: dict, tpath: Path, rp: Path, bfactor_per_dose: float, notes: list[str]) -> list:
    """Per tomogram of the particles: (TomoCtf, CTF table, hand, row positions) from RELION's per-tilt tables."""
    from subtomo.tomo.ctf_models import ctf_table, relion_tomo_ctf

    rows_of = {str(k): v for k, v in tomos.set_index(tomos["rlnTomoName"].astype(str)).iterrows()}
    names = list(dict.fromkeys(table["rlnTomoName"].astype(str)))
    sources = {}
    for name in names:
        row = rows_of[name]
        if isinstance(row.get("rlnTomoTiltSeriesStarFile"), str):  # RELION 5: a file per tilt series
            path = resolve_project_path(rp, row["rlnTomoTiltSeriesStarFile"], source=tpath, column="rlnTomoTiltSeriesStarFile")
            if not path.exists():
                raise SubtomoError(f"{tpath}: {name}: tilt-series STAR {path} not found (paths relative to {rp}; give "
                                   "--relion-project DIR if RELION ran elsewhere).")
            sources[name] = (read_star_table(path), str(path))
        elif isinstance(blocks.get(name), pd.DataFrame):  # RELION 4: a block per tilt series in tomograms.star
            sources[name] = (blocks[name], f"{tpath} data_{name}")
    if not sources:
        notes.append(f"{tpath}: no per-tilt tables (rlnTomoTiltSeriesStarFile or data_<tomogram> blocks): particles "
                     "imported without 3D CTF models")
        return []
    if missing := [n for n in names if n not in sources]:
        raise SubtomoError(f"{tpath}: no per-tilt table for {', '.join(missing)} (but for other tomograms). Give the "
                           "tomograms.star that lists every tilt series' STAR file.")
    out = []
    for name in names:
        tilts, more = relion_tilt_table(*sources[name])
        notes.extend(more)
        path_component(name, "rlnTomoName", tpath)
        at = np.nonzero(table["rlnTomoName"].astype(str).to_numpy() == name)[0]
        coords = table[["rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ"]].to_numpy(float)[at]
        micrograph = str(table["rlnMicrographName"].iloc[at[0]]) if "rlnMicrographName" in table else ""
        t = relion_tomo_ctf(rows_of[name], tilts, coords, micrograph)
        hand = int(round(float(rows_of[name].get("rlnTomoHand", -1.0))))
        out.append((t, ctf_table(t, bfactor_per_dose, "exact", hand), hand, at))
    return out


def _run(ctx: JobContext) -> None:
    star, particles, notes, model, ctfs = ctx.state
    ctx.add_input(star)
    for note in notes:
        ctx.log(note)
    if ctfs:
        particles = _write_ctf_models(ctx, particles, ctfs)
    if model is not None:
        mpath, general = model
        ctx.add_input(mpath)
        ctx.log(f"{ctx.rel(mpath)}: current resolution {float(general['rlnCurrentResolution']):.2f} A "
                f"(rlnCurrentResolution, in A as RELION writes it), pixel size {general.get('rlnPixelSize', '?')} A")
    out = particles.write(ctx.path("particles.star"))
    ctx.add_declared_outputs()
    poses = "with poses" if particles.has_angles() else "without poses"
    ctx.log(f"wrote {ctx.rel(out)}: {len(particles)} particles {poses} from {ctx.rel(star)}")


def _write_ctf_models(ctx: JobContext, particles: ParticleSet, ctfs: list) -> ParticleSet:
    """Write each tomogram's compact CTF table; the particles refer to their rows (subtomoCtfModel)."""
    from subtomo.tomo.ctf3d import CTF_GENERAL_BLOCK, CTF_TABLE_BLOCK
    from subtomo.tomo.ctf_models import general_block

    refs, pixel = np.full(len(particles), "", dtype=object), np.zeros(len(particles))
    for t, table, hand, at in ctfs:
        path = write_star(ctx.path(f"CtfModels/{t.name}_ctf.star"), {CTF_GENERAL_BLOCK: general_block(t, "exact", hand),
                                                                      CTF_TABLE_BLOCK: table})
        refs[at] = [f"{k:06d}@{ctx.rel(path)}" for k in range(1, len(at) + 1)]
        pixel[at] = t.pixel_size_A
        ctx.log(f"{t.name}: 3D CTF models of {len(at)} particles x {len(t.tilts_deg)} tilts ({t.tilts_deg.min():.1f} to "
                f"{t.tilts_deg.max():.1f} deg, defocus {t.defocus_u_A.min():.0f}-{t.defocus_u_A.max():.0f} A, hand {hand:+d}, "
                f"tomogram {t.pixel_size_A:.3f} A/px) in {ctx.rel(path)}")
    return particles.with_columns(**{CTF_MODEL: refs, TOMOGRAM_PIXEL_SIZE: pixel})


SPEC = JobSpec(
    command="import-relion", job_type="ImportRelion", params=ImportRelionParams, run=_run, check=_check,
    summary="Import from RELION ('import relion'): a RELION 3.1 subtomogram particle set (run_data.star, CTF volumes) "
            "or a RELION 4/5 tomography particle set, to continue here.",
    inputs=(InputSpec("i", NodeType.PARTICLES, hint="Give RELION's particle STAR with --i."),),
    outputs=(OutputSpec("particles.star", NodeType.PARTICLES, "the particles, poses and CTF models for subtomo"),
             OutputSpec("CtfModels/*_ctf.star", NodeType.CTF_MODELS, "per-tomogram 3D CTF model tables (RELION 4/5)",
                        optional=True)),
)
