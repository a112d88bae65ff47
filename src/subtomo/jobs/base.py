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
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from subtomo import __version__
from subtomo.errors import SubtomoError
from subtomo.jobs import pipeline as pipeline_file
from subtomo.jobs.contracts import InputSpec, NodeType, OutputSpec
from subtomo.jobs.monitor import ResourceMonitor
from subtomo.jobs.pipeline import STATUS_FAILED, STATUS_RUNNING, STATUS_SUCCEEDED, Process

T = TypeVar("T")
SUCCESS_SENTINEL = "RELION_JOB_EXIT_SUCCESS"
FAILURE_SENTINEL = "RELION_JOB_EXIT_FAILURE"


class JobParams(BaseModel):
    """Base of every job's parameters. Units go in each field's description."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    output: str | None = Field(None, description="Output job directory (default: <JobType>/jobNNN/ in the project).")


class ComputeParams(JobParams):
    """Parameters of jobs that compute with torch."""

    device: str = Field("auto", description="Compute device: auto, cpu, cuda or cuda:N. A GPU asked for and absent is an error.")
    threads: int = Field(0, ge=0, description="CPU threads for torch (0: all cores).")
    seed: int = Field(0, description="Random seed; the same inputs, parameters and seed give the same result.")


def resolve_device(name: str) -> torch.device:
    """Turn ``--device`` into a torch device; never falls back silently from a GPU."""
    name = name.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SubtomoError(f"--device {name}: no usable CUDA GPU on this machine. Use --device cpu, or check the driver and torch build.")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SubtomoError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) present.")
        return dev
    if name == "cpu":
        return torch.device("cpu")
    raise SubtomoError(f"--device {name!r}: not a device. Use auto, cpu, cuda or cuda:N.")


class JobContext:
    """What a running job sees: its directory, parameters, logging, progress and nodes."""

    def __init__(self, spec: "JobSpec", params: JobParams, project: Path, job_dir: Path, name: str,
                 state: Any = None, quiet: bool = False) -> None:
        self.spec = spec
        self.params = params
        self.project = project
        self.dir = job_dir
        self.name = name
        self.state = state  # whatever spec.check returned
        self.quiet = quiet
        self.inputs: list[str] = []
        self.outputs: list[tuple[str, str]] = []
        self._out = open(job_dir / "run.out", "a", buffering=1)
        self.device = resolve_device(params.device) if isinstance(params, ComputeParams) else torch.device("cpu")
        if isinstance(params, ComputeParams):
            if params.threads:
                torch.set_num_threads(params.threads)
            torch.manual_seed(params.seed)
            self.rng = np.random.default_rng(params.seed)
        else:
            self.rng = np.random.default_rng(0)

    def log(self, message: str) -> None:
        """A line in run.out and on the terminal."""
        stamp = _dt.datetime.now().strftime("%H:%M:%S")
        self._out.write(f"[{stamp}] {message}\n")
        if not self.quiet:
            print(message, flush=True)

    def warn(self, message: str) -> None:
        self.log(f"WARNING: {message}")
        with open(self.dir / "run.err", "a") as fh:
            fh.write(message + "\n")

    def rel(self, path: str | Path) -> str:
        """Path relative to the project directory (as stored in STAR files)."""
        p = Path(path)
        try:
            return os.path.relpath(p.resolve(), self.project.resolve())
        except ValueError:
            return str(p)

    def path(self, name: str) -> Path:
        """Absolute path of a file inside the job directory."""
        return self.dir / name

    def add_input(self, path: str | Path) -> None:
        self.inputs.append(self.rel(path))

    def add_output(self, path: str | Path, node_type: NodeType | str = NodeType.FILE) -> None:
        label = node_type.value if isinstance(node_type, NodeType) else str(node_type)
        self.outputs.append((self.rel(path), label))

    def input(self, param: str) -> Path:
        """Resolve a declared input (the user's value, else the newest matching output) and record it."""
        path = self.spec.input(param).resolve(self.project, getattr(self.params, param))
        assert path is not None, f"optional input {param} resolved to nothing; use optional_input"
        self.add_input(path)
        return path

    def optional_input(self, param: str) -> Path | None:
        """Like :meth:`input` for inputs that may be absent (``required=False``)."""
        path = self.spec.input(param).resolve(self.project, getattr(self.params, param))
        if path is not None:
            self.add_input(path)
        return path

    def add_declared_outputs(self, iteration: int | None = None, n_classes: int = 1) -> None:
        """Record the declared outputs that exist in the job directory (``*`` patterns globbed)."""
        for out in self.spec.outputs:
            root = self.project if out.in_project else self.dir
            for name in out.expand(iteration, n_classes):
                paths = sorted(root.glob(name)) if "*" in name else [root / name]
                for path in paths:
                    if path.exists():
                        self.add_output(path, out.node_type)
                    elif not out.optional and "*" not in name:
                        raise RuntimeError(f"{self.spec.command}: declared output {name} was not written")

    def progress(self, items: Iterable[T], total: int | None = None, description: str = "") -> Iterator[T]:
        """Iterate with progress: a rich bar on a terminal, plain lines (every ~10 %) in the log."""
        total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
        if sys.stdout.isatty() and not self.quiet:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeRemainingColumn(), transient=True) as bar:
                task = bar.add_task(description, total=total)
                for item in items:
                    yield item
                    bar.advance(task)
            self._out.write(f"{description}: done ({total})\n")
            return
        step = max(1, (total or 10) // 10)
        start = time.time()
        for i, item in enumerate(items, start=1):
            yield item
            if total and (i % step == 0 or i == total):
                self._out.write(f"{description}: {i}/{total} ({time.time() - start:.1f} s)\n")

    def close(self) -> None:
        self._out.close()


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


def _continued_job_dir(spec: JobSpec, params: JobParams, project: Path, cont: str) -> tuple[Path, str]:
    """The directory of ``--continue-job``, refused unless it is an unfinished job of this type on the same input."""
    d = Path(cont) if Path(cont).is_absolute() else project / cont
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
    if (d / SUCCESS_SENTINEL).exists():
        raise SubtomoError(f"--continue-job {cont}: this job finished; its results are kept as they are. To refine "
                           f"further, start a new {spec.command} job from its outputs (e.g. --i {cont.rstrip('/')}/run_data.star).")
    saved_input = (record.get("parameters") or {}).get("i")
    given_input = getattr(params, "i", None)
    if given_input and saved_input and Path(given_input) != Path(saved_input):
        raise SubtomoError(f"--continue-job {cont}: it ran on --i {saved_input}, not {given_input}. Continue with the same "
                           "input (omit --i), or start a new job.")
    return d, os.path.relpath(d, project).rstrip("/") + "/"


def _job_dir_for(spec: JobSpec, params: JobParams, project: Path) -> tuple[Path, str]:
    cont = getattr(params, "continue_job", None)
    if cont:
        return _continued_job_dir(spec, params, project, cont)
    if params.output:
        d = Path(params.output) if Path(params.output).is_absolute() else project / params.output
        if d.exists() and any(d.iterdir()):
            raise SubtomoError(f"--output {params.output}: directory exists and is not empty; nothing of it is overwritten. Choose a new directory.")
        d.mkdir(parents=True, exist_ok=True)
        return d, os.path.relpath(d, project).rstrip("/") + "/"
    with pipeline_file.locked(project) as pipeline:
        d, name = pipeline.reserve_job_dir(spec.job_type)
        pipeline.add(Process(name, spec.job_type, STATUS_RUNNING))
    return d, name


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
    job_dir, name = _job_dir_for(spec, params, project)
    for sentinel in (SUCCESS_SENTINEL, FAILURE_SENTINEL):
        (job_dir / sentinel).unlink(missing_ok=True)
    record = {
        "job_type": spec.job_type, "command": spec.command,
        "command_line": " ".join(argv) if argv else f"subtomo {spec.command}",
        "parameters": params.model_dump(), "subtomo_version": __version__,
        "torch_version": torch.__version__, "started": _dt.datetime.now().isoformat(timespec="seconds"),
    }
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
