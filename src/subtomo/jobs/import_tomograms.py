"""``subtomo import`` (protocol Steps 1-7): validate the layout, write all_tomograms.star."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pandas as pd
from pydantic import Field

from subtomo.errors import SubtomoError
from subtomo.io.importers.tiltseries import SeriesPlan, find_series, write_layout
from subtomo.io.layout import TomogramInputs, scan_layout
from subtomo.io.particles import resolve_project_path
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
    source: Literal["layout", "imod", "aretomo", "warp"] = Field(
        "layout", description="Where the tilt series come from: layout (Tomograms/<name>/ as the protocol arranges it), or "
                              "the folders of imod (etomo), aretomo or warp (WarpTools) in --source-dir, which become "
                              "Tomograms/<name>/ (stack and tomogram linked, .tlt and .order written, .coords copied).")
    source_dir: str | None = Field(None, description="With --source imod|aretomo|warp: the folder of one tilt series, or "
                                                     "of one sub-folder per tilt series.")
    coords: str | None = Field(None, description="With --source imod|aretomo|warp: folder of <name>.coords files (e.g. "
                                                 "the coords/ of an import-particles job).")


def _check(params: ImportParams, project: Path) -> list[TomogramInputs] | list[SeriesPlan]:
    if params.source == "layout":
        return scan_layout(project, params.pixel_size)
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


def _run(ctx: JobContext) -> None:
    p: ImportParams = ctx.params
    tomograms: list[TomogramInputs] = ctx.state
    if p.source != "layout":
        for plan in ctx.state:
            d = write_layout(plan, ctx.project / "Tomograms", resolve_project_path(ctx.project, p.coords) / f"{plan.name}.coords")
            ctx.log(f"{plan.name}: from {p.source}: {len(plan.tilts_deg)} tilts, dose {plan.pre_exposure.max():.1f} e/A^2 "
                    f"before the last image; {ctx.rel(d)} made")
            for note in plan.notes:
                ctx.log(f"{plan.name}: {note}")
        tomograms = scan_layout(ctx.project, p.pixel_size)
    rows = []
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
        })
        ctx.log(f"{t.name}: {nx}x{ny}x{nz} px at {t.pixel_size_A:.3f} A, {len(t.tilts_deg)} tilts "
                f"({t.tilts_deg.min():.1f} to {t.tilts_deg.max():.1f} deg), {len(t.coords_xyz)} particles"
                + (", trials" if t.trial else ""))
        for note in t.notes:
            ctx.log(note)
        ctx.add_input(resolve_project_path(ctx.project, t.tomogram))
        if p.check_coordinates:
            png = plot_coordinates_on_tilts(resolve_project_path(ctx.project, t.tilt_series), t.tilts_deg, t.coords_xyz, (nx, ny, nz),
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
    ),
)
