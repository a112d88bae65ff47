"""Job machinery: typed parameters, job directories, logs, sentinels, progress.

Every command runs as a job in ``<JobType>/jobNNN/`` (or ``--output DIR``) holding the
exact command line and parameters (``job.json``, ``note.txt``), the package version,
device and seed, ``run.out``/``run.err``, and RELION's sentinel files
``RELION_JOB_EXIT_SUCCESS`` / ``RELION_JOB_EXIT_FAILURE``. The job is recorded in the
project's ``default_pipeline.star`` with its input and output nodes.

A job type is a :class:`JobSpec`: a pydantic parameter model (unknown keys refused; the
CLI options are generated from it), its contract (declared inputs and outputs with their
node types, :mod:`subtomo.jobs.contracts`), an optional ``check`` run *before* anything is
written (validation that must leave no trace), and ``run(ctx)``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import signal
import socket
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from subtomo import __version__
from subtomo.errors import SubtomoError
from subtomo.io.particles import resolve_project_path
from subtomo.jobs import pipeline as pipeline_file
from subtomo.jobs.context import ComputeParams, JobContext, JobParams, resolve_device
from subtomo.jobs.contracts import InputSpec, OutputSpec
from subtomo.jobs.monitor import ResourceMonitor
from subtomo.jobs.pipeline import STATUS_FAILED, STATUS_RUNNING, STATUS_SUCCEEDED, Process

__all__ = ["SUCCESS_SENTINEL", "FAILURE_SENTINEL", "ComputeParams", "JobContext", "JobParams", "JobSpec",
           "JobTerminated", "execute", "resolve_device"]

SUCCESS_SENTINEL = "RELION_JOB_EXIT_SUCCESS"
FAILURE_SENTINEL = "RELION_JOB_EXIT_FAILURE"


@dataclass
class JobSpec:
    """A job type: its CLI name, directory name, parameters and behaviour."""

    command: str  # CLI sub-command, e.g. "refine3d"
    job_type: str  # RELION-like directory name, e.g. "Refine3D"
    params: type[JobParams]
    run: Callable[[JobContext], None]
    summary: str
    check: Callable[[JobParams, Path], Any] | None = None  # validation before anything is written
    # name of a parameter holding the project directory the job creates (``simulate``): the
    # job then runs in that directory (relative to ``project``) instead of ``project`` itself
    project_param: str | None = None
    inputs: tuple[InputSpec, ...] = ()  # declared inputs, resolved through JobContext.input
    outputs: tuple[OutputSpec, ...] = ()  # declared outputs, recorded by JobContext.add_declared_outputs

    def input(self, param: str) -> InputSpec:
        """The declared input for parameter ``param``."""
        for spec in self.inputs:
            if spec.param == param:
                return spec
        raise KeyError(f"{self.command} declares no input {param!r}")

    def contract(self) -> dict[str, Any]:
        """The job's contract as plain data (what a GUI or a scheduler reads)."""
        return {"command": self.command, "job_type": self.job_type, "summary": self.summary,
                "inputs": [i.as_dict() for i in self.inputs], "outputs": [o.as_dict() for o in self.outputs],
                "parameters": self.params.model_json_schema()}


ITERATION_PARAMS = ("max_iter", "iter")  # the iteration count of refine3d; of class3d and class2d


