"""Particle importers (issue 20): values read by hand from files written as each program
documents them, a round trip per format (ours → format → ours), and the import-particles job."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from subtomo.errors import SubtomoError
from subtomo.geometry.euler import angular_distance_deg, euler_to_matrix, random_rotations
from subtomo.io.importers import csv_points, dynamo, portal, pytom, stopgap
from subtomo.io.importers.picks import picks_from_particles
from subtomo.io.mrc import write_mrc
from subtomo.io.particles import ParticleSet
from subtomo.jobs.base import execute
from subtomo.jobs.import_particles import SPEC, ImportParticlesParams

RX90 = np.array([[1.0, 0, 0], [0, 0, -1], [0, 1, 0]])  # 90° counter-clockwise about x


def our_particles(n: int = 40, seed: int = 0) -> ParticleSet:
    rng = np.random.default_rng(seed)
    coords = rng.uniform(0, 400, (n, 3))
    origins_A = rng.uniform(-6, 6, (n, 3))
    table = pd.DataFrame({"rlnTomoName": np.where(np.arange(n) % 3 == 0, "TS_01", "TS_02"),
                          "rlnCoordinateX": coords[:, 0], "rlnCoordinateY": coords[:, 1], "rlnCoordinateZ": coords[:, 2],
                          "rlnOpticsGroup": 1, "rlnRandomSubset": np.arange(n) % 2 + 1})
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnImagePixelSize": [6.8]})
    ps = ParticleSet.from_table(table, optics)
    return ps.with_poses(random_rotations(n, rng), origins_A / 6.8)


def roundtrip(fmt: str, tmp_path: Path):
    ours = our_particles()
    picks = picks_from_particles(ours)
    numbers = {"TS_01": 1, "TS_02": 2}
    names = {1: "TS_01", 2: "TS_02"}
    if fmt == "dynamo":
        back = dynamo.read_dynamo_table(dynamo.write_dynamo_table(tmp_path / "p.tbl", picks, numbers), names)
    elif fmt == "stopgap":
        back = stopgap.read_stopgap_motl(stopgap.write_stopgap_motl(tmp_path / "p.star", picks, numbers), names)
    elif fmt == "pytom":
        back = pytom.read_pytom_candidates(pytom.write_pytom_candidates(tmp_path / "p.star", picks, 6.8))
    elif fmt == "csv":
        back = csv_points.read_csv_points(csv_points.write_csv_points(tmp_path / "p.csv", picks, 1.0), "x", 1.0)
    else:
        sel = picks.tomo == "TS_02"
        one = type(picks)(tomo=picks.tomo[sel], coords_px=picks.coords_px[sel], rotations=picks.rotations[sel])
        back = portal.read_portal_ndjson(portal.write_portal_ndjson(tmp_path / "p.ndjson", one), "TS_02")
        picks = one
    return picks, back.to_particles(6.8)


@pytest.mark.parametrize("fmt", ["dynamo", "stopgap", "pytom", "csv", "ndjson"])
def test_round_trip_positions_and_orientations(fmt, tmp_path):
    picks, imported = roundtrip(fmt, tmp_path)
    pos = imported.table[["rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ"]].to_numpy()
    assert np.abs(pos - picks.coords_px).max() < 0.01
    assert imported.table["rlnTomoName"].tolist() == picks.tomo.tolist()
    err = angular_distance_deg(imported.rotations(), picks.rotations)
    assert err.max() < 0.01
    prior = euler_to_matrix(*(imported.table[c].to_numpy() for c in ("rlnAngleRotPrior", "rlnAngleTiltPrior", "rlnAnglePsiPrior")))
    assert angular_distance_deg(prior, picks.rotations).max() < 0.01
    if fmt == "stopgap":
        assert imported.table["rlnRandomSubset"].tolist() == picks.halves.tolist()


def test_particle_position_is_coordinate_minus_origin():
    ours = our_particles(3)
    picks = picks_from_particles(ours)
    expected = ours.table["rlnCoordinateX"].to_numpy() - ours.table["rlnOriginXAngst"].to_numpy() / 6.8
    assert np.allclose(picks.coords_px[:, 0], expected)


def test_dynamo_table_read_by_hand(tmp_path):
    # 35 columns as dynamo_table_blank writes them; tomo 2, shifts (0.5, -0.25, 1), x y z = 101 202 33
    row = ["1", "1", "1", "0.5", "-0.25", "1", "-47.273", "1.1777", "-132.3", "0.8", "0", "0", "1", "-60", "60",
           "-60", "60", "0", "0", "2", "0", "3", "0", "101", "202", "33"] + ["0"] * 9 + ["3.4"]
    (tmp_path / "a.tbl").write_text(" ".join(row) + "\n")
    picks = dynamo.read_dynamo_table(tmp_path / "a.tbl", {1: "TS_01", 2: "TS_02"})
    assert picks.tomo.tolist() == ["TS_02"]
    assert np.allclose(picks.coords_px, [[100.5, 200.75, 33.0]])  # x + dx - 1 (MATLAB's first voxel is 1)
    assert picks.classes.tolist() == [3] and picks.scores.tolist() == [0.8] and picks.pixel_size_A == 3.4
    # eulerangles' test pair: Dynamo (-47.273, 1.1777, -132.3) is RELION (137.7, 1.1777, 42.727)
    assert angular_distance_deg(picks.rotations, euler_to_matrix(137.7, 1.1777, 42.727)[None]).max() < 0.01
    with pytest.raises(SubtomoError, match="tomogram number 2"):
        dynamo.read_dynamo_table(tmp_path / "a.tbl", {1: "TS_01"})
    (tmp_path / "b.tbl").write_text("1 1 1 0 0 0\n")
    with pytest.raises(SubtomoError, match=r"b.tbl:1: 6 numbers"):
        dynamo.read_dynamo_table(tmp_path / "b.tbl", {})


def test_dynamo_volume_list(tmp_path):
    (tmp_path / "t.vll").write_text("/data/tomos/TS_01.mrc\n* label = a\n/data/tomos/TS_07.rec\n")
    assert dynamo.read_volume_list(tmp_path / "t.vll") == {1: "TS_01", 2: "TS_07"}


STOPGAP_TEXT = """
data_stopgap_motivelist

