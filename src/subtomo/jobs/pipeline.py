"""The project's pipeline file (``default_pipeline.star``, RELION-style).

It records every job (process), its status, and the files (nodes) it read and wrote,
so jobs can default their inputs to the previous stage's outputs and a GUI can draw
the flow. Paths are relative to the project directory.

Several jobs (terminals, a GUI, cluster workers) may update the file at once: every change
is a read-modify-write inside an exclusive lock (:func:`locked`, ``fcntl`` on POSIX) with an
atomic replace, and job numbers are reserved inside the same lock. A damaged file is an
error with the fix: ``subtomo pipeline --rebuild`` rebuilds it from the job directories
(each ``job.json`` records its job type, status, inputs and outputs).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pandas as pd

from subtomo.errors import SubtomoError
from subtomo.io.star import read_star, write_star

try:  # POSIX advisory locks; elsewhere jobs must not be started concurrently
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

PIPELINE_FILE = "default_pipeline.star"
STATUS_RUNNING, STATUS_SUCCEEDED, STATUS_FAILED = "Running", "Succeeded", "Failed"


@dataclass
class Process:
    name: str  # e.g. "Refine3D/job005/"
    job_type: str
    status: str
    inputs: list[str] = field(default_factory=list)
    outputs: list[tuple[str, str]] = field(default_factory=list)  # (path, node type)


class Pipeline:
    """In-memory view of ``default_pipeline.star``; ``save()`` writes it atomically."""

    def __init__(self, project: Path) -> None:
        self.project = Path(project)
        self.counter = 1
        self.processes: list[Process] = []
        path = self.project / PIPELINE_FILE
        if path.exists():
            self._load(path)

    def _load(self, path: Path) -> None:
        try:
            blocks = read_star(path)
        except SubtomoError as exc:
            raise _damaged(path, str(exc)) from exc
        if "pipeline_processes" in blocks and not {"pipeline_general", "pipeline_nodes"} <= set(blocks):
            raise _damaged(path, "blocks are missing (the file is truncated)")
        general = blocks.get("pipeline_general", {})
        if isinstance(general, pd.DataFrame):
            general = general.iloc[0].to_dict()
        self.counter = int(general.get("rlnPipeLineJobCounter", 1))
        procs = blocks.get("pipeline_processes")
        if isinstance(procs, dict):
            procs = pd.DataFrame([procs])
        by_name: dict[str, Process] = {}
        if isinstance(procs, pd.DataFrame):
            for _, row in procs.iterrows():
                p = Process(str(row["rlnPipeLineProcessName"]), str(row["rlnPipeLineProcessTypeLabel"]),
                            str(row["rlnPipeLineProcessStatusLabel"]))
                by_name[p.name] = p
                self.processes.append(p)
        nodes = blocks.get("pipeline_nodes")
        node_types = {}
        if isinstance(nodes, dict):
            nodes = pd.DataFrame([nodes])
        if isinstance(nodes, pd.DataFrame):
            node_types = dict(zip(nodes["rlnPipeLineNodeName"].astype(str), nodes["rlnPipeLineNodeTypeLabel"].astype(str)))
        for block, src, dst in (("pipeline_input_edges", "rlnPipeLineEdgeFromNode", "rlnPipeLineEdgeProcess"),
                                ("pipeline_output_edges", "rlnPipeLineEdgeProcess", "rlnPipeLineEdgeToNode")):
            edges = blocks.get(block)
            if isinstance(edges, dict):
                edges = pd.DataFrame([edges])
            if not isinstance(edges, pd.DataFrame):
                continue
            for _, row in edges.iterrows():
                if block == "pipeline_input_edges" and str(row[dst]) in by_name:
                    by_name[str(row[dst])].inputs.append(str(row[src]))
                elif block == "pipeline_output_edges" and str(row[src]) in by_name:
                    node = str(row[dst])
                    by_name[str(row[src])].outputs.append((node, node_types.get(node, "")))

    def next_job_name(self, job_type: str) -> str:
        return f"{job_type}/job{self.counter:03d}/"

    def reserve_job_dir(self, job_type: str) -> tuple[Path, str]:
        """Make the next free ``<JobType>/jobNNN/`` directory (call inside :func:`locked`)."""
        while True:
            name = self.next_job_name(job_type)
            number_taken = any(p.name.rstrip("/").endswith(f"job{self.counter:03d}") for p in self.processes)
            try:
                if number_taken:
                    raise FileExistsError(name)
                (self.project / name).mkdir(parents=True)
                return self.project / name, name
            except FileExistsError:
                self.counter += 1

    def add(self, process: Process) -> None:
        self.processes = [p for p in self.processes if p.name != process.name] + [process]
        number = int(process.name.rstrip("/").rsplit("job", 1)[-1]) if "/job" in process.name else 0
        self.counter = max(self.counter, number + 1)

    def latest_output(self, job_types: tuple[str, ...], filename: str | tuple[str, ...]) -> str | None:
        """Most recent succeeded job of one of ``job_types`` that wrote a node ending in ``filename``.

        ``filename`` may be a tuple of alternatives (e.g. the two outputs a Select job can write).
        """
        names = (filename,) if isinstance(filename, str) else tuple(filename)
        for proc in reversed(self.processes):
            if proc.job_type in job_types and proc.status == STATUS_SUCCEEDED:
                for node, _ in proc.outputs:
                    if node.endswith(names):
                        return node
        return None

    def save(self) -> None:
        procs = pd.DataFrame({
            "rlnPipeLineProcessName": [p.name for p in self.processes],
            "rlnPipeLineProcessAlias": ["None"] * len(self.processes),
            "rlnPipeLineProcessTypeLabel": [p.job_type for p in self.processes],
            "rlnPipeLineProcessStatusLabel": [p.status for p in self.processes],
        })
        nodes: dict[str, str] = {}
        for p in self.processes:
            for n in p.inputs:
                nodes.setdefault(n, "")
            for n, t in p.outputs:
                nodes[n] = t
        blocks: dict = {
            "pipeline_general": {"rlnPipeLineJobCounter": self.counter},
            "pipeline_processes": procs,
            "pipeline_nodes": pd.DataFrame({"rlnPipeLineNodeName": list(nodes),
                                            "rlnPipeLineNodeTypeLabel": [t or "File" for t in nodes.values()]}),
            "pipeline_input_edges": pd.DataFrame({
                "rlnPipeLineEdgeFromNode": [n for p in self.processes for n in p.inputs],
                "rlnPipeLineEdgeProcess": [p.name for p in self.processes for _ in p.inputs]}),
            "pipeline_output_edges": pd.DataFrame({
                "rlnPipeLineEdgeProcess": [p.name for p in self.processes for _ in p.outputs],
                "rlnPipeLineEdgeToNode": [n for p in self.processes for n, _ in p.outputs]}),
        }
        write_star(self.project / PIPELINE_FILE, blocks)


def _damaged(path: Path, problem: str) -> SubtomoError:
    return SubtomoError(f"{path}: the pipeline file is damaged ({problem}). Rebuild it from the job directories with "
                        "'subtomo pipeline --rebuild' (the damaged file is kept as default_pipeline.star.damaged).")


@contextlib.contextmanager
def locked(project: Path) -> Iterator[Pipeline]:
    """The project's pipeline, read and written back under an exclusive lock.

    Use for every change: ``with locked(project) as pipeline: pipeline.add(...)``. The file
    is saved (atomically) when the block ends without an exception.
    """
    project = Path(project)
    project.mkdir(parents=True, exist_ok=True)
    with open(project / f".{PIPELINE_FILE}.lock", "a") as lock:
        if fcntl is not None:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            pipeline = Pipeline(project)
            yield pipeline
            pipeline.save()
        finally:
            if fcntl is not None:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def rebuild(project: Path) -> Pipeline:
    """A new pipeline file from the ``job.json`` of every job directory (the old one kept aside)."""
    project = Path(project)
    with open(project / f".{PIPELINE_FILE}.lock", "a") as lock:
        if fcntl is not None:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        old = project / PIPELINE_FILE
        if old.exists():
            os.replace(old, old.with_name(PIPELINE_FILE + ".damaged"))
        pipeline = Pipeline(project)
        records = []
        for record_path in project.glob("*/job[0-9][0-9][0-9]*/job.json"):
            try:
                record = json.loads(record_path.read_text())
            except (OSError, ValueError):
                continue
            name = record_path.parent.relative_to(project).as_posix() + "/"
            status = {"succeeded": STATUS_SUCCEEDED, "failed": STATUS_FAILED}.get(record.get("status", ""), STATUS_FAILED)
            records.append(Process(name, str(record.get("job_type", record_path.parent.parent.name)), status,
                                   list(record.get("inputs", [])), [tuple(o) for o in record.get("outputs", [])]))
        for process in sorted(records, key=lambda p: int(p.name.rstrip("/").rsplit("job", 1)[-1])):
            pipeline.add(process)
        pipeline.save()
        if fcntl is not None:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    return pipeline
