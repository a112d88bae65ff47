"""The project's pipeline file (``default_pipeline.star``, RELION-style).

It records every job (process), its status, and the files (nodes) it read and wrote,
so jobs can default their inputs to the previous stage's outputs and a GUI can draw
the flow. Paths are relative to the project directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from subtomo.io.star import read_star, write_star

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
        blocks = read_star(path)
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