loop_
_motl_idx
_tomo_num
_object
_subtomo_num
_halfset
_orig_x
_orig_y
_orig_z
_score
_x_shift
_y_shift
_z_shift
_phi
_psi
_the
_class
1 1 1 1 A 100 50 20 0.31 0.5 0 -1 30 0 0 1
2 1 1 2 B 10 11 12 0.12 0 0 0 0 0 90 2
"""


def test_stopgap_motl_read_by_hand(tmp_path):
    (tmp_path / "m.star").write_text(STOPGAP_TEXT)
    picks = stopgap.read_stopgap_motl(tmp_path / "m.star", {1: "TS_01"})
    assert np.allclose(picks.coords_px, [[99.5, 49, 18], [9, 10, 11]])
    assert picks.halves.tolist() == [1, 2] and picks.classes.tolist() == [1, 2]
    assert np.allclose(picks.scores, [0.31, 0.12])
    c, s = np.cos(np.radians(30)), np.sin(np.radians(30))
    assert np.allclose(picks.rotations[0], [[c, -s, 0], [s, c, 0], [0, 0, 1]])  # phi = 30 about z
    assert np.allclose(picks.rotations[1], RX90)  # the = 90 about x
    (tmp_path / "bad.star").write_text(STOPGAP_TEXT.replace("_phi\n", ""))
    with pytest.raises(SubtomoError):
        stopgap.read_stopgap_motl(tmp_path / "bad.star", {1: "TS_01"})


PYTOM_TEXT = """
# Created by the starfile Python package (version 0.5.6) at 10:00:00 on 01/02/2025


data_

