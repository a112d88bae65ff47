"""Issue 15: the five convention defects found by the audit against RELION, each with a test.

These need no RELION installation (tests/test_relion.py runs RELION itself).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from subtomo.errors import SubtomoError
from subtomo.geometry.tilt import specimen_coordinates_A
from subtomo.io.mrc import write_mrc
from subtomo.io.particles import ParticleSet
from subtomo.io.relion import LEGACY_LABELS, label_problems, relion_labels, upgrade_legacy_labels
from subtomo.io.run_files import write_model_star
from subtomo.io.star import read_star, read_star_table, write_star
from subtomo.jobs.base import execute
from subtomo.tomo.ctf3d import ParticleCtfModels, check_ctf_volumes
from subtomo.tomo.ctf_models import TomoCtf, ctf_table, read_tomogram_ctfs
from subtomo.tomo.defocus import beam_height_A

PX = 5.0


def _extracted(tmp_path, box: int, px: float, ctf_box: int, ctf_px: float) -> ParticleSet:
    """One extracted particle (box³ at px) whose rlnCtfImage is a RELION volume ctf_box³ at ctf_px."""
    write_mrc(tmp_path / "Extract/job004/p1.mrc", np.zeros((box,) * 3, np.float32), px)
    write_mrc(tmp_path / "Prepare/job003/ctf1.mrc", np.ones((ctf_box,) * 3, np.float32), ctf_px)
    table = pd.DataFrame({"rlnImageName": ["Extract/job004/p1.mrc"], "rlnCtfImage": ["Prepare/job003/ctf1.mrc"],
                          "rlnOpticsGroup": [1]})
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"], "rlnImagePixelSize": [px],
                           "rlnImageSize": [box], "rlnImageDimensionality": [3]})
    path = ParticleSet.from_table(table, optics, tmp_path).write(tmp_path / "Extract/job004/particles.star")
    return ParticleSet.read(path, tmp_path)


# ---------------------------------------------------------------- finding 1: CTF volume and particle tied

def test_ctf_volume_of_another_box_is_refused_naming_both_files(tmp_path):
    parts = _extracted(tmp_path, box=32, px=PX, ctf_box=16, ctf_px=PX)
    with pytest.raises(SubtomoError) as err:
        ParticleCtfModels.from_particle_set(parts)
    text = str(err.value) + " ".join(err.value.problems or [])
    assert "ctf1.mrc" in text and "particles.star" in text and "16 px" in text and "32 px" in text and "Fix" in text


def test_ctf_volume_of_another_pixel_size_is_refused(tmp_path):
    parts = _extracted(tmp_path, box=16, px=2 * PX, ctf_box=16, ctf_px=PX)  # e.g. extract --rescale after export
    with pytest.raises(SubtomoError, match="disagree"):
        ParticleCtfModels.from_particle_set(parts)
    with pytest.raises(SubtomoError):
        check_ctf_volumes(parts)


def test_matching_ctf_volume_is_read(tmp_path):
    parts = _extracted(tmp_path, box=16, px=PX, ctf_box=16, ctf_px=PX)
    models = ParticleCtfModels.from_particle_set(parts)
    assert models.volumes([0], 16).shape == (1, 16, 16, 9)


def test_ctf_volume_that_is_not_a_cube_is_refused(tmp_path):
    parts = _extracted(tmp_path, box=16, px=PX, ctf_box=16, ctf_px=PX)
    write_mrc(tmp_path / "Prepare/job003/ctf1.mrc", np.ones((16, 16), np.float32), PX)  # a 2D CTF image
    with pytest.raises(SubtomoError, match="not a 3D cube"):
        check_ctf_volumes(parts)


# ---------------------------------------------------------------- finding 2: rlnCurrentResolution in Å

class _Model:
    box, pixel_size_A, n_classes, n_shells, ndim, current_size = 16, 4.0, 1, 9, 3, 16
    current_resolution_A = 16.0
    class_priors = torch.ones(1)
    data_vs_prior = tau2 = fsc = torch.ones(1, 9)
    sigma2 = torch.ones(9)
    tau2_fudge, sigma_offset_px, log_lik = 1.0, 1.0, 0.0
    extra: dict = {}


def test_current_resolution_is_written_in_angstrom_as_relion_does(tmp_path):
    path = write_model_star(tmp_path / "Refine3D/job008/run_model.star", _Model(), ["run_class001.mrc"])
    general = read_star(path)["model_general"]
    assert general["rlnCurrentResolution"] == pytest.approx(16.0)  # Å, not 1/16


# ---------------------------------------------------------------- finding 3: defocus handedness

def _tomo(hand_px=(40.0, 30.0, 50.0)) -> TomoCtf:
    tilts = np.array([-60.0, -30.0, 0.0, 30.0, 60.0])
    return TomoCtf("t", "Tomograms/t/t.mrc", (100, 80, 60), PX, 300.0, 2.7, 0.07, False, tilts, np.arange(5.0),
                   np.full(5, 30000.0), np.full(5, 29000.0), np.zeros(5), np.array([[80.0, 30.0, 45.0], hand_px]))


def test_both_defocus_hands_exact_model():
    t = _tomo()
    h = beam_height_A(specimen_coordinates_A(t.coords_px, t.size_xyz, PX), t.tilts_deg)  # (P, T) along the beam
    minus = ctf_table(t, 4.0, "exact", -1)["rlnDefocusU"].to_numpy().reshape(2, 5)
    plus = ctf_table(t, 4.0, "exact", +1)["rlnDefocusU"].to_numpy().reshape(2, 5)
    np.testing.assert_allclose(minus, 30000.0 - h)  # hand -1: D - h (RELION 5, rlnTomoHand -1)
    np.testing.assert_allclose(plus, 30000.0 + h)  # hand +1: D + h
    assert np.abs(plus - minus).max() > 100  # the offsets are not negligible here


def test_handedness_flips_the_relion_model_too_and_is_validated():
    t = _tomo()
    minus = ctf_table(t, 4.0, "relion", -1)["rlnDefocusU"].to_numpy() - 30000.0
    plus = ctf_table(t, 4.0, "relion", +1)["rlnDefocusU"].to_numpy() - 30000.0
    np.testing.assert_allclose(plus, -minus)
    with pytest.raises(SubtomoError, match="handedness"):
        ctf_table(t, 4.0, "exact", 0)


def test_prepare_ctf_and_simulate_take_the_handedness():
    from subtomo.jobs.ctf import CtfParams
    from subtomo.jobs.prepare import PrepareParams
    from subtomo.simulate.presets import config_for

    assert PrepareParams(defocus_handedness=1).defocus_handedness == 1
    assert CtfParams(defocus_handedness=1).defocus_handedness == 1
    assert config_for("tiny", {"defocus_handedness": 1}).defocus_handedness == 1


def test_simulated_particle_defocus_follows_the_hand():
    from subtomo.simulate.tiltseries import TiltGeometry

    geom = TiltGeometry(np.zeros(1), np.zeros(1), np.zeros((1, 2)), np.zeros(1, int), np.zeros(1), 1.0, np.full(1, 1e4),
                        np.zeros(1), np.zeros(1), (8, 8), PX)
    assert geom.defocus_hand == -1  # default: D - h, as our exact model with hand -1


# ---------------------------------------------------------------- finding 4: paths RELION can open

def test_reference_images_are_project_relative_in_job_directories(tmp_path):
    path = write_model_star(tmp_path / "Refine3D/job008/run_model.star", _Model(), ["run_class001.mrc"])
    assert read_star(path)["model_classes"]["rlnReferenceImage"].tolist() == ["Refine3D/job008/run_class001.mrc"]
    path = write_model_star(tmp_path / "Class2D/job005/run_it002_model.star", _Model(),
                            ["000001@run_it002_classes.mrcs"])
    assert read_star(path)["model_classes"]["rlnReferenceImage"][0] == "000001@Class2D/job005/run_it002_classes.mrcs"
    path = write_model_star(tmp_path / "other/m.star", _Model(), ["a.mrc"])  # not a job directory: kept
    assert read_star(path)["model_classes"]["rlnReferenceImage"][0] == "a.mrc"


def test_compact_ctf_models_use_our_label_and_rln_ctf_image_only_names_volumes(tmp_path):
    from test_ctf3d import _project

    from subtomo.jobs.prepare import SPEC as PREPARE
    from subtomo.jobs.prepare import PrepareParams

    _project(tmp_path)
    prep = execute(PREPARE, PrepareParams(i="CtfFind/job002/ctf_tomograms.star", export_relion=16, plot_box=16,
                                          device="cpu"), tmp_path, quiet=True)
    blocks = read_star(prep.path("particles_subtomo.star"))
    rows = blocks["particles"]
    assert "rlnCtfImage" not in rows  # RELION cannot open NNNNNN@<t>_ctf.star
    assert rows["subtomoCtfModel"].tolist()[:2] == [f"00000{i}@{prep.name}CtfModels/tomo1_ctf.star" for i in (1, 2)]
    relion = read_star_table(prep.path("particles_subtomo_relion.star"))
    assert all(str(v).endswith(".mrc") and "@" not in str(v) for v in relion["rlnCtfImage"])  # RELION volumes only
    # a file of an older version (compact form in rlnCtfImage) reads as the same models
    old = rows.rename(columns={"subtomoCtfModel": "rlnCtfImage"})
    write_star(tmp_path / "old.star", {"optics": blocks["optics"], "particles": old})
    back = ParticleSet.read(tmp_path / "old.star", tmp_path)
    assert "rlnCtfImage" not in back.table and back.table["subtomoCtfModel"].tolist() == rows["subtomoCtfModel"].tolist()
    new = ParticleCtfModels.from_particle_set(ParticleSet.read(prep.path("particles_subtomo.star"), tmp_path))
    torch.testing.assert_close(ParticleCtfModels.from_particle_set(back).volumes([0, 2], 16), new.volumes([0, 2], 16))
    # a mixed column (one RELION volume, compact rows) stays, and each row is read as what it is
    mixed = old.assign(rlnCtfImage=[relion["rlnCtfImage"][0], *old["rlnCtfImage"][1:]])
    models = ParticleCtfModels.from_particles(mixed.assign(rlnImageSize=16), tmp_path)
    assert list(models.volumes_half) == [0]
    torch.testing.assert_close(models.volumes([2], 16), new.volumes([2], 16))


def test_particles_without_any_ctf_reference_are_refused_by_row(tmp_path):
    table = pd.DataFrame({"rlnImageName": ["a.mrc", "b.mrc"], "subtomoCtfModel": ["000001@t_ctf.star", "None"]})
    with pytest.raises(SubtomoError, match="row 2 has no 3D CTF"):
        ParticleSet.from_table(table, None, tmp_path).ctf_refs()
    with pytest.raises(SubtomoError, match="no rlnCtfImage or subtomoCtfModel"):
        ParticleSet.from_table(table[["rlnImageName"]], None, tmp_path).ctf_refs()


# ---------------------------------------------------------------- finding 5: only RELION's labels carry rln

def test_invented_labels_are_gone_and_old_files_still_read(tmp_path):
    known = relion_labels()
    for old, new in LEGACY_LABELS.items():
        assert old not in known and new.startswith("subtomo")
    old = pd.DataFrame({"rlnTomoName": ["a"], "rlnCtfFindResultsStar": ["x.star"], "rlnTomoHasTrials": [1],
                        "rlnNumberOfParticles": [3]})
    new = upgrade_legacy_labels(old)
    assert list(new.columns) == ["rlnTomoName", "subtomoCtfResultsStar", "subtomoHasTrials", "subtomoNumberOfParticles"]
    assert upgrade_legacy_labels(old.iloc[0])["subtomoHasTrials"] == 1
    assert upgrade_legacy_labels({"rlnNumberOfParticles": 2}) == {"subtomoNumberOfParticles": 2}


def test_label_check_flags_invented_and_mistyped_labels():
    blocks = {"a": pd.DataFrame({"rlnTomoHasTrials": [1], "rlnTomoParticleId": [1.5], "rlnDefocusU": [1.0],
                                 "subtomoAnything": ["x"]}), "g": {"rlnCurrentResolution": 12.0}}
    problems = label_problems(blocks, "f.star")
    assert len(problems) == 2
    assert "rlnTomoHasTrials is not a RELION label" in problems[0] and "rlnTomoParticleId should be int" in problems[1]


def test_import_writes_only_real_relion_labels(tmp_path):
    from subtomo.jobs.import_tomograms import SPEC as IMPORT
    from subtomo.jobs.import_tomograms import ImportParams
    from subtomo.simulate.presets import config_for
    from subtomo.simulate.project import simulate_project

    simulate_project(config_for("tiny", {"n_particles": 2, "n_junk": 0, "n_fiducials": 0}), tmp_path, seed=3, log=lambda s: None)
    ctx = execute(IMPORT, ImportParams(check_coordinates=False), tmp_path, quiet=True)
    table = read_star_table(ctx.path("all_tomograms.star"))
    assert label_problems({"t": table}, "all_tomograms.star") == []
    assert table["subtomoNumberOfParticles"].tolist() == [2] and "subtomoTomogramPixelSize" in table
    # a tomogram table written by an older version (invented rln labels) still works downstream
    write_star(tmp_path / "old.star", table.rename(columns={v: k for k, v in LEGACY_LABELS.items()}))
    assert read_tomogram_ctfs(tmp_path / "old.star", tmp_path, skip_ctf=True)[0].pixel_size_A == pytest.approx(10.0)


def test_extract_refuses_relion_ctf_volumes_of_another_box_or_pixel_size(tmp_path):
    from test_ctf3d import _project

    from subtomo.jobs.extract import SPEC as EXTRACT
    from subtomo.jobs.extract import ExtractParams
    from subtomo.jobs.prepare import SPEC as PREPARE
    from subtomo.jobs.prepare import PrepareParams

    _project(tmp_path)
    prep = execute(PREPARE, PrepareParams(i="CtfFind/job002/ctf_tomograms.star", export_relion=16, plot_box=16,
                                          device="cpu"), tmp_path, quiet=True)
    star = prep.rel(prep.path("particles_subtomo_relion.star"))
    for options in ({"box": 32}, {"box": 16, "rescale": 8}):  # another box; another pixel size
        with pytest.raises(SubtomoError, match="CTF volume does not match"):
            execute(EXTRACT, ExtractParams(i=star, device="cpu", **options), tmp_path, quiet=True)
    assert not (tmp_path / "Extract").exists()  # refused in check: nothing written


@pytest.mark.parametrize("hand", [-1, 1])
def test_ctf_tells_which_hand_fits_the_high_tilts(tmp_path, hand):
    from subtomo.ctf.estimate import CtfSearchParams
    from subtomo.ctf.model import Optics
    from subtomo.ctf.series import TiltSeries, handedness_report, handedness_scores
    from subtomo.ctf.synthetic import synthetic_tilt_images

    optics = Optics(300.0, 2.7, 0.07, 4.0)
    tilts = np.array([-60.0, 60.0])
    # the synthetic images carry the gradient D + x tan(θ) (hand -1); hand +1 data: the gradient of -θ
    imgs = synthetic_tilt_images([25000.0] * 2, [25000.0] * 2, [0.0] * 2, -hand * tilts, optics, size=384, snr=0.5, seed=4)
    stack = write_mrc(tmp_path / "ts.mrcs", imgs.numpy(), 4.0, stack=True)
    series = TiltSeries("ts", stack, tmp_path / "ts.star", ["1@ts.mrcs", "2@ts.mrcs"], tilts, np.zeros(2), optics)
    params = CtfSearchParams(box_px=256, res_min_A=30.0, res_max_A=10.0, defocus_min_A=15000.0, defocus_max_A=35000.0)
    scores = handedness_scores(series, params)
    assert scores[hand] > scores[-hand], scores
    message, warn = handedness_report(series, params, -hand)
    assert warn and f"--defocus-handedness {hand:+d}" in message
