"""``subtomo class3d`` (protocol Steps 19-22, 25): 3D and focused classification of subtomograms.

Input: particles STAR (default with --local or --skip-align: the latest Refine3D run_data.star,
whose poses the search starts from; otherwise as refine3d: the latest Select output_2Dto3D.star,
else the latest Extract particles_subtomo.star). Options follow RELION's names (--K, --iter,
--tau2-fudge, default T = 4 as in the protocol's Step 19).
Writes run_itNNN_class00K.mrc, run_itNNN_model.star, run_itNNN_data.star and a PNG of
central slices of all classes.
"""

from __future__ import annotations

from pydantic import Field

from subtomo.em.classify import ClassifyOptions, classify3d
from subtomo.io.star import read_particles
from subtomo.jobs.base import ComputeParams, JobContext, JobSpec, default_input
from subtomo.jobs.refine3d import (StarParticleSource, input_offsets_px, input_rotations, load_mask, load_reference,
                                   order_for_step, particles_input)


class Class3DParams(ComputeParams):
    i: str | None = Field(None, description="Particles STAR (default with --local/--skip-align: the latest Refine3D run_data.star; else the latest Select output_2Dto3D.star, else the latest Extract particles_subtomo.star).")
    ref: str | None = Field(None, description="Reference map (.mrc); none: references from random subsets.")
    ini_high: float = Field(60.0, gt=0, description="Low-pass filter of the initial reference [Å].")
    K: int = Field(4, ge=1, description="Number of classes (protocol: typically 3-10).")
    tau2_fudge: float = Field(4.0, gt=0, description="Regularisation parameter T; RELION's 3D default is 4.")
    iter: int = Field(25, ge=1, description="Number of iterations.")
    ctf: bool = Field(True, description="Use the 3D CTF model (missing wedge and CTF) of each particle.")
    particle_diameter: float = Field(..., gt=0, description="Particle diameter for the soft spherical mask [Å].")
    solvent_mask: str | None = Field(None, description="Solvent mask (.mrc) applied to the references.")
    focus_mask: str | None = Field(None, description="Focused classification: mask white only over the region of interest, used in the E-step.")
    healpix_step: float = Field(7.5, description="Angular sampling (oversampled) [deg].")
    offset_range: float = Field(5.0, ge=0, description="Translational search range [px].")
    offset_step: float = Field(1.0, gt=0, description="Translational step (oversampled) [px].")
    local: bool = Field(False, description="Local angular searches around the input poses.")
    sigma_ang: float = Field(5.0, gt=0, description="Width of the Gaussian prior of local searches [deg].")
    skip_align: bool = Field(False, description="Keep the input poses fixed; classify only.")
    sym: str = Field("C1", description="Point-group symmetry.")
    pad: int = Field(2, ge=1, le=3, description="Padding factor of the reference transforms.")
    batch_size: int = Field(16, ge=1, description="Particles per batch.")
    continue_job: str | None = Field(None, description="Job directory to continue from its last finished iteration.")


def _run(ctx: JobContext) -> None:
    p: Class3DParams = ctx.params
    if p.local or p.skip_align:  # searches start from refined poses (Step 25)
        star = default_input(ctx.project, p.i, ("Refine3D",), "run_data.star", "--i",
                             "--local/--skip-align start from refined poses: run subtomo refine3d first, or pass --i.")
    else:
        star = particles_input(ctx, p.i)
    ctx.add_input(star)
    df, optics = read_particles(star)
    src = StarParticleSource(df, ctx.project, p.ctf)
    rot = input_rotations(df)
    if (p.skip_align or p.local) and rot is None:
        from subtomo.errors import SubtomoError

        raise SubtomoError(f"{star}: --skip-align/--local need input poses (rlnAngleRot/Tilt/Psi); give a refine3d run_data.star.")
    ref = load_reference(p.ref, ctx.project, src.box, src.pixel_size_A) if p.ref else None
    opts = ClassifyOptions(
        n_classes=p.K, particle_diameter_A=p.particle_diameter, n_iter=p.iter, tau2_fudge=p.tau2_fudge,
        healpix_order=order_for_step(p.healpix_step), offset_range_px=p.offset_range, offset_step_px=2 * p.offset_step,
        sym=p.sym, local=p.local, sigma_ang_deg=p.sigma_ang, skip_align=p.skip_align, ini_high_A=p.ini_high,
        pad=p.pad, batch_size=p.batch_size, use_ctf=p.ctf, seed=p.seed,
        focus_mask=load_mask(p.focus_mask, ctx.project, src.box), solvent_mask=load_mask(p.solvent_mask, ctx.project, src.box))
    keep = [c for c in df.columns if optics is None or c not in optics.columns or c == "rlnOpticsGroup"]
    res = classify3d(src, opts, ctx.dir, particles=df[keep], optics=optics, initial_ref=ref, initial_rot=rot,
                     initial_offset_px=input_offsets_px(df, src.pixel_size_A), device=ctx.device, log=ctx.log,
                     continue_run=bool(p.continue_job))
    it = res["iterations"]
    for k in range(p.K):
        ctx.add_output(ctx.path(f"run_it{it:03d}_class{k + 1:03d}.mrc"), "DensityMap")
    ctx.add_output(ctx.path(f"run_it{it:03d}_data.star"), "ParticlesData")
    ctx.add_output(ctx.path(f"run_it{it:03d}_model.star"), "File")
    ctx.log("class distribution: " + ", ".join(f"{k + 1}: {v:.3f}" for k, v in enumerate(res["class_priors"].tolist())))


SPEC = JobSpec(
    command="class3d", job_type="Class3D", params=Class3DParams, run=_run,
    summary="Steps 19-22, 25: 3D classification (K classes, T = 4), focused classification with a mask and --skip-align.",
)
