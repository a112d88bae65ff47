"""``subtomo extract`` (protocol Steps 13-14): subtomograms and their z-projections.

Input: a particle STAR (default: the latest Prepare job's ``particles_subtomo.star``).
Each particle is cut from its tomogram (memory-mapped; only the box's slab is read) so
that voxel floor(coordinate) is the box centre N//2, the fractional part going to
``rlnOriginX/Y/ZAngst``; contrast is inverted by default (cryo-ET tomograms show protein
dark; the output has the particle white); voxels outside the tomogram are filled with
noise of the background statistics (``subtomoBoxCrossesEdge`` = 1); the box is optionally
Fourier-rescaled, then normalised (background outside the sphere: mean 0, stdev 1).
Output: ``Particles/Tomograms/<t>/<t>NNNNNN.mrc`` and ``particles_subtomo.star``; with
``--project`` also a z-projection stack ``<t>_proj2d.mrcs`` per tomogram and
``subtomo_proj2d.star`` (Step 14).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import Field

from subtomo.em.parallel import map_tasks
from subtomo.errors import SubtomoError
from subtomo.io.mrc import read_mrc_header, write_mrc
from subtomo.io.particles import ParticleSet, path_component, resolve_project_path
from subtomo.jobs._cluster import check_cluster, open_runner
from subtomo.jobs.base import ComputeParams, JobContext, JobSpec
from subtomo.jobs.contracts import NodeType, OutputSpec, Source, particles_spec
from subtomo.tomo.ctf3d import check_ctf_volumes
from subtomo.tomo.ctf_models import tomogram_pixel_size_A
from subtomo.tomo.extract import (
    ExtractionSettings,
    TomogramBoxes,
    TomogramBoxReader,
    default_bg_radius_A,
    extract_tomogram,
    max_bg_radius_A,
)

EDGE_COLUMN = "subtomoBoxCrossesEdge"


class ExtractParams(ComputeParams):
    i: str | None = Field(None, description="Input particle STAR (default: particles_subtomo.star of the latest Prepare job).")
    box: int = Field(..., ge=8, description="Particle box size in the tomogram, even (150-200% of the longest particle dimension) [px].")
    bg_diameter: float | None = Field(None, gt=0, description="Diameter of the sphere outside which the background mean and "
                                                              "stdev are computed, slightly larger than the particle "
                                                              "(default: 75% of the box) [Å].")
    invert_contrast: bool = Field(True, description="Invert the contrast (default on: particles are black in cryo-ET "
                                                    "tomograms; the subtomograms get white particles). Use "
                                                    "--no-invert-contrast if the particles are already white.")
    normalise: bool = Field(True, description="Normalise each box: background mean 0, stdev 1.")
    rescale: int | None = Field(None, ge=8, description="Rescale the boxes to this size by Fourier cropping/padding (even); "
                                                        "the pixel size changes by box/rescale [px].")
    project: bool = Field(False, description="Step 14: also write 2D projections of the boxes along z (one .mrcs per "
                                             "tomogram) and subtomo_proj2d.star.")


def _check(params: ExtractParams, project: Path):
    problems = []
    if params.box % 2:
        problems.append(f"--box {params.box}: must be even (the box centre is index N/2).")
    if params.rescale is not None and params.rescale % 2:
        problems.append(f"--rescale {params.rescale}: must be even.")
    if problems:
        raise SubtomoError("invalid extraction options", problems)
    check_cluster(params, project)
    star = SPEC.input("i").resolve(project, params.i)
    particle_set = ParticleSet.read(star, project)
    particles, optics = particle_set.merged(), particle_set.optics
    need = {"rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ"}
    if missing := need - set(particles.columns):
        raise SubtomoError(f"{star}: missing column(s) {', '.join(sorted(missing))}. Give the particles_subtomo.star of subtomo prepare.")
    if particles.empty:
        raise SubtomoError(f"{star}: contains no particles.")
    pixel = {}
    if "rlnTomoName" in particles.columns:  # subtomograms are written to Subtomograms/<rlnTomoName>/
        for tomo_name in particles["rlnTomoName"].unique():
            path_component(tomo_name, "rlnTomoName", star)
    for name, rows in particles.groupby("rlnMicrographName", sort=False):
        tomo = resolve_project_path(project, str(name), source=star, row=int(rows.index[0]) + 1, column="rlnMicrographName")
        if not tomo.exists():
            problems.append(f"{tomo}: tomogram not found (rlnMicrographName of {len(rows)} particle(s) in {star}).")
            continue
        # the tomogram's pixel size (one rule, shared with prepare): subtomoTomogramPixelSize, else its header
        pixel[name] = tomogram_pixel_size_A(rows.iloc[0], tomo)
        if params.box > min(shape := read_mrc_header(tomo)[0]):  # every box would cross the tomogram's edge
            problems.append(f"--box {params.box}: larger than the tomogram {name} ({' x '.join(map(str, shape[::-1]))} px, "
                            "x y z). Use a smaller --box (1.5-2 x the particle's size in tomogram pixels).")
    if problems:
        raise SubtomoError(f"{star}: cannot extract", problems)
    out_box = params.rescale or params.box
    for px in pixel.values():
        out_px = px * params.box / out_box
        if params.bg_diameter is not None and params.bg_diameter / 2 >= max_bg_radius_A(out_box, out_px):
            raise SubtomoError(f"--bg-diameter {params.bg_diameter:g} A: must be smaller than the box ({out_box} px x "
                               f"{out_px:.3f} A = {out_box * out_px:.1f} A) so that background voxels remain. Use a larger "
                               f"--box or a smaller diameter.")
    check_ctf_volumes(particle_set, out_box, next(iter(pixel.values())) * params.box / out_box)  # RELION volumes fit?
    return star, particles, optics, pixel


def _tomogram_tasks(ctx: JobContext, particles: pd.DataFrame, pixel: dict, star: Path) -> list[tuple[str, np.ndarray, TomogramBoxes]]:
    """One task per tomogram: (tomogram name, its rows in ``particles``, what to extract), in input order."""
    p: ExtractParams = ctx.params
    tomo_of = particles["rlnMicrographName"].astype(str).to_numpy()
    coords = particles[["rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ"]].to_numpy(float)
    out = []
    for k, name in enumerate(dict.fromkeys(tomo_of)):
        sel = np.nonzero(tomo_of == name)[0]
        rows, px = particles.iloc[sel], pixel[name]
        tname = str(rows["rlnTomoName"].iloc[0]) if "rlnTomoName" in rows else Path(name).stem
        ids = rows["rlnTomoParticleId"].astype(int).to_numpy() if "rlnTomoParticleId" in rows else np.arange(1, len(sel) + 1)
        out_px = px * p.box / (p.rescale or p.box)
        bg_radius = p.bg_diameter / 2 if p.bg_diameter else default_bg_radius_A(p.rescale or p.box, out_px)
        settings = ExtractionSettings(box=p.box, bg_radius_A=bg_radius, pixel_size_A=px, invert=p.invert_contrast,
                                      normalise=p.normalise, new_box=p.rescale, project=p.project, device=ctx.device)
        path = resolve_project_path(ctx.project, name)
        with TomogramBoxReader(path) as reader:  # the header only (memory-mapped)
            header_px = reader.pixel_size_A
        if abs(header_px - px) > 1e-3 * px and header_px not in (0.0, 1.0):
            ctx.warn(f"{name}: header pixel size {header_px:.4f} A differs from {px:.4f} A in {ctx.rel(star)}; "
                     f"using {px:.4f} A.")
        out.append((tname, sel, TomogramBoxes(path, coords[sel], [f"{tname}{i:06d}.mrc" for i in ids],
                                              ctx.path(f"Particles/Tomograms/{tname}"), settings, (p.seed, k))))
    return out


def _run(ctx: JobContext) -> None:
    p: ExtractParams = ctx.params
    star, particles, optics, pixel = ctx.state
    ctx.add_input(star)
    particles = particles.reset_index(drop=True).copy()
    out_box = p.rescale or p.box
    ctx.log(f"input {ctx.rel(star)}: {len(particles)} particles in {len(pixel)} tomogram(s); box {p.box} px"
            + (f" rescaled to {out_box} px" if p.rescale else "")
            + f"; contrast {'inverted' if p.invert_contrast else 'kept'}; "
            + ("normalised" if p.normalise else "not normalised") + (", z-projections" if p.project else ""))
    n = len(particles)
    image_names, proj_names = [""] * n, [""] * n
    origins, edge, keep, out_px = np.zeros((n, 3)), np.zeros(n, dtype=int), np.zeros(n, dtype=bool), np.zeros(n)
    tasks = _tomogram_tasks(ctx, particles, pixel, star)
    with open_runner(ctx) as runner:  # --cluster: one task per tomogram (None: here, with per-particle progress)
        if runner is None:
            done = [extract_tomogram(t, ctx.progress) for _, _, t in tasks]
        else:
            # a worker uses its own (pinned) GPU: the device type, not this process's device index
            remote = [replace(t, settings=replace(t.settings, device=ctx.device.type)) for _, _, t in tasks]
            done = map_tasks(runner, extract_tomogram, remote, (), lambda it: ctx.progress(it, None, "tomograms extracted"))
    for (tname, sel, task), res in zip(tasks, done):
        made = [j for j, path in enumerate(res.paths) if path is not None]
        for j in made:
            image_names[sel[j]] = ctx.rel(res.paths[j])
        keep[sel[made]], origins[sel], edge[sel] = True, res.origins_A, res.crosses_edge
        out_px[sel] = task.settings.out_pixel_size_A
        if p.project and made:
            stack = write_mrc(ctx.path(f"Particles/Tomograms/{tname}/{tname}_proj2d.mrcs"),
                              np.stack([res.projections[j] for j in made]), task.settings.out_pixel_size_A, stack=True)
            for k, j in enumerate(made, start=1):
                proj_names[sel[j]] = f"{k:06d}@{ctx.rel(stack)}"
        n_empty = len(sel) - len(made)
        ctx.log(f"{tname}: {len(made)} subtomograms, {int(res.crosses_edge[made].sum())} crossing the tomogram edge "
                "(filled with background noise)" + (f"; {n_empty} skipped: box entirely outside the tomogram" if n_empty else ""))
        if n_empty:
            ctx.warn(f"{tname}: {n_empty} particle(s) lie entirely outside the tomogram and were not extracted; "
                     f"check the .coords file.")
    if not keep.any():
        raise SubtomoError(f"{ctx.rel(star)}: no particle box overlaps its tomogram. Check the coordinates (pixels, IMOD origin).")
    particles["rlnImageName"] = image_names
    particles["rlnOriginXAngst"], particles["rlnOriginYAngst"], particles["rlnOriginZAngst"] = origins.T
    particles[EDGE_COLUMN] = edge
    kept = particles[keep].reset_index(drop=True)
    kept_px = pd.Series(out_px[keep])
    new_optics = _output_optics(kept, optics, kept_px, out_box, dim=3)
    out = ParticleSet.from_table(kept, new_optics, ctx.project).write(ctx.path("particles_subtomo.star"))
    ctx.add_output(out, "ParticlesData")
    ctx.log(f"wrote {ctx.rel(out)}: {len(kept)} subtomograms of {out_box} px at {kept_px.iloc[0]:.4f} A/px")
    if p.project:
        cols = ["rlnMicrographName", "rlnTomoName", "rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ",
                "rlnTomoParticleId", "rlnOriginXAngst", "rlnOriginYAngst", EDGE_COLUMN, "rlnOpticsGroup"]
        proj = kept[[c for c in cols if c in kept.columns]].copy()
        proj.insert(0, "rlnImageOriginalName", kept["rlnImageName"].to_numpy())
        proj.insert(0, "rlnImageName", np.asarray(proj_names, dtype=object)[keep])
        opt2 = _output_optics(proj, optics, kept_px, out_box, dim=2)
        out2 = ParticleSet.from_table(proj, opt2, ctx.project).write(ctx.path("subtomo_proj2d.star"))
        ctx.add_output(out2, "ParticlesData")
        ctx.log(f"wrote {ctx.rel(out2)}: {len(proj)} z-projections")


def _output_optics(particles: pd.DataFrame, optics: pd.DataFrame | None, out_px: pd.Series, out_box: int,
                   dim: int) -> pd.DataFrame:
    """Optics table of the output: the input's groups with the new image size, pixel size and dimensionality."""
    if "rlnOpticsGroup" not in particles.columns:
        particles["rlnOpticsGroup"] = 1
    groups = particles["rlnOpticsGroup"].astype(int)
    rows = []
    for g in sorted(groups.unique()):
        base = {}
        if optics is not None and "rlnOpticsGroup" in optics.columns:
            match = optics[optics["rlnOpticsGroup"].astype(int) == g]
            if len(match):
                base = match.iloc[0].to_dict()
        else:
            first = particles[groups == g].iloc[0]
            base = {c: first[c] for c in ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast") if c in particles}
        pxs = out_px[groups.to_numpy() == g].unique()
        if len(pxs) > 1:
            raise SubtomoError(f"optics group {g} holds tomograms of different pixel sizes ({', '.join(f'{v:.4f}' for v in pxs)}); "
                               f"re-run subtomo prepare so that each pixel size has its own optics group.")
        base.update({"rlnOpticsGroup": int(g), "rlnOpticsGroupName": base.get("rlnOpticsGroupName", f"opticsGroup{g}"),
                     "rlnImagePixelSize": float(pxs[0]), "rlnImageSize": int(out_box), "rlnImageDimensionality": dim})
        rows.append(base)
    return pd.DataFrame(rows)


SPEC = JobSpec(
    command="extract", job_type="Extract", params=ExtractParams, run=_run, check=_check,
    summary="Steps 13-14: cut normalised subtomograms (and z-projections) from the tomograms; particles_subtomo.star.",
    inputs=(particles_spec("i", (Source("Prepare", ("particles_subtomo.star",)),), "Run subtomo prepare first, or pass --i."),),
    outputs=(
        OutputSpec("particles_subtomo.star", NodeType.PARTICLES, "the extracted subtomograms (rlnImageName)"),
        OutputSpec("subtomo_proj2d.star", NodeType.PARTICLES, "their z-projections (--project)", optional=True),
    ),
)
