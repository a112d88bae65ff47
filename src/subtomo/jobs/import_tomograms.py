"""``subtomo import`` (protocol Steps 1-7): validate the layout, write all_tomograms.star.

``--source imod|aretomo|warp`` first makes ``Tomograms/<name>/`` from those programs' folders
(:mod:`subtomo.io.importers.tiltseries`). ``--source portal`` imports CryoET Data Portal runs
(:mod:`subtomo.io.importers.portal`): OME-Zarr tomograms at the level nearest ``--pixel-size``
and one ``.ndjson`` annotation per run (positions to ``<name>.coords``, orientations to this
job's ``particles.star`` for ``prepare --particles``). The portal gives no tilt series of ours,
so ``subtomo ctf`` cannot run on them: ``--tilt-range`` and ``--dose-per-tilt`` give the tilt
angles and doses that ``prepare --skip-ctf`` needs (without them the tomograms are imported,
and prepare refuses them, saying so).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pandas as pd
from pydantic import Field

from subtomo.errors import SubtomoError
from subtomo.io.importers.imod import imod_to_tilt_geometry, tomogram_geometry
from subtomo.io.importers.portal import PortalRun, dose_symmetric_tilts, find_portal_runs, write_portal_layout
from subtomo.io.importers.tiltseries import SeriesPlan, find_series, write_layout
from subtomo.io.layout import TomogramInputs, scan_layout
from subtomo.io.particles import ParticleSet, resolve_project_path
from subtomo.io.star import write_star
from subtomo.jobs.base import JobContext, JobParams, JobSpec
from subtomo.jobs.contracts import NodeType, OutputSpec
from subtomo.plot.coordinates import plot_coordinates_on_tilts


class ImportParams(JobParams):
    pixel_size: float | None = Field(None, gt=0, description="Pixel size of tomograms, coordinates and tilt series [Å] (default: from the MRC headers).")
    voltage: float = Field(300.0, gt=0, description="Acceleration voltage [kV].")
    cs: float = Field(2.7, ge=0, description="Spherical aberration [mm].")
    amplitude_contrast: float = Field(0.07, ge=0, le=1, description="Amplitude contrast [fraction].")
    check_coordinates: bool = Field(True, description="Draw each tomogram's particles on its lowest- and highest-tilt image (PNG) to check axes and binning.")
    source: Literal["layout", "imod", "aretomo", "warp", "portal"] = Field(
        "layout", description="Where the tilt series come from: layout (Tomograms/<name>/ as the protocol arranges it), or "
                              "the folders of imod (etomo), aretomo or warp (WarpTools) in --source-dir, which become "
                              "Tomograms/<name>/ (stack and tomogram linked, .tlt and .order written, .coords copied); "
                              "or portal: CryoET Data Portal runs (OME-Zarr tomograms and .ndjson annotations, no tilt "
                              "series: see --tilt-range).")
    source_dir: str | None = Field(None, description="With --source imod|aretomo|warp|portal: the folder of one tilt "
                                                     "series (portal: run), or of one sub-folder per tilt series (run).")
    coords: str | None = Field(None, description="With --source imod|aretomo|warp: folder of <name>.coords files (e.g. "
                                                 "the coords/ of an import-particles job).")
    annotation: str = Field("*.ndjson", description="With --source portal: file-name pattern of the one annotation per "
                                                    "run to import.")
    tilt_range: list[float] | None = Field(None, description="With --source portal: MIN,MAX,STEP of the tilt series the "
                                                            "tomograms were made from [deg] (needed by prepare --skip-ctf; "
                                                            "write --tilt-range=-60,60,3).")
    dose_per_tilt: float | None = Field(None, gt=0, description="With --source portal and --tilt-range: dose of each "
                                                                "image [e/A^2] (dose-symmetric order assumed).")


def _check_portal(params: ImportParams, project: Path) -> list[PortalRun]:
    if not params.source_dir:
        raise SubtomoError("--source portal: give --source-dir, the folder of the Data Portal runs.")
    if (params.tilt_range is None) != (params.dose_per_tilt is None):
        raise SubtomoError("--source portal: give --tilt-range=MIN,MAX,STEP and --dose-per-tilt together (or neither).")
    if params.tilt_range is not None:
        dose_symmetric_tilts(params.tilt_range, params.dose_per_tilt or 0.0)  # checks the range
    runs = find_portal_runs(resolve_project_path(project, params.source_dir), params.pixel_size, params.annotation)
    for run in runs:
        if (project / "Tomograms" / run.name).exists():
            raise SubtomoError(f"Tomograms/{run.name}: exists; nothing in it is replaced. Remove it, or import that "
                               "run with --source layout.")
    return runs


def _check(params: ImportParams, project: Path) -> list[TomogramInputs] | list[SeriesPlan] | list[PortalRun]:
    if params.source == "layout":
        return scan_layout(project, params.pixel_size)
    if params.source == "portal":
        return _check_portal(params, project)
    if not params.source_dir or not params.coords:
        raise SubtomoError(f"--source {params.source}: give --source-dir (the tilt-series folders) and --coords (a folder "
                           "of <name>.coords, e.g. ImportParticles/jobNNN/coords).")
    plans = find_series(params.source, resolve_project_path(project, params.source_dir))
    for plan in plans:
        if (project / "Tomograms" / plan.name).exists():
            raise SubtomoError(f"Tomograms/{plan.name}: exists; nothing in it is replaced. Remove it, or import that "
                               "series with --source layout.")
        if not (resolve_project_path(project, params.coords) / f"{plan.name}.coords").is_file():
            raise SubtomoError(f"{params.coords}: no {plan.name}.coords. Import the picks first (subtomo import-particles) "
                               "and give its coords/ folder.")
    return plans


def tilt_table(t: TomogramInputs) -> pd.DataFrame:
    """Per-image table of one tilt series: image name, refined tilt, accumulated dose."""
    return pd.DataFrame({
        "rlnMicrographName": [f"{i + 1}@{t.tilt_series}" for i in range(len(t.tilts_deg))],
        "rlnTomoNominalStageTiltAngle": t.tilts_deg,
        "rlnMicrographPreExposure": t.dose_e_per_A2,
    })


def _run_portal(ctx: JobContext) -> None:
    """Data Portal runs: Tomograms/<name>/ (level linked, .coords, .tlt/.order when given), the table, particles.star."""
    p: ImportParams = ctx.params
    tilts = pre = None
    if p.tilt_range is not None and p.dose_per_tilt is not None:
        tilts, pre = dose_symmetric_tilts(p.tilt_range, p.dose_per_tilt)
    rows, picks = [], []
    for run in ctx.state:
        d = write_portal_layout(run, ctx.project / "Tomograms", tilts, pre)
        nx, ny, nz = run.size_xyz
        inside = ((run.picks.coords_px >= 0) & (run.picks.coords_px <= [nx - 1, ny - 1, nz - 1])).all(axis=1)
        ctx.log(f"{run.name}: {ctx.rel(d)} made; {nx}x{ny}x{nz} px at {run.pixel_size_A:.3f} A, {int(inside.sum())} "
                f"particles inside, {int((~inside).sum())} outside")
        for note in run.notes:
            ctx.log(f"{run.name}: {note}")
        row = {"rlnMicrographName": ctx.rel(d / f"{run.name}.zarr"), "rlnTomoName": run.name, "rlnTomoSizeX": nx,
               "rlnTomoSizeY": ny, "rlnTomoSizeZ": nz, "rlnTomoTiltSeriesPixelSize": run.pixel_size_A,
               "subtomoTomogramPixelSize": run.pixel_size_A, "rlnVoltage": p.voltage, "rlnSphericalAberration": p.cs,
               "rlnAmplitudeContrast": p.amplitude_contrast, "subtomoHasTrials": 0,
               "subtomoNumberOfParticles": len(run.picks)}
        if tilts is not None:
            row["rlnTomoTiltSeriesStarFile"] = ctx.rel(write_star(ctx.path(f"tilt_series/{run.name}.star"), {run.name: pd.DataFrame(
                {"rlnTomoNominalStageTiltAngle": tilts, "rlnMicrographPreExposure": pre})}))
        rows.append(row)
        picks.append(run.picks.to_particles(run.pixel_size_A).table.assign(subtomoTomogramPixelSize=run.pixel_size_A))
    if tilts is None:
        ctx.warn("no tilt angles (--tilt-range, --dose-per-tilt): prepare refuses these tomograms until they are "
                 "re-imported with them; subtomo ctf cannot run on portal tomograms (no tilt series): use prepare --skip-ctf")
    ctx.log("no tilt series: coordinates are not drawn on tilt images; subtomo ctf cannot run (use prepare --skip-ctf)")
    out = write_star(ctx.path("all_tomograms.star"), pd.DataFrame(rows))
    ctx.add_output(out, "TomogramGroupMetadata")
    table = pd.concat(picks, ignore_index=True)  # rlnTomoParticleId counts within each tomogram
    ParticleSet.from_table(table).write(ctx.path("particles.star"))
    ctx.add_output(ctx.path("particles.star"), "ParticlesData")
    ctx.log(f"wrote {ctx.rel(out)} ({len(rows)} tomograms) and {ctx.rel(ctx.path('particles.star'))} ({len(table)} "
            f"particles): subtomo prepare --skip-ctf --i {ctx.rel(out)} --particles {ctx.rel(ctx.path('particles.star'))}")


def _run(ctx: JobContext) -> None:
    p: ImportParams = ctx.params
    if p.source == "portal":
        _run_portal(ctx)
        return
    tomograms: list[TomogramInputs] = ctx.state
    geometry: dict[str, dict[str, float]] = {}
    if p.source != "layout":
        geometry = {plan.name: plan.geometry for plan in ctx.state}
        for plan in ctx.state:
            d = write_layout(plan, ctx.project / "Tomograms", resolve_project_path(ctx.project, p.coords) / f"{plan.name}.coords")
            ctx.log(f"{plan.name}: from {p.source}: {len(plan.tilts_deg)} tilts, dose {plan.pre_exposure.max():.1f} e/A^2 "
                    f"before the last image; {ctx.rel(d)} made")
            for note in plan.notes:
                ctx.log(f"{plan.name}: {note}")
            for warning in plan.warnings:
                ctx.warn(f"{plan.name}: {warning}")
        tomograms = scan_layout(ctx.project, p.pixel_size)
    rows: list[dict[str, Any]] = []
    for t in tomograms:
        ts_star = ctx.path(f"tilt_series/{t.name}.star")
        write_star(ts_star, {t.name: tilt_table(t)})
        nz, ny, nx = t.shape_zyx
        rows.append({
            "rlnMicrographName": str(t.tomogram), "rlnTomoName": t.name,
            "rlnTomoTiltSeriesName": str(t.tilt_series), "rlnTomoTiltSeriesStarFile": ctx.rel(ts_star),
            "rlnTomoSizeX": nx, "rlnTomoSizeY": ny, "rlnTomoSizeZ": nz,
            "rlnTomoTiltSeriesPixelSize": t.pixel_size_A, "subtomoTomogramPixelSize": t.pixel_size_A, "rlnVoltage": p.voltage,
            "rlnSphericalAberration": p.cs, "rlnAmplitudeContrast": p.amplitude_contrast,
            "subtomoHasTrials": int(t.trial is not None), "subtomoNumberOfParticles": len(t.coords_xyz),
            **geometry.get(t.name, {}),
        })
        ctx.log(f"{t.name}: {nx}x{ny}x{nz} px at {t.pixel_size_A:.3f} A, {len(t.tilts_deg)} tilts "
                f"({t.tilts_deg.min():.1f} to {t.tilts_deg.max():.1f} deg), {len(t.coords_xyz)} particles"
                + (", trials" if t.trial else ""))
        for note in t.notes:
            ctx.log(note)
        ctx.add_input(resolve_project_path(ctx.project, t.tomogram))
        if p.check_coordinates:
            placed = tomogram_geometry(rows[-1])  # IMOD's SHIFT / XAXISTILT: where the tilt images see the picks
            coords = t.coords_xyz if placed is None else imod_to_tilt_geometry(t.coords_xyz, (nx, ny, nz), *placed)
            png = plot_coordinates_on_tilts(resolve_project_path(ctx.project, t.tilt_series), t.tilts_deg, coords, (nx, ny, nz),
                                            t.pixel_size_A, ctx.path(f"coordinates/{t.name}.png"))
            ctx.log(f"{t.name}: particle positions drawn on tilt images: {ctx.rel(png)}")
    out = write_star(ctx.path("all_tomograms.star"), pd.DataFrame(rows))
    ctx.add_output(out, "TomogramGroupMetadata")
    ctx.log(f"wrote {ctx.rel(out)}: {len(rows)} tomograms, {sum(r['subtomoNumberOfParticles'] for r in rows)} particles")


SPEC = JobSpec(
    command="import", job_type="Import", params=ImportParams, run=_run, check=_check,
    summary="Steps 1-7: check Tomograms/<name>/ (.mrc .coords .mrcs .tlt .order [.trial]) and write all_tomograms.star.",
    outputs=(
        OutputSpec("all_tomograms.star", NodeType.TOMOGRAM_SET, "one row per tomogram with its inputs and optics"),
        OutputSpec("tilt_series/*.star", NodeType.FILE, "per-tilt table (angle, dose, order) of each tilt series"),
        OutputSpec("coordinates/*.png", NodeType.IMAGE, "picks drawn on the tilt images", optional=True),
        OutputSpec("particles.star", NodeType.PARTICLES, "--source portal: positions and orientations", optional=True),
    ),
)
