"""What the GUI shows of a project: its jobs, their state, progress, logs and outputs.

Everything is read from the project directory on each request (``default_pipeline.star``,
each job's ``job.json``, ``run.out``, ``run.err`` and sentinels), so a restarted server or a
second browser tab sees the same thing.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from subtomo.jobs.base import FAILURE_SENTINEL, SUCCESS_SENTINEL
from subtomo.jobs.pipeline import STATUS_FAILED, STATUS_RUNNING, STATUS_SUCCEEDED, Pipeline, Process

_PROGRESS = re.compile(r"^(?P<what>[^\[\n][^\n]*?): (?P<i>\d+)/(?P<n>\d+) \(")
_ITERATION = re.compile(r"[Ii]teration (?P<i>\d+)\s*(?:/|of)\s*(?P<n>\d+)")
MAX_FILES_LISTED = 500  # an Extract job holds one file per particle; the page lists the first ones
DISPLAYABLE = (".png", ".star", ".mrc", ".mrcs", ".map", ".rec", ".json", ".txt", ".xml", ".coords", ".tlt", ".out", ".err")


@dataclass
class JobRow:
    """One line of the job list."""

    name: str
    job_type: str
    status: str  # Running | Succeeded | Failed
    progress: float | None  # 0..1 from the last progress line of run.out
    progress_text: str
    command_line: str
    log_tail: str = ""


@dataclass
class JobDetail:
    """A job's page: its record, log, resources and outputs."""

    row: JobRow
    parameters: dict[str, Any]
    resources: dict[str, Any]
    started: str
    finished: str
    inputs: list[str]
    outputs: list[tuple[str, str]]
    pictures: list[str]  # PNGs in the job directory
    files: list[str]  # every displayable file in the job directory
    log: str
    errors: str
    extra: dict[str, Any] = field(default_factory=dict)


def read_text_tail(path: Path, n_chars: int) -> str:
    """The last ``n_chars`` characters of a text file ("" if absent)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - n_chars))
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def progress_of(log: str) -> tuple[float | None, str]:
    """(fraction done, description) from the last progress line of a run.out text."""
    for line in reversed(log.splitlines()):
        match = _PROGRESS.match(line) or _ITERATION.search(line)
        if match:
            i, n = int(match.group("i")), int(match.group("n"))
            if n > 0:
                what = match.groupdict().get("what") or "iteration"
                return min(1.0, i / n), f"{what}: {i}/{n}"
    return None, ""


def job_status(project: Path, proc: Process) -> str:
    """The status, trusting the sentinels over the pipeline (a killed job leaves Running there)."""
    directory = project / proc.name
    if (directory / SUCCESS_SENTINEL).exists():
        return STATUS_SUCCEEDED
    if (directory / FAILURE_SENTINEL).exists():
        return STATUS_FAILED
    return proc.status


def _record(project: Path, name: str) -> dict[str, Any]:
    try:
        return json.loads((project / name / "job.json").read_text())
    except (OSError, ValueError):
        return {}


def job_row(project: Path, proc: Process, tail_chars: int = 0) -> JobRow:
    """A job's line in the job list (with the end of its log when ``tail_chars``)."""
    status = job_status(project, proc)
    log = read_text_tail(project / proc.name / "run.out", 6000)
    fraction, text = progress_of(log) if status == STATUS_RUNNING else (1.0 if status == STATUS_SUCCEEDED else None, "")
    return JobRow(proc.name, proc.job_type, status, fraction, text, _record(project, proc.name).get("command_line", ""),
                  log[-tail_chars:] if tail_chars else "")


def job_rows(project: Path) -> list[JobRow]:
    """Every job of the project, newest first."""
    return [job_row(project, proc, tail_chars=600 if proc.status == STATUS_RUNNING else 0)
            for proc in reversed(Pipeline(project).processes)]


def find_process(project: Path, name: str) -> Process | None:
    """The pipeline's process called ``name`` (``Type/jobNNN/``; a missing slash is added)."""
    name = name if name.endswith("/") else name + "/"
    return next((p for p in Pipeline(project).processes if p.name == name), None)


def job_detail(project: Path, proc: Process) -> JobDetail:
    """Everything the job page shows."""
    record = _record(project, proc.name)
    directory = project / proc.name
    files = sorted(p.relative_to(project).as_posix() for p in directory.rglob("*")
                   if p.is_file() and p.suffix.lower() in DISPLAYABLE)
    return JobDetail(
        row=job_row(project, proc), parameters=record.get("parameters", {}), resources=record.get("resources", {}),
        started=record.get("started", ""), finished=record.get("finished", ""),
        inputs=list(record.get("inputs", proc.inputs)),
        outputs=[(str(o[0]), str(o[1])) for o in record.get("outputs", proc.outputs)],
        pictures=[f for f in files if f.endswith(".png")][:MAX_FILES_LISTED], files=files[:MAX_FILES_LISTED],
        log=read_text_tail(directory / "run.out", 20000), errors=read_text_tail(directory / "run.err", 8000),
        extra={"files_total": len(files)})


def as_json(obj: Any) -> Any:
    """A dataclass (or list of them) as plain data for a JSON response."""
    if isinstance(obj, list):
        return [as_json(o) for o in obj]
    return asdict(obj)