loop_
_rlnCoordinateX #1
_rlnCoordinateY #2
_rlnCoordinateZ #3
_rlnAngleRot #4
_rlnAngleTilt #5
_rlnAnglePsi #6
_rlnLCCmax #7
_rlnCutOff #8
_rlnSearchStd #9
_rlnDetectorPixelSize #10
_rlnMicrographName #11
120	311	74	-10.0	90.0	35.0	0.2731	0.1821	0.0112	13.79	tomo200528_107.mrc
17	208	66	171.5	12.5	-97.5	0.2014	0.1821	0.0112	13.79	tomo200528_107.mrc
"""


def test_pytom_candidates_read_by_hand(tmp_path):
    (tmp_path / "tomo200528_107_particles.star").write_text(PYTOM_TEXT)
    picks = pytom.read_pytom_candidates(tmp_path / "tomo200528_107_particles.star")
    assert picks.tomo.tolist() == ["tomo200528_107"] * 2
    assert np.allclose(picks.coords_px, [[120, 311, 74], [17, 208, 66]])
    assert np.allclose(picks.scores, [0.2731, 0.2014]) and picks.pixel_size_A == 13.79
    assert np.allclose(picks.rotations[1], euler_to_matrix(171.5, 12.5, -97.5))


def test_pytom_relion5_centred_coordinates(tmp_path):
    text = PYTOM_TEXT.replace("_rlnCoordinateX", "_rlnCenteredCoordinateXAngst").replace(
        "_rlnCoordinateY", "_rlnCenteredCoordinateYAngst").replace("_rlnCoordinateZ", "_rlnCenteredCoordinateZAngst").replace(
        "_rlnMicrographName", "_rlnTomoName").replace("tomo200528_107.mrc", "tomo200528_107")
    (tmp_path / "c.star").write_text(text)
    with pytest.raises(SubtomoError, match="size is unknown"):
        pytom.read_pytom_candidates(tmp_path / "c.star")
    picks = pytom.read_pytom_candidates(tmp_path / "c.star", {"tomo200528_107": (464, 480, 140)})
    assert np.allclose(picks.coords_px[0], [232 + 120 / 13.79, 240 + 311 / 13.79, 70 + 74 / 13.79])


def test_csv_with_and_without_header(tmp_path):
    (tmp_path / "a.csv").write_text("x,y,z\n1.5,2,3\n# comment\n4,5,6\n")
    picks = csv_points.read_csv_points(tmp_path / "a.csv", "T")
    assert np.allclose(picks.coords_px, [[1.5, 2, 3], [4, 5, 6]]) and picks.rotations is None
    (tmp_path / "b.txt").write_text("11 12 13 0 90 0\n")
    picks = csv_points.read_csv_points(tmp_path / "b.txt", "T", origin=1.0)
    assert np.allclose(picks.coords_px, [[10, 11, 12]])
    assert np.allclose(picks.rotations[0], euler_to_matrix(0, 90, 0))
    (tmp_path / "c.csv").write_text("x,y,z\n1,2\n")
    with pytest.raises(SubtomoError, match="c.csv:2: 2 fields"):
        csv_points.read_csv_points(tmp_path / "c.csv", "T")


def test_portal_ndjson_read_by_hand(tmp_path):
    lines = [{"type": "orientedPoint", "location": {"x": 251.0, "y": 402.5, "z": 88.0},
              "xyz_rotation_matrix": RX90.tolist()},
             {"type": "orientedPoint", "location": {"x": 1.0, "y": 2.0, "z": 3.0},
              "xyz_rotation_matrix": np.eye(3).tolist()}]
    (tmp_path / "a.ndjson").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    picks = portal.read_portal_ndjson(tmp_path / "a.ndjson", "TS_5")
    assert np.allclose(picks.coords_px, [[251, 402.5, 88], [1, 2, 3]])
    assert np.allclose(picks.rotations[0], RX90)
    (tmp_path / "p.ndjson").write_text('{"type": "point", "location": {"x": 1, "y": 2, "z": 3}}\n')
    assert portal.read_portal_ndjson(tmp_path / "p.ndjson", "T").rotations is None
    (tmp_path / "bad.ndjson").write_text('{"type": "point"}\n')
    with pytest.raises(SubtomoError, match="bad.ndjson:1"):
        portal.read_portal_ndjson(tmp_path / "bad.ndjson", "T")


def test_import_particles_job(tmp_path):
    d = tmp_path / "Tomograms" / "TS_01"
    d.mkdir(parents=True)
    write_mrc(d / "TS_01.mrc", np.zeros((20, 60, 50), np.float32), 10.0)
    write_mrc(d / "TS_01.mrcs", np.zeros((3, 60, 50), np.float32), 10.0, stack=True)
    (d / "TS_01.tlt").write_text("-3\n0\n3\n")
    (tmp_path / "picks.csv").write_text("x,y,z,rot,tilt,psi\n20,30,10,10,20,30\n200,30,10,0,0,0\n")
    ctx = execute(SPEC, ImportParticlesParams(i=["picks.csv"], format="csv", coords_pixel_size=5.0), tmp_path, quiet=True)
    ps = ParticleSet.read(ctx.path("particles.star"))
    assert ps.table["rlnTomoName"].tolist() == ["TS_01", "TS_01"]
    assert np.allclose(ps.table["rlnCoordinateX"], [10, 100])  # 5 Å picks scaled to the 10 Å tomogram
    assert ps.pixel_size_A == 10.0
    assert np.allclose(ps.table["rlnAngleTiltPrior"], [20, 0])
    assert np.allclose(np.loadtxt(ctx.path("coords/TS_01.coords")), [[10, 15, 5], [100, 15, 5]])
    log = (ctx.dir / "run.out").read_text()
    assert "1 inside" in log and "1 outside" in log
    assert (ctx.path("coordinates/TS_01.png")).stat().st_size > 1000  # the coordinate checker


def test_import_particles_bad_input_writes_nothing(tmp_path):
    (tmp_path / "t.tbl").write_text("1 1 1\n")
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SubtomoError, match="t.tbl:1"):
        execute(SPEC, ImportParticlesParams(i=["t.tbl"], format="dynamo", tomo_names=["a"]), tmp_path, quiet=True)
    assert sorted(tmp_path.rglob("*")) == before


def test_pytom_relion5_coordinates_placed_with_a_real_relion5_tomograms_star(tmp_path, shared_data):
    star = shared_data / "formats" / "star_relion5" / "pytom_match_pick_relion5_project" / "Tomograms" / "job009" / "tomograms.star"
    extents = pytom.relion5_tomogram_extents_A(star)
    # tomo200528_107: rlnTomoSize 4000 4000 2000 at rlnTomoTiltSeriesPixelSize 1.724 A
    assert extents["tomo200528_107"] == pytest.approx((6896.0, 6896.0, 3448.0)) and len(extents) == 10
    text = PYTOM_TEXT.replace("_rlnCoordinateX", "_rlnCenteredCoordinateXAngst").replace(
        "_rlnCoordinateY", "_rlnCenteredCoordinateYAngst").replace("_rlnCoordinateZ", "_rlnCenteredCoordinateZAngst").replace(
        "_rlnMicrographName", "_rlnTomoName").replace("tomo200528_107.mrc", "tomo200528_107")
    (tmp_path / "c.star").write_text(text)
    (tmp_path / "tomograms.star").write_text(star.read_text())
    ctx = execute(SPEC, ImportParticlesParams(i=["c.star"], format="pytom", tomograms_star="tomograms.star"), tmp_path,
                  quiet=True)
    ps = ParticleSet.read(ctx.path("particles.star"))
    assert ps.pixel_size_A == 13.79
    assert np.allclose(ps.table["rlnCoordinateX"], [(3448 + 120) / 13.79, (3448 + 17) / 13.79])
    assert np.allclose(ps.table["rlnCoordinateZ"], [(1724 + 74) / 13.79, (1724 + 66) / 13.79])
