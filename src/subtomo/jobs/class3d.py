"""``subtomo class3d`` (protocol Steps 19-22, 25): 3D and focused classification of subtomograms.

Input: particles STAR (default with --local or --skip-align: the latest Refine3D run_data.star,
whose poses the search starts from; otherwise as refine3d: the latest Select output_2Dto3D.star,
else the latest Extract particles_subtomo.star). Options follow RELION's names (--K, --iter,
--tau2-fudge, default T = 4 as in the protocol's Step 19).
Writes run_itNNN_class00K.mrc, run_itNNN_model.star, run_itNNN_data.star and a PNG of
central slices of all classes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from subtomo.em.classify import ClassifyOptions, ClassifyState, classify3d
from subtomo.em.sampling import children_per_axis, order_for_step
from subtomo.errors import SubtomoError
from subtomo.io.particles import ParticleSet
from subtomo.jobs._cluster import DaskRunner, check_cluster, open_runner
from subtomo.jobs._em_runs import ClassifyFiles, check_symmetry, resume_state
from subtomo.jobs._inputs import load_map, load_mask
from subtomo.jobs.base import ComputeParams, JobContext, JobSpec
from subtomo.jobs.contracts import SELECTED_OR_EXTRACTED, InputSpec, NodeType, OutputSpec, Source, particles_spec
from subtomo.tomo.particle_source import SubtomogramSource

# --class-choice -> ClassifyOptions.significant_per_class (None: decided from the sampling and the box)
_CLASS_CHOICE = {"auto": None, "per-class": True, "joint": False}

INPUT_REFINED = particles_spec("i", (Source("Refine3D", ("run_data.star",)),),
                               "--local/--skip-align start from refined poses: run subtomo refine3d first, or pass --i.",
                               when="--local or --skip-align")


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
    healpix_step: float = Field(7.5, gt=0, le=60, description="Angular sampling (oversampled) [deg]; for global searches 7.5 or finer (see the summary above).")
    offset_range: float = Field(5.0, ge=0, description="Translational search range [px].")
    offset_step: float = Field(1.0, gt=0, description="Translational step (oversampled) [px].")
    offset_through_centre: bool = Field(True, description="Fine translations 3 per axis through each particle's current offset, so converged particles stay in place (--no-offset-through-centre: RELION's 2 per axis at +-step/4, never the current offset).")
    class_choice: Literal["auto", "per-class", "joint"] = Field("auto", description="Where the class is decided (issue 22). per-class: each class's most probable coarse poses go to the fine pass, which decides; joint: RELION's choice over all classes in the coarse pass (up to K times faster). A pass whose angular step is too coarse for the resolution it compares at favours blurred classes, and a spare class fills up. auto: per-class when the fine step resolves the box (7.5 deg on a 32-40 px box), else joint (15 deg on 40 px).")
    local: bool = Field(False, description="Local angular searches around the input poses.")
    sigma_ang: float = Field(5.0, gt=0, description="Width of the Gaussian prior of local searches [deg].")
    skip_align: bool = Field(False, description="Keep the input poses fixed; classify only.")
    sym: str = Field("C1", description="Point-group symmetry.")
    pad: int = Field(2, ge=1, le=3, description="Padding factor of the reference transforms.")
    batch_size: int = Field(16, ge=1, description="Particles per batch.")
    max_memory_gb: float = Field(3.0, gt=0, description="Memory a global-search pass may hold for the projected references [GB]; above it, groups of particles share each chunk of projections (same results, particles read twice).")
    continue_job: str | None = Field(None, description="Job directory to continue from its last finished iteration (a finished job: a new job, given a larger --iter).")


def _check(p: Class3DParams, project: Path) -> dict:
    """Inputs read and checked before the job directory is made (a bad input leaves nothing behind)."""
    check_cluster(p, project)
    check_symmetry(p.sym)
    star = (INPUT_REFINED if p.local or p.skip_align else SPEC.input("i")).resolve(project, p.i)
    particles = ParticleSet.read(star, project)
    particles.check_image_files()  # missing, truncated or mixed boxes: refused here
    src = SubtomogramSource(particles, p.ctf)
    rot = particles.rotations()
    if (p.skip_align or p.local) and rot is None:
        raise SubtomoError(f"{star}: --skip-align/--local need input poses (rlnAngleRot/Tilt/Psi); give a refine3d run_data.star.")
    if p.K > len(particles):
        raise SubtomoError(f"--K {p.K}: more classes than the {len(particles)} particles in {star}. Use fewer classes.")
    if p.particle_diameter > src.box * src.pixel_size_A:
        raise SubtomoError(f"--particle-diameter {p.particle_diameter:g} Å exceeds the box ({src.box} px x "
                           f"{src.pixel_size_A:.3g} Å). Give the particle's diameter, or extract in a larger box.")
    shape = (src.box,) * 3
    return {"star": star, "particles": particles, "src": src, "rot": rot,
            "ref": load_map(p.ref, project, src.box, src.pixel_size_A, "--ref") if p.ref else None,
            "focus": load_mask(p.focus_mask, project, shape, "--focus-mask") if p.focus_mask else None,
            "solvent": load_mask(p.solvent_mask, project, shape, "--solvent-mask") if p.solvent_mask else None}


def _run(ctx: JobContext) -> None:
    with open_runner(ctx) as runner:  # --cluster: where the E-step's tasks run (None: here)
        _run_on(ctx, runner)


def _run_on(ctx: JobContext, runner: DaskRunner | None) -> None:
    p: Class3DParams = ctx.params
    star, particles, src, rot, ref = (ctx.state[k] for k in ("star", "particles", "src", "rot", "ref"))
    ctx.add_input(star)
    opts = ClassifyOptions(
        n_classes=p.K, particle_diameter_A=p.particle_diameter, n_iter=p.iter, tau2_fudge=p.tau2_fudge,
        healpix_order=order_for_step(p.healpix_step), offset_range_px=p.offset_range,
        offset_step_px=children_per_axis(p.offset_through_centre) * p.offset_step,
        translations_through_centre=p.offset_through_centre, significant_per_class=_CLASS_CHOICE[p.class_choice],
        sym=p.sym, local=p.local, sigma_ang_deg=p.sigma_ang, skip_align=p.skip_align, ini_high_A=p.ini_high,
        pad=p.pad, batch_size=p.batch_size, pass_memory_bytes=int(p.max_memory_gb * 2 ** 30), use_ctf=p.ctf, seed=p.seed,
        focus_mask=ctx.state["focus"], solvent_mask=ctx.state["solvent"], runner=runner)
    files = ClassifyFiles(ctx.dir, particles, src.pixel_size_A)
    resume = resume_state(ctx.dir, ClassifyState.from_dict, ctx.device, ctx.log) if p.continue_job else None
    res = classify3d(src, opts, initial_ref=ref, initial_rot=rot, initial_offset_px=particles.offsets_px(),
                     resume=resume, device=ctx.device, log=ctx.log, on_iteration=files)
    files.gallery(res.model, res.iterations)
    ctx.add_declared_outputs(iteration=res.iterations, n_classes=p.K)
    ctx.log("class distribution: " + ", ".join(f"{k + 1}: {v:.3f}" for k, v in enumerate(res.class_priors.tolist())))


SPEC = JobSpec(
    command="class3d", job_type="Class3D", params=Class3DParams, run=_run, check=_check,
    summary=("Steps 19-22, 25: 3D classification (K classes, T = 4), focused classification with a mask and --skip-align.\n\n"
             "Which search: global (the default) at --healpix-step 7.5 (the default) or finer, when the poses are "
             "unknown or the particle is (pseudo-)symmetric and was refined in C1, so that a class can re-align its "
             "particles; on an asymmetric particle with a large variant, 15 deg lost its classes once Pmax ~ 1 "
             "(bench/bench_class3d_collapse.py). "
             "--local (starts from a refine3d run_data.star) for an asymmetric particle with refined poses: a search "
             "of a few sigma-ang around each pose. --skip-align (poses of refine3d kept) for a compositional "
             "difference when the consensus poses are good: the fastest, and with --focus-mask for a local region. "
             "With a spare class (K above the expected number of states) keep --class-choice auto (the default) and "
             "a global step of 7.5 deg or finer: with the class decided on a grid too coarse for the box, the spare "
             "class filled up with particles of a true class."),
    inputs=(
        particles_spec("i", SELECTED_OR_EXTRACTED, "Run subtomo extract (or select) first, or pass --i."),
        INPUT_REFINED,
        InputSpec("ref", NodeType.DENSITY_MAP, (Source("Refine3D", ("run_class001.mrc",)),), required=False),
        InputSpec("solvent_mask", NodeType.MASK, required=False),
        InputSpec("focus_mask", NodeType.MASK, (Source("MaskCreate", ("mask.mrc",)),), required=False,
                  when="focused classification"),
    ),
    outputs=(
        OutputSpec("run_it{it:03d}_class{k:03d}.mrc", NodeType.DENSITY_MAP, "class maps"),
        OutputSpec("run_it{it:03d}_data.star", NodeType.PARTICLES, "class and pose of every particle"),
        OutputSpec("run_it{it:03d}_model.star", NodeType.MODEL, "class distribution, resolution, spectra"),
    ),
)
