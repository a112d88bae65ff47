"""Issue 15: reading RELION 4/5 tomography particle sets (no RELION needed)."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from subtomo.errors import SubtomoError
from subtomo.io.particles import ParticleSet
from subtomo.io.relion import relion31_tables, relion_tilt_table, relocate_paths, tomo_particles_to_legacy
from subtomo.io.star import read_star, write_star
from subtomo.jobs.base import execute

TOMOS = pd.DataFrame({"rlnTomoName": ["TS_01"], "rlnTomoSizeX": [4000], "rlnTomoSizeY": [4000], "rlnTomoSizeZ": [1200],
                      "rlnTomoTiltSeriesPixelSize": [1.5], "rlnTomoTomogramBinning": [4.0], "rlnTomoHand": [-1],
                      "rlnTomoReconstructedTomogram": ["Tomograms/TS_01/TS_01.mrc"]})


def test_relion5_centred_angstrom_coordinates_become_tomogram_pixels():
    rows = pd.DataFrame({"rlnTomoName": ["TS_01", "TS_01"], "rlnCenteredCoordinateXAngst": [0.0, 60.0],
                         "rlnCenteredCoordinateYAngst": [0.0, -30.0], "rlnCenteredCoordinateZAngst": [0.0, 6.0]})
    out, notes = tomo_particles_to_legacy(rows, TOMOS, "particles.star")
    # centre of a 4000x4000x1200 (unbinned) tomogram binned 4: (500, 500, 150); 6 Å per binned pixel
    np.testing.assert_allclose(out[["rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ"]].to_numpy(),
                               [[500, 500, 150], [510, 495, 151]])
    assert out["rlnMicrographName"].tolist() == ["Tomograms/TS_01/TS_01.mrc"] * 2
    assert any("TS_01: -1" in n for n in notes)


def test_relion4_unbinned_pixels_and_refusals():
    rows = pd.DataFrame({"rlnTomoName": ["TS_01"], "rlnCoordinateX": [2000.0], "rlnCoordinateY": [400.0],
                         "rlnCoordinateZ": [600.0]})
    out, _ = tomo_particles_to_legacy(rows, TOMOS, "p.star")
    np.testing.assert_allclose(out[["rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ"]].to_numpy(), [[500, 100, 150]])
    with pytest.raises(SubtomoError, match="not in the tomograms.star"):
        tomo_particles_to_legacy(rows.assign(rlnTomoName="TS_09"), TOMOS, "p.star")
    with pytest.raises(SubtomoError, match="rlnTomoSubtomogramRot"):
        tomo_particles_to_legacy(rows.assign(rlnTomoSubtomogramRot=10.0, rlnTomoSubtomogramTilt=0.0,
                                             rlnTomoSubtomogramPsi=0.0), TOMOS, "p.star")
    with pytest.raises(SubtomoError, match="--tomograms"):
        tomo_particles_to_legacy(pd.DataFrame({"rlnTomoName": ["a"], "rlnCenteredCoordinateXAngst": [1.0],
                                               "rlnCenteredCoordinateYAngst": [1.0], "rlnCenteredCoordinateZAngst": [1.0]}),
                                 None, "p.star")


def test_paths_relative_to_relion_s_directory_move_to_ours(tmp_path):
    table = pd.DataFrame({"rlnImageName": ["Extract/job3/a.mrc", "000002@Extract/job3/b.mrcs"]})
    out = relocate_paths(table, tmp_path / "relion_project", tmp_path)
    assert out["rlnImageName"].tolist() == ["relion_project/Extract/job3/a.mrc", "000002@relion_project/Extract/job3/b.mrcs"]


def test_relion31_tables_keep_only_relion_3_1_labels():
    rows, optics = relion31_tables(
        pd.DataFrame({"rlnImageName": ["a.mrc"], "rlnTomoName": ["t"], "subtomoX": [1], "rlnAngleRot": [1.0],
                      "rlnOpticsGroup": [1]}),
        pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["g"], "rlnImagePixelSize": [2.0], "rlnImageSize": [32],
                      "rlnImageDimensionality": [3], "rlnVoltage": [300.0], "rlnSphericalAberration": [2.7],
                      "rlnAmplitudeContrast": [0.07]}))
    assert list(rows.columns) == ["rlnImageName", "rlnAngleRot", "rlnOpticsGroup"]  # rlnTomoName is RELION 4+
    assert int(optics["rlnCtfDataAreCtfPremultiplied"][0]) == 0


def test_import_relion_job_reads_a_relion5_set(tmp_path):
    from subtomo.jobs.import_relion import SPEC, ImportRelionParams

    write_star(tmp_path / "relion/tomograms.star", {"global": TOMOS})
    write_star(tmp_path / "relion/particles.star", {"particles": pd.DataFrame({
        "rlnTomoName": ["TS_01"], "rlnCenteredCoordinateXAngst": [12.0], "rlnCenteredCoordinateYAngst": [0.0],
        "rlnCenteredCoordinateZAngst": [-6.0], "rlnAngleRot": [10.0], "rlnAngleTilt": [20.0], "rlnAnglePsi": [30.0]})})
    ctx = execute(SPEC, ImportRelionParams(i="relion/particles.star", tomograms="relion/tomograms.star"), tmp_path,
                  quiet=True)
    back = ParticleSet.read(ctx.path("particles.star"), tmp_path)
    np.testing.assert_allclose(back.table[["rlnCoordinateX", "rlnCoordinateZ"]].to_numpy(), [[502, 149]])
    assert back.has_angles()


def test_import_relion5_carries_each_tilt_s_ctf_into_our_ctf_models(tmp_path, shared_data):
    """The RELION 5 tutorial's TS_01 (tomograms.star + its tilt-series STAR): values read by hand from the files."""
    from subtomo.jobs.import_relion import SPEC, ImportRelionParams
    from subtomo.tomo.ctf3d import ParticleCtfModels

    tutorial = shared_data / "formats/star_relion5/cryocat_relion5_tutorial_empiar10164"
    rp = tmp_path / "relion"
    (rp / "Tomograms/job006/tilt_series").mkdir(parents=True)
    shutil.copyfile(tutorial / "R5_tutorial_run_tomograms.star", rp / "Tomograms/job006/tomograms.star")
    shutil.copyfile(tutorial / "relion5_TS_01_tilt.star", rp / "Tomograms/job006/tilt_series/TS_01.star")
    # particle 1 at the tomogram centre; particle 2 at the first particle of the tutorial's run_data.star
    xyz = np.array([[0.0, 0.0, 0.0], [1774.846956, -951.52983, 1127.416439]])
    write_star(rp / "particles.star", {"particles": pd.DataFrame({
        "rlnTomoName": ["TS_01"] * 2, "rlnCenteredCoordinateXAngst": xyz[:, 0], "rlnCenteredCoordinateYAngst": xyz[:, 1],
        "rlnCenteredCoordinateZAngst": xyz[:, 2], "rlnAngleRot": [0.0, 10.0], "rlnAngleTilt": [90.0, 80.0],
        "rlnAnglePsi": [0.0, 5.0]})})
    ctx = execute(SPEC, ImportRelionParams(i="relion/particles.star", tomograms="relion/Tomograms/job006/tomograms.star",
                                           relion_project="relion"), tmp_path, quiet=True)
    parts = ParticleSet.read(ctx.path("particles.star"), tmp_path)
    assert parts.table["subtomoCtfModel"].tolist() == [f"00000{i}@{ctx.name}CtfModels/TS_01_ctf.star" for i in (1, 2)]
    assert "rlnCtfImage" not in parts.table
    np.testing.assert_allclose(parts.table["subtomoTomogramPixelSize"], 1.35 * 7.407407, rtol=1e-6)  # 10 Å
    blocks = read_star(ctx.path("CtfModels/TS_01_ctf.star"))
    general, table = blocks["general"], blocks["ctf_models"]
    assert general["rlnVoltage"] == 300.0 and general["rlnAmplitudeContrast"] == pytest.approx(0.1)
    assert int(general["subtomoDefocusHandedness"]) == -1 and int(general["rlnTomoSizeX"]) == 540  # 4000 / 7.407407
    p1, p2 = (table[table["rlnTomoParticleId"] == i].reset_index(drop=True) for i in (1, 2))
    assert len(p1) == 40  # 40 tilt images in TS_01.star
    # first line of TS_01.star: YTilt -57, U 39527.781250, V 39418.410156, angle 44.527622, pre-exposure 114, scale 0.544639
    first = p1.iloc[0]
    assert first["rlnTomoNominalStageTiltAngle"] == pytest.approx(-57.0)
    assert (first["rlnDefocusU"], first["rlnDefocusV"]) == (pytest.approx(39527.78125), pytest.approx(39418.410156))
    assert first["rlnDefocusAngle"] == pytest.approx(44.527622) and first["rlnCtfScalefactor"] == pytest.approx(0.544639)
    assert first["rlnCtfBfactor"] == pytest.approx(4.0 * 114.0)  # --bfactor-per-dose 4 x rlnMicrographPreExposure
    zero = p1[p1["rlnTomoNominalStageTiltAngle"].abs() < 1e-6].iloc[0]  # line 'TS_01_000_0.0'
    assert zero["rlnDefocusU"] == pytest.approx(38855.828125) and zero["rlnCtfBfactor"] == 0.0
    # particle 2: RELION 5's Tomogram::getCtf with rlnTomoHand -1: D + hand * (-x sin(t) + z cos(t))
    t = np.deg2rad(p2["rlnTomoNominalStageTiltAngle"].to_numpy())
    depth = -xyz[1, 0] * np.sin(t) + xyz[1, 2] * np.cos(t)
    np.testing.assert_allclose(p2["rlnDefocusU"], p1["rlnDefocusU"] - depth, atol=0.5)
    assert abs(p2["rlnDefocusU"][0] - 39527.78125 + 2102.5) < 1.0  # by hand: 1774.85 sin 57° + 1127.42 cos 57°
    # the imported particles have 3D CTFs (built at the tomogram's pixel size until extracted)
    vols = ParticleCtfModels.from_particle_set(parts).volumes([0, 1], 16, pixel_size_A=10.0)
    assert vols.shape == (2, 16, 16, 9) and float(vols.abs().max()) > 0.1 and not torch.allclose(vols[0], vols[1])


