"""``subtomo import-relion`` (the issue's "import relion"): continue here from RELION's output.

Reads

* a RELION 3.1 legacy subtomogram particle set: ``particles.star`` with ``rlnCtfImage``
  volumes, or a refinement's ``run_data.star`` (poses, origins, halves) with its
  ``run_model.star`` (``--model``: resolution in Å, as RELION writes it);
* a RELION 4/5 tomography particle set (``particles.star`` with ``rlnTomo*`` labels) with
  its ``tomograms.star`` (``--tomograms``): RELION 5 centred coordinates in Å (or RELION 4
  unbinned pixels) become tomogram pixel coordinates; ``rlnTomoHand`` is reported as the
  ``--defocus-handedness`` to use here.

Paths in RELION's files are relative to the directory RELION ran in (``--relion-project``,
default this project); they are rewritten relative to this project. The particle set is
checked like every reader's: images present, CTF volumes of the particles' box and pixel
size. Output: ``particles.star`` (subtomo's particle set), which refine3d, class3d, select,
export-relion and the others take with ``--i``.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from subtomo.errors import SubtomoError
from subtomo.io.particles import ParticleSet, resolve_project_path
from subtomo.io.relion import relocate_paths, tomo_particles_to_legacy
from subtomo.io.star import read_star, read_star_table
from subtomo.jobs.base import JobContext, JobParams, JobSpec
from subtomo.jobs.contracts import InputSpec, NodeType, OutputSpec


class ImportRelionParams(JobParams):
    i: str = Field(..., description="RELION particle STAR: a 3.1 particles.star / run_data.star, or a RELION 4/5 "
                                    "tomography particles.star.")
    model: str | None = Field(None, description="RELION run_model.star of that refinement (its resolution is reported).")
    tomograms: str | None = Field(None, description="RELION 4/5 tomograms.star (needed for RELION 5 centred coordinates).")
    relion_project: str | None = Field(None, description="Directory RELION ran in, which its paths are relative to "
                                                         "(default: this project).")


def _check(params: ImportRelionParams, project: Path):
    rp = resolve_project_path(project, params.relion_project) if params.relion_project else project
    star = resolve_project_path(project, params.i)
    if not star.exists():
        raise SubtomoError(f"--i {params.i}: file not found.")
    raw = ParticleSet.read(star, rp)
    notes: list[str] = []
    table = raw.table
    if "rlnTomoName" in table and ("rlnCenteredCoordinateXAngst" in table or params.tomograms):
        tomos = None
        if params.tomograms:
            tpath = resolve_project_path(project, params.tomograms)
            if not tpath.exists():
                raise SubtomoError(f"--tomograms {params.tomograms}: file not found.")
            tomos = read_star_table(tpath)
        table, notes = tomo_particles_to_legacy(table, tomos, str(star))
    table = relocate_paths(table, rp, project)
    particles = ParticleSet.from_table(table, raw.optics, project)
    if particles.has("rlnImageName"):
        missing = [str(p) for p in dict.fromkeys(particles.image_paths()) if not p.exists()]
        if missing:
            raise SubtomoError(f"{star}: {len(missing)} image(s) not found (paths relative to {rp}; give "
                               "--relion-project DIR if RELION ran elsewhere)", missing[:10])
    if particles.has("rlnCtfImage"):
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
    return star, particles, notes, model


def _run(ctx: JobContext) -> None:
    star, particles, notes, model = ctx.state
    ctx.add_input(star)
    for note in notes:
        ctx.log(note)
    if model is not None:
        mpath, general = model
        ctx.add_input(mpath)
        ctx.log(f"{ctx.rel(mpath)}: current resolution {float(general['rlnCurrentResolution']):.2f} A "
                f"(rlnCurrentResolution, in A as RELION writes it), pixel size {general.get('rlnPixelSize', '?')} A")
    out = particles.write(ctx.path("particles.star"))
    ctx.add_declared_outputs()
    poses = "with poses" if particles.has_angles() else "without poses"
    ctx.log(f"wrote {ctx.rel(out)}: {len(particles)} particles {poses} from {ctx.rel(star)}")


SPEC = JobSpec(
    command="import-relion", job_type="ImportRelion", params=ImportRelionParams, run=_run, check=_check,
    summary="Import from RELION ('import relion'): a RELION 3.1 subtomogram particle set (run_data.star, CTF volumes) "
            "or a RELION 4/5 tomography particle set, to continue here.",
    inputs=(InputSpec("i", NodeType.PARTICLES, hint="Give RELION's particle STAR with --i."),),
    outputs=(OutputSpec("particles.star", NodeType.PARTICLES, "the particles, poses and CTF models for subtomo"),),
)
