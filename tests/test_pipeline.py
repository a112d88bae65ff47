"""The pipeline file and job directories under concurrency, damage, continuation and termination."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from subtomo.errors import SubtomoError
from subtomo.jobs import pipeline as pipeline_file
from subtomo.jobs.base import FAILURE_SENTINEL, SUCCESS_SENTINEL, JobContext, JobSpec, JobTerminated, execute
from subtomo.jobs.mask import SPEC as MASK
from subtomo.jobs.mask import MaskParams
from subtomo.jobs.pipeline import STATUS_FAILED, STATUS_SUCCEEDED, Pipeline


def _mask_job(project: str) -> None:
    execute(MASK, MaskParams(sphere=60, box=16, angpix=5), Path(project), quiet=True)


def test_concurrent_jobs_all_recorded_with_their_final_state(tmp_path):
    ctx = multiprocessing.get_context("fork")
    for round_ in range(3):
        project = tmp_path / f"p{round_}"
        project.mkdir()
        procs = [ctx.Process(target=_mask_job, args=(str(project),)) for _ in range(8)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0] * 8
        processes = Pipeline(project).processes
        assert len(processes) == 8 and len({p.name for p in processes}) == 8
        assert all(p.status == STATUS_SUCCEEDED for p in processes)
        assert all(p.outputs == [(p.name + "mask.mrc", "Mask")] for p in processes)


def test_damaged_pipeline_is_an_error_and_rebuild_restores_it(tmp_path):
    for _ in range(2):
        _mask_job(str(tmp_path))
    path = tmp_path / pipeline_file.PIPELINE_FILE
    text = path.read_text()
    path.write_text(text[: text.index("data_pipeline_nodes")])  # truncated
    with pytest.raises(SubtomoError, match="pipeline file is damaged.*--rebuild"):
        Pipeline(tmp_path)
    with pytest.raises(SubtomoError, match="damaged"):
        _mask_job(str(tmp_path))  # refused before any job directory is made
    assert not (tmp_path / "MaskCreate/job003").exists()
    rebuilt = pipeline_file.rebuild(tmp_path)
    assert [(p.name, p.status) for p in rebuilt.processes] == [("MaskCreate/job001/", STATUS_SUCCEEDED),
                                                               ("MaskCreate/job002/", STATUS_SUCCEEDED)]
    assert rebuilt.processes[1].outputs == [("MaskCreate/job002/mask.mrc", "Mask")]
    assert (tmp_path / (pipeline_file.PIPELINE_FILE + ".damaged")).exists()
    _mask_job(str(tmp_path))
    assert Pipeline(tmp_path).processes[-1].name == "MaskCreate/job003/"


def _iterative_spec(job_type: str = "Refine3D") -> tuple[JobSpec, type]:
    from pydantic import Field

    from subtomo.jobs.base import JobParams

    class Params(JobParams):
        i: str | None = Field(None)
        continue_job: str | None = Field(None)
        fail: bool = Field(False)

    def run(ctx: JobContext) -> None:
        (ctx.dir / "out.txt").write_text("done")
        if ctx.params.fail:
            raise SubtomoError("stopped on purpose")

    return JobSpec("fake", job_type, Params, run, "a fake iterative job"), Params


def test_continue_job_refuses_other_types_finished_jobs_and_other_inputs(tmp_path):
    spec, Params = _iterative_spec()
    with pytest.raises(SubtomoError):
        execute(spec, Params(i="a.star", fail=True), tmp_path, quiet=True)
    failed = "Refine3D/job001/"
    other, OtherParams = _iterative_spec("Class2D")
    with pytest.raises(SubtomoError, match="a Refine3D job; subtomo fake continues only Class2D jobs"):
        execute(other, OtherParams(continue_job=failed), tmp_path, quiet=True)
    assert (tmp_path / failed / FAILURE_SENTINEL).exists()  # untouched
    with pytest.raises(SubtomoError, match="it ran on --i a.star, not b.star"):
        execute(spec, Params(continue_job=failed, i="b.star"), tmp_path, quiet=True)
    execute(spec, Params(continue_job=failed, i="a.star"), tmp_path, quiet=True)
    assert (tmp_path / failed / SUCCESS_SENTINEL).exists()
    record = json.loads((tmp_path / failed / "job.json").read_text())
    assert record["status"] == "succeeded"
    with pytest.raises(SubtomoError, match="this job finished; its results are kept"):
        execute(spec, Params(continue_job=failed), tmp_path, quiet=True)


def test_sigterm_marks_the_job_failed(tmp_path):
    from pydantic import Field

    from subtomo.jobs.base import JobParams

    class Params(JobParams):
        x: int = Field(0)

    def run(ctx: JobContext) -> None:
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()
        time.sleep(5)

    spec = JobSpec("slow", "Slow", Params, run, "sleeps")
    with pytest.raises(JobTerminated):
        execute(spec, Params(), tmp_path, quiet=True)
    assert (tmp_path / "Slow/job001" / FAILURE_SENTINEL).exists()
    assert Pipeline(tmp_path).processes[0].status == STATUS_FAILED
    assert signal.getsignal(signal.SIGTERM) is not None  # handler restored
