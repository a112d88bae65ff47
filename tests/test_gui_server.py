"""The GUI server without a browser: file-serving and token rules, forms, slices and isosurfaces."""

from __future__ import annotations

import http.client
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette", reason="the GUI extra is not installed (pip install -e '.[gui]')")
pytest.importorskip("skimage", reason="the GUI extra is not installed (pip install -e '.[gui]')")

from PIL import Image  # noqa: E402

from subtomo.cli.main import build_cli  # noqa: E402
from subtomo.io.mrc import write_mrc  # noqa: E402
from subtomo.jobs.pipeline import Process  # noqa: E402
from subtomo.jobs.registry import load_spec  # noqa: E402
from subtomo.web import forms  # noqa: E402
from subtomo.web.graph import layout, pipeline_edges  # noqa: E402
from subtomo.web.live import ServerThread, free_port  # noqa: E402
from subtomo.web.project_view import progress_of  # noqa: E402
from subtomo.web.security import project_file  # noqa: E402
from subtomo.web.volumes import isosurface, mesh_bytes, read_mesh_bytes, slice_png  # noqa: E402

SECRET = "top secret outside the project"


def _request(url: str, raw_path: str, method: str = "GET", body: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, bytes, http.client.HTTPResponse]:
    """One request with the path sent exactly as given (no client-side normalisation of ``..``)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest(method, raw_path, skip_host=True, skip_accept_encoding=True)
    sent = {"Host": f"{host}:{port}", **(headers or {})}
    if body is not None:
        sent["Content-Length"] = str(len(body))
    for k, v in sent.items():
        conn.putheader(k, v)
    conn.endheaders(body)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data, response


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gui")
    proj = root / "project"
    (proj / "Maps").mkdir(parents=True)
    (root / "secret.txt").write_text(SECRET)
    (proj / "Maps" / "note.txt").write_text("inside")
    z, y, x = np.mgrid[:24, :20, :16].astype(np.float32)
    write_mrc(proj / "Maps" / "ramp.mrc", (x + 100 * z).astype(np.float32), pixel_size_A=2.0)
    os.symlink(root / "secret.txt", proj / "Maps" / "link_out.txt")
    os.symlink(proj / "Maps" / "note.txt", proj / "Maps" / "link_in.txt")
    return proj


@pytest.fixture(scope="module")
def server(project):
    with ServerThread(project) as live:
        yield live


def test_project_file_rules(project):
    assert project_file(project, "Maps/note.txt") == (project / "Maps" / "note.txt").resolve()
    assert project_file(project, "Maps/link_in.txt") is not None
    for bad in ("../secret.txt", "Maps/../../secret.txt", "/etc/passwd", str(project / "Maps" / "note.txt"),
                "Maps/link_out.txt", "", "Maps\\..\\..\\secret.txt", "C:/x", "Maps/missing.txt", "Maps"):
        assert project_file(project, bad) is None, bad


@pytest.mark.parametrize("raw_path", [
    "/files/../secret.txt", "/files/Maps/../../secret.txt", "/files/%2e%2e/secret.txt", "/files/%2E%2E%2Fsecret.txt",
    "/files/Maps/%2e%2e/%2e%2e/secret.txt", "/files//etc/passwd", "/files/%2Fetc%2Fpasswd", "/files/Maps/link_out.txt",
    "/display?path=../secret.txt", "/display?path=%2Fetc%2Fpasswd", "/display?path=Maps/link_out.txt",
    "/api/star?path=..%2Fsecret.txt", "/api/map/info?path=%2e%2e%2Fsecret.txt", "/api/map/slice?path=Maps/link_out.txt",
    "/select?path=../secret.txt",
])
def test_traversal_and_symlinks_out_get_404(server, raw_path):
    status, body, _ = _request(server.url, raw_path)
    assert status == 404, (raw_path, status)
    assert SECRET.encode() not in body


def test_files_inside_are_served(server):
    assert _request(server.url, "/files/Maps/note.txt")[:2] == (200, b"inside")
    assert _request(server.url, "/files/Maps/link_in.txt")[:2] == (200, b"inside")
    status, body, _ = _request(server.url, "/display?path=Maps/note.txt")
    assert status == 200 and b"inside" in body


def test_loopback_server_refuses_foreign_host_header(server):
    status, _, _ = _request(server.url, "/", headers={"Host": "evil.example:80"})
    assert status == 403


def test_posts_must_be_same_origin_json(server):
    body = json.dumps({"values": {}}).encode()
    status, _, _ = _request(server.url, "/api/validate/mask", "POST", body,
                            {"Content-Type": "application/json", "Origin": "http://evil.example"})
    assert status == 403
    status, _, _ = _request(server.url, "/api/run/mask", "POST", b"i=x", {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 415


def test_only_registered_jobs_with_valid_parameters_start(server, project):
    def post(path: str, values: dict) -> tuple[int, dict]:
        status, body, _ = _request(server.url, path, "POST", json.dumps({"values": values}).encode(),
                                   {"Content-Type": "application/json", "Origin": server.url})
        return status, json.loads(body) if body.startswith(b"{") else {}

    assert post("/api/run/rm", {})[0] == 404
    assert post("/api/run/..%2F..%2Fbin%2Fsh", {})[0] == 404
    status, data = post("/api/run/mask", {"i": "Maps/ramp.mrc", "soft_edge": "-1"})
    assert status == 422 and "soft_edge" in data["errors"]
    status, data = post("/api/run/mask", {"i": "Maps/ramp.mrc", "__class__": "x"})
    assert status == 422 and "__class__" in data["errors"]
    status, data = post("/api/validate/mask", {"i": "Maps/ramp.mrc; rm -rf /", "extend": "2"})
    assert status == 200 and data["command"] == "subtomo mask --i 'Maps/ramp.mrc; rm -rf /' --extend 2.0"
    assert not (project / ".subtomo_gui").exists()  # nothing was started


def test_token_required_off_loopback(project):
    with ServerThread(project, token="s3cret-token", bound_host="0.0.0.0") as live:
        assert _request(live.url, "/")[0] == 403
        assert _request(live.url, "/?token=wrong")[0] == 403
        assert _request(live.url, "/files/Maps/note.txt")[0] == 403
        status, _, response = _request(live.url, "/?token=s3cret-token")
        assert status == 200
        cookie = response.getheader("set-cookie")
        assert cookie and "HttpOnly" in cookie and "s3cret-token" in cookie
        assert _request(live.url, "/files/Maps/note.txt", headers={"Cookie": cookie.split(";")[0]})[:2] == (200, b"inside")
        assert _request(live.url, "/files/Maps/note.txt", headers={"Cookie": "subtomo_gui_token=nope"})[0] == 403


def test_form_command_round_trips_through_the_cli(project):
    spec = load_spec("mask")
    params, errors = forms.parse_form(spec, {"i": "Maps/ramp.mrc", "extend": "-2", "center": "1, 2,3", "soft_edge": "4"})
    assert errors == {}
    args = forms.command_arguments(spec, params)
    command = build_cli().commands["mask"]
    ctx = command.make_context("mask", args[1:])
    assert ctx.params["i"] == "Maps/ramp.mrc" and float(ctx.params["extend"]) == -2.0
    assert float(ctx.params["soft_edge"]) == 4.0 and ctx.params["center"] == "1.0,2.0,3.0"
    reparsed, errors = forms.parse_form(spec, {k: v for k, v in ctx.params.items() if k in ("i", "extend", "center", "soft_edge")})
    assert errors == {} and reparsed == params


def test_form_fields_follow_the_model(project):
    spec = load_spec("refine3d")
    fields = {f.name: f for f in forms.form_fields(spec, project)}
    assert set(fields) == set(spec.params.model_fields)
    assert fields["device"].tab == "Running" and fields["i"].tab == "I/O"
    assert fields["i"].node_type == "ParticlesData"
    info = spec.params.model_fields["seed"]
    assert fields["seed"].default == str(info.default) and fields["seed"].help == info.description


def test_slice_png_is_the_section(project):
    volume = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    image = np.asarray(Image.open(io.BytesIO(slice_png(volume, "y", 2, 0.0, 119.0))))
    expected = np.clip(volume[:, 2, :] / 119.0 * 255, 0, 255).astype(np.uint8)[::-1]
    np.testing.assert_array_equal(image, expected)


def test_isosurface_of_a_sphere_lies_on_the_sphere():
    n, radius = 40, 12.0
    z, y, x = np.mgrid[:n, :n, :n].astype(np.float32) - (n - 1) / 2
    distance = np.sqrt(x**2 + y**2 + z**2)
    vertices, normals, faces = isosurface(-distance, -radius)  # inside = higher values
    assert len(faces) > 500
    r = np.linalg.norm(vertices, axis=1) * n / 2  # back to voxels
    assert np.abs(r - radius).max() < 0.1
    np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-3)
    v2, n2, f2 = read_mesh_bytes(mesh_bytes(vertices, normals, faces))
    np.testing.assert_array_equal(v2, vertices) and np.testing.assert_array_equal(f2, faces)
    assert isosurface(-distance, 5.0)[2].shape == (0, 3)  # level outside the map's range


def test_map_api_over_http(server):
    status, body, _ = _request(server.url, "/api/map/info?path=Maps/ramp.mrc")
    info = json.loads(body)
    assert status == 200 and info["shape"] == [24, 20, 16] and info["pixel_size_A"] == pytest.approx(2.0)
    status, body, _ = _request(server.url, "/api/map/slice?path=Maps/ramp.mrc&axis=x&index=3&low=0&high=2315")
    image = np.asarray(Image.open(io.BytesIO(body)))
    assert status == 200 and image.shape == (24, 20)  # (z, y) section, x = 3
    z = np.arange(24, dtype=np.float32)[:, None].repeat(20, axis=1)
    expected = np.clip((3 + 100 * z) / 2315 * 255, 0, 255).astype(np.uint8)[::-1]
    np.testing.assert_array_equal(image, expected)
    status, body, response = _request(server.url, "/api/map/mesh?path=Maps/ramp.mrc&level=1000.5")
    vertices, _, faces = read_mesh_bytes(body)
    assert status == 200 and len(faces) > 0 and response.getheader("X-Mesh-Seconds")


def test_progress_lines():
    assert progress_of("[10:00:00] start\nextract: 3/10 (1.0 s)\nextract: 7/10 (2.0 s)\n") == (0.7, "extract: 7/10")
    assert progress_of("iteration   4: resolution ...\nIteration 5/20 done\n")[0] == pytest.approx(0.25)
    assert progress_of("nothing here") == (None, "")


def test_refused_job_reports_its_error_and_leaves_no_job(server, project):
    """A job whose input is missing stops in its check: the launch's output carries the message."""
    status, body, _ = _request(server.url, "/api/run/mask", "POST",
                               json.dumps({"values": {"i": "Maps/missing.mrc"}}).encode(),
                               {"Content-Type": "application/json", "Origin": server.url})
    launch = json.loads(body)["launch"]
    assert status == 200
    deadline = time.time() + 120
    while time.time() < deadline:
        state = json.loads(_request(server.url, f"/api/launch/{launch}")[1])
        if not state["alive"]:
            break
        time.sleep(0.5)
    assert not state["alive"] and state["job"] is None
    assert "Maps/missing.mrc" in state["output"] and "ERROR" in state["output"]
    assert not (project / "MaskCreate").exists()
    assert _request(server.url, "/api/launch/..%2F..%2Fsecret")[0] == 404
    # the launch record lives in the project: a new server (restart) finds it
    with ServerThread(project) as again:
        assert json.loads(_request(again.url, f"/api/launch/{launch}")[1])["output"] == state["output"]


