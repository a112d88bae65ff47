"""``subtomo demo``: the whole protocol on a freshly simulated project.

Simulates a small project with ground truth (``subtomo simulate``), then runs every job of
the protocol in order from inside it — import, ctf, prepare, extract (+ 2D projections),
class2d, select, refine3d (de novo, from random orientations), class3d,
postprocess, localres — exactly as a user would on the command line, and ends with a
summary: the gold-standard resolution, the resolution of the average with the true poses
(the oracle) and where to look at the pictures. Each stage is an ordinary job directory in
the project, so every step can be inspected or re-run by hand. At the end every stage is
scored against the simulator's ground truth (``demo_report``): a summary table on the
terminal, ``demo_summary.json`` in the demo's job directory and ``report.html`` (one
self-contained page with all the pictures) in the project.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from subtomo import __version__
from subtomo.errors import SubtomoError
from subtomo.jobs.base import ComputeParams, JobContext, JobSpec, execute
from subtomo.jobs.contracts import NodeType, OutputSpec
from subtomo.jobs.demo_report import evaluate_project, stage_rows, summary_rows, write_report
from subtomo.jobs.registry import load_spec


class DemoParams(ComputeParams):
    project_dir: str = Field("demo_project", description="Directory of the demo project (created; must not exist yet).",
                             json_schema_extra={"positional": True})
    out: str | None = Field(None, description="Directory of the demo project; the same as PROJECT_DIR.")
    preset: Literal["tiny", "demo", "benchmark"] = Field("demo", description="Simulation preset: tiny (seconds, a smoke test), demo (a few minutes), benchmark (long).")
    classes2d: int | None = Field(None, ge=2, description="Number of 2D classes (default: the preset's).")
    iterations2d: int | None = Field(None, ge=1, description="Iterations of 2D classification (default: the preset's).")
    min_class_fraction: float | None = Field(None, ge=0, lt=1, description="Also require the selected 2D classes to hold at least this fraction of the particles, on top of select --auto (default: no such rule) [fraction].")
    max_class_resolution: float | None = Field(None, ge=0, description="Also require the selected 2D classes to reach this estimated resolution, on top of select --auto (default: no such rule) [Å].")
    sym: str = Field("C1", description="Point-group symmetry imposed in 3D auto-refinement (and its oracle); with a symmetry the de novo refinement goes through C1 and a symmetry-axis alignment first (about twice the time).")
    healpix_step: float = Field(15.0, gt=0, le=60, description="Initial angular sampling of 3D auto-refinement [deg].")
    healpix_step3d: float = Field(15.0, gt=0, le=60, description="Angular sampling of the global search of 3D classification [deg] (class3d's default is 7.5; 15 keeps the demo short).")
    refine_max_iter: int | None = Field(None, ge=1, description="Iterations of 3D auto-refinement before its final iteration; bounds the demo's time (default: the preset's).")
    classes3d: int = Field(2, ge=0, description="Number of 3D classes (0: skip 3D classification).")
    iterations3d: int | None = Field(None, ge=1, description="Iterations of 3D classification (default: the preset's).")
    lower_tilt_defoci: float | None = Field(30.0, ge=0, lt=90, description="Step 11: tilts above this get the mean lower-tilt defocus (0 or none: off) [deg].")

    @model_validator(mode="before")
    @classmethod
    def _out_names_the_project(cls, data):
        if isinstance(data, dict) and data.get("out"):
            given = data.get("project_dir")
            if given and given != data["out"]:
                raise ValueError(f"give the project directory once: PROJECT_DIR {given!r} and --out {data['out']!r} differ")
            data = {**data, "project_dir": data["out"]}
        return data


# Per-preset choices where the right value depends on the data's size. 2D classes are chosen
# by select --auto (per-class scores that reject gold beads, blobs and noise; class resolution
# is a poor score at low SNR and a bead's class looks "best"). 3D classification searches globally:
# a pseudo-symmetric particle refined in C1 sits in a random one of its equivalent poses, and
# only a global search lets a class that breaks the symmetry line its particles up (local
# searches: 74 % accuracy on the demo preset; global at 15 deg: 92-97 %). At 15 deg, not class3d's
# default 7.5 deg, to keep the demo short (7.5 deg costs about 8x per iteration; issue 22 measured
# classes lost at 15 deg on an asymmetric particle once Pmax ~ 1: bench/bench_class3d_collapse.py).
PRESET_DEFAULTS: dict[str, dict[str, float | int]] = {
    "tiny": dict(classes2d=4, iterations2d=8, refine_max_iter=8, iterations3d=3),
    "demo": dict(classes2d=8, iterations2d=15, refine_max_iter=12, iterations3d=10),
    "benchmark": dict(classes2d=10, iterations2d=25, refine_max_iter=25, iterations3d=10),
}


def with_preset_defaults(params: DemoParams) -> DemoParams:
    """``params`` with every option left unset (None) taken from the preset's defaults."""
    filled = {k: v for k, v in PRESET_DEFAULTS[params.preset].items() if getattr(params, k) is None}
    return params.model_copy(update=filled)


