"""ParticleSet: the one reader/writer of particle metadata (pixel size rule, poses, image paths)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from subtomo.errors import SubtomoError
from subtomo.geometry.euler import euler_to_matrix, random_rotations
from subtomo.io.mrc import write_mrc
from subtomo.io.particles import ParticleSet, parse_image_name, resolve_project_path
from subtomo.io.star import write_star


def _table(n: int = 4) -> pd.DataFrame:
    return pd.DataFrame({
        "rlnTomoName": ["TS_01"] * n,
        "rlnCoordinateX": np.arange(n, dtype=float) * 10, "rlnCoordinateY": 5.0, "rlnCoordinateZ": 7.0,
        "rlnImageName": [f"Extract/job003/Subtomograms/TS_01/{i:06d}.mrc" for i in range(n)],
        "rlnOpticsGroup": 1,
    })


def _optics(px: float = 4.2, box: int = 8) -> pd.DataFrame:
    return pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"], "rlnImagePixelSize": [px],
                         "rlnImageSize": [box], "rlnImageDimensionality": [3]})


def test_parse_image_name_and_resolve(tmp_path):
    assert parse_image_name("3@Extract/job005/stack.mrcs") == (3, "Extract/job005/stack.mrcs")
    assert parse_image_name("Extract/job005/p@1.mrc") == (None, "Extract/job005/p@1.mrc")
    assert parse_image_name(" a.mrc ") == (None, "a.mrc")
    assert resolve_project_path(tmp_path, "x/y.mrc") == tmp_path / "x" / "y.mrc"
    assert resolve_project_path(tmp_path, "/abs/y.mrc") == resolve_project_path("/elsewhere", "/abs/y.mrc")


def test_round_trip_keeps_rows_optics_and_poses(tmp_path):
    n = 6
    rng = np.random.default_rng(0)
    rot = random_rotations(n, rng)
    off_px = rng.normal(0, 2, (n, 3))
    ps = ParticleSet.from_table(_table(n), _optics(), tmp_path).with_poses(rot, off_px)
    out = ps.write(tmp_path / "p.star")
    again = ParticleSet.read("p.star", tmp_path)
    assert len(again) == n and again.path == out
    assert again.optics is not None and "rlnImagePixelSize" not in again.table.columns
    assert again.pixel_size_A == pytest.approx(4.2)
    assert again.box_px == 8
    assert np.allclose(again.rotations(), rot, atol=1e-6)
    assert np.allclose(again.offsets_px(), off_px, atol=1e-6)
    assert np.allclose(again.offsets_A(), off_px * 4.2, atol=1e-5)
    assert again.image_paths()[2] == tmp_path / "Extract/job003/Subtomograms/TS_01/000002.mrc"


def test_pixel_size_rule_order(tmp_path):
    table = _table(2)
    # optics group wins over a row value of another label
    ps = ParticleSet.from_table(table.assign(rlnPixelSize=9.0), _optics(px=3.0), tmp_path)
    assert ps.pixel_size_A == pytest.approx(3.0)
    # row value when there is no optics table
    assert ParticleSet.from_table(table.assign(rlnPixelSize=9.0), None, tmp_path).pixel_size_A == pytest.approx(9.0)
    # RELION 3.0: detector pixel size [um] and magnification
    legacy = table.assign(rlnDetectorPixelSize=14.0, rlnMagnification=10000.0)
    assert ParticleSet.from_table(legacy, None, tmp_path).pixel_size_A == pytest.approx(14.0)
    # last resort: the first image's MRC header
    path = tmp_path / table["rlnImageName"].iloc[0]
    write_mrc(path, np.zeros((8, 8, 8), np.float32), pixel_size_A=6.5)
    assert ParticleSet.from_table(table, None, tmp_path).pixel_size_A == pytest.approx(6.5)
    assert ParticleSet.from_table(table, None, tmp_path).box_px == 8


def test_no_pixel_size_and_mixed_pixel_sizes_are_errors(tmp_path):
    with pytest.raises(SubtomoError, match="no pixel size"):
        _ = ParticleSet.from_table(_table(2), None, tmp_path).pixel_size_A
    mixed = _table(2).assign(rlnPixelSize=[4.0, 8.0])
    with pytest.raises(SubtomoError, match="different pixel sizes"):
        _ = ParticleSet.from_table(mixed, None, tmp_path).pixel_size_A


def test_legacy_pixel_origins_and_missing_angles(tmp_path):
    table = _table(3).assign(rlnPixelSize=2.0, rlnOriginX=[1.0, 2.0, 3.0], rlnOriginY=0.0, rlnOriginZ=-1.0)
    ps = ParticleSet.from_table(table, None, tmp_path)
    assert ps.rotations() is None
    assert np.allclose(ps.offsets_px()[:, 0], [1, 2, 3])
    assert np.allclose(ps.offsets_A()[:, 2], -2.0)
    moved = ps.with_poses(euler_to_matrix([10, 20, 30], 40, 50), ps.offsets_px() + 1)
    assert "rlnOriginX" not in moved.table.columns
    assert np.allclose(moved.table["rlnOriginXAngst"], [4, 6, 8])
    assert np.allclose(moved.table["rlnAngleRot"], [10, 20, 30])


def test_damaged_row_is_an_error_naming_the_row(tmp_path):
    path = tmp_path / "bad.star"
    ParticleSet.from_table(_table(3).assign(rlnAngleRot=1.0, rlnAngleTilt=2.0, rlnAnglePsi=3.0), _optics(),
                           tmp_path).write(path)
    lines = path.read_text().rstrip("\n").split("\n")
    lines[-1] = " ".join(lines[-1].split()[:-3])  # the last row loses its last three fields
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SubtomoError, match=r"bad.star: 1 particle row\(s\) have missing fields \(row 3"):
        ParticleSet.read(path)


def test_subset_columns_and_halves(tmp_path):
    ps = ParticleSet.from_table(_table(5), _optics(), tmp_path).with_columns(rlnRandomSubset=[1, 2, 1, 2, 1])
    sub = ps.subset(np.array([True, False, True, False, False]))
    assert len(sub) == 2 and list(sub.halves()) == [1, 1]
    assert list(ps.subset([4, 0]).table["rlnCoordinateX"]) == [40.0, 0.0]
    assert ps.merged()["rlnImagePixelSize"].tolist() == [4.2] * 5
    assert ps.column("rlnImageSize").tolist() == [8] * 5
    assert ParticleSet.from_table(_table(2)).halves() is None


def test_unknown_optics_group_and_no_table(tmp_path):
    write_star(tmp_path / "o.star", {"optics": _optics(), "particles": _table(2).assign(rlnOpticsGroup=2)})
    with pytest.raises(SubtomoError, match="optics group"):
        ParticleSet.read(tmp_path / "o.star")
    write_star(tmp_path / "single.star", {"general": {"rlnImageSize": 8}})
    with pytest.raises(SubtomoError, match="no particle table"):
        ParticleSet.read(tmp_path / "single.star")


def test_reads_real_relion5_and_warp_particles(shared_data):
    fmt = shared_data / "formats" / "star_relion5"
    r5 = ParticleSet.read(fmt / "cryocat_relion5_tutorial_empiar10164" / "R5_tutorial_run_data.star.gz")
    assert len(r5) > 100 and r5.optics is not None
    assert r5.pixel_size_A > 0 and r5.rotations().shape == (len(r5), 3, 3)
    warp = ParticleSet.read(fmt / "warp" / "warp2_particles_matching.star")
    assert warp.box_px == 64


@pytest.mark.parametrize("bad", ["../../../../x", "a/b", "..", "", "a\\b"])
def test_names_used_in_output_paths_cannot_escape(bad):
    from subtomo.io.particles import path_component

    with pytest.raises(SubtomoError, match="rlnTomoName .* cannot be used as a file name"):
        path_component(bad, "rlnTomoName", "tomograms.star")
    assert path_component(" TS_01 ", "rlnTomoName", "tomograms.star") == "TS_01"
