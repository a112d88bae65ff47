"""The README's main job: `subtomo demo` runs the whole protocol end to end (tiny preset)."""

from __future__ import annotations

import json
import re

import numpy as np

from subtomo.io.relion import label_problems
from subtomo.io.star import read_star, read_star_table
from subtomo.jobs.base import execute
from subtomo.jobs.demo import SPEC, DemoParams


def test_demo_runs_every_stage_on_a_tiny_project(tmp_path):
    ctx = execute(SPEC, DemoParams(project_dir="demo", preset="tiny", threads=1), tmp_path, quiet=True)
    project = tmp_path / "demo"
    assert ctx.dir.parent.parent == project
    for job_type in ("Simulate", "Import", "CtfFind", "Prepare", "Extract", "Class2D", "Select", "Refine3D",
                     "Class3D", "PostProcess", "LocalRes"):
        jobs = sorted((project / job_type).glob("job*"))
        assert jobs and (jobs[-1] / "RELION_JOB_EXIT_SUCCESS").exists(), f"{job_type} did not finish"
        usage = json.loads((jobs[-1] / "job.json").read_text())["resources"]
        assert usage["wall_s"] >= 0 and usage["peak_rss_MB"] > 50, f"{job_type}: no resource record"
    post = read_star(next((project / "PostProcess").glob("job*")) / "postprocess.star")
    resolution = float(post["general"]["rlnFinalResolution"])
    assert 2 * 10.0 <= resolution < 100.0  # tiny preset: 10 Å pixels, 10 particles
    processes = read_star_table(project / "default_pipeline.star", "pipeline_processes")
    assert (processes["rlnPipeLineProcessStatusLabel"] == "Succeeded").all()

    # scored against the ground truth: the final map matches the true map at low resolution
    summary = json.loads(ctx.path("demo_summary.json").read_text())
    fig = summary["figures"]
    assert fig["particles.picked"] == 14 and fig["particles.true_among_picked"] == 10
    assert fig["select2d.precision"] >= 0.7 and fig["select2d.recall"] >= 0.7
    assert fig["refine3d.fsc_truth_0.5_A"] <= 60.0  # FSC(refined, truth) >= 0.5 out to 60 Å (6 px)
    assert fig["refine3d.median_angular_error_deg"] < 15.0
    assert np.isfinite(fig["oracle.gold_standard_A"]) and np.isfinite(fig["ctf.median_abs_error_all_used_A"])
    assert [s["command"] for s in summary["stages"]][:3] == ["simulate", "import", "ctf"]

    # one self-contained page with every picture embedded
    page = (project / "report.html").read_text()
    assert "picture not produced" not in page
    assert len(re.findall(r'src="data:image/png;base64,', page)) >= 9
    for heading in ("CTF estimation", "2D classification and selection", "Resolution", "Final map and the truth",
                    "Local resolution", "Time and memory per stage"):
        assert heading in page
    assert not re.search(r'src="(?!data:)', page)  # nothing refers to files beside it

    # every label of every STAR file the demo wrote is RELION's (with RELION's type) or starts with subtomo
    stars = sorted(project.rglob("*.star"))
    assert len(stars) > 20
    problems = [p for path in stars for p in label_problems(read_star(path), str(path.relative_to(project)))]
    assert problems == [], "\n".join(problems)