def _continued_job_dir(spec: JobSpec, params: JobParams, project: Path, cont: str) -> tuple[Path, str, dict | None]:
    """The directory of ``--continue-job``: an unfinished job of this type on the same input, continued in place,
    or a finished one continued with more iterations as a new job (then also where it continued from)."""
    d = resolve_project_path(project, cont)
    if not (d / "job.json").exists():
        raise SubtomoError(f"--continue-job {cont}: not a job directory (no job.json). Give the directory of the job to continue.")
    try:
        record = json.loads((d / "job.json").read_text())
    except ValueError as exc:
        raise SubtomoError(f"--continue-job {cont}: {d / 'job.json'} is damaged ({exc}); this job cannot be continued. "
                           "Start a new job.") from exc
    if record.get("job_type") != spec.job_type:
        raise SubtomoError(f"--continue-job {cont}: a {record.get('job_type')} job; subtomo {spec.command} continues only "
                           f"{spec.job_type} jobs. Give a {spec.job_type}/jobNNN/ directory.")
    saved_input = (record.get("parameters") or {}).get("i")
    given_input = getattr(params, "i", None)
    if given_input and saved_input and Path(given_input) != Path(saved_input):
        raise SubtomoError(f"--continue-job {cont}: it ran on --i {saved_input}, not {given_input}. Continue with the same "
                           "input (omit --i), or start a new job.")
    name = os.path.relpath(d, project).rstrip("/") + "/"
    if (d / SUCCESS_SENTINEL).exists():
        return _continue_finished(spec, params, project, d, name)
    return d, name, None


def _continue_finished(spec: JobSpec, params: JobParams, project: Path, old: Path, old_name: str) -> tuple[Path, str, dict]:
    """A new job that starts from a finished job's last optimiser state; the old job is only read."""
    it_param = next((n for n in ITERATION_PARAMS if n in type(params).model_fields), None)
    flag = "--" + (it_param or "").replace("_", "-")
    if it_param is None:
        raise SubtomoError(f"--continue-job {old_name}: this job finished; its results are kept as they are. To refine "
                           f"further, start a new {spec.command} job from its outputs (e.g. --i {old_name}run_data.star).")
    from subtomo.jobs._em_runs import copy_resume_files, last_finished_state

    found = last_finished_state(old)
    if found is None:
        raise SubtomoError(f"--continue-job {old_name}: this job finished and kept no optimiser state to continue from. "
                           f"Start a new {spec.command} job from its outputs.")
    iteration, state_file, converged = found
    if converged:
        raise SubtomoError(f"--continue-job {old_name}: this job finished; it converged after iteration {iteration}, so "
                           f"more iterations would not change it. To refine further, start a new {spec.command} job "
                           f"from its outputs (--i {old_name}run_data.star --ref {old_name}run_class001.mrc).")
    wanted = int(getattr(params, it_param))
    if wanted <= iteration:
        raise SubtomoError(f"--continue-job {old_name}: this job finished after {iteration} iterations; its results are "
                           f"kept as they are. To run more iterations, give a larger {flag} (e.g. {flag} {iteration + 5}): "
                           "a new job then continues from its last iteration and this one stays as it is.")
    with pipeline_file.locked(project) as pipeline:
        d, name = pipeline.reserve_job_dir(spec.job_type)
        pipeline.add(Process(name, spec.job_type, STATUS_RUNNING))
    copied = copy_resume_files(old, state_file, d)
    return d, name, {"job": old_name, "iteration": iteration, it_param: wanted, "copied": copied}


def _job_dir_for(spec: JobSpec, params: JobParams, project: Path) -> tuple[Path, str, dict | None]:
    cont = getattr(params, "continue_job", None)
    if cont:
        return _continued_job_dir(spec, params, project, cont)
    if params.output:
        d = resolve_project_path(project, params.output)
        if d.exists() and any(d.iterdir()):
            raise SubtomoError(f"--output {params.output}: directory exists and is not empty; nothing of it is overwritten. Choose a new directory.")
        d.mkdir(parents=True, exist_ok=True)
        return d, os.path.relpath(d, project).rstrip("/") + "/", None
    with pipeline_file.locked(project) as pipeline:
        d, name = pipeline.reserve_job_dir(spec.job_type)
        pipeline.add(Process(name, spec.job_type, STATUS_RUNNING))
    return d, name, None


class JobTerminated(BaseException):
    """SIGTERM (a scheduler's wall-time limit, ``kill``): handled like Ctrl-C."""