STAGES = ("simulate", "import", "ctf", "prepare", "extract", "class2d", "select", "refine3d", "class3d",
          "postprocess", "localres")


def _stage(ctx: JobContext, jobs: dict[str, str], command: str, root: Path, **params) -> JobContext:
    """Run one stage as an ordinary job of the project and remember its job directory."""
    spec = load_spec({"import": "import_tomograms"}.get(command, command))
    shown = " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {round(v, 2) if isinstance(v, float) else v}")
                     for k, v in params.items() if k not in ("device", "threads", "seed") and v is not None and v is not False)
    ctx.log(f"=== [{len(jobs) + 1}/{len(STAGES)}] subtomo {command} {shown}")
    job = execute(spec, spec.params(**params), root, argv=["subtomo", command, *shown.split()], quiet=ctx.quiet)
    jobs[command] = job.name
    return job


def _check(params: DemoParams, project: Path) -> None:
    if project.exists() and any(project.iterdir()):
        raise SubtomoError(f"{project}: exists and is not empty; the demo never overwrites anything. "
                           f"Give another directory (subtomo demo NEW_DIR) or remove this one.")


def _run_stages(ctx: JobContext, jobs: dict[str, str]) -> None:
    p = with_preset_defaults(ctx.params)
    project = ctx.project
    common = dict(device=p.device, threads=p.threads, seed=p.seed)
    _stage(ctx, jobs, "simulate", project, project_dir=".", preset=p.preset, **common)
    truth = json.loads((project / "GroundTruth" / "simulation.json").read_text())
    box = int(truth["box_px"])
    diameter = round(float(truth["structure"]["diameter_A"]) * 1.1)
    _stage(ctx, jobs, "import", project)
    _stage(ctx, jobs, "ctf", project, lower_tilt_defoci=p.lower_tilt_defoci or None, **common)
    _stage(ctx, jobs, "prepare", project, **common)
    _stage(ctx, jobs, "extract", project, box=box, project=True, **common)
    _stage(ctx, jobs, "class2d", project, K=p.classes2d, iter=p.iterations2d, particle_diameter=diameter, **common)
    _stage(ctx, jobs, "select", project, auto=True, particle_diameter=float(diameter),  # rules only when given
           min_class_fraction=ctx.params.min_class_fraction, max_class_resolution=ctx.params.max_class_resolution or None)
    ref = _stage(ctx, jobs, "refine3d", project, particle_diameter=diameter, healpix_step=p.healpix_step,
                 max_iter=p.refine_max_iter, sym=p.sym, oracle="GroundTruth/picks.star", **common)
    if p.classes3d > 1:
        _stage(ctx, jobs, "class3d", project, i=f"{ref.name}run_data.star", K=p.classes3d, iter=p.iterations3d,
               particle_diameter=diameter, ref=f"{ref.name}run_class001.mrc", healpix_step=p.healpix_step3d, **common)
    _stage(ctx, jobs, "postprocess", project, **common)
    _stage(ctx, jobs, "localres", project, **common)


def _run(ctx: JobContext) -> None:
    p: DemoParams = ctx.params
    project = ctx.project
    start = time.time()
    jobs: dict[str, str] = {}
    _run_stages(ctx, jobs)
    ctx.log("")
    ctx.log(f"all stages finished in {time.time() - start:.0f} s; scoring against the ground truth ...")
    result = evaluate_project(project, jobs, ctx.dir)
    result.figures["stages_wall_s"] = sum(s.wall_s for s in result.stages)
    summary = ctx.path("demo_summary.json")
    summary.write_text(json.dumps({"preset": p.preset, "jobs": jobs, "figures": result.figures,
                                   "stages": [s.__dict__ for s in result.stages],
                                   "total_wall_s": time.time() - start}, indent=2, default=str))
    ctx.add_output(summary, "File")
    report = write_report(project / "report.html", project, jobs, result, f"subtomo demo: preset {p.preset}",
                          f"The whole protocol on a simulated project ({project}), run by subtomo {__version__} "
                          f"on {ctx.device} in {time.time() - start:.0f} s.")
    ctx.add_output(report, "File")
    ctx.log("")
    width = max(len(label) for label, _ in summary_rows(result)) if result.figures else 10
    for label, value in summary_rows(result):
        ctx.log(f"  {label:<{width}}  {value}")
    ctx.log("")
    ctx.log(f"  {'stage':<12} {'job':<22} {'time [s]':>9} {'peak memory [MB]':>17}")
    for command, job, wall, peak in stage_rows(result):
        ctx.log(f"  {command:<12} {job:<22} {wall:>9} {peak:>17}")
    ctx.log("")
    ctx.log(f"demo finished in {time.time() - start:.0f} s. Open the report: {report}")


SPEC = JobSpec(
    command="demo", job_type="Demo", params=DemoParams, run=_run, check=_check, project_param="project_dir",
    summary="Simulate a small project and run the whole protocol on it (import to localres), with a summary against the ground truth.",
    outputs=(
        OutputSpec("demo_summary.json", NodeType.FILE, "figures against the ground truth, time and memory per stage"),
        OutputSpec("report.html", NodeType.FILE, "one-page report with the pictures", in_project=True),
    ),
)
