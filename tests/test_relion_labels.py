"""Issue 15: every label of every STAR file the demo writes is RELION's (with RELION's type) or starts with subtomo."""

from __future__ import annotations

from subtomo.io.relion import label_problems
from subtomo.io.star import read_star
from subtomo.jobs.base import execute
from subtomo.jobs.demo import SPEC, DemoParams


def test_every_star_label_of_the_demo_is_relion_s_or_ours(tmp_path):
    ctx = execute(SPEC, DemoParams(project_dir="demo", preset="tiny", threads=1), tmp_path, quiet=True)
    project = tmp_path / "demo"
    stars = sorted(project.rglob("*.star"))
    assert len(stars) > 20, ctx.dir
    problems = [p for path in stars for p in label_problems(read_star(path), str(path.relative_to(project)))]
    assert problems == [], "\n".join(problems)
