"""Benchmark of the web GUI in headless Chromium (prints timings).

    python bench/bench_gui.py [--jobs 50] [--box 128] [--repeats 5] [--json PATH]

A synthetic project with ``--jobs`` finished jobs (job.json, run.out, sentinels and a
pipeline chaining them) and one ``--box``³ map (Gaussian blobs plus noise). Reported
(medians over ``--repeats``): the job list page (server response, and navigation to load
in the browser with the job table and pipeline graph drawn); the map display (navigation
until the three orthogonal slices are shown; one slider step until the new slice is
shown); the isosurface (marching cubes on the server, and fetch + WebGL upload + draw as
the page measures it, with the triangle count). Needs the GUI extra, Playwright and a
Chromium executable (``apt-get install chromium``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from _common import add_json_option, write_figures
from playwright.sync_api import sync_playwright

from subtomo.io.mrc import write_mrc
from subtomo.jobs import pipeline as pipeline_file
from subtomo.jobs.base import SUCCESS_SENTINEL
from subtomo.jobs.pipeline import STATUS_SUCCEEDED, Process
from subtomo.web.live import ServerThread


def make_project(root: Path, n_jobs: int, box: int) -> None:
    """``n_jobs`` finished jobs, each reading the previous one's output, and a box³ map."""
    with pipeline_file.locked(root) as pipeline:
        previous = None
        for j in range(1, n_jobs + 1):
            name = f"Refine3D/job{j:03d}/"
            directory = root / name
            directory.mkdir(parents=True)
            (directory / "job.json").write_text(json.dumps({"job_type": "Refine3D", "command": "refine3d",
                                                            "command_line": "subtomo refine3d --particle-diameter 200",
                                                            "parameters": {"particle_diameter": 200}}))
            (directory / "run.out").write_text("".join(f"iteration {i}: resolution 20 A\n" for i in range(20)))
            (directory / "run_data.star").write_text("data_\n")
            (directory / SUCCESS_SENTINEL).touch()
            pipeline.add(Process(name, "Refine3D", STATUS_SUCCEEDED, [previous] if previous else [],
                                 [(name + "run_data.star", "ParticlesData")]))
            previous = name + "run_data.star"
    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[:box, :box, :box].astype(np.float32) - box / 2
    volume = rng.normal(0, 0.1, (box, box, box)).astype(np.float32)
    for centre in rng.uniform(-box / 4, box / 4, (12, 3)):
        volume += np.exp(-((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2) / (2 * (box / 16) ** 2))
    (root / "Maps").mkdir()
    write_mrc(root / "Maps" / "map.mrc", volume, pixel_size_A=2.0)


SLICES_SHOWN = ("() => ['z','y','x'].every(a => { const i = document.getElementById('slice-' + a);"
                " return i && i.complete && i.naturalWidth > 0 && !i.dataset.loading; })")


def measure(url: str, repeats: int) -> dict[str, float]:
    server_s, page_s, slices_s, step_s, mesh_server_s, mesh_shown_s, triangles = [], [], [], [], [], [], 0
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium") or "chromium",
                                             args=["--no-sandbox", "--use-gl=swiftshader", "--enable-unsafe-swiftshader"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        for _ in range(repeats):
            t = time.perf_counter()
            urllib.request.urlopen(url + "/").read()
            server_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            page.goto(url + "/")
            page.locator("#pipeline-graph g.node").last.wait_for()
            page_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            page.goto(url + "/display?path=Maps/map.mrc")
            page.wait_for_function(SLICES_SHOWN)
            slices_s.append(time.perf_counter() - t)
            start = int(page.locator("#index-z").input_value())
            t = time.perf_counter()
            page.locator("#index-z").focus()
            page.keyboard.press("ArrowRight")
            page.wait_for_function(f"() => document.getElementById('slice-z').dataset.index === '{start + 1}' && "
                                   "!document.getElementById('slice-z').dataset.loading")
            step_s.append(time.perf_counter() - t)
            page.wait_for_function("() => document.getElementById('mesh-info').dataset.shownSeconds")
            text = page.locator("#mesh-info").inner_text()
            mesh_server_s.append(float(text.split("marching cubes ")[1].split(" s")[0]))
            mesh_shown_s.append(float(page.locator("#mesh-info").get_attribute("data-shown-seconds")))
            triangles = int(page.locator("#mesh-info").get_attribute("data-triangles"))
        browser.close()
    median = statistics.median
    return {"job_list_server_s": median(server_s), "job_list_page_s": median(page_s),
            "map_slices_shown_s": median(slices_s), "map_slices_shown_first_s": slices_s[0], "map_slider_step_s": median(step_s),
            "isosurface_marching_cubes_s": median(mesh_server_s), "isosurface_fetch_and_draw_s": median(mesh_shown_s),
            "isosurface_triangles": triangles}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=50)
    ap.add_argument("--box", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    add_json_option(ap)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        make_project(Path(tmp), args.jobs, args.box)
        with ServerThread(Path(tmp)) as live:
            figures = measure(live.url, args.repeats)
    print(f"GUI, {args.jobs} jobs, {args.box}^3 map, median of {args.repeats}:")
    for key, value in figures.items():
        print(f"  {key:<32} {value:.3f}" if isinstance(value, float) else f"  {key:<32} {value}")
    write_figures(args.json, {f"{k}": v for k, v in figures.items()})


if __name__ == "__main__":
    main()
