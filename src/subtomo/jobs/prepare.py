"""``subtomo prepare`` (protocol Steps 9, 11, 12): per-particle 3D CTF models.

For every particle of every tomogram and every tilt image: the position-dependent defocus
(U and V shifted alike, :mod:`subtomo.tomo.defocus`), the dose B-factor
(``--bfactor-per-dose`` × accumulated dose) and the scale factor cos θ. These compact
parameters are written per tomogram to ``CtfModels/<t>_ctf.star`` (one row per particle per
tilt) and referenced by ``subtomoCtfModel = NNNNNN@CtfModels/<t>_ctf.star`` (our label: RELION's
``rlnCtfImage`` names a CTF volume); later jobs build the 3D CTF volumes on the fly
(:class:`subtomo.tomo.ctf3d.ParticleCtfModels`), so no ``do_all_reconstruct_ctfs.sh`` is needed. ``--export-relion BOX`` also writes RELION-style
``rlnCtfImage`` volumes (as ``relion_reconstruct --reconstruct_ctf`` makes them from the per-tilt
STAR beside each) and ``particles_subtomo_relion.star`` pointing at them; extract it with
``subtomo extract --i Prepare/jobNNN/particles_subtomo_relion.star --box BOX`` (the same box, no
``--rescale``: a CTF volume only fits particles of its box and pixel size), or use
``subtomo export-relion`` after extraction. ``--defocus-handedness`` (docs/conventions.md)
chooses the sign of the position-dependent defocus. The tables are computed
by :mod:`subtomo.tomo.ctf_models` (failed CTF fits get the tilt series' defocus trend; a
series whose CTF is unknown is refused); this job writes them.

``--particles STAR`` (e.g. ``particles.star`` of ``subtomo import-particles``) gives the
particles instead of the layout's ``.coords`` files: positions, matched to the tomograms by
``rlnTomoName``, and the orientations of the other program as initial ``rlnAngleRot/Tilt/Psi``
with the same values as priors ``rlnAngle*Prior`` (and ``rlnRandomSubset``, ``rlnClassNumber``
when given). They travel through ``extract``; ``class3d --local`` / ``--skip-align`` start from
these angles, whereas ``refine3d`` (de novo) starts from random orientations.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field

from subtomo.em.parallel import map_tasks
from subtomo.errors import SubtomoError
from subtomo.io.importers.imod import imod_to_tilt_geometry, tomogram_geometry
from subtomo.io.importers.picks import picks_per_tomogram
from subtomo.io.mrc import write_mrc
from subtomo.io.particles import ParticleSet, resolve_project_path
from subtomo.io.relion import upgrade_legacy_labels
from subtomo.io.star import read_star_table, write_star
from subtomo.jobs._cluster import check_cluster, open_runner
from subtomo.jobs.base import ComputeParams, JobContext, JobSpec
from subtomo.jobs.contracts import InputSpec, NodeType, OutputSpec, Source
from subtomo.tomo.ctf3d import CTF_GENERAL_BLOCK, CTF_TABLE_BLOCK, relion_ctf_cube, to_relion_cube
from subtomo.tomo.ctf_models import (
    RELION_CTF_COLUMNS,
    TomoCtf,
    ctf_table,
    general_block,
    optics_groups,
    particle_rows,
    particle_volumes,
    read_tomogram_ctfs,
    relion_ctf_star,
)

INPUT_CTF = InputSpec("i", NodeType.TOMOGRAM_SET, (Source("CtfFind", ("ctf_tomograms.star",)),),
                      "Run subtomo ctf first, or pass --i all_tomograms.star with --skip-ctf.")
INPUT_SKIP_CTF = InputSpec("i", NodeType.TOMOGRAM_SET, (Source("CtfFind", ("ctf_tomograms.star",)),
                                                        Source("Import", ("all_tomograms.star",))),
                           "Run subtomo import first, or pass --i.", when="--skip-ctf")


class PrepareParams(ComputeParams):
    i: str | None = Field(None, description="Input tomogram STAR: ctf_tomograms.star of a CtfFind job (default: the latest), "
                                            "or all_tomograms.star with --skip-ctf.")
    skip_ctf: bool = Field(False, description="No CTF correction (e.g. phase-plate data, Table 1): the 3D model is 1 inside the "
                                              "sampled wedge, weighted by tilt scale and dose only.")
    bfactor_per_dose: float = Field(4.0, ge=0, description="Dose-dependent B-factor per accumulated dose [Å² per e⁻/Å²].")
    defocus_model: Literal["exact", "relion"] = Field(
        "exact", description="Position-dependent defocus: exact geometry (D − h), or relion (first-order D + x_img sin θ "
                             "of relion_prepare_subtomograms.py).")
    defocus_handedness: int = Field(-1, description="Defocus handedness, -1 or +1 (docs/conventions.md): -1 (default) = "
                                                    "RELION 5's hand -1 and RELION 3's formula; +1 for data of the other "
                                                    "hand (subtomo ctf reports which hand the high tilts fit better).")
    use_lower_tilt_defoci: bool = Field(False, description="Step 11: give every tilt with |θ| above --lower-tilt-limit the "
                                                           "mean defocus of the tilts below it.")
    lower_tilt_limit: float = Field(30.0, gt=0, lt=90, description="Tilt limit for --use-lower-tilt-defoci [deg].")
    export_relion: int | None = Field(None, gt=0, description="Also write RELION rlnCtfImage volumes (centred N³ cubes) of "
                                                              "this box size [px] and particles_subtomo_relion.star.")
    particles: str | None = Field(None, description="Particles STAR (e.g. particles.star of import-particles) used "
                                  "instead of the .coords files: positions per rlnTomoName, and angles as initial "
                                  "rlnAngleRot/Tilt/Psi and priors rlnAngle*Prior.")
    plot_box: int = Field(96, gt=0, description="Box size of the PNG of one particle's 3D CTF model [px].")


def _input_path(params: PrepareParams, project: Path) -> Path:
    spec = INPUT_SKIP_CTF if params.skip_ctf else INPUT_CTF
    path = spec.resolve(project, params.i)
    assert path is not None  # required input
    return path


def _require_tilts(star: Path, project: Path) -> None:
    """Refuse tomograms imported without tilt angles (a tomogram-only source: import --source portal)."""
    table = upgrade_legacy_labels(read_star_table(star))
    for _, row in table.iterrows() if "rlnMicrographName" in table.columns else ():  # else read_tomogram_ctfs says so
        has = any(isinstance(row.get(c), str) for c in ("subtomoCtfResultsStar", "rlnTomoTiltSeriesStarFile"))
        tomo = resolve_project_path(project, str(row.get("rlnMicrographName", "")))
        if not has and not tomo.with_suffix(".tlt").is_file():
            raise SubtomoError(f"{star}: tomogram {row.get('rlnTomoName', tomo.stem)} has no tilt angles (no tilt-series "
                               f"table, no {tomo.with_suffix('.tlt').name}): it was imported without its tilt series. "
                               "Re-import it with --tilt-range=MIN,MAX,STEP --dose-per-tilt D (import --source portal).")


def _check(params: PrepareParams, project: Path):
    if params.defocus_handedness not in (-1, 1):
        raise SubtomoError(f"--defocus-handedness {params.defocus_handedness}: must be -1 or +1.")
    if params.export_relion is not None and params.export_relion % 2:
        raise SubtomoError(f"--export-relion {params.export_relion}: the box size must be even (as the subtomograms' box).")
    check_cluster(params, project)
    star = _input_path(params, project)
    _require_tilts(star, project)
    limit = params.lower_tilt_limit if params.use_lower_tilt_defoci else None
    tomos = read_tomogram_ctfs(star, project, params.skip_ctf, limit)
    if params.particles is None:
        if not any(len(t.coords_px) for t in tomos):
            raise SubtomoError(f"{star}: the .coords files list no particles. Step 3: pick particles first (or give "
                               "them with --particles).")
        return star, tomos, None
    particles = ParticleSet.read(resolve_project_path(project, params.particles), project)
    given = picks_per_tomogram(particles, {t.name: t.pixel_size_A for t in tomos})
    tomos = [replace(t, coords_px=given[t.name][0]) for t in tomos]
    return star, tomos, {name: extra for name, (_, extra) in given.items()}


def _geometry_tomos(star: Path, tomos: list[TomoCtf]) -> dict[str, TomoCtf]:
    """Per tomogram, the positions that the tilt images see: an IMOD tomogram's SHIFT / XAXISTILT undone."""
    table = read_star_table(star)
    rows = {str(r.get("rlnTomoName", "")): r for _, r in table.iterrows()}
    out = {}
    for t in tomos:
        placed = tomogram_geometry(rows[t.name]) if t.name in rows else None
        out[t.name] = t if placed is None else replace(t, coords_px=imod_to_tilt_geometry(t.coords_px, t.size_xyz, *placed))
    return out