def test_pipeline_graph_joins_writers_to_readers():
    procs = [Process("Import/job001/", "Import", "Succeeded", [], [("Import/job001/all.star", "TomogramGroupMetadata")]),
             Process("CtfFind/job002/", "CtfFind", "Succeeded", ["Import/job001/all.star"], [("CtfFind/job002/c.star", "X")]),
             Process("Prepare/job003/", "Prepare", "Failed", ["CtfFind/job002/c.star"], []),
             Process("Mask/job004/", "MaskCreate", "Succeeded", ["Import/job001/all.star", "outside.mrc"], [])]
    edges = pipeline_edges(procs)
    assert [(e.source, e.target) for e in edges] == [("Import/job001/", "CtfFind/job002/"), ("CtfFind/job002/", "Prepare/job003/"),
                                                      ("Import/job001/", "Mask/job004/")]
    assert layout(procs, edges) == {"Import/job001/": (0, 0), "CtfFind/job002/": (0, 1), "Prepare/job003/": (0, 2),
                                     "Mask/job004/": (1, 1)}
    running = Process("Refine3D/job005/", "Refine3D", "Running")  # inputs not recorded yet
    assert layout([*procs, running], edges)["Refine3D/job005/"] == (0, 3)


def test_stopping_the_server_does_not_stop_its_jobs(tmp_path):
    """`subtomo gui` is stopped (SIGINT to its whole process group, as Ctrl-C does) while its job runs."""
    project = tmp_path / "project"
    (project / "Maps").mkdir(parents=True)
    z, y, x = np.mgrid[:24, :20, :16].astype(np.float32)
    write_mrc(project / "Maps" / "ramp.mrc", (x + 100 * z).astype(np.float32), pixel_size_A=2.0)
    port = free_port()
    gui = subprocess.Popen([sys.executable, "-m", "subtomo", "gui", str(project), "--port", str(port)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if _request(url, "/api/jobs")[0] == 200:
                    break
            except OSError:
                time.sleep(0.3)
        status, body, _ = _request(url, "/api/run/mask", "POST", json.dumps({"values": {"i": "Maps/ramp.mrc"}}).encode(),
                                   {"Content-Type": "application/json", "Origin": url})
        assert status == 200
        launch = json.loads(body)["launch"]
    finally:
        os.killpg(gui.pid, signal.SIGINT)
        gui.wait(timeout=60)
    assert not any(project.glob("MaskCreate/job*/RELION_JOB_EXIT_*"))  # the job was still running when the server ended
    record = json.loads((project / ".subtomo_gui" / "launches" / f"{launch}.json").read_text())
    assert record["arguments"] == ["mask", "--i", "Maps/ramp.mrc"]
    deadline = time.time() + 180
    while time.time() < deadline and not any(project.glob("MaskCreate/job*/RELION_JOB_EXIT_*")):
        time.sleep(0.5)
    assert sorted(p.name for p in project.glob("MaskCreate/job*/RELION_JOB_EXIT_*")) == ["RELION_JOB_EXIT_SUCCESS"]
