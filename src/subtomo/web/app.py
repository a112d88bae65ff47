"""The GUI's web application (Starlette): pages, the JSON API the pages call, and file serving.

Pages are rendered on the server from Jinja2 templates; a little vendored JavaScript
(``static/``) polls the JSON API for live job state, sorts tables, drives the map sliders
and draws the isosurface with WebGL. Nothing is loaded from the internet.

Every file-name parameter goes through :func:`subtomo.web.security.project_file` (files
inside the project only, else 404); jobs start only as registered job types whose form
validated against the job's parameter model (:mod:`subtomo.web.forms`).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from subtomo import __version__
from subtomo.errors import SubtomoError
from subtomo.jobs.base import JobSpec
from subtomo.jobs.registry import all_specs
from subtomo.web import forms, processes, project_view
from subtomo.web.classes import class_cards, is_classification_result
from subtomo.web.graph import pipeline_svg
from subtomo.web.guard import AccessGuard
from subtomo.web.security import project_file, relative_to_project
from subtomo.web.tables import star_tables
from subtomo.web.volumes import AXES, MapCache, isosurface, map_info, mesh_bytes, slice_png

STATIC = Path(__file__).parent / "static"
MAP_SUFFIXES = (".mrc", ".map", ".rec")


class GuiState:
    """What the app knows: the project directory, the job registry and caches (no job state)."""

    def __init__(self, project: Path) -> None:
        self.project = project.resolve()
        self.specs: dict[str, JobSpec] = {s.command: s for s in all_specs() if s.command != "demo"}
        self.maps = MapCache()
        self.templates = Environment(loader=PackageLoader("subtomo.web", "templates"),
                                     autoescape=select_autoescape(["html"]))

    def page(self, template: str, **context: Any) -> HTMLResponse:
        """Render a page template with the project, version and job types every page shows."""
        context.update(project=str(self.project), version=__version__, specs=list(self.specs.values()))
        return HTMLResponse(self.templates.get_template(template).render(**context))

    def spec(self, command: str) -> JobSpec:
        """The job type ``command``, or 404."""
        if command not in self.specs:
            raise HTTPException(404, f"no job type {command!r}")
        return self.specs[command]

    def file(self, relative: str | None) -> Path:
        """A project file by its project-relative path, or 404 (see :func:`project_file`)."""
        path = project_file(self.project, relative or "")
        if path is None:
            raise HTTPException(404, "Not found")
        return path

    def volume(self, relative: str | None) -> tuple[Any, float]:
        """A project map as a (z, y, x) float32 array and its pixel size [Å], or 404/422."""
        path = self.file(relative)
        try:
            return self.maps.get(path)
        except (SubtomoError, ValueError, OSError) as exc:
            raise HTTPException(422, f"{relative}: not a readable MRC map ({exc})") from exc


def _state(request: Request) -> GuiState:
    return request.app.state.gui


def _job_name(request: Request, state: GuiState) -> Any:
    proc = project_view.find_process(state.project, request.query_params.get("name", ""))
    if proc is None:
        raise HTTPException(404, "no such job in default_pipeline.star")
    return proc


async def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError as exc:
        raise HTTPException(400, "the request body is not JSON") from exc
    if not isinstance(body, dict):
        raise HTTPException(400, "the request body must be a JSON object")
    return body


# ----------------------------------------------------------------------------- pages


async def index(request: Request) -> HTMLResponse:
    """Job list (live), job types and the pipeline graph."""
    state = _state(request)
    rows = await asyncio.to_thread(project_view.job_rows, state.project)
    graph = await asyncio.to_thread(pipeline_svg, state.project)
    return state.page("index.html", rows=rows, graph=graph)


async def job_form(request: Request) -> HTMLResponse:
    """A job type's form; query parameters pre-fill fields (e.g. ``?i=...``)."""
    state = _state(request)
    spec = state.spec(request.path_params["command"])
    fields = await asyncio.to_thread(forms.form_fields, spec, state.project)
    preset = {k: v for k, v in request.query_params.items() if k in spec.params.model_fields}
    return state.page("form.html", spec=spec, fields=fields, tabs=forms.TABS, preset=preset)