def test_relion4_tilt_from_projection_matrices(shared_data):
    """Warp's RELION 4 tomograms.star: a data_<tomogram> block with rlnTomoProjX..W per tilt."""
    blocks = read_star(shared_data / "formats/star_relion5/warp/warp2_matching_tomograms.star")
    tilts, notes = relion_tilt_table(blocks["TS_17.tomostar"], "TS_17")
    # first line: ProjZ [0.64292127,0,0.76593226,0], U 27342.8, V 27211.3, angle 25, scale 0.766, pre-exposure 119.6
    assert tilts["rlnTomoNominalStageTiltAngle"][0] == pytest.approx(-np.rad2deg(np.arcsin(0.64292127)))  # -40.0
    assert tilts["rlnTomoNominalStageTiltAngle"][0] == pytest.approx(-40.0, abs=0.01)
    assert (tilts["rlnDefocusU"][0], tilts["rlnDefocusV"][0], tilts["rlnDefocusAngle"][0]) == (27342.8, 27211.3, 25.0)
    assert tilts["rlnCtfScalefactor"][0] == pytest.approx(0.766) and tilts["rlnMicrographPreExposure"][0] == 119.6
    assert any("projection matrices" in n for n in notes)
    with pytest.raises(SubtomoError, match="no rlnDefocusU"):
        relion_tilt_table(pd.DataFrame({"rlnTomoYTilt": [0.0]}), "x.star")
    with pytest.raises(SubtomoError, match="no tilt angle"):
        relion_tilt_table(pd.DataFrame({"rlnDefocusU": [1e4]}), "x.star")