def _run(ctx: JobContext) -> None:
    p: PrepareParams = ctx.params
    star, tomos, extras = ctx.state
    ctx.add_input(star)
    if extras is not None:
        ctx.add_input(resolve_project_path(ctx.project, p.particles or ""))
        carried = sorted({c for e in extras.values() for c in e.columns})
        ctx.log(f"particles from {p.particles} instead of the .coords files; carried: {', '.join(carried) or 'positions only'}")
    ctx.log(f"input {ctx.rel(star)}: {len(tomos)} tomogram(s); defocus model {p.defocus_model}, hand {p.defocus_handedness:+d}, "
            f"B = {p.bfactor_per_dose:g} A^2 per e/A^2 x accumulated dose, scale = cos(tilt)")
    optics, group_of = optics_groups(tomos)
    rows: list[dict] = []
    tables: dict[str, pd.DataFrame] = {}
    placed = _geometry_tomos(star, tomos)
    for t in tomos:
        for note in t.notes:
            if "failed" in note:
                ctx.warn(note)
            else:
                ctx.log(note)
        if placed[t.name] is not t:
            ctx.log(f"{t.name}: positions placed in the tilt geometry with the tomogram's SHIFT / XAXISTILT (IMOD tilt.com)")
        table = ctf_table(placed[t.name], p.bfactor_per_dose, p.defocus_model, p.defocus_handedness)
        tables[t.name] = table
        path = write_star(ctx.path(f"CtfModels/{t.name}_ctf.star"), {CTF_GENERAL_BLOCK: general_block(t, p.defocus_model, p.defocus_handedness),
                                                                      CTF_TABLE_BLOCK: table})
        ctx.add_output(path, "TomogramCtfModels")
        n = len(t.coords_px)
        new = particle_rows(t, ctx.rel(path), group_of[t.name])
        if extras is not None:  # the given orientations (and half sets, classes) of each particle
            new = [{**row, **extra} for row, extra in zip(new, extras[t.name].to_dict("records"))]
        rows.extend(new)
        dz = table["rlnDefocusU"].to_numpy().reshape(n, len(t.tilts_deg)) - (0 if t.skip_ctf else t.defocus_u_A[None, :])
        ctx.log(f"{t.name}: {n} particles x {len(t.tilts_deg)} tilts ({t.tilts_deg.min():.1f} to {t.tilts_deg.max():.1f} deg, "
                f"dose {t.dose.min():.1f}-{t.dose.max():.1f} e/A^2)"
                + (", wedge-only (no CTF)" if t.skip_ctf else
                   f", defocus {t.defocus_u_A.min():.0f}-{t.defocus_u_A.max():.0f} A, position offsets "
                   f"{dz.min() if n else 0:.0f} to {dz.max() if n else 0:.0f} A"))
    if not rows:
        where = f"{p.particles} lists no particles of these tomograms" if p.particles else "the .coords files list no particles"
        raise SubtomoError(f"{ctx.rel(star)}: {where}. Step 3: pick particles first.")
    particles = ParticleSet.from_table(pd.DataFrame(rows), optics, ctx.project)
    out = particles.write(ctx.path("particles_subtomo.star"))
    ctx.add_output(out, "ParticlesData")
    ctx.log(f"wrote {ctx.rel(out)}: {len(particles)} particles; CTF models in {ctx.rel(ctx.path('CtfModels'))}/")

    # picture of the first particle's model (Fig. 2a,b)
    from subtomo.plot.ctf3d import plot_ctf3d_slices

    t0 = next(t for t in tomos if len(t.coords_px))
    box = p.export_relion or p.plot_box
    box += box % 2
    ids = np.array([1])
    w = to_relion_cube(particle_volumes(t0, tables[t0.name], ids, box, ctx.device, weighted=True))[0].cpu().numpy()
    u = to_relion_cube(particle_volumes(t0, tables[t0.name], ids, box, ctx.device, weighted=False))[0].cpu().numpy()
    png = plot_ctf3d_slices(u, w, ctx.path("ctf3d_particle.png"), t0.pixel_size_A,
                            title=f"3D CTF model of {t0.name} particle 1 (box {box})")
    ctx.add_output(png, "Image")

    if p.export_relion:
        _export_relion(ctx, tomos, tables, particles, p.export_relion)