@contextlib.contextmanager
def _sigterm_as_exception() -> Iterator[None]:
    """Turn SIGTERM into :class:`JobTerminated` while a job runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise JobTerminated("terminated by SIGTERM")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _finish(project: Path, proc: Process, ctx: JobContext, status: str) -> None:
    """Record the job's final state in the pipeline (under the lock)."""
    proc.status = status
    proc.inputs, proc.outputs = list(ctx.inputs), list(ctx.outputs)
    with pipeline_file.locked(project) as pipeline:
        pipeline.add(proc)


def _record_end(job_dir: Path, record: dict, monitor: ResourceMonitor, status: str, ctx: JobContext) -> None:
    """Add the end time, status, nodes and resource usage (wall, CPU, peak memory) to job.json."""
    record["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
    record["status"] = status
    record["inputs"], record["outputs"] = list(ctx.inputs), [list(o) for o in ctx.outputs]
    if monitor.usage is not None:
        record["resources"] = monitor.usage.as_dict()
    (job_dir / "job.json").write_text(json.dumps(record, indent=2, default=str))


def execute(spec: JobSpec, params: JobParams, project: str | Path = ".", argv: list[str] | None = None,
            quiet: bool = False) -> JobContext:
    """Run one job in ``project``; returns its context. Raises SubtomoError on failure."""
    if spec.project_param:
        project = Path(project) / str(getattr(params, spec.project_param))
    project = Path(project).resolve()
    state = spec.check(params, project) if spec.check else None
    if spec.project_param:
        project.mkdir(parents=True, exist_ok=True)
    job_dir, name, continued_from = _job_dir_for(spec, params, project)
    for sentinel in (SUCCESS_SENTINEL, FAILURE_SENTINEL):
        (job_dir / sentinel).unlink(missing_ok=True)
    record = {
        "job_type": spec.job_type, "command": spec.command,
        "command_line": " ".join(argv) if argv else f"subtomo {spec.command}",
        "parameters": params.model_dump(), "subtomo_version": __version__,
        "torch_version": torch.__version__, "started": _dt.datetime.now().isoformat(timespec="seconds"),
        "pid": os.getpid(), "host": socket.gethostname(),
    }
    if continued_from is not None:  # a finished job continued with more iterations: where this one starts
        record["continued_from"] = continued_from
    proc = Process(name, spec.job_type, STATUS_RUNNING)
    ctx = JobContext(spec, params, project, job_dir, name, state, quiet=quiet)
    record["device"] = str(ctx.device)
    (job_dir / "job.json").write_text(json.dumps(record, indent=2, default=str))
    with open(job_dir / "note.txt", "a") as fh:
        fh.write(f"++++ executing at {record['started']}\n{record['command_line']}\n")
    _finish(project, proc, ctx, STATUS_RUNNING)
    ctx.log(f"subtomo {__version__} {spec.command} -> {name} (device {ctx.device})")
    monitor = ResourceMonitor(ctx.device)
    try:
        with _sigterm_as_exception(), monitor:
            spec.run(ctx)
    except BaseException as exc:
        _record_end(job_dir, record, monitor, "failed", ctx)
        with open(job_dir / "run.err", "a") as fh:
            fh.write(str(exc) + "\n")
            if not isinstance(exc, (SubtomoError, KeyboardInterrupt, JobTerminated)):
                fh.write(traceback.format_exc())
        (job_dir / FAILURE_SENTINEL).touch()
        if not hasattr(exc, "subtomo_job"):
            try:
                exc.subtomo_job = name  # type: ignore[attr-defined]  # the innermost failing job, for the CLI
            except AttributeError:
                pass
        _finish(project, proc, ctx, STATUS_FAILED)
        ctx.close()
        raise
    _record_end(job_dir, record, monitor, "succeeded", ctx)
    _finish(project, proc, ctx, STATUS_SUCCEEDED)
    (job_dir / SUCCESS_SENTINEL).touch()
    usage = monitor.usage
    peak = f", peak memory {usage.peak_rss_MB:.0f} MB" if usage and usage.peak_rss_MB is not None else ""
    ctx.log(f"{spec.command} finished: {name} ({usage.wall_s if usage else 0:.1f} s{peak})")
    ctx.close()
    return ctx
