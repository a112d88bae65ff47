"""``subtomo demo``: the whole protocol on a freshly simulated project.

Simulates a small project with ground truth (``subtomo simulate``), then runs every job of
the protocol in order from inside it — import, ctf, prepare, extract (+ 2D projections),
class2d, select, refine3d (de novo, from random orientations), class3d,
postprocess, localres — exactly as a user would on the command line, and ends with a
summary: the gold-standard resolution, the resolution of the average with the true poses
(the oracle) and where to look at the pictures. Each stage is an ordinary job directory in
the project, so every step can be inspected or re-run by hand.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from subtomo.errors import SubtomoError
from subtomo.io.star import read_star
from subtomo.jobs.base import ComputeParams, JobContext, JobSpec, execute
from subtomo.jobs.registry import load_spec


class DemoParams(ComputeParams):
    project_dir: str = Field("demo_project", description="Directory of the demo project (created; must not exist yet).",
                             json_schema_extra={"positional": True})
    preset: Literal["tiny", "demo", "benchmark"] = Field("demo", description="Simulation preset: tiny (seconds, a smoke test), demo (a few minutes), benchmark (long).")
    classes2d: int = Field(8, ge=2, description="Number of 2D classes.")
    iterations2d: int = Field(15, ge=1, description="Iterations of 2D classification.")
    min_class_fraction: float = Field(0.05, ge=0, lt=1, description="Select the 2D classes holding at least this fraction of the particles [fraction].")
    max_class_resolution: float = Field(40.0, gt=0, description="Select the 2D classes whose estimated resolution is this or better [Å].")
    healpix_step: float = Field(15.0, gt=0, description="Initial angular sampling of 3D auto-refinement [deg].")
    refine_max_iter: int = Field(12, ge=1, description="Iterations of 3D auto-refinement before its final iteration (bounds the demo's time).")
    classes3d: int = Field(2, ge=0, description="Number of 3D classes (0: skip 3D classification).")
    iterations3d: int = Field(5, ge=1, description="Iterations of 3D classification.")
    lower_tilt_defoci: float | None = Field(30.0, gt=0, description="Step 11: tilts above this get the mean lower-tilt defocus (0 or none: off) [deg].")


def _stage(ctx: JobContext, command: str, root: Path, **params) -> JobContext:
    spec = load_spec({"import": "import_tomograms"}.get(command, command))
    shown = " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {round(v, 2) if isinstance(v, float) else v}")
                     for k, v in params.items() if k not in ("device", "threads", "seed") and v is not None and v is not False)
    ctx.log(f"--- subtomo {command} {shown}")
    start = time.time()
    job = execute(spec, spec.params(**params), root, argv=["subtomo", command, *shown.split()], quiet=ctx.quiet)
    ctx.log(f"    {job.name} ({time.time() - start:.0f} s)")
    return job


def _check(params: DemoParams, project: Path) -> None:
    if project.exists() and any(project.iterdir()):
        raise SubtomoError(f"{project}: exists and is not empty; the demo never overwrites anything. "
                           f"Give another directory (subtomo demo NEW_DIR) or remove this one.")


def _run(ctx: JobContext) -> None:
    p: DemoParams = ctx.params
    project = ctx.project
    common = dict(device=p.device, threads=p.threads, seed=p.seed)
    start = time.time()
    _stage(ctx, "simulate", project, project_dir=".", preset=p.preset, **common)
    truth = json.loads((project / "GroundTruth" / "simulation.json").read_text())
    box = int(truth["box_px"])
    diameter = float(truth["structure"]["diameter_A"])
    _stage(ctx, "import", project)
    _stage(ctx, "ctf", project, lower_tilt_defoci=p.lower_tilt_defoci or None, **common)
    _stage(ctx, "prepare", project, **common)
    _stage(ctx, "extract", project, box=box, project=True, **common)
    c2 = _stage(ctx, "class2d", project, K=p.classes2d, iter=p.iterations2d, particle_diameter=round(diameter * 1.1), **common)
    _stage(ctx, "select", project, min_class_fraction=p.min_class_fraction, max_class_resolution=p.max_class_resolution)
    ref = _stage(ctx, "refine3d", project, particle_diameter=round(diameter * 1.1), healpix_step=p.healpix_step, max_iter=p.refine_max_iter,
                 oracle="GroundTruth/picks.star", **common)
    if p.classes3d > 1:
        _stage(ctx, "class3d", project, i=f"{ref.name}run_data.star", K=p.classes3d, iter=p.iterations3d, particle_diameter=round(diameter * 1.1),
               ref=f"{ref.name}run_class001.mrc", local=True, **common)
    post = _stage(ctx, "postprocess", project, **common)
    loc = _stage(ctx, "localres", project, **common)
    general = read_star(post.path("postprocess.star")).get("general", {})
    resolution = general.get("rlnFinalResolution") if isinstance(general, dict) else None
    ctx.log("")
    ctx.log(f"demo finished in {time.time() - start:.0f} s: project {project}")
    if resolution is not None:
        ctx.log(f"final resolution after postprocessing (corrected FSC = 0.143): {float(resolution):.1f} A at {truth['pixel_size_A']} A/px")
    if ref.path("oracle.star").exists():
        orc = read_star(ref.path("oracle.star"))["oracle"]
        ctx.log(f"refine3d from random orientations: {float(orc['subtomoRefinedResolution']):.1f} A; with the true poses "
                f"(oracle): {float(orc['rlnFinalResolution']):.1f} A (ratio {float(orc['subtomoRefinedOverOracle']):.2f})")
    ctx.log("look at:")
    c3 = sorted(project.glob("Class3D/job*/run_it*_classes.png"))
    for label, path in (("particles on tilt images", "Import/*/coordinates/*.png"),
                        ("CTF fits", "CtfFind/*/Diagnostics/*summary*.png"),
                        ("2D class averages", f"{c2.name}*_classes.png"),
                        ("refined map", f"{ref.name}run_class001_slices.png"),
                        ("3D classes", str(c3[-1].relative_to(project)) if c3 else "Class3D/none"),
                        ("FSC curves", f"{post.name}postprocess_fsc.png"),
                        ("Guinier plot", f"{post.name}postprocess_guinier.png"),
                        ("directional FSC (missing wedge)", f"{post.name}postprocess_directional_fsc.png"),
                        ("local resolution", f"{loc.name}localres_slices.png")):
        found = sorted(project.glob(path))
        if found:
            ctx.log(f"  {label}: {ctx.rel(found[-1])}")


SPEC = JobSpec(
    command="demo", job_type="Demo", params=DemoParams, run=_run, check=_check, project_param="project_dir",
    summary="Simulate a small project and run the whole protocol on it (import to localres), with a summary against the ground truth.",
)
