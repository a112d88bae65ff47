"""``subtomo simulate PROJECT_DIR --preset NAME --seed N``: a synthetic project with ground truth.

Creates PROJECT_DIR (the job is not run from inside a project): ``Tomograms/<t>/`` with the
protocol's inputs, ``GroundTruth/`` with the true picks, poses, classes, defoci and maps, and
its own job record in ``PROJECT_DIR/Simulate/job001/``. Every parameter of the preset can
be overridden; the same seed gives byte-identical files.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, create_model

from subtomo.errors import SubtomoError
from subtomo.jobs.base import ComputeParams, JobContext, JobSpec
from subtomo.jobs.contracts import NodeType, OutputSpec
from subtomo.simulate.presets import SimulationConfig, config_for


class _SimulateBase(ComputeParams):
    project_dir: str = Field(..., description="Directory of the new project (created; must not hold Tomograms/ or GroundTruth/ yet).",
                             json_schema_extra={"positional": True})
    preset: Literal["tiny", "demo", "benchmark"] = Field("demo", description="Parameter set: tiny (tests, seconds), demo (README demo), benchmark (hundreds of particles, box 64).")


def _override_fields() -> dict:
    fields = {}
    for name, info in SimulationConfig.model_fields.items():
        desc = (info.description or "") + " (default: from the preset)"
        bounds = {k: getattr(m, k) for m in info.metadata for k in ("gt", "ge", "lt", "le") if hasattr(m, k)}
        fields[name] = (info.annotation | None, Field(None, description=desc, **bounds))  # the config's ranges
    return fields


SimulateParams = create_model("SimulateParams", __base__=_SimulateBase, **_override_fields())
SimulateParams.__doc__ = "Parameters of ``subtomo simulate``: the preset, then any SimulationConfig field as an override."


def _config(params) -> SimulationConfig:
    overrides = {name: getattr(params, name) for name in SimulationConfig.model_fields}
    return config_for(params.preset, overrides)


def _check(params, project: Path) -> SimulationConfig:
    cfg = _config(params)
    if cfg.structure != "default" and not Path(cfg.structure).exists():
        raise SubtomoError(f"--structure {cfg.structure}: file not found. Give a PDB/mmCIF (.gz ok) or MRC file, or leave the default.")
    for sub in ("Tomograms", "GroundTruth"):
        d = project / sub
        if d.exists() and any(d.iterdir()):
            raise SubtomoError(f"{d}: exists and is not empty; a simulation never overwrites a project. Choose a new PROJECT_DIR.")
    return cfg


def _run(ctx: JobContext) -> None:
    from subtomo.simulate.project import simulate_project

    cfg: SimulationConfig = ctx.state
    ctx.log(f"preset {ctx.params.preset}, seed {ctx.params.seed}: {cfg.n_tomograms} tomogram(s) x {cfg.n_particles} particles, "
            f"{cfg.pixel_size:g} A/px, tilts {cfg.tilt_min:g}..{cfg.tilt_max:g} step {cfg.tilt_step:g} ({cfg.tilt_scheme}), "
            f"{cfg.total_dose:g} e/A^2")
    start = time.time()
    summary = simulate_project(cfg, ctx.project, ctx.params.seed, log=ctx.log, device=ctx.device)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for t in summary["tomograms"]:
        tdir = ctx.project / "Tomograms" / t["name"]
        ctx.add_output(tdir / f"{t['name']}.mrc", "TomogramMrc")
        ctx.add_output(tdir / f"{t['name']}.coords", "TomogramCoordinates")
    gt = ctx.project / "GroundTruth"
    ctx.add_output(gt / "picks.star", "GroundTruthPicks")
    ctx.add_output(gt / "tilts.star", "GroundTruthTilts")
    for c in summary["classes"]:
        ctx.add_output(gt / c, "DensityMap")
    ctx.add_output(gt / "simulation.json", "GroundTruthSummary")
    ctx.log(f"simulated {len(summary['tomograms'])} tomogram(s) in {time.time() - start:.1f} s "
            f"(process peak RSS {peak_mib:.0f} MiB); next: cd {ctx.project} && subtomo import")


SPEC = JobSpec(
    command="simulate", job_type="Simulate", params=SimulateParams, run=_run, check=_check,
    project_param="project_dir",
    summary="Create a synthetic cryo-ET project (tilt series, WBP tomograms, picks, trials) with its ground truth in GroundTruth/.",
    outputs=(
        OutputSpec("Tomograms/*/*.mrc", NodeType.TOMOGRAM, "tomograms and tilt series", in_project=True),
        OutputSpec("Tomograms/*/*.coords", NodeType.COORDINATES, "picked coordinates", in_project=True),
        OutputSpec("GroundTruth/picks.star", NodeType.GROUND_TRUTH_PICKS, "true poses and kinds", in_project=True),
        OutputSpec("GroundTruth/tilts.star", NodeType.GROUND_TRUTH_TILTS, "true per-tilt defoci", in_project=True),
        OutputSpec("GroundTruth/class*.mrc", NodeType.DENSITY_MAP, "true maps", in_project=True),
        OutputSpec("GroundTruth/simulation.json", NodeType.GROUND_TRUTH_SUMMARY, "simulation settings", in_project=True),
    ),
)

__all__ = ["SPEC", "SimulateParams"]
