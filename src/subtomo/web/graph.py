"""The pipeline graph: jobs joined by the files one wrote and another read (``default_pipeline.star``).

Laid out in rows by depth, top to bottom (a job sits one row below the deepest job it reads
from; jobs of the same depth side by side) and drawn as an SVG whose boxes link to the job
pages.
"""

from __future__ import annotations

from dataclasses import dataclass
from html import escape
from pathlib import Path
from urllib.parse import quote

from subtomo.jobs.pipeline import STATUS_RUNNING, Pipeline, Process
from subtomo.web.project_view import job_status

BOX_W, BOX_H, GAP_X, GAP_Y = 150, 40, 16, 26
STATUS_COLOURS = {"Succeeded": "#2e7d32", "Failed": "#c62828", "Running": "#1565c0"}


@dataclass
class Edge:
    """A file written by one job and read by another."""

    source: str
    target: str
    file: str


def pipeline_edges(processes: list[Process]) -> list[Edge]:
    """Every (writer job, reader job, file) triple of the pipeline."""
    writer = {node: p.name for p in processes for node, _ in p.outputs}
    return [Edge(writer[node], p.name, node) for p in processes for node in p.inputs
            if node in writer and writer[node] != p.name]


def layout(processes: list[Process], edges: list[Edge]) -> dict[str, tuple[int, int]]:
    """(column, row) of each job: row = longest chain of inputs before it, column = order within the row."""
    depth: dict[str, int] = {}
    parents: dict[str, list[str]] = {}
    for e in edges:
        parents.setdefault(e.target, []).append(e.source)
    for p in processes:  # pipeline order is execution order, so parents come first
        depth[p.name] = max((depth.get(s, 0) + 1 for s in parents.get(p.name, [])), default=0)
    bottom = max(depth.values(), default=0) + 1
    for p in processes:  # a running job records its inputs when it ends: show it below the rest until then
        if p.status == STATUS_RUNNING and not p.inputs:
            depth[p.name] = bottom
    used: dict[int, int] = {}
    place = {}
    for p in processes:
        row = depth[p.name]
        place[p.name] = (used.get(row, 0), row)
        used[row] = used.get(row, 0) + 1
    return place


def pipeline_svg(project: Path) -> str:
    """The project's pipeline as an SVG element (empty message if there are no jobs)."""
    processes = Pipeline(project).processes
    if not processes:
        return '<p class="muted">No jobs yet.</p>'
    edges = pipeline_edges(processes)
    place = layout(processes, edges)
    width = (max(c for c, _ in place.values()) + 1) * (BOX_W + GAP_X)
    height = (max(r for _, r in place.values()) + 1) * (BOX_H + GAP_Y)
    parts = [f'<svg id="pipeline-graph" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="pipeline graph">']

    def anchor(name: str) -> tuple[int, int]:
        column, row = place[name]
        return column * (BOX_W + GAP_X), row * (BOX_H + GAP_Y)

    for e in edges:  # from the bottom of the writer to the top of the reader
        (x0, y0), (x1, y1) = anchor(e.source), anchor(e.target)
        x0, x1, y0 = x0 + BOX_W // 2, x1 + BOX_W // 2, y0 + BOX_H
        mid = (y0 + y1) // 2
        parts.append(f'<path class="edge" d="M{x0},{y0} C{x0},{mid} {x1},{mid} {x1},{y1}" fill="none" stroke="#888">'
                     f'<title>{escape(e.file)}</title></path>')
    for p in processes:
        x, y = anchor(p.name)
        colour = STATUS_COLOURS.get(job_status(project, p), "#555")
        parts.append(f'<a href="/job?name={quote(p.name)}"><g class="node" data-job="{escape(p.name)}">'
                     f'<rect x="{x}" y="{y}" width="{BOX_W}" height="{BOX_H}" rx="6" fill="#fff" stroke="{colour}" '
                     f'stroke-width="2"/><text x="{x + 8}" y="{y + 18}" font-size="13">{escape(p.name)}</text>'
                     f'<text x="{x + 8}" y="{y + 35}" font-size="11" fill="{colour}">{escape(job_status(project, p))}'
                     f'</text></g></a>')
    parts.append("</svg>")
    return "".join(parts)