async def job_page(request: Request) -> HTMLResponse:
    """One job: state, progress, log, parameters, resources, outputs and pictures."""
    state = _state(request)
    detail = await asyncio.to_thread(project_view.job_detail, state.project, _job_name(request, state))
    selectable = [f for f in detail.files if is_classification_result(f) and f.endswith("_data.star")]
    return state.page("job.html", job=detail, selectable=selectable[-1:], map_suffixes=MAP_SUFFIXES)


async def display(request: Request) -> HTMLResponse:
    """Display of one project file, by type: picture, STAR table, map or image stack, text."""
    state = _state(request)
    path = state.file(request.query_params.get("path"))
    relative = relative_to_project(state.project, path)
    kind = ("map" if path.suffix.lower() in MAP_SUFFIXES else "stack" if path.suffix.lower() == ".mrcs"
            else "picture" if path.suffix.lower() == ".png" else "star" if path.suffix.lower() == ".star" else "text")
    text = path.read_text(errors="replace")[:200000] if kind == "text" else ""
    return state.page("display.html", path=relative, kind=kind, text=text,
                      selectable=is_classification_result(relative))


async def select_page(request: Request) -> HTMLResponse:
    """Class gallery of a classification result, for selection by clicking."""
    state = _state(request)
    path = state.file(request.query_params.get("path"))
    try:
        data_path, cards = await asyncio.to_thread(class_cards, path, state.project)
    except SubtomoError as exc:
        raise HTTPException(422, str(exc)) from exc
    return state.page("select.html", path=relative_to_project(state.project, data_path), cards=cards)


# ----------------------------------------------------------------------------- JSON API


async def api_jobs(request: Request) -> JSONResponse:
    """Every job's row, newest first."""
    rows = await asyncio.to_thread(project_view.job_rows, _state(request).project)
    return JSONResponse(project_view.as_json(rows))


async def api_job(request: Request) -> JSONResponse:
    """One job's state, progress and log tail."""
    state = _state(request)
    detail = await asyncio.to_thread(project_view.job_detail, state.project, _job_name(request, state))
    return JSONResponse({"row": project_view.as_json(detail.row), "log": detail.log[-8000:], "errors": detail.errors})


async def api_validate(request: Request) -> JSONResponse:
    """Validate a form: errors per field, and the exact command when valid."""
    state = _state(request)
    spec = state.spec(request.path_params["command"])
    params, errors = forms.parse_form(spec, (await _json_body(request)).get("values", {}))
    command = forms.printed_command(forms.command_arguments(spec, params)) if params is not None else ""
    return JSONResponse({"ok": params is not None, "errors": errors, "command": command})


async def api_run(request: Request) -> JSONResponse:
    """Validate a form and start the job as its own process."""
    state = _state(request)
    spec = state.spec(request.path_params["command"])
    params, errors = forms.parse_form(spec, (await _json_body(request)).get("values", {}))
    if params is None:
        return JSONResponse({"ok": False, "errors": errors}, status_code=422)
    arguments = forms.command_arguments(spec, params)
    launch = await asyncio.to_thread(processes.start_job, state.project, arguments)
    return JSONResponse({"ok": True, "launch": launch.id, "command": forms.printed_command(arguments)})


async def api_launch(request: Request) -> JSONResponse:
    """A started process: alive or not, the job directory it made, its early output."""
    state = _state(request)
    launch = processes.read_launch(state.project, request.path_params["launch_id"])
    if launch is None:
        raise HTTPException(404, "no such launch")
    job = await asyncio.to_thread(processes.job_of_launch, state.project, launch)
    return JSONResponse({"alive": launch.alive(), "job": job, "output": launch.log_tail()})


