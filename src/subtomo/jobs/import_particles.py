"""``subtomo import-particles``: picks and orientations from other programs into a particles STAR.

Formats (one reader each in :mod:`subtomo.io.importers`, whose docstrings state the
programs' conventions): Dynamo ``.tbl`` (+ ``.vll``), STOPGAP motive lists, pytom-match-pick
candidate STARs, CSV/whitespace tables, CryoET Data Portal ``.ndjson`` point annotations.
Positions are converted to our convention (first voxel = 0) and to the tomograms' pixel
size; orientations to RELION angles, also written as priors (``rlnAngle*Prior``).

Outputs: ``particles.star`` (rlnTomoName, rlnCoordinateX/Y/Z [px at the tomograms' pixel
size], angles and priors when given) and ``coords/<tomo>.coords`` (the protocol's Step-3
coordinate files, to copy into ``Tomograms/<tomo>/`` for ``subtomo import``/``prepare``).
The log reports per tomogram how many picks lie inside and outside the tomogram.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from subtomo.errors import SubtomoError
from subtomo.io.importers.picks import Picks
from subtomo.io.mrc import read_tomogram_header
from subtomo.io.particles import path_component, resolve_project_path
from subtomo.io.text import write_text_rows
from subtomo.jobs.base import JobContext, JobParams, JobSpec
from subtomo.jobs.contracts import NodeType, OutputSpec

Format = Literal["dynamo", "stopgap", "pytom", "csv", "ndjson"]


class ImportParticlesParams(JobParams):
    i: list[str] = Field(..., description="Input file(s): a Dynamo .tbl, STOPGAP motive list .star, pytom-match-pick "
                                          "*_particles.star, CSV, or Data Portal .ndjson (one file per tomogram for csv/ndjson).")
    format: Format = Field(..., description="Format of the input: dynamo, stopgap, pytom, csv or ndjson.")
    tomo_names: list[str] | None = Field(None, description="Tomogram names: of tomogram 1, 2, ... (dynamo, stopgap) or of "
                                                           "each input file (csv, ndjson). Default: the .vll (dynamo), a "
                                                           "csv 'tomo' column, or the directories of Tomograms/ in order.")
    vll: str | None = Field(None, description="Dynamo volume list (.vll): line i is the tomogram of number i.")
    coords_pixel_size: float | None = Field(None, gt=0, description="Pixel size the input positions are given at [Å] "
                                            "(default: the file's own, Dynamo apix or pytom rlnDetectorPixelSize; else "
                                            "the tomograms').")
    pixel_size: float | None = Field(None, gt=0, description="Pixel size of the tomograms the particles go to [Å] "
                                     "(default: the header of Tomograms/<name>/<name>.mrc; else --coords-pixel-size).")
    origin: float = Field(0.0, description="csv: coordinate of the first voxel's centre in the file (0: numpy, napari, "
                                           "ours; 1: MATLAB programs).")
    tomo_size: list[int] | None = Field(None, description="pytom RELION-5 mode: tomogram size NX,NY,NZ [px] when "
                                                          "Tomograms/<name>/<name>.mrc is absent.")
    tomograms_star: str | None = Field(None, description="pytom RELION-5 mode: RELION 5's tomograms.star, whose "
                                                         "tomogram sizes place the centred coordinates.")


def _tomogram_dirs(project: Path) -> list[str]:
    root = project / "Tomograms"
    return sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []


def _header(project: Path, name: str) -> tuple[tuple[int, int, int], float] | None:
    mrc = project / "Tomograms" / name / f"{name}.mrc"
    if not mrc.is_file():
        mrc = mrc.with_suffix(".zarr")  # an OME-Zarr tomogram
        if not mrc.is_dir():
            return None
    shape, px = read_tomogram_header(mrc)
    return (int(shape[-1]), int(shape[-2]), int(shape[-3])), float(px)


def _names_per_file(params: ImportParticlesParams, project: Path) -> list[str | None]:
    if params.tomo_names:
        if len(params.tomo_names) != len(params.i):
            raise SubtomoError(f"--tomo-names: {len(params.tomo_names)} names for {len(params.i)} input files. "
                               "Give one tomogram name per input file.")
        return list(params.tomo_names)
    dirs = _tomogram_dirs(project)
    return [dirs[0] if len(dirs) == 1 else None for _ in params.i]


def _read(params: ImportParticlesParams, project: Path) -> Picks:
    from subtomo.io.importers import csv_points, dynamo, portal, pytom, stopgap

    files = [resolve_project_path(project, f) for f in params.i]
    numbered = {i + 1: n for i, n in enumerate(params.tomo_names or _tomogram_dirs(project))}
    parts: list[Picks] = []
    if params.format in ("dynamo", "stopgap"):
        if params.vll:
            numbered = dynamo.read_volume_list(resolve_project_path(project, params.vll))
        reader = dynamo.read_dynamo_table if params.format == "dynamo" else stopgap.read_stopgap_motl
        parts = [reader(f, numbered) for f in files]
    elif params.format == "pytom":
        sizes = {n: h[0] for n in _tomogram_dirs(project) if (h := _header(project, n)) is not None}
        default = None
        if params.tomo_size:
            if len(params.tomo_size) != 3:
                raise SubtomoError(f"--tomo-size {params.tomo_size}: give three numbers NX,NY,NZ [px].")
            default = (params.tomo_size[0], params.tomo_size[1], params.tomo_size[2])
        extents = (pytom.relion5_tomogram_extents_A(resolve_project_path(project, params.tomograms_star))
                   if params.tomograms_star else None)
        parts = [pytom.read_pytom_candidates(f, sizes, default, extents) for f in files]
    else:
        for f, name in zip(files, _names_per_file(params, project)):
            if params.format == "csv":
                parts.append(csv_points.read_csv_points(f, name or f.stem, params.origin))
            else:
                parts.append(portal.read_portal_ndjson(f, name or f.stem))
    return _concat(parts)


def _concat(parts: list[Picks]) -> Picks:
    rot = [p.rotations for p in parts]
    px = {p.pixel_size_A for p in parts}

    def cat(values: list[np.ndarray | None]) -> np.ndarray | None:
        return None if any(v is None for v in values) else np.concatenate(values)  # type: ignore[arg-type]

    return Picks(tomo=np.concatenate([p.tomo for p in parts]), coords_px=np.concatenate([p.coords_px for p in parts]),
                 rotations=cat(rot), scores=cat([p.scores for p in parts]), halves=cat([p.halves for p in parts]),
                 classes=cat([p.classes for p in parts]), pixel_size_A=px.pop() if len(px) == 1 else None)


def _check(params: ImportParticlesParams, project: Path):
    picks = _read(params, project)
    for name in sorted(set(picks.tomo.tolist())):
        path_component(name, "tomogram name", params.i[0])
    headers = {n: _header(project, n) for n in sorted(set(picks.tomo.tolist()))}
    source_px = params.coords_pixel_size or picks.pixel_size_A
    target_px = params.pixel_size or next((h[1] for h in headers.values() if h is not None and h[1] > 0), None)
    target_px = target_px or source_px
    source_px = source_px or target_px  # None only when no pixel size is known anywhere
    if source_px and target_px and abs(source_px / target_px - 1) > 1e-4:
        picks = picks.scaled(source_px / target_px, target_px)
    return picks, target_px, headers, source_px


def _draw(ctx: JobContext, name: str, coords: np.ndarray, header: tuple[tuple[int, int, int], float]) -> None:
    """The coordinate checker, when the layout has the tilt series and its angles."""
    from subtomo.io.text import read_tlt
    from subtomo.plot.coordinates import plot_coordinates_on_tilts

    d = ctx.project / "Tomograms" / name
    stack, tlt = d / f"{name}.mrcs", d / f"{name}.tlt"
    if stack.is_file() and tlt.is_file():
        png = plot_coordinates_on_tilts(stack, read_tlt(tlt), coords, header[0], header[1] or 1.0,
                                        ctx.path(f"coordinates/{name}.png"))
        ctx.log(f"{name}: particle positions drawn on tilt images: {ctx.rel(png)}")


def _run(ctx: JobContext) -> None:
    p: ImportParticlesParams = ctx.params
    picks, pixel_size, headers, source_px = ctx.state
    for f in p.i:
        ctx.add_input(resolve_project_path(ctx.project, f))
    if source_px and pixel_size and abs(source_px / pixel_size - 1) > 1e-4:
        ctx.log(f"positions scaled by {source_px / pixel_size:.4f} (from {source_px:.3f} to {pixel_size:.3f} A pixels)")
    ctx.path("coords").mkdir(exist_ok=True)
    for name in sorted(set(picks.tomo.tolist())):
        sel = picks.tomo == name
        coords = picks.coords_px[sel]
        write_text_rows(ctx.path(f"coords/{name}.coords"), coords, fmt="%.3f")
        header = headers.get(name)
        if header is None:
            ctx.log(f"{name}: {int(sel.sum())} particles (no Tomograms/{name}/{name}.mrc to check them against)")
            continue
        size = np.asarray(header[0], np.float64)
        inside = np.all((coords >= 0) & (coords <= size - 1), axis=1)
        ctx.log(f"{name}: {int(sel.sum())} particles, {int(inside.sum())} inside the {'x'.join(str(int(s)) for s in size)} "
                f"tomogram, {int((~inside).sum())} outside")
        if (~inside).any():
            ctx.warn(f"{name}: {int((~inside).sum())} particles lie outside the tomogram: check --coords-pixel-size, "
                     "--pixel-size and --origin")
        _draw(ctx, name, coords, header)
    particles = picks.to_particles(pixel_size)
    particles.write(ctx.path("particles.star"))
    ctx.log(f"wrote {ctx.rel(ctx.path('particles.star'))}: {len(particles)} particles"
            + (", orientations as angles and priors" if picks.rotations is not None else ", no orientations"))
    ctx.add_declared_outputs()


SPEC = JobSpec(
    command="import-particles", job_type="ImportParticles", params=ImportParticlesParams, run=_run, check=_check,
    summary="Picks and orientations from Dynamo, STOPGAP, pytom-match-pick, CSV or the CryoET Data Portal into a "
            "particles STAR and .coords files.",
    outputs=(
        OutputSpec("particles.star", NodeType.PARTICLES, "positions [px], angles and priors, rlnTomoName"),
        OutputSpec("coords/*.coords", NodeType.COORDINATES, "per-tomogram coordinates for Tomograms/<name>/"),
        OutputSpec("coordinates/*.png", NodeType.IMAGE, "picks drawn on the tilt images", optional=True),
    ),
)
