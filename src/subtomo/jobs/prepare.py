"""``subtomo prepare`` (protocol Steps 9, 11, 12): per-particle 3D CTF models.

For every particle of every tomogram and every tilt image: the position-dependent defocus
(U and V shifted alike, :mod:`subtomo.tomo.defocus`), the dose B-factor
(``--bfactor-per-dose`` × accumulated dose) and the scale factor cos θ. These compact
parameters are written per tomogram to ``CtfModels/<t>_ctf.star`` (one row per particle per
tilt) and referenced by ``rlnCtfImage = NNNNNN@CtfModels/<t>_ctf.star``; later jobs build
the 3D CTF volumes on the fly (:class:`subtomo.tomo.ctf3d.ParticleCtfModels`), so no
``do_all_reconstruct_ctfs.sh`` is needed. ``--export-relion BOX`` also writes RELION-style
``rlnCtfImage`` volumes and a particle STAR that points at them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from subtomo.errors import SubtomoError
from subtomo.io.mrc import read_mrc_header, write_mrc
from subtomo.io.star import read_star_table, write_particles, write_star
from subtomo.io.text import match_order_to_tilts, read_coords, read_order, read_tlt
from subtomo.jobs.base import ComputeParams, JobContext, JobSpec, default_input
from subtomo.tomo.ctf3d import CTF_GENERAL_BLOCK, CTF_TABLE_BLOCK, ctf3d_from_tilts, to_relion_cube
from subtomo.tomo.defocus import particle_defocus_A

FAILED_COLUMN = "subtomoCtfFitFailed"
SKIP_COLUMN = "subtomoSkipCtf"


class PrepareParams(ComputeParams):
    i: str | None = Field(None, description="Input tomogram STAR: ctf_tomograms.star of a CtfFind job (default: the latest), "
                                            "or all_tomograms.star with --skip-ctf.")
    skip_ctf: bool = Field(False, description="No CTF correction (e.g. phase-plate data, Table 1): the 3D model is 1 inside the "
                                              "sampled wedge, weighted by tilt scale and dose only.")
    bfactor_per_dose: float = Field(4.0, ge=0, description="Dose-dependent B-factor per accumulated dose [Å² per e⁻/Å²].")
    defocus_model: Literal["exact", "relion"] = Field(
        "exact", description="Position-dependent defocus: exact geometry (D − h), or relion (first-order D + x_img sin θ "
                             "of relion_prepare_subtomograms.py).")
    use_lower_tilt_defoci: bool = Field(False, description="Step 11: give every tilt with |θ| above --lower-tilt-limit the "
                                                           "mean defocus of the tilts below it.")
    lower_tilt_limit: float = Field(30.0, gt=0, description="Tilt limit for --use-lower-tilt-defoci [deg].")
    export_relion: int | None = Field(None, gt=0, description="Also write RELION rlnCtfImage volumes (centred N³ cubes) of "
                                                              "this box size [px] and particles_subtomo_relion.star.")
    plot_box: int = Field(96, gt=0, description="Box size of the PNG of one particle's 3D CTF model [px].")


@dataclass
class TomoCtf:
    """Per-tilt inputs of one tomogram."""

    name: str
    tomogram: str  # project-relative path
    size_xyz: tuple[int, int, int]
    pixel_size_A: float
    voltage_kV: float
    cs_mm: float
    amplitude_contrast: float
    skip_ctf: bool
    tilts_deg: np.ndarray
    dose: np.ndarray
    defocus_u_A: np.ndarray
    defocus_v_A: np.ndarray
    defocus_angle_deg: np.ndarray
    coords_px: np.ndarray
    notes: list[str]


def _resolve(project: Path, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else project / p


def _input_path(params: PrepareParams, project: Path) -> Path:
    if params.i or not params.skip_ctf:
        return default_input(project, params.i, ("CtfFind",), "ctf_tomograms.star", "--i",
                             "Run subtomo ctf first, or pass --i all_tomograms.star with --skip-ctf.")
    try:
        return default_input(project, None, ("CtfFind",), "ctf_tomograms.star", "--i", "")
    except SubtomoError:
        return default_input(project, None, ("Import",), "all_tomograms.star", "--i",
                             "Run subtomo import first, or pass --i.")


def _tilt_inputs(project: Path, row: pd.Series, tomo: Path, star: Path, skip: bool) -> tuple[pd.DataFrame, str]:
    """Per-image table (tilt, dose[, defocus]) of one tomogram and where it came from."""
    if "rlnCtfFindResultsStar" in row and isinstance(row["rlnCtfFindResultsStar"], str):
        path = _resolve(project, row["rlnCtfFindResultsStar"])
        return read_star_table(path), str(path)
    if not skip:
        raise SubtomoError(f"{star}: has no rlnCtfFindResultsStar column, so there are no CTF estimates for {row.get('rlnTomoName', tomo)}. "
                           f"Fix: run subtomo ctf and give its ctf_tomograms.star, or add --skip-ctf for data without CTF correction.")
    if "rlnTomoTiltSeriesStarFile" in row and isinstance(row["rlnTomoTiltSeriesStarFile"], str):
        path = _resolve(project, row["rlnTomoTiltSeriesStarFile"])
        return read_star_table(path), str(path)
    tlt, order = tomo.with_suffix(".tlt"), tomo.with_suffix(".order")
    tilts = read_tlt(tlt)
    dose, _ = match_order_to_tilts(tilts, read_order(order))
    return pd.DataFrame({"rlnTomoNominalStageTiltAngle": tilts, "rlnMicrographPreExposure": dose}), f"{tlt} and {order}"


def _lower_tilt(tilts: np.ndarray, du: np.ndarray, dv: np.ndarray, ang: np.ndarray, limit: float) -> tuple[np.ndarray, ...]:
    """Step 11 (PY16 rule): tilts with |θ| > L get the mean defocus of tilts with |θ| < L."""
    low = np.abs(tilts) < limit
    if not low.any():
        raise SubtomoError(f"--use-lower-tilt-defoci: no tilt below --lower-tilt-limit {limit} deg. Raise the limit.")
    high = np.abs(tilts) > limit
    du, dv, ang = du.copy(), dv.copy(), ang.copy()
    du[high], dv[high] = du[low].mean(), dv[low].mean()
    ang[high] = ang[low][np.argmin(np.abs(tilts[low]))]
    return du, dv, ang


def _read_tomograms(params: PrepareParams, project: Path, star: Path) -> list[TomoCtf]:
    table = read_star_table(star)
    if "rlnMicrographName" not in table.columns:
        raise SubtomoError(f"{star}: no rlnMicrographName column (the tomogram of each row). Give the all_tomograms.star of "
                           f"subtomo import or the ctf_tomograms.star of subtomo ctf.")
    out: list[TomoCtf] = []
    problems: list[str] = []
    for _, row in table.iterrows():
        tomo = _resolve(project, str(row["rlnMicrographName"]))
        name = str(row["rlnTomoName"]) if "rlnTomoName" in row else tomo.stem
        notes: list[str] = []
        n_problems = len(problems)
        try:
            if {"rlnTomoSizeX", "rlnTomoSizeY", "rlnTomoSizeZ"} <= set(row.index):
                size = (int(row["rlnTomoSizeX"]), int(row["rlnTomoSizeY"]), int(row["rlnTomoSizeZ"]))
                px = float(row["rlnTomoTiltSeriesPixelSize"]) if "rlnTomoTiltSeriesPixelSize" in row else read_mrc_header(tomo)[1]
            else:
                (nz, ny, nx), px = read_mrc_header(tomo)
                size = (nx, ny, nz)
                if "rlnTomoTiltSeriesPixelSize" in row:
                    px = float(row["rlnTomoTiltSeriesPixelSize"])
            coords = read_coords(tomo.with_suffix(".coords"))
            tilt_table, source = _tilt_inputs(project, row, tomo, star, params.skip_ctf)
        except SubtomoError as exc:
            problems.extend(exc.problems or [str(exc)])
            continue
        for col in ("rlnTomoNominalStageTiltAngle", "rlnMicrographPreExposure"):
            if col not in tilt_table.columns:
                problems.append(f"{source}: no {col} column. Fix: re-run subtomo import / subtomo ctf.")
        if len(problems) > n_problems:
            continue
        tilts = tilt_table["rlnTomoNominalStageTiltAngle"].to_numpy(float)
        dose = tilt_table["rlnMicrographPreExposure"].to_numpy(float)
        skip = bool(params.skip_ctf)
        if not skip and SKIP_COLUMN in row and int(row[SKIP_COLUMN]):
            skip = True
            notes.append(f"{name}: {star.name} marks this tomogram {SKIP_COLUMN} = 1: wedge-only model (no CTF).")
        if not skip:
            if "rlnDefocusU" not in tilt_table.columns:
                problems.append(f"{source}: no rlnDefocusU column. Fix: run subtomo ctf, or add --skip-ctf.")
                continue
            du = tilt_table["rlnDefocusU"].to_numpy(float)
            dv = tilt_table["rlnDefocusV"].to_numpy(float) if "rlnDefocusV" in tilt_table else du.copy()
            ang = tilt_table["rlnDefocusAngle"].to_numpy(float) if "rlnDefocusAngle" in tilt_table else np.zeros_like(du)
            if np.all(du == 0) and np.all(dv == 0):
                skip = True
                notes.append(f"{name}: every defocus in {source} is 0 (CTF estimation skipped): wedge-only model (no CTF).")
            elif SKIP_COLUMN in tilt_table and (tilt_table[SKIP_COLUMN].astype(int) > 0).all():
                skip = True
                notes.append(f"{name}: {source} marks CTF estimation as skipped: wedge-only model (no CTF).")
        if skip:
            du = dv = ang = np.zeros_like(tilts)
        else:
            if FAILED_COLUMN in tilt_table.columns:
                failed = tilt_table[FAILED_COLUMN].astype(int).to_numpy() > 0
                if failed.all():
                    problems.append(f"{source}: the CTF fit failed for every image of {name}. Fix: re-run subtomo ctf with other "
                                    f"parameters (Step 10), or use --skip-ctf.")
                    continue
                if failed.any():
                    mean_u, mean_v = du[~failed].mean(), dv[~failed].mean()
                    du, dv, ang = du.copy(), dv.copy(), ang.copy()
                    du[failed], dv[failed] = mean_u, mean_v
                    notes.append(f"{name}: CTF fit failed for {failed.sum()} image(s) (tilts "
                                 f"{', '.join(f'{t:.1f}' for t in tilts[failed])}); they get the mean defocus of the "
                                 f"successful fits ({(mean_u + mean_v) / 2:.0f} Å). Consider Step 11 options or re-running subtomo ctf.")
            if params.use_lower_tilt_defoci:
                du, dv, ang = _lower_tilt(tilts, du, dv, ang, params.lower_tilt_limit)
        out.append(TomoCtf(
            name=name, tomogram=str(row["rlnMicrographName"]), size_xyz=size, pixel_size_A=px,
            voltage_kV=float(row.get("rlnVoltage", 300.0)), cs_mm=float(row.get("rlnSphericalAberration", 2.7)),
            amplitude_contrast=float(row.get("rlnAmplitudeContrast", 0.07)), skip_ctf=skip, tilts_deg=tilts,
            dose=dose, defocus_u_A=du, defocus_v_A=dv, defocus_angle_deg=ang, coords_px=coords, notes=notes))
    if problems:
        raise SubtomoError(f"{star}: cannot prepare the CTF models; nothing was written", problems)
    if not out:
        raise SubtomoError(f"{star}: lists no tomograms.")
    return out


def ctf_table(t: TomoCtf, bfactor_per_dose: float, model: str) -> pd.DataFrame:
    """The compact CTF table of one tomogram: one row per particle per tilt."""
    n_p, n_t = len(t.coords_px), len(t.tilts_deg)
    if t.skip_ctf:
        du = dv = np.zeros((n_p, n_t))
    else:
        du = particle_defocus_A(t.defocus_u_A, t.tilts_deg, t.coords_px, t.size_xyz, t.pixel_size_A, model)
        dv = particle_defocus_A(t.defocus_v_A, t.tilts_deg, t.coords_px, t.size_xyz, t.pixel_size_A, model)
    rep = lambda a: np.tile(np.asarray(a, dtype=np.float64), n_p)  # noqa: E731  per-tilt value for every particle
    return pd.DataFrame({
        "rlnTomoParticleId": np.repeat(np.arange(1, n_p + 1), n_t),
        "rlnTomoNominalStageTiltAngle": rep(t.tilts_deg),
        "rlnDefocusU": du.reshape(-1),
        "rlnDefocusV": dv.reshape(-1),
        "rlnDefocusAngle": rep(t.defocus_angle_deg),
        "rlnCtfBfactor": rep(bfactor_per_dose * t.dose),
        "rlnCtfScalefactor": rep(np.cos(np.deg2rad(t.tilts_deg))),
        "rlnMicrographPreExposure": rep(t.dose),
    })


def general_block(t: TomoCtf, model: str) -> dict:
    return {
        "rlnTomoName": t.name, "rlnVoltage": t.voltage_kV, "rlnSphericalAberration": t.cs_mm,
        "rlnAmplitudeContrast": t.amplitude_contrast, "rlnTomoTiltSeriesPixelSize": t.pixel_size_A,
        "rlnTomoSizeX": t.size_xyz[0], "rlnTomoSizeY": t.size_xyz[1], "rlnTomoSizeZ": t.size_xyz[2],
        SKIP_COLUMN: int(t.skip_ctf), "subtomoDefocusModel": model,
    }


def _particle_volumes(t: TomoCtf, table: pd.DataFrame, ids: np.ndarray, box: int, device, weighted: bool = True) -> torch.Tensor:
    """Internal-layout 3D CTFs (len(ids), box, box, box//2+1) of particles ``ids`` (1-based) of one tomogram."""
    n_t = len(t.tilts_deg)
    sel = table.set_index("rlnTomoParticleId").loc[ids]
    get = lambda c: sel[c].to_numpy(float).reshape(len(ids), n_t)  # noqa: E731
    b = get("rlnCtfBfactor") if weighted else np.zeros((len(ids), n_t))
    s = get("rlnCtfScalefactor") if weighted else np.ones((len(ids), n_t))
    return ctf3d_from_tilts(get("rlnDefocusU"), get("rlnTomoNominalStageTiltAngle"), b, s, box, t.pixel_size_A,
                            t.voltage_kV, t.cs_mm, t.amplitude_contrast, skip_ctf=t.skip_ctf, device=device,
                            defocus_v_A=get("rlnDefocusV"), astig_angle_deg=get("rlnDefocusAngle"))


def relion_ctf_star(t: TomoCtf, rows: pd.DataFrame) -> pd.DataFrame:
    """RELION per-particle CTF STAR (one line per tilt), usable with relion_reconstruct --reconstruct_ctf.

    Our tilt-θ image fills the plane with normal n = (−sin θ, 0, cos θ) and in-plane x axis
    (cos θ, 0, sin θ). RELION inserts an image with Euler angles (rot, tilt, psi) at Aᵀ(x, y, 0);
    for (0, t, 0) that plane has normal (sin t, 0, cos t) and x axis (cos t, 0, −sin t)
    (relion-internals §2.2), so our tilt θ is RELION's (0, −θ, 0).
    """
    skip = t.skip_ctf
    return pd.DataFrame({
        "rlnDefocusU": rows["rlnDefocusU"].to_numpy(float),
        "rlnDefocusV": rows["rlnDefocusV"].to_numpy(float),
        "rlnDefocusAngle": rows["rlnDefocusAngle"].to_numpy(float),
        "rlnVoltage": t.voltage_kV,
        "rlnSphericalAberration": 0.0 if skip else t.cs_mm,
        "rlnAmplitudeContrast": 1.0 if skip else t.amplitude_contrast,
        "rlnAngleRot": 0.0,
        "rlnAngleTilt": -rows["rlnTomoNominalStageTiltAngle"].to_numpy(float),
        "rlnAnglePsi": 0.0,
        "rlnCtfBfactor": rows["rlnCtfBfactor"].to_numpy(float),
        "rlnCtfScalefactor": rows["rlnCtfScalefactor"].to_numpy(float),
    })


def _optics(tomos: list[TomoCtf]) -> tuple[pd.DataFrame, dict[str, int]]:
    keys: dict[tuple, int] = {}
    group_of: dict[str, int] = {}
    for t in tomos:
        k = (t.voltage_kV, t.cs_mm, t.amplitude_contrast, round(t.pixel_size_A, 6))
        group_of[t.name] = keys.setdefault(k, len(keys) + 1)
    optics = pd.DataFrame([{
        "rlnOpticsGroup": g, "rlnOpticsGroupName": f"opticsGroup{g}", "rlnVoltage": k[0], "rlnSphericalAberration": k[1],
        "rlnAmplitudeContrast": k[2], "rlnImagePixelSize": k[3], "rlnImageDimensionality": 3,
    } for k, g in keys.items()])
    return optics, group_of


def _check(params: PrepareParams, project: Path):
    if params.export_relion is not None and params.export_relion % 2:
        raise SubtomoError(f"--export-relion {params.export_relion}: the box size must be even (as the subtomograms' box).")
    star = _input_path(params, project)
    return star, _read_tomograms(params, project, star)


def _run(ctx: JobContext) -> None:
    p: PrepareParams = ctx.params
    star, tomos = ctx.state
    ctx.add_input(star)
    ctx.log(f"input {ctx.rel(star)}: {len(tomos)} tomogram(s); defocus model {p.defocus_model}, "
            f"B = {p.bfactor_per_dose:g} A^2 per e/A^2 x accumulated dose, scale = cos(tilt)")
    optics, group_of = _optics(tomos)
    particle_rows = []
    tables: dict[str, pd.DataFrame] = {}
    for t in tomos:
        for note in t.notes:
            if "failed" in note:
                ctx.warn(note)
            else:
                ctx.log(note)
        table = ctf_table(t, p.bfactor_per_dose, p.defocus_model)
        tables[t.name] = table
        path = write_star(ctx.path(f"CtfModels/{t.name}_ctf.star"), {CTF_GENERAL_BLOCK: general_block(t, p.defocus_model),
                                                                      CTF_TABLE_BLOCK: table})
        ctx.add_output(path, "TomogramCtfModels")
        rel = ctx.rel(path)
        n = len(t.coords_px)
        for i, (x, y, z) in enumerate(t.coords_px, start=1):
            particle_rows.append({
                "rlnMicrographName": t.tomogram, "rlnTomoName": t.name,
                "rlnCoordinateX": x, "rlnCoordinateY": y, "rlnCoordinateZ": z, "rlnTomoParticleId": i,
                "rlnImageName": f"Particles/Tomograms/{t.name}/{t.name}{i:06d}.mrc",
                "rlnCtfImage": f"{i:06d}@{rel}", "rlnTomoTiltSeriesPixelSize": t.pixel_size_A,
                "rlnOpticsGroup": group_of[t.name],
            })
        dz = table["rlnDefocusU"].to_numpy().reshape(n, -1) - (0 if t.skip_ctf else t.defocus_u_A[None, :])
        ctx.log(f"{t.name}: {n} particles x {len(t.tilts_deg)} tilts ({t.tilts_deg.min():.1f} to {t.tilts_deg.max():.1f} deg, "
                f"dose {t.dose.min():.1f}-{t.dose.max():.1f} e/A^2)"
                + (", wedge-only (no CTF)" if t.skip_ctf else
                   f", defocus {t.defocus_u_A.min():.0f}-{t.defocus_u_A.max():.0f} A, position offsets "
                   f"{dz.min() if n else 0:.0f} to {dz.max() if n else 0:.0f} A"))
    if not particle_rows:
        raise SubtomoError(f"{ctx.rel(star)}: the .coords files list no particles. Step 3: pick particles first.")
    particles = pd.DataFrame(particle_rows)
    out = write_particles(ctx.path("particles_subtomo.star"), particles, optics)
    ctx.add_output(out, "ParticlesData")
    ctx.log(f"wrote {ctx.rel(out)}: {len(particles)} particles; CTF models in {ctx.rel(ctx.path('CtfModels'))}/")

    # picture of the first particle's model (Fig. 2a,b)
    from subtomo.plot.ctf3d import plot_ctf3d_slices

    t0 = next(t for t in tomos if len(t.coords_px))
    box = p.export_relion or p.plot_box
    box += box % 2
    ids = np.array([1])
    w = to_relion_cube(_particle_volumes(t0, tables[t0.name], ids, box, ctx.device, weighted=True))[0].cpu().numpy()
    u = to_relion_cube(_particle_volumes(t0, tables[t0.name], ids, box, ctx.device, weighted=False))[0].cpu().numpy()
    png = plot_ctf3d_slices(u, w, ctx.path("ctf3d_particle.png"), t0.pixel_size_A,
                            title=f"3D CTF model of {t0.name} particle 1 (box {box})")
    ctx.add_output(png, "Image")

    if p.export_relion:
        _export_relion(ctx, tomos, tables, particles, optics, p.export_relion)


def _export_relion(ctx: JobContext, tomos: list[TomoCtf], tables: dict[str, pd.DataFrame], particles: pd.DataFrame,
                   optics: pd.DataFrame, box: int) -> None:
    """RELION rlnCtfImage volumes: float32 N³, DC at N/2, Friedel-symmetric, pixel size in the header."""
    chunk = max(1, int(2 ** 24 // (box * box * (box // 2 + 1))))
    work = [(t, ids[i:i + chunk]) for t in tomos
            for ids in [np.arange(1, len(t.coords_px) + 1)] for i in range(0, len(ids), chunk)]
    ctf_names: dict[tuple[str, int], str] = {}
    for t, ids in ctx.progress(work, description=f"RELION 3D CTF volumes (box {box})"):
        table = tables[t.name]
        cubes = to_relion_cube(_particle_volumes(t, table, ids, box, ctx.device)).cpu().numpy()
        for pid, cube in zip(ids, cubes):
            root = ctx.path(f"Particles/Tomograms/{t.name}/{t.name}_ctf{pid:06d}")
            write_mrc(root.with_suffix(".mrc"), cube, t.pixel_size_A)
            write_star(root.with_suffix(".star"), {"images": relion_ctf_star(t, table[table["rlnTomoParticleId"] == pid])})
            ctf_names[(t.name, int(pid))] = ctx.rel(root.with_suffix(".mrc"))
    rel = particles.copy()
    rel["rlnCtfImage"] = [ctf_names[(n, int(i))] for n, i in zip(rel["rlnTomoName"], rel["rlnTomoParticleId"])]
    opt = optics.copy()
    opt["rlnImageSize"] = box
    out = write_particles(ctx.path("particles_subtomo_relion.star"), rel, opt)
    ctx.add_output(out, "ParticlesData")
    ctx.log(f"wrote {len(rel)} RELION 3D CTF volumes (box {box}) and {ctx.rel(out)}")


SPEC = JobSpec(
    command="prepare", job_type="Prepare", params=PrepareParams, run=_run, check=_check,
    summary="Steps 9, 11, 12: per-particle 3D CTF models (position-dependent defocus, dose B-factor, tilt scale) "
            "and particles_subtomo.star.",
)