async def api_abort(request: Request) -> JSONResponse:
    """Send SIGTERM to a running job (it ends as failed, with the failure sentinel)."""
    state = _state(request)
    proc = project_view.find_process(state.project, str((await _json_body(request)).get("job", "")))
    if proc is None:
        raise HTTPException(404, "no such job in default_pipeline.star")
    try:
        pid = await asyncio.to_thread(processes.abort_job, state.project, proc.name)
    except SubtomoError as exc:
        return JSONResponse({"ok": False, "error": str(exc)}, status_code=409)
    return JSONResponse({"ok": True, "pid": pid})


async def api_star(request: Request) -> JSONResponse:
    """Every block of a STAR file as columns and rows."""
    state = _state(request)
    path = state.file(request.query_params.get("path"))
    try:
        tables = await asyncio.to_thread(star_tables, path)
    except (SubtomoError, ValueError) as exc:
        raise HTTPException(422, f"not a readable STAR file ({exc})") from exc
    return JSONResponse(tables)


async def api_map_info(request: Request) -> JSONResponse:
    """Shape, pixel size and grey-value statistics of a map."""
    volume, pixel = await asyncio.to_thread(_state(request).volume, request.query_params.get("path"))
    info = map_info(volume, pixel)
    return JSONResponse({**info.__dict__, "shape": list(info.shape)})


def _number(request: Request, name: str, default: float) -> float:
    try:
        return float(request.query_params.get(name, default))
    except ValueError as exc:
        raise HTTPException(400, f"{name} must be a number") from exc


async def api_map_slice(request: Request) -> Response:
    """One orthogonal slice of a map as PNG (``axis``, ``index``, contrast ``low``..``high``)."""
    volume, _ = await asyncio.to_thread(_state(request).volume, request.query_params.get("path"))
    axis = request.query_params.get("axis", "z")
    if axis not in AXES:
        raise HTTPException(400, "axis must be z, y or x")
    low, high = _number(request, "low", float(volume.min())), _number(request, "high", float(volume.max()))
    png = await asyncio.to_thread(slice_png, volume, axis, int(_number(request, "index", 0)), low, high)
    return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})


async def api_map_mesh(request: Request) -> Response:
    """Marching-cubes isosurface of a map at ``level`` (binary, see :func:`mesh_bytes`)."""
    volume, _ = await asyncio.to_thread(_state(request).volume, request.query_params.get("path"))
    level = _number(request, "level", float(volume.mean() + 2 * volume.std()))
    start = time.perf_counter()
    mesh = await asyncio.to_thread(isosurface, volume, level)
    elapsed = time.perf_counter() - start
    return Response(mesh_bytes(*mesh), media_type="application/octet-stream",
                    headers={"Cache-Control": "no-store", "X-Mesh-Seconds": f"{elapsed:.4f}"})


async def project_files(request: Request) -> FileResponse:
    """A file of the project, as it is (pictures, downloads); 404 outside the project."""
    return FileResponse(_state(request).file(request.path_params["path"]))


def create_app(project: Path, token: str | None = None, host: str = "127.0.0.1") -> Starlette:
    """The GUI app for ``project``; with ``token`` every request must carry it (see :mod:`subtomo.web.security`)."""
    routes = [
        Route("/", index), Route("/new/{command}", job_form), Route("/job", job_page), Route("/display", display),
        Route("/select", select_page),
        Route("/api/jobs", api_jobs), Route("/api/job", api_job),
        Route("/api/validate/{command}", api_validate, methods=["POST"]),
        Route("/api/run/{command}", api_run, methods=["POST"]),
        Route("/api/launch/{launch_id}", api_launch), Route("/api/abort", api_abort, methods=["POST"]),
        Route("/api/star", api_star), Route("/api/map/info", api_map_info), Route("/api/map/slice", api_map_slice),
        Route("/api/map/mesh", api_map_mesh),
        Route("/files/{path:path}", project_files),
        Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes)
    app.state.gui = GuiState(project)
    app.add_middleware(AccessGuard, token=token, bound_host=host)
    return app
