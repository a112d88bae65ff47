"""Issue 16 (reliability): finished jobs continued as new jobs, confined STAR paths, option ranges.

Every test here runs the command line (or the job runner) on a tiny project and checks what
is on disk afterwards: old results bit-identical, nothing written when an input is refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from subtomo.cli.main import build_cli
from subtomo.errors import SubtomoError
from subtomo.io.mrc import read_mrc, write_mrc
from subtomo.io.particles import ParticleSet, resolve_project_path
from subtomo.io.run_files import save_optimiser_state
from subtomo.io.star import write_particles
from subtomo.jobs.base import SUCCESS_SENTINEL, execute
from subtomo.jobs.pipeline import Pipeline
from subtomo.testing.synthetic import make_set, write_star_project

FAST = ["--threads", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def dataset():
    return make_set(n=8, box=16, pixel_size_A=12.0, snr=3.0, seed=2, max_offset_px=0.0, ctf=False)


def _project(root: Path, ds) -> Path:
    """Particles (8 subtomograms of 16 px at 12 Å) and a 48 x 40 x 32 px tomogram with picks."""
    write_star_project(ds, root)
    (root / "Tomograms/t1").mkdir(parents=True)
    write_mrc(root / "Tomograms/t1/t1.mrc", np.zeros((32, 40, 48), np.float32), 12.0)
    _picks(root / "picks.star", "Tomograms/t1/t1.mrc")
    return root


def _picks(path: Path, tomogram: str) -> None:
    parts = pd.DataFrame({"rlnMicrographName": [tomogram] * 2, "rlnTomoName": "t1", "rlnCoordinateX": [20.0, 24.0],
                          "rlnCoordinateY": [20.0, 18.0], "rlnCoordinateZ": [16.0, 15.0], "rlnOpticsGroup": 1,
                          "rlnTomoTiltSeriesPixelSize": 12.0})
    optics = pd.DataFrame([{"rlnOpticsGroup": 1, "rlnOpticsGroupName": "opticsGroup1", "rlnVoltage": 300.0,
                            "rlnSphericalAberration": 2.7, "rlnAmplitudeContrast": 0.07, "rlnImagePixelSize": 12.0}])
    write_particles(path, parts, optics)


def _cli(project: Path, monkeypatch, *args: str):
    monkeypatch.chdir(project)
    return CliRunner().invoke(build_cli(), list(args), catch_exceptions=False)


def _hashes(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _entry(project: Path, name: str) -> tuple:
    proc = next(p for p in Pipeline(project).processes if p.name == name)
    return proc.job_type, proc.status, proc.inputs, proc.outputs


# ----------------------------------------------------------------------------- continuing a finished job


def test_a_finished_refinement_continues_with_more_iterations_as_a_new_job(tmp_path, dataset, monkeypatch):
    project = _project(tmp_path, dataset)
    common = ["--i", "particles.star", "--particle-diameter", str(dataset.diameter_A), "--no-ctf",
              "--healpix-step", "15", "--offset-range", "0", "--batch-size", "8", *FAST]
    assert _cli(project, monkeypatch, "refine3d", *common, "--max-iter", "2").exit_code == 0
    old = "Refine3D/job001/"
    before, entry = _hashes(project / old), _entry(project, old)
    again = _cli(project, monkeypatch, "refine3d", "--continue-job", old)  # saved options, no more iterations
    assert again.exit_code == 1
    assert "this job finished after 2 iterations" in again.output and "give a larger --max-iter" in again.output
    more = _cli(project, monkeypatch, "refine3d", "--continue-job", old, "--max-iter", "3")
    assert more.exit_code == 0, more.output
    new = project / "Refine3D/job002"
    assert _hashes(project / old) == before and _entry(project, old) == entry  # the old job as it was
    record = json.loads((new / "job.json").read_text())
    assert record["continued_from"]["job"] == old and record["continued_from"]["iteration"] == 2
    assert record["parameters"]["max_iter"] == 3 and (new / SUCCESS_SENTINEL).exists()
    assert _entry(project, "Refine3D/job002/")[1] == "Succeeded"
    assert (new / "run_it003_model.star").exists() and not (new / "run_it001_model.star").exists()
    # the same maps as one uninterrupted run of 3 iterations
    assert _cli(project, monkeypatch, "refine3d", *common, "--max-iter", "3", "--output", "Refine3D/fresh").exit_code == 0
    for name in ("run_class001.mrc", "run_half1_class001_unfil.mrc"):
        np.testing.assert_array_equal(read_mrc(new / name)[0], read_mrc(project / "Refine3D/fresh" / name)[0])


def test_a_finished_classification_continues_with_more_iterations_as_a_new_job(tmp_path, dataset, monkeypatch):
    project = _project(tmp_path, dataset)
    common = ["--i", "particles.star", "--particle-diameter", str(dataset.diameter_A), "--no-ctf", "--K", "2",
              "--healpix-step", "30", "--offset-range", "0", "--batch-size", "8", *FAST]
    assert _cli(project, monkeypatch, "class3d", *common, "--iter", "1").exit_code == 0
    before = _hashes(project / "Class3D/job001")
    refused = _cli(project, monkeypatch, "class3d", "--continue-job", "Class3D/job001/", "--iter", "1")
    assert refused.exit_code == 1 and "give a larger --iter" in refused.output
    assert not (project / "Class3D/job002").exists()
    assert _cli(project, monkeypatch, "class3d", "--continue-job", "Class3D/job001/", "--iter", "2").exit_code == 0
    assert _hashes(project / "Class3D/job001") == before
    assert _cli(project, monkeypatch, "class3d", *common, "--iter", "2", "--output", "Class3D/fresh").exit_code == 0
    for k in (1, 2):
        name = f"run_it002_class{k:03d}.mrc"
        np.testing.assert_array_equal(read_mrc(project / "Class3D/job002" / name)[0],
                                      read_mrc(project / "Class3D/fresh" / name)[0])


def test_a_finished_2d_classification_continues_with_more_iterations_as_a_new_job(tmp_path):
    from subtomo.jobs.class2d import SPEC, Class2DParams
    from subtomo.testing.patterns2d import dataset as patterns
    from subtomo.testing.patterns2d import write_proj2d_project

    star = write_proj2d_project(tmp_path, patterns(n_per=6, noise=0.5, seed=0)[0])
    common = dict(i=str(star), K=3, particle_diameter=150.0, highres_limit=None, seed=1, device="cpu", threads=1)
    old = execute(SPEC, Class2DParams(iter=2, **common), tmp_path, quiet=True)
    before = _hashes(old.dir)
    with pytest.raises(SubtomoError, match="finished after 2 iterations.*give a larger --iter"):
        execute(SPEC, Class2DParams(iter=2, continue_job=old.name, **common), tmp_path, quiet=True)
    new = execute(SPEC, Class2DParams(iter=3, continue_job=old.name, **common), tmp_path, quiet=True)
    fresh = execute(SPEC, Class2DParams(iter=3, output="Class2D/fresh", **common), tmp_path, quiet=True)
    assert new.name == "Class2D/job002/" and _hashes(old.dir) == before
    np.testing.assert_array_equal(read_mrc(new.dir / "run_it003_classes.mrcs")[0],
                                  read_mrc(fresh.dir / "run_it003_classes.mrcs")[0])


def test_a_converged_refinement_is_not_continued(tmp_path, dataset):
    from subtomo.jobs.refine3d import SPEC, Refine3DParams

    project = _project(tmp_path, dataset)
    old = project / "Refine3D/job001"
    old.mkdir(parents=True)
    (old / "job.json").write_text(json.dumps({"job_type": "Refine3D", "parameters": {"max_iter": 50}}))
    (old / SUCCESS_SENTINEL).touch()
    save_optimiser_state(old, 7, {"iteration": 7, "sampling": {"converged": True}})
    params = Refine3DParams(i="particles.star", particle_diameter=100.0, ctf=False, continue_job="Refine3D/job001/",
                            max_iter=60)
    with pytest.raises(SubtomoError, match="converged after iteration 7.*start a new refine3d job"):
        execute(SPEC, params, project, quiet=True)
    assert sorted(p.name for p in (project / "Refine3D").iterdir()) == ["job001"]


# ----------------------------------------------------------------------------- paths from STAR files


def test_relative_star_paths_stay_inside_the_project(tmp_path):
    project = tmp_path / "p"
    assert resolve_project_path(project, "Particles/../Particles/a.mrc", source="x.star") == project / "Particles/../Particles/a.mrc"
    assert resolve_project_path(project, "/data/t1.mrc", source="x.star") == Path("/data/t1.mrc")  # absolute: as written
    assert resolve_project_path(project, "../shared/ref.mrc") == project / "../shared/ref.mrc"  # given by the user
    with pytest.raises(SubtomoError, match=r"x.star: row 4, rlnCtfImage 'a/../../b.mrc' is a relative path that leads "
                                           r"out of the project.*Give an absolute path if the file really lives outside"):
        resolve_project_path(project, "a/../../b.mrc", source="x.star", row=4, column="rlnCtfImage")


def test_a_particle_image_outside_the_project_is_refused_before_a_job_is_made(tmp_path, dataset, monkeypatch):
    project = _project(tmp_path / "deep/p", dataset)
    star = project / "particles.star"
    particles = ParticleSet.read(star, project)
    names = particles.table["rlnImageName"].astype(str).tolist()
    outside = tmp_path / "elsewhere.mrc"
    write_mrc(outside, read_mrc(project / names[0])[0], 12.0)
    ok = particles.with_columns(rlnImageName=[str(outside)] + names[1:])  # absolute: allowed
    ok.write(project / "absolute.star")
    assert ParticleSet.read("absolute.star", project).image_paths()[0] == outside
    bad = particles.with_columns(rlnImageName=names[:2] + ["1@../../etc/passwd"] + names[3:])
    bad.write(project / "escape.star")
    with pytest.raises(SubtomoError, match=r"escape.star: row 3, rlnImageName '../../etc/passwd'"):
        ParticleSet.read("escape.star", project).image_refs()
    before = sorted(project.rglob("*"))
    result = _cli(project, monkeypatch, "refine3d", "--i", "escape.star", "--particle-diameter", "100", *FAST)
    assert result.exit_code == 1 and "leads out of the project" in result.output
    assert sorted(project.rglob("*")) == before  # no job directory, no pipeline entry


def test_a_tomogram_path_outside_the_project_is_refused_by_extract(tmp_path, dataset, monkeypatch):
    project = _project(tmp_path / "p", dataset)
    _picks(project / "escape.star", "../t1.mrc")
    result = _cli(project, monkeypatch, "extract", "--i", "escape.star", "--box", "16", *FAST)
    assert result.exit_code == 1
    assert "escape.star: row 1, rlnMicrographName '../t1.mrc' is a relative path that leads out" in result.output
    assert not (project / "Extract").exists()


def test_missing_truncated_or_mismatched_images_are_refused_before_a_job_is_made(tmp_path, dataset, monkeypatch):
    project = _project(tmp_path / "p", dataset)
    image = project / "Particles/p000003.mrc"
    good = image.read_bytes()
    for damage, problem in ((lambda: image.unlink(), "row 4, rlnImageName: .*p000003.mrc not found"),
                            (lambda: image.write_bytes(good[:3000]), "p000003.mrc: the file is truncated"),
                            (lambda: write_mrc(image, np.zeros((18, 18, 18), np.float32), 12.0),
                             "row 4, rlnImageName: .*p000003.mrc is 18 x 18 x 18 px, .*p000000.mrc is 16 x 16 x 16")):
        damage()
        with pytest.raises(SubtomoError, match=problem):
            ParticleSet.read("particles.star", project).check_image_files()
        for command in ("refine3d", "class3d"):
            result = _cli(project, monkeypatch, command, "--particle-diameter", "100", "--no-ctf", "--i", "particles.star")
            assert result.exit_code == 1 and "p000003.mrc" in result.output
        image.write_bytes(good)
    assert sorted(p.name for p in project.iterdir()) == ["Particles", "Tomograms", "particles.star", "picks.star"]
    write_mrc(project / "stack.mrcs", np.zeros((3, 16, 16), np.float32), 12.0, stack=True)
    table = pd.DataFrame({"rlnImageName": ["1@stack.mrcs", "3@stack.mrcs", "4@stack.mrcs"], "rlnImagePixelSize": 12.0})
    with pytest.raises(SubtomoError, match=r"row 3, rlnImageName: image 4 of .*stack.mrcs, which holds 3"):
        ParticleSet.from_table(table, project=project).check_image_files()


# ----------------------------------------------------------------------------- option ranges

ON_PARTICLES = ["--i", "particles.star", "--no-ctf"]  # refine3d, class3d: checks against the data too
BAD_OPTIONS = [
    # command, arguments, the option the message must name
    ("refine3d", [*ON_PARTICLES, "--particle-diameter", "0"], "--particle-diameter"),
    ("refine3d", [*ON_PARTICLES, "--particle-diameter", "1000"], "--particle-diameter"),  # larger than the 192 Å box
    ("refine3d", [*ON_PARTICLES, "--particle-diameter", "100", "--healpix-step", "-7.5"], "--healpix-step"),
    ("refine3d", [*ON_PARTICLES, "--particle-diameter", "100", "--auto-local-healpix-step", "90"], "--auto-local-healpix-step"),
    ("refine3d", [*ON_PARTICLES, "--particle-diameter", "100", "--offset-step", "0"], "--offset-step"),
    ("refine3d", [*ON_PARTICLES, "--particle-diameter", "100", "--max-iter", "0"], "--max-iter"),
    ("refine3d", [*ON_PARTICLES, "--particle-diameter", "100", "--pad", "4"], "--pad"),
    ("refine3d", [*ON_PARTICLES, "--particle-diameter", "100", "--sym", "X5"], "--sym"),
    ("refine3d", [*ON_PARTICLES, "--particle-diameter", "100", "--seed", "-1"], "--seed"),
    ("class3d", [*ON_PARTICLES, "--particle-diameter", "100", "--K", "9"], "--K"),  # more classes than the 8 particles
    ("class3d", [*ON_PARTICLES, "--particle-diameter", "100", "--sym", "Q"], "--sym"),
    ("class3d", [*ON_PARTICLES, "--particle-diameter", "100", "--tau2-fudge", "0"], "--tau2-fudge"),
    ("class3d", [*ON_PARTICLES, "--particle-diameter", "100", "--iter", "0"], "--iter"),
    ("class2d", ["--K", "0"], "--K"),
    ("class2d", ["--psi-step", "120"], "--psi-step"),
    ("class2d", ["--highres-limit", "-3"], "--highres-limit"),
    ("extract", ["--i", "picks.star", "--box", "15"], "--box"),  # odd
    ("extract", ["--i", "picks.star", "--box", "4"], "--box"),
    ("extract", ["--i", "picks.star", "--box", "40"], "--box"),  # larger than the tomogram's 32 px in z
    ("extract", ["--i", "picks.star", "--box", "16", "--rescale", "7"], "--rescale"),
    ("ctf", ["--res-max", "40"], "--res-max"),
    ("ctf", ["--defocus-min", "60000"], "--defocus-min"),
    ("ctf", ["--lower-tilt-defoci", "95"], "--lower-tilt-defoci"),
    ("ctf", ["--cc-threshold", "1.5"], "--cc-threshold"),
    ("ctf", ["--defocus-handedness", "2"], "--defocus-handedness"),
    ("prepare", ["--bfactor-per-dose", "-4"], "--bfactor-per-dose"),
    ("prepare", ["--lower-tilt-limit", "95"], "--lower-tilt-limit"),
    ("import", ["--amplitude-contrast", "1.5"], "--amplitude-contrast"),
    ("import", ["--voltage", "0"], "--voltage"),
    ("mask", ["--cylinder", "30", "--box", "16", "--angpix", "5", "--axis", "0,0,0"], "--axis"),
    ("mask", ["--sphere", "60", "--box", "16", "--angpix", "5", "--soft-edge", "-1"], "--soft-edge"),
    ("mask", ["--sphere", "60", "--box", "16", "--angpix", "5", "--threshold-fraction", "1"], "--threshold-fraction"),
    ("postprocess", ["--autob-highres", "20", "--autob-lowres", "10"], "--autob-highres"),
    ("postprocess", ["--fsc-threshold", "0"], "--fsc-threshold"),
    ("localres", ["--threshold", "1.5"], "--threshold"),
    ("select", ["--min-class-fraction", "2"], "--min-class-fraction"),
    ("reconstruct", ["--bin", "0"], "--bin"),
    ("export-relion", ["--sym", "Q"], "--sym"),
    ("simulate", ["new", "--pixel-size", "-1"], "--pixel-size"),
    ("simulate", ["new", "--variant-mass-fraction", "1.2"], "--variant-mass-fraction"),
    ("demo", ["--healpix-step", "90"], "--healpix-step"),
]


@pytest.fixture(scope="module")
def range_project(tmp_path_factory, dataset) -> Path:
    return _project(tmp_path_factory.mktemp("ranges"), dataset)


@pytest.mark.parametrize(("command", "args", "option"), BAD_OPTIONS, ids=[f"{c} {' '.join(a)}" for c, a, _ in BAD_OPTIONS])
def test_a_bad_option_value_stops_before_anything_is_written(range_project, monkeypatch, command, args, option):
    before = sorted(range_project.rglob("*"))
    result = _cli(range_project, monkeypatch, command, *args)
    assert result.exit_code != 0
    lines = [line.strip() for line in result.output.splitlines()]
    assert any(line.startswith(("ERROR:", "Error:", "- ")) and option in line for line in lines), result.output
    assert sorted(range_project.rglob("*")) == before  # no job directory, no pipeline file, nothing
