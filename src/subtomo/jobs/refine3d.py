"""``subtomo refine3d`` (protocol Step 18): gold-standard 3D auto-refinement of subtomograms.

Input: particles STAR (default: the latest Select job's ``particles_selected.star`` (Step 21, a
3D class selection) or ``output_2Dto3D.star`` (Step 17), else the
latest Extract job's ``particles_subtomo.star``). Subtomograms are read from rlnImageName,
their 3D CTFs from ``subtomo.tomo.ctf3d.ParticleCtfModels``. Without ``--ref`` iteration
0 reconstructs the particles in random orientations (the protocol's de novo path).
Outputs RELION's run_itNNN_* and final run_* files (see ``subtomo.em.refine``).

De novo with a symmetry (``--sym`` other than C1, no ``--ref``) follows RELION's recommended
route by default (``--denovo-symmetry c1-then-align``): refine in C1 from random orientations
(all its files in ``c1_stage/``), put the C1 map's symmetry axes along the group's standard
axes (:func:`subtomo.em.symmetry_align.align_symmetry`, like relion_align_symmetry; written
as ``c1_stage/run_class001_symaligned.mrc``), then refine with the symmetry from that map
(the usual outputs in the job directory). A symmetric refinement from random orientations
(``direct``) can settle in a wrong self-consistent solution.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from subtomo.em.iteration import ParticleSource
from subtomo.em.refine import RefineOptions, auto_refine, oracle, split_halves
from subtomo.errors import SubtomoError
from subtomo.geometry.euler import euler_to_matrix, matrix_to_euler
from subtomo.io.mrc import read_mrc, write_mrc
from subtomo.io.star import read_particles, write_star
from subtomo.jobs.base import ComputeParams, JobContext, JobSpec, default_input


class StarParticleSource:
    """Subtomograms (rlnImageName .mrc) and their 3D CTFs, cached in memory after the first read."""

    def __init__(self, df: pd.DataFrame, project: Path, use_ctf: bool, cache_limit_bytes: int = 3 * 2 ** 30) -> None:
        self.df = df.reset_index(drop=True)
        self.project = Path(project)
        self.n = len(self.df)
        if "rlnImageName" not in self.df.columns:
            raise SubtomoError("particles STAR has no rlnImageName column: run subtomo extract first.")
        first, px = read_mrc(self._path(0))
        if first.ndim != 3 or len(set(first.shape)) != 1:
            raise SubtomoError(f"{self._path(0)}: subtomograms must be cubic 3D maps (got shape {first.shape}).")
        self.box = int(first.shape[0])
        col = next((c for c in ("rlnImagePixelSize", "rlnPixelSize") if c in self.df.columns), None)
        self.pixel_size_A = float(self.df[col].iloc[0]) if col else float(px)
        self._vols: dict[int, torch.Tensor] = {}
        self._ctfs: dict[int, torch.Tensor] = {}
        per = self.box ** 3 * 4 * 2
        self.cache = self.n * per <= cache_limit_bytes
        self.ctf_models = None
        if use_ctf:
            from subtomo.tomo.ctf3d import ParticleCtfModels

            self.ctf_models = ParticleCtfModels.from_particles(self.df, self.project)

    def _path(self, i: int) -> Path:
        name = str(self.df["rlnImageName"].iloc[i])
        name = name.split("@", 1)[1] if "@" in name else name
        p = Path(name)
        return p if p.is_absolute() else self.project / p

    def volumes(self, idx, device) -> torch.Tensor:
        out = []
        for i in np.asarray(idx):
            i = int(i)
            v = self._vols.get(i)
            if v is None:
                arr, _ = read_mrc(self._path(i))
                if arr.shape != (self.box,) * 3:
                    raise SubtomoError(f"{self._path(i)}: box {arr.shape} differs from the first subtomogram's {self.box}.")
                v = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
                if self.cache:
                    self._vols[i] = v
            out.append(v)
        return torch.stack(out).to(device)

    def ctf(self, idx, device):
        if self.ctf_models is None:
            return None
        idx = np.asarray(idx)
        missing = [int(i) for i in idx if int(i) not in self._ctfs]
        if missing:
            vols = self.ctf_models.volumes(missing, self.box, self.box, "cpu", pixel_size_A=self.pixel_size_A)
            for j, i in enumerate(missing):
                if self.cache:
                    self._ctfs[i] = vols[j]
            if not self.cache:
                got = dict(zip(missing, vols))
                return torch.stack([got[int(i)] for i in idx]).to(device)
        return torch.stack([self._ctfs[int(i)] for i in idx]).to(device)


def input_offsets_px(df: pd.DataFrame, pixel_size_A: float) -> np.ndarray:
    cols = [f"rlnOrigin{a}Angst" for a in "XYZ"]
    if all(c in df.columns for c in cols):
        return df[cols].to_numpy(dtype=np.float64) / pixel_size_A
    cols = [f"rlnOrigin{a}" for a in "XYZ"]
    if all(c in df.columns for c in cols):
        return df[cols].to_numpy(dtype=np.float64)
    return np.zeros((len(df), 3))


def input_rotations(df: pd.DataFrame) -> np.ndarray | None:
    cols = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
    if all(c in df.columns for c in cols):
        return euler_to_matrix(*(df[c].to_numpy(dtype=np.float64) for c in cols))
    return None


def load_reference(path: str, project: Path, box: int, pixel_size_A: float) -> torch.Tensor:
    p = Path(path) if Path(path).is_absolute() else project / path
    if not p.exists():
        raise SubtomoError(f"--ref {path}: file not found.")
    arr, px = read_mrc(p)
    if arr.shape != (box,) * 3:
        raise SubtomoError(f"--ref {path}: box {arr.shape} differs from the subtomograms' {box}^3. "
                           "Resample the map to the particle box and pixel size first.")
    if px > 0 and abs(px - pixel_size_A) / pixel_size_A > 0.01:
        raise SubtomoError(f"--ref {path}: pixel size {px:.3f} A differs from the particles' {pixel_size_A:.3f} A.")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


def load_mask(path: str | None, project: Path, box: int) -> torch.Tensor | None:
    if not path:
        return None
    p = Path(path) if Path(path).is_absolute() else project / path
    if not p.exists():
        raise SubtomoError(f"mask {path}: file not found.")
    arr, _ = read_mrc(p)
    if arr.shape != (box,) * 3:
        raise SubtomoError(f"mask {path}: box {arr.shape} differs from the subtomograms' {box}^3.")
    return torch.from_numpy(np.clip(np.ascontiguousarray(arr, dtype=np.float32), 0, 1))


def particles_input(ctx: JobContext, given: str | None) -> Path:
    try:
        return default_input(ctx.project, given, ("Select",), ("particles_selected.star", "output_2Dto3D.star"), "--i", "")
    except SubtomoError:
        if given:
            raise
    return default_input(ctx.project, given, ("Extract",), "particles_subtomo.star", "--i",
                         "Run subtomo extract (or select) first, or pass --i.")


class Refine3DParams(ComputeParams):
    i: str | None = Field(None, description="Particles STAR (default: particles_selected.star or output_2Dto3D.star of the latest Select job, else particles_subtomo.star of the latest Extract job).")
    ref: str | None = Field(None, description="Initial reference map (.mrc); none: start from a reconstruction in random orientations.")
    ini_high: float = Field(60.0, gt=0, description="Low-pass filter of the initial reference [Å].")
    ref_on_absolute_greyscale: bool = Field(False, description="The reference is on the particles' grey scale (else the first iteration uses normalised cross-correlation).")
    ref_ctf_corrected: bool = Field(True, description="The reference has been CTF-corrected.")
    ctf: bool = Field(True, description="Use the 3D CTF model (missing wedge, CTF, dose/tilt weights) of each particle.")
    particle_diameter: float = Field(..., gt=0, description="Particle diameter for the soft spherical mask [Å].")
    solvent_mask: str | None = Field(None, description="Solvent mask (.mrc, 0..1) applied to the references after each iteration.")
    healpix_step: float = Field(7.5, description="Initial (oversampled) angular sampling [deg]: 30, 15, 7.5, 3.75, 1.8.")
    offset_range: float = Field(3.0, ge=0, description="Initial translational search range [px] (subtomograms are centred on their picks; RELION's GUI default is 5, at 4x the cost of 3).")
    offset_step: float = Field(1.0, gt=0, description="Initial (oversampled) translational step [px].")
    sym: str = Field("C1", description="Point-group symmetry: C<n>, D<n>, T, O or I.")
    denovo_symmetry: Literal["c1-then-align", "direct"] = Field(
        "c1-then-align", description="De novo refinement (no --ref) with a symmetry: c1-then-align = RELION's route: "
        "refine in C1 (in c1_stage/), align the C1 map's symmetry axes with the standard frame, then refine with the "
        "symmetry from that map; direct = impose the symmetry from random orientations (can converge to a wrong "
        "self-consistent solution).")
    sym_align_lowpass: float = Field(0.0, ge=0, description="Low-pass of the C1 map for the symmetry-axis search of "
                                     "c1-then-align [Å]; 0: the C1 map's gold-standard resolution (at least 20 Å and 3 px).")
    auto_local_healpix_step: float = Field(3.7, description="Angular step from which searches become local [deg] (RELION's GUI default 1.8 makes the 3.75 deg step a global search, 8x the cost of 7.5 deg).")
    max_iter: int = Field(50, ge=1, description="Maximum number of iterations.")
    auto_ignore_angles: bool = Field(False, description="Count the poses as settled once the average Pmax is >= 0.8, whatever the orientation changes (like RELION's --auto_ignore_angles: pseudo-symmetric particles refined in C1 keep jumping between near-equivalent poses).")
    pad: int = Field(2, ge=1, le=3, description="Padding factor of the reference transforms.")
    batch_size: int = Field(32, ge=1, description="Particles per batch.")
    oracle: str | None = Field(None, description="Ground-truth picks.star: also reconstruct with the true poses (the ceiling) and report it.")
    continue_job: str | None = Field(None, description="Job directory to continue from its last finished iteration.")


def order_for_step(step_deg: float) -> int:
    """HEALPix coarse order whose oversampled step (half the coarse) is closest to ``step_deg``."""
    from subtomo.em.healpix import angular_step_deg

    return int(min(range(0, 8), key=lambda o: abs(np.log(angular_step_deg(o) / 2 / step_deg))))


def _run(ctx: JobContext) -> None:
    p: Refine3DParams = ctx.params
    star = particles_input(ctx, p.i)
    ctx.add_input(star)
    df, optics = read_particles(star)
    src = StarParticleSource(df, ctx.project, p.ctf)
    ctx.log(f"{len(df)} particles from {ctx.rel(star)}; box {src.box}, {src.pixel_size_A:.3f} A/px; CTF {'on' if p.ctf else 'off'}")
    ref = load_reference(p.ref, ctx.project, src.box, src.pixel_size_A) if p.ref else None
    opts = RefineOptions(
        particle_diameter_A=p.particle_diameter, healpix_order=order_for_step(p.healpix_step),
        offset_range_px=p.offset_range, offset_step_px=2 * p.offset_step, sym=p.sym,
        auto_local_order=order_for_step(p.auto_local_healpix_step), max_iter=p.max_iter,
        auto_ignore_angles=p.auto_ignore_angles, ini_high_A=p.ini_high,
        firstiter_cc=bool(ref is not None and not p.ref_on_absolute_greyscale), ref_ctf_corrected=p.ref_ctf_corrected,
        pad=p.pad, batch_size=p.batch_size, use_ctf=p.ctf, seed=p.seed,
        solvent_mask=load_mask(p.solvent_mask, ctx.project, src.box))
    halves = split_halves(df, len(df), p.seed)
    particles = df.drop(columns=[c for c in (optics.columns if optics is not None else [])
                                 if c in df.columns and c not in ("rlnOpticsGroup",)])
    offsets = input_offsets_px(df, src.pixel_size_A)
    initial_rot = None
    if ref is None and p.sym.strip().upper() != "C1" and p.denovo_symmetry == "c1-then-align":
        ref, initial_rot, offsets, halves = _c1_then_align(ctx, src, opts, particles, optics, offsets, halves)
        opts = replace(opts, firstiter_cc=False)  # the aligned C1 map is on the particles' grey scale
        ctx.log(f"stage 2: refinement with {p.sym} symmetry from the aligned C1 map (low-pass {p.ini_high:.0f} A)")
    res = auto_refine(src, opts, ctx.dir, particles=particles,
                      optics=optics, initial_ref=ref, initial_rot=initial_rot, initial_offset_px=offsets,
                      halves=halves, device=ctx.device, log=ctx.log, continue_run=bool(p.continue_job))
    for name, node in (("run_class001.mrc", "DensityMap"), ("run_half1_class001_unfil.mrc", "DensityMap"),
                       ("run_half2_class001_unfil.mrc", "DensityMap"), ("run_data.star", "ParticlesData"),
                       ("run_model.star", "File")):
        ctx.add_output(ctx.path(name), node)
    ctx.log(f"final resolution (gold-standard FSC 0.143): {res['resolution_A']:.2f} A after {res['iterations']} iterations "
            f"({res['seconds']:.0f} s)")
    if p.oracle:
        truth = oracle_poses(df, p.oracle, ctx.project, src.pixel_size_A)
        orc = oracle(src, truth[0], truth[1], res["halves"], use_ctf=p.ctf, sym=p.sym,
                     diameter_A=p.particle_diameter, device=ctx.device, batch_size=p.batch_size)
        ctx.log(f"oracle (true poses) resolution: {orc['resolution_A']:.2f} A; ratio refined/oracle "
                f"{res['resolution_A'] / orc['resolution_A']:.3f}")
        oracle_map = write_mrc(ctx.path("oracle_class001.mrc"), orc["map"].numpy(), src.pixel_size_A)
        ctx.add_output(oracle_map, "DensityMap")
        out = write_star(ctx.path("oracle.star"), {"oracle": {
            "rlnFinalResolution": float(orc["resolution_A"]), "subtomoRefinedResolution": float(res["resolution_A"]),
            "subtomoRefinedOverOracle": float(res["resolution_A"] / orc["resolution_A"]), "subtomoGroundTruth": p.oracle}})
        ctx.add_output(out, "File")


def _c1_then_align(ctx: JobContext, src: StarParticleSource, opts: RefineOptions, particles: pd.DataFrame,
                   optics: pd.DataFrame | None, offsets: np.ndarray, halves: np.ndarray):
    """Stage 1 (C1 refinement in c1_stage/) and the symmetry alignment of its map.

    Returns the aligned map (stage 2's reference), the C1 poses and origins moved into the
    aligned frame (pose A R^T, origin o + A shift) and the halves of stage 1.
    """
    from subtomo.em.symmetry_align import align_symmetry

    p: Refine3DParams = ctx.params
    c1_dir = ctx.dir / "c1_stage"
    px = src.pixel_size_A
    done = (c1_dir / "run_class001.mrc").exists() and (c1_dir / "run_data.star").exists()
    if p.continue_job and done:
        ctx.log("stage 1 (C1) finished earlier: using c1_stage/run_class001.mrc and run_data.star")
        vol, _ = read_mrc(c1_dir / "run_class001.mrc")
        final_map = torch.from_numpy(np.ascontiguousarray(vol, dtype=np.float32))
        data, _ = read_particles(c1_dir / "run_data.star")
        if len(data) != src.n:
            raise SubtomoError(f"{ctx.rel(c1_dir / 'run_data.star')}: {len(data)} particles, the input has {src.n}. "
                               "Continue with the same --i, or start a new job.")
        rot = input_rotations(data)
        off = input_offsets_px(data, px)
        halves = data["rlnRandomSubset"].to_numpy().astype(int)
        from subtomo.em.refine import fsc_threshold_shell
        from subtomo.io.star import read_star_table

        fsc = read_star_table(c1_dir / "run_model.star", "model_class_1")["rlnGoldStandardFsc"].to_numpy(dtype=np.float64)
        res_A = src.box * px / max(fsc_threshold_shell(torch.from_numpy(fsc.copy()), 0.143), 1)
    else:
        ctx.log(f"stage 1: refinement in C1 from random orientations (c1_stage/), then alignment of the {p.sym} axes")
        # poses of a symmetric particle refined in C1 keep jumping between equivalent ones: count them as
        # settled once Pmax is high (RELION's --auto_ignore_angles)
        res1 = auto_refine(src, replace(opts, sym="C1", auto_ignore_angles=True), c1_dir, particles=particles, optics=optics,
                           initial_offset_px=offsets, halves=halves, device=ctx.device,
                           log=lambda m: ctx.log(f"[C1] {m}"), continue_run=bool(p.continue_job))
        final_map, rot, off, halves = res1["final_map"], res1["poses"].rot, res1["poses"].offset_px, res1["halves"]
        res_A = float(res1["resolution_A"])
        ctx.log(f"stage 1 (C1): gold-standard resolution {res_A:.2f} A after {res1['iterations']} iterations "
                f"({res1['seconds']:.0f} s)")
    t0 = time.time()
    lp = p.sym_align_lowpass or max(res_A, 20.0, 3 * px)
    al = align_symmetry(final_map.to(ctx.device), p.sym, px, lowpass_A=lp)
    out = write_mrc(c1_dir / "run_class001_symaligned.mrc", al.volume.cpu().numpy(), px)
    ctx.add_output(out, "DensityMap")
    ang = matrix_to_euler(al.rotation[None])[0]
    ctx.log(f"symmetry alignment ({p.sym}, low-pass {lp:.1f} A, {al.coarse_candidates} coarse candidates, "
            f"{time.time() - t0:.1f} s): score {al.score:.3f} (correlation with the {p.sym}-symmetrised map), rotation "
            f"(rot, tilt, psi) = ({ang[0]:.1f}, {ang[1]:.1f}, {ang[2]:.1f}) deg, shift ({al.shift_px[0]:.2f}, "
            f"{al.shift_px[1]:.2f}, {al.shift_px[2]:.2f}) px -> {ctx.rel(out)}")
    if al.score < 0.8:
        ctx.warn(f"the C1 map is not clearly {p.sym}-symmetric (score {al.score:.3f} < 0.8): check --sym, or use a "
                 "better C1 map.")
    new_rot = np.einsum("nij,kj->nik", np.asarray(rot), al.rotation)  # A R^T
    new_off = np.asarray(off) + np.einsum("nij,j->ni", np.asarray(rot), al.shift_px)  # o + A shift
    return al.volume.cpu(), new_rot, new_off, np.asarray(halves)


def oracle_poses(df: pd.DataFrame, truth_star: str, project: Path, pixel_size_A: float) -> tuple[np.ndarray, np.ndarray]:
    """True rotations and origins (px) of the particles from the simulator's picks.star.

    Rows are matched by rlnTomoName + rlnTomoParticleId. The true origin follows from the
    true centre: particle centre = box centre - origin, and extraction put floor(coordinate)
    at the box centre, so origin = floor(coordinate) - true centre (+ the extraction origin
    already in the STAR file accounts for the fractional part of the picked coordinate).
    """
    from subtomo.io.star import read_star_table

    path = Path(truth_star) if Path(truth_star).is_absolute() else project / truth_star
    gt = read_star_table(path)
    key = ["rlnTomoName", "rlnTomoParticleId"]
    m = df[key + ["rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ"]].merge(
        gt[key + ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ"]],
        on=key, how="left", suffixes=("", "_true"))
    if m["rlnAngleRot"].isna().any():
        raise SubtomoError(f"--oracle {truth_star}: {int(m['rlnAngleRot'].isna().sum())} particles have no ground-truth row.")
    rot = euler_to_matrix(m["rlnAngleRot"].to_numpy(), m["rlnAngleTilt"].to_numpy(), m["rlnAnglePsi"].to_numpy())
    picked = np.floor(m[["rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ"]].to_numpy(dtype=np.float64))
    true_c = m[["rlnCoordinateX_true", "rlnCoordinateY_true", "rlnCoordinateZ_true"]].to_numpy(dtype=np.float64)
    return rot, picked - true_c


SPEC = JobSpec(
    command="refine3d", job_type="Refine3D", params=Refine3DParams, run=_run,
    summary="Step 18: gold-standard 3D auto-refinement (de novo from random orientations or from --ref).",
)