def export_tomogram_task(item: tuple[TomoCtf, pd.DataFrame], box: int, out_dir: Path) -> list[Path]:
    """RELION CTF volumes (and the per-tilt STAR beside each) of one tomogram's particles (a task of ``--cluster``)."""
    t, table = item
    out = []
    for pid in range(1, len(t.coords_px) + 1):
        rows = table[table["rlnTomoParticleId"] == pid]
        cube = relion_ctf_cube(*(rows[c].to_numpy(float) for c in RELION_CTF_COLUMNS), box, t.pixel_size_A,
                               t.voltage_kV, t.cs_mm, t.amplitude_contrast, skip_ctf=t.skip_ctf)
        root = out_dir / t.name / f"{t.name}_ctf{pid:06d}"
        out.append(write_mrc(root.with_suffix(".mrc"), cube, t.pixel_size_A))
        write_star(root.with_suffix(".star"), {"images": relion_ctf_star(t, rows)})
    return out


def _export_relion(ctx: JobContext, tomos: list[TomoCtf], tables: dict[str, pd.DataFrame], particles: ParticleSet,
                   box: int) -> None:
    """RELION rlnCtfImage volumes as relion_reconstruct --reconstruct_ctf makes them, one tomogram per task."""
    with open_runner(ctx) as runner:  # --cluster: one task per tomogram (None: here)
        done = map_tasks(runner, export_tomogram_task, [(t, tables[t.name]) for t in tomos],
                         (box, ctx.path("Particles/Tomograms")),
                         lambda it: ctx.progress(it, None, f"RELION 3D CTF volumes (box {box}), tomograms"))
    ctf_names = {(t.name, pid): ctx.rel(path) for t, paths in zip(tomos, done) for pid, path in enumerate(paths, 1)}
    table = particles.table
    names = [ctf_names[(n, int(i))] for n, i in zip(table["rlnTomoName"], table["rlnTomoParticleId"])]
    assert particles.optics is not None  # prepare always writes an optics table
    rel = ParticleSet.from_table(table.assign(rlnCtfImage=names), particles.optics.assign(rlnImageSize=box), ctx.project)
    out = rel.write(ctx.path("particles_subtomo_relion.star"))
    ctx.add_output(out, "ParticlesData")
    ctx.log(f"wrote {len(rel)} RELION 3D CTF volumes (box {box}) and {ctx.rel(out)}; extract them with "
            f"subtomo extract --i {ctx.rel(out)} --box {box} (same box, no --rescale), or use subtomo export-relion "
            "after extraction")


SPEC = JobSpec(
    command="prepare", job_type="Prepare", params=PrepareParams, run=_run, check=_check,
    summary="Steps 9, 11, 12: per-particle 3D CTF models (position-dependent defocus, dose B-factor, tilt scale) "
            "and particles_subtomo.star.",
    inputs=(INPUT_CTF, INPUT_SKIP_CTF),
    outputs=(
        OutputSpec("particles_subtomo.star", NodeType.PARTICLES, "one row per particle, with its CTF model"),
        OutputSpec("CtfModels/*_ctf.star", NodeType.CTF_MODELS, "per-tomogram 3D CTF model tables"),
        OutputSpec("ctf3d_particle.png", NodeType.IMAGE, "central sections of one particle's 3D CTF", optional=True),
        OutputSpec("particles_subtomo_relion.star", NodeType.PARTICLES, "RELION-style CTF volumes (--export-relion)",
                   optional=True),
    ),
)
