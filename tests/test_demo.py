"""The README's main job: `subtomo demo` runs the whole protocol end to end (tiny preset)."""

from __future__ import annotations

import numpy as np

from subtomo.io.star import read_star, read_star_table
from subtomo.jobs.base import execute
from subtomo.jobs.demo import SPEC, DemoParams


def test_demo_runs_every_stage_on_a_tiny_project(tmp_path):
    ctx = execute(SPEC, DemoParams(project_dir="demo", preset="tiny", threads=1, classes2d=4, iterations2d=4,
                                   classes3d=2, iterations3d=2), tmp_path, quiet=True)
    project = tmp_path / "demo"
    assert ctx.dir.parent.parent == project
    for job_type in ("Simulate", "Import", "CtfFind", "Prepare", "Extract", "Class2D", "Select", "Refine3D",
                     "Class3D", "PostProcess", "LocalRes"):
        jobs = sorted((project / job_type).glob("job*"))
        assert jobs and (jobs[-1] / "RELION_JOB_EXIT_SUCCESS").exists(), f"{job_type} did not finish"
    post = read_star(next((project / "PostProcess").glob("job*")) / "postprocess.star")
    resolution = float(post["general"]["rlnFinalResolution"])
    assert 2 * 10.0 <= resolution < 100.0  # tiny preset: 10 Å pixels, 14 particles
    processes = read_star_table(project / "default_pipeline.star", "pipeline_processes")
    assert (processes["rlnPipeLineProcessStatusLabel"] == "Succeeded").all()
    assert np.isfinite(resolution)
