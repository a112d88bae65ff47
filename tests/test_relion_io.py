"""Issue 15: reading RELION 4/5 tomography particle sets (no RELION needed)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from subtomo.errors import SubtomoError
from subtomo.io.particles import ParticleSet
from subtomo.io.relion import relion31_tables, relocate_paths, tomo_particles_to_legacy
from subtomo.io.star import write_star
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
