"""The GUI in a real browser (Playwright driving Debian's Chromium) on a tiny simulated project.

The project is made once for the module (simulate tiny, import, ctf, prepare, extract,
class2d: about 20 s on 2 cores). The tests then do what a person does: fill a job form,
see an invalid value flagged, run the job and see it finish; click three 2D classes and
save the selection (a real ``select`` job, checked against the data STAR); move a map's
slice slider; abort a running job and see the failure sentinel.

Screenshots: ``SUBTOMO_GUI_SCREENSHOTS=docs/gui python -m pytest tests/test_gui_browser.py``
writes the pictures shown in the README.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="the GUI extra is not installed (pip install -e '.[gui]')")
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no Chromium executable (Debian: apt-get install -y chromium); browser tests skipped",
                allow_module_level=True)

from subtomo.io.particles import ParticleSet  # noqa: E402
from subtomo.jobs.base import FAILURE_SENTINEL, SUCCESS_SENTINEL, execute  # noqa: E402
from subtomo.jobs.registry import load_spec  # noqa: E402
from subtomo.web.live import ServerThread  # noqa: E402

TIMEOUT_MS = 120_000
SHOTS = Path(os.environ["SUBTOMO_GUI_SCREENSHOTS"]) if os.environ.get("SUBTOMO_GUI_SCREENSHOTS") else None


def _run(where: Path, module: str, **params) -> str:
    spec = load_spec(module)
    return execute(spec, spec.params(**params), where, quiet=True).name


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gui_browser")
    _run(root, "simulate", project_dir="tiny", preset="tiny", seed=1)
    proj = root / "tiny"
    _run(proj, "import_tomograms")
    _run(proj, "ctf", skip_ctf=True)
    _run(proj, "prepare", skip_ctf=True)
    _run(proj, "extract", box=32, project=True)
    _run(proj, "class2d", K=4, iter=3, particle_diameter=200)
    return proj


@pytest.fixture(scope="module")
def server(project):
    with ServerThread(project) as live:
        yield live


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--use-gl=swiftshader",
                                                                               "--enable-unsafe-swiftshader"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    tab = context.new_page()
    tab.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    tab.on("dialog", lambda dialog: dialog.accept())
    yield tab
    context.close()
    assert errors == [], f"JavaScript errors in the page: {errors}"


def _shot(page, name: str, full_page: bool = False) -> None:
    if SHOTS is not None:
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / name), full_page=full_page)


def _wait_for_status(page, status: str) -> str:
    """Wait on a job page until its badge shows ``status``; returns the job name."""
    page.wait_for_url(lambda url: "/job?name=" in url)
    page.locator("#job-status", has_text=status).wait_for()
    return page.locator("#job-title").get_attribute("data-job")


def test_job_list_and_pipeline_graph(page, server, project):
    page.goto(server.url + "/")
    rows = page.locator("#jobs tbody tr[data-job]")
    rows.first.wait_for()
    assert rows.count() == 6  # simulate, import, ctf, prepare, extract, class2d
    assert page.locator("#pipeline-graph g.node").count() == 6
    assert page.locator("#pipeline-graph path.edge").count() >= 5  # each stage reads the one before
    page.locator("#pipeline-graph g.node", has_text="Class2D").click()
    page.wait_for_url(lambda url: "/job?name=Class2D" in url)
    assert page.locator("#job-status").inner_text() == "Succeeded"
    assert page.locator(".pictures img").count() >= 1  # the class gallery PNG


def test_fill_and_run_a_job_from_its_form(page, server, project):
    page.goto(server.url + "/new/mask")
    page.locator('select.pick[data-for="f-i"]').select_option("GroundTruth/class001.mrc")
    assert page.locator("#f-i").input_value() == "GroundTruth/class001.mrc"
    page.locator(".tab", has_text="Parameters").click()
    page.locator("#f-soft_edge").fill("-1")
    page.locator("#e-soft_edge", has_text="greater than or equal to 0").wait_for()  # flagged at the field
    assert not (project / "MaskCreate").exists()  # nothing ran
    page.locator("#f-soft_edge").fill("3")
    page.locator("#f-extend").fill("2")
    page.locator("#print-command").click()
    page.locator("#command", has_text="subtomo mask").wait_for()
    assert page.locator("#command").inner_text() == "subtomo mask --i GroundTruth/class001.mrc --extend 2.0 --soft-edge 3.0"
    page.locator("#run-job").click()
    job = _wait_for_status(page, "Succeeded")
    assert job.startswith("MaskCreate/job") and (project / job / SUCCESS_SENTINEL).exists()
    assert page.locator("#outputs li").count() >= 1


def test_select_three_classes_by_clicking(page, server, project):
    data = sorted((project / "Class2D").glob("job*/run_it003_data.star"))[-1]
    relative = data.relative_to(project).as_posix()
    page.goto(server.url + "/job?name=" + data.parent.relative_to(project).as_posix() + "/")
    page.locator("#select-classes").click()
    cards = page.locator(".class-card")
    cards.first.wait_for()
    fractions = [float(t.split("%")[0].split()[-1]) for t in cards.all_inner_texts()]
    assert fractions == sorted(fractions, reverse=True)  # largest first
    chosen = [int(cards.nth(j).get_attribute("data-class")) for j in range(3)]
    for j in range(3):
        cards.nth(j).click()
    assert page.locator(".class-card.selected").count() == 3
    _shot(page, "class_gallery_selection.png")
    page.locator("#save-selection").click()
    job = _wait_for_status(page, "Succeeded")
    assert job.startswith("Select/job")
    particles = ParticleSet.read(data, project).table
    expected = particles[particles["rlnClassNumber"].isin(chosen)]
    selected = ParticleSet.read(project / job / "subtomo_proj2d_sel.star", project).table
    assert len(selected) == len(expected) > 0
    assert sorted(selected["rlnImageName"]) == sorted(expected["rlnImageName"])
    subtomograms = ParticleSet.read(project / job / "output_2Dto3D.star", project).table  # Step 17: one per projection
    assert len(subtomograms) == len(expected)
    record = (project / job / "job.json").read_text()
    assert relative in record and ",".join(str(k) for k in sorted(chosen)) in record.replace(" ", "").replace("[", "").replace("]", "")


def test_map_display_slider_and_isosurface(page, server, project):
    page.goto(server.url + "/display?path=GroundTruth/class001.mrc")
    image = page.locator("#slice-z")
    page.wait_for_function("() => { const i = document.getElementById('slice-z'); return i.complete && i.naturalWidth > 0 && !i.dataset.loading; }")
    before = image.get_attribute("src")
    start = int(page.locator("#index-z").input_value())
    page.locator("#index-z").focus()
    for _ in range(4):
        page.keyboard.press("ArrowRight")
    page.wait_for_function(f"() => document.getElementById('slice-z').dataset.index === '{start + 4}'")
    assert image.get_attribute("src") != before and f"index={start + 4}" in image.get_attribute("src")
    assert page.locator("#label-z").inner_text().startswith(f"{start + 4} /")
    page.wait_for_function("() => Number(document.getElementById('mesh-info').dataset.triangles) > 0")
    _shot(page, "map_display.png")


def test_abort_a_running_job(page, server, project):
    page.goto(server.url + "/new/refine3d")
    page.locator(".tab", has_text="Parameters").click()
    page.locator("#f-particle_diameter").fill("200")
    page.locator("#run-job").click()
    job = _wait_for_status(page, "Running")
    page.goto(server.url + "/")
    page.locator(f'#jobs tr[data-job="{job}"] button.abort').wait_for()
    _shot(page, "job_list_running.png")
    page.goto(server.url + "/job?name=" + job)
    page.locator("#abort").click()
    page.locator("#job-status", has_text="Failed").wait_for()
    assert (project / job / FAILURE_SENTINEL).exists() and not (project / job / SUCCESS_SENTINEL).exists()
    assert "terminated by SIGTERM" in (project / job / "run.err").read_text()


def test_screenshots_of_forms_and_graph(page, server):
    if SHOTS is None:
        pytest.skip("set SUBTOMO_GUI_SCREENSHOTS=DIR to write the README's screenshots")
    page.goto(server.url + "/new/refine3d")
    page.locator(".tab", has_text="Parameters").click()
    _shot(page, "refine3d_form.png")
    page.goto(server.url + "/")
    page.locator("#pipeline-graph g.node").last.wait_for()
    _shot(page, "pipeline_graph.png", full_page=True)
