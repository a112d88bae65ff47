"""Starting and aborting jobs as their own processes.

"Run" starts ``python -m subtomo <job> ...`` (an argument list, never a shell string) in the
project directory, in a new session, so closing the browser or stopping the server never
kills the job. Each start is recorded in ``.subtomo_gui/launches/<id>.json`` inside the
project (the project directory is the only state): its pid, arguments and start time; the
job's own output before it has a job directory (e.g. a refused input) goes to ``<id>.log``.

"Abort" sends SIGTERM to the job's process, which the job turns into a clean failure
(``RELION_JOB_EXIT_FAILURE``, pipeline status Failed). The process is found by the job's
``run.out`` being open in it (``/proc/<pid>/fd``, Linux), which works for jobs started from
a terminal too, and checked against the launch records elsewhere.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from subtomo.errors import SubtomoError

STATE_DIR = ".subtomo_gui"
_children: dict[int, subprocess.Popen] = {}  # processes this server started, reaped by a waiting thread


@dataclass
class Launch:
    """One job process started from the GUI."""

    id: str
    pid: int
    arguments: list[str]
    started: float
    log: Path

    def alive(self) -> bool:
        """Whether the process still runs (a zombie of this server counts as ended)."""
        child = _children.get(self.pid)
        if child is not None:
            return child.poll() is None
        return _pid_alive(self.pid)

    def log_tail(self, n_chars: int = 4000) -> str:
        """The end of the process's own output (before and besides the job's run.out)."""
        try:
            return self.log.read_text(errors="replace")[-n_chars:]
        except OSError:
            return ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():  # a zombie is not alive
        try:
            return stat.read_text().split(")")[-1].split()[0] != "Z"
        except OSError:
            return False
    return True


def launches_dir(project: Path) -> Path:
    """Where the GUI records the processes it started."""
    return project / STATE_DIR / "launches"


def start_job(project: Path, arguments: list[str]) -> Launch:
    """Start ``subtomo <arguments>`` in ``project`` as a detached process; returns its record."""
    directory = launches_dir(project)
    directory.mkdir(parents=True, exist_ok=True)
    launch_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    log = directory / f"{launch_id}.log"
    with open(log, "wb") as out:
        child = subprocess.Popen([sys.executable, "-m", "subtomo", *arguments], cwd=project, stdin=subprocess.DEVNULL,
                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
    _children[child.pid] = child
    threading.Thread(target=child.wait, name=f"reap-{child.pid}", daemon=True).start()
    launch = Launch(launch_id, child.pid, list(arguments), time.time(), log)
    record = {"pid": launch.pid, "arguments": launch.arguments, "started": launch.started}
    tmp = directory / f".{launch_id}.json.tmp"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, directory / f"{launch_id}.json")
    return launch


def read_launch(project: Path, launch_id: str) -> Launch | None:
    """The launch record ``launch_id`` (None if there is none or the id is not one of ours)."""
    if not launch_id.replace("-", "").isalnum():
        return None
    path = launches_dir(project) / f"{launch_id}.json"
    try:
        record: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return Launch(launch_id, int(record["pid"]), list(record["arguments"]), float(record["started"]),
                  path.with_suffix(".log"))


def all_launches(project: Path) -> list[Launch]:
    """Every launch record, newest first."""
    found = [read_launch(project, p.stem) for p in launches_dir(project).glob("*.json")]
    return sorted((launch for launch in found if launch is not None), key=lambda la: la.started, reverse=True)


def _open_job_dir(pid: int, project: Path) -> str | None:
    """The job directory (relative to the project) whose run.out process ``pid`` holds open."""
    root = project.resolve()
    try:
        links = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    for fd in links:
        try:
            target = Path(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
        if target.name == "run.out" and root in target.parents:
            return target.parent.relative_to(root).as_posix() + "/"
    return None


def job_of_launch(project: Path, launch: Launch) -> str | None:
    """The job directory a launch made: by its open run.out, else by its recorded command line."""
    if launch.alive():
        found = _open_job_dir(launch.pid, project)
        if found:
            return found
    line = " ".join(["subtomo", *launch.arguments])
    best: tuple[float, str] | None = None
    for record_path in project.glob("*/job*/job.json"):
        try:
            if record_path.stat().st_mtime < launch.started - 1:
                continue
            record = json.loads(record_path.read_text())
        except (OSError, ValueError):
            continue
        if record.get("command_line") == line:
            name = record_path.parent.relative_to(project).as_posix() + "/"
            started = record_path.parent.stat().st_ctime
            if best is None or started < best[0]:
                best = (started, name)
    return best[1] if best else None


def job_pid(project: Path, job: str) -> int | None:
    """The pid of the process running ``job`` (a ``Type/jobNNN/`` name), or None."""
    for launch in all_launches(project):
        if launch.alive() and _open_job_dir(launch.pid, project) == job:
            return launch.pid
    if Path("/proc").is_dir():  # a job started from a terminal
        for entry in os.listdir("/proc"):
            if entry.isdigit() and _open_job_dir(int(entry), project) == job:
                return int(entry)
        return None
    for launch in all_launches(project):  # no /proc: trust our own records
        if launch.alive() and job_of_launch(project, launch) == job:
            return launch.pid
    return None


def abort_job(project: Path, job: str) -> int:
    """Send SIGTERM to the process of ``job``; returns its pid.

    Raises
    ------
    SubtomoError
        No running process holds that job.
    """
    pid = job_pid(project, job)
    if pid is None:
        raise SubtomoError(f"{job}: no running process found for this job (it has ended, or it runs on another machine). "
                           "Nothing was sent.")
    os.kill(pid, signal.SIGTERM)
    return pid
