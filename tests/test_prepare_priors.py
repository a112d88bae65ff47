"""`prepare --particles`: picks imported from another program (here a Dynamo .tbl) give the positions, and their
orientations become initial angles and priors on the particle rows, through extraction."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from subtomo.errors import SubtomoError
from subtomo.geometry.euler import angular_distance_deg, euler_to_matrix
from subtomo.io.mrc import write_mrc
from subtomo.io.particles import ParticleSet
from subtomo.io.star import read_star, write_star
from subtomo.jobs.base import execute

PX = 10.0
TILTS = np.array([-40.0, -20.0, 0.0, 20.0, 40.0])


def _project(root):
    """One 64x48x32 tomogram at 10 Å with a .coords file that --particles must replace, and an Import-style table."""
    d = root / "Tomograms" / "tomo1"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    write_mrc(d / "tomo1.mrc", rng.normal(size=(32, 48, 64)).astype(np.float32), PX)
    (d / "tomo1.coords").write_text("1 1 1\n")
    write_star(root / "Import/job001/tilt_series/tomo1.star",
               {"tomo1": pd.DataFrame({"rlnTomoNominalStageTiltAngle": TILTS,
                                       "rlnMicrographPreExposure": np.abs(TILTS) / 10})})
    write_star(root / "Import/job001/all_tomograms.star", pd.DataFrame([{
        "rlnMicrographName": "Tomograms/tomo1/tomo1.mrc", "rlnTomoName": "tomo1",
        "rlnTomoTiltSeriesStarFile": "Import/job001/tilt_series/tomo1.star", "rlnTomoTiltSeriesPixelSize": PX}]))


def _dynamo_row(x, y, z, dx, dy, dz, tdrot, tilt, narot, apix):
    """One .tbl row as dynamo_table_blank lays it out (cols 4-6 shifts, 7-9 angles, 20 tomo, 24-26 x y z, 36 apix)."""
    row = ["1", "1", "1", dx, dy, dz, tdrot, tilt, narot] + ["0"] * 10 + ["1", "0", "0", "0", x, y, z] + ["0"] * 9
    return " ".join([*row, apix])


def test_dynamo_angles_reach_the_prepared_and_extracted_rows(tmp_path):
    from subtomo.jobs.extract import SPEC as EXTRACT
    from subtomo.jobs.extract import ExtractParams
    from subtomo.jobs.import_particles import SPEC as IMPORT
    from subtomo.jobs.import_particles import ImportParticlesParams
    from subtomo.jobs.prepare import SPEC as PREPARE
    from subtomo.jobs.prepare import PrepareParams

    _project(tmp_path)
    # positions at 5 Å (apix): ours = (x + dx - 1) * 5 / 10 at the tomogram's 10 Å
    (tmp_path / "picks.tbl").write_text(
        _dynamo_row("41", "31", "21", "0.5", "-0.25", "1", "-47.273", "1.1777", "-132.3", "5") + "\n"
        + _dynamo_row("81", "61", "33", "0", "0", "0", "30", "90", "-60", "5") + "\n")
    imp = execute(IMPORT, ImportParticlesParams(i=["picks.tbl"], format="dynamo", tomo_names=["tomo1"]), tmp_path,
                  quiet=True)
    ctx = execute(PREPARE, PrepareParams(i="Import/job001/all_tomograms.star", skip_ctf=True, plot_box=16, device="cpu",
                                         particles=imp.name + "particles.star"), tmp_path, quiet=True)
    parts = ParticleSet.read(ctx.path("particles_subtomo.star"), tmp_path)
    t = parts.table
    assert len(t) == 2  # the two picks, not the .coords file's one line
    xyz = t[["rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ"]].to_numpy()
    assert np.abs(xyz - [[20.25, 14.875, 10.5], [40.0, 30.0, 16.0]]).max() < 0.01 * 0.5
    # eulerangles' pair: Dynamo (-47.273, 1.1777, -132.3) = RELION (137.7, 1.1777, 42.727), i.e. rot = narot - 90,
    # psi = tdrot + 90; so Dynamo (30, 90, -60) = RELION (-150, 90, 120)
    expected = euler_to_matrix(np.array([137.7, -150.0]), np.array([1.1777, 90.0]), np.array([42.727, 120.0]))
    assert angular_distance_deg(parts.rotations(), expected).max() < 0.01
    for angle in ("Rot", "Tilt", "Psi"):
        assert np.allclose(t[f"rlnAngle{angle}Prior"], t[f"rlnAngle{angle}"], atol=1e-9)
    # the CTF model of each particle is at its given position: one row per particle per tilt
    table = read_star(ctx.path("CtfModels/tomo1_ctf.star"))["ctf_models"]
    assert sorted(set(table["rlnTomoParticleId"].astype(int))) == [1, 2] and len(table) == 2 * len(TILTS)
    assert "instead of the .coords files" in (ctx.dir / "run.out").read_text()
    # extraction keeps the angles and priors, so class3d --local / --skip-align can start from them
    ext = execute(EXTRACT, ExtractParams(i=ctx.name + "particles_subtomo.star", box=8, device="cpu"), tmp_path,
                  quiet=True)
    extracted = ParticleSet.read(ext.path("particles_subtomo.star"), tmp_path)
    assert angular_distance_deg(extracted.rotations(), expected).max() < 0.01
    assert np.allclose(extracted.table["rlnAngleTiltPrior"], [1.1777, 90.0], atol=1e-3)


def test_particles_of_an_unknown_tomogram_are_refused_before_anything_is_written(tmp_path):
    from subtomo.jobs.prepare import SPEC, PrepareParams

    _project(tmp_path)
    ps = ParticleSet.from_table(pd.DataFrame({"rlnTomoName": ["TS_09"], "rlnCoordinateX": [1.0], "rlnCoordinateY": [2.0],
                                              "rlnCoordinateZ": [3.0], "rlnAngleRot": [10.0], "rlnAngleTilt": [20.0],
                                              "rlnAnglePsi": [30.0]}))
    ps.write(tmp_path / "picks.star")
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SubtomoError, match=r"picks.star: rlnTomoName TS_09 is no tomogram.*tomo1"):
        execute(SPEC, PrepareParams(i="Import/job001/all_tomograms.star", skip_ctf=True, particles="picks.star",
                                    device="cpu"), tmp_path, quiet=True)
    assert sorted(tmp_path.rglob("*")) == before


def test_positions_are_rescaled_to_each_tomogram_and_origins_subtracted():
    from subtomo.io.importers.picks import picks_per_tomogram

    table = pd.DataFrame({"rlnTomoName": ["a", "b", "a"], "rlnCoordinateX": [40.0, 40.0, 8.0],
                          "rlnCoordinateY": [20.0, 20.0, 6.0], "rlnCoordinateZ": [10.0, 10.0, 4.0],
                          "rlnOriginXAngst": [10.0, 0.0, 0.0], "rlnOriginYAngst": [0.0, 0.0, -5.0],
                          "rlnOriginZAngst": [0.0, 0.0, 0.0], "subtomoTomogramPixelSize": [5.0, 5.0, 5.0],
                          "rlnAngleRot": [1.0, 2.0, 3.0], "rlnAngleTilt": [4.0, 5.0, 6.0], "rlnAnglePsi": [7.0, 8.0, 9.0]})
    given = picks_per_tomogram(ParticleSet.from_table(table), {"a": 10.0, "b": 2.5, "c": 10.0})
    # a at 10 Å: (40, 20, 10) * 5/10 - (10, 0, 0) Å / 10 Å = (19, 10, 5); (8, 6, 4) / 2 - (0, -0.5, 0) = (4, 3.5, 2)
    assert np.allclose(given["a"][0], [[19, 10, 5], [4, 3.5, 2]])
    assert np.allclose(given["b"][0], [[80, 40, 20]]) and len(given["c"][0]) == 0
    assert given["a"][1]["rlnAnglePsiPrior"].tolist() == [7.0, 9.0]  # priors = the given angles



def test_particles_given_without_any_coords_file(tmp_path):
    """--particles needs no .coords file; without either, prepare stops with the fix and writes nothing."""
    from subtomo.errors import SubtomoError
    from subtomo.jobs.import_particles import SPEC as IMPORT
    from subtomo.jobs.import_particles import ImportParticlesParams
    from subtomo.jobs.prepare import SPEC as PREPARE
    from subtomo.jobs.prepare import PrepareParams

    _project(tmp_path)
    (tmp_path / "Tomograms/tomo1/tomo1.coords").unlink()
    (tmp_path / "picks.tbl").write_text(_dynamo_row("41", "31", "21", "0", "0", "0", "0", "0", "0", "10") + "\n")
    imp = execute(IMPORT, ImportParticlesParams(i=["picks.tbl"], format="dynamo", tomo_names=["tomo1"]), tmp_path,
                  quiet=True)
    kw = dict(i="Import/job001/all_tomograms.star", skip_ctf=True, plot_box=16, device="cpu")
    with pytest.raises(SubtomoError, match="pick particles first"):
        execute(PREPARE, PrepareParams(**kw), tmp_path, quiet=True)
    ctx = execute(PREPARE, PrepareParams(**kw, particles=imp.name + "particles.star"), tmp_path, quiet=True)
    assert len(ParticleSet.read(ctx.path("particles_subtomo.star"), tmp_path)) == 1
    assert "no tomo1.coords" in (ctx.dir / "run.out").read_text()
