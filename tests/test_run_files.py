"""RELION run files written by the jobs from the engine's results (io/run_files.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from subtomo.em.iteration import PoseTable
from subtomo.em.model import EMModel
from subtomo.geometry.euler import random_rotations
from subtomo.io.particles import ParticleSet
from subtomo.io.run_files import latest_optimiser_state, run_root, save_optimiser_state, write_data_star, write_model_star
from subtomo.io.star import read_star


def _model(k: int = 2, n: int = 16) -> EMModel:
    shells = n // 2 + 1
    fsc = torch.linspace(1, 0, shells).repeat(k, 1)
    return EMModel(torch.zeros(k, n, n, n), torch.arange(1, shells + 1, dtype=torch.float32), 2 * torch.ones(k, shells),
                   torch.full((k, shells), 3.0), fsc, torch.tensor([0.25, 0.75]), 4.0, 4.0, 1.5, 4, 12,
                   log_lik=-12.5, extra={"average_pmax": 0.6, "n_particles": 7})


def test_model_star_holds_the_model(tmp_path):
    path = write_model_star(tmp_path / "m.star", _model(),
                            ["a.mrc", "b.mrc"], class_resolutions_A=[20.0, 16.0], accuracy_rot_deg=3.5)
    blocks = read_star(path)
    general = blocks["model_general"]
    assert general["rlnPixelSize"] == 4.0 and general["rlnNrClasses"] == 2
    assert abs(general["rlnCurrentResolution"] - 16.0) < 1e-9  # shell 4 of a 16 px box at 4 Å: 16 Å (RELION writes Å)
    assert abs(general["rlnSigmaOffsetsAngst"] - 1.5 * 4.0) < 1e-9
    classes = blocks["model_classes"]
    np.testing.assert_allclose(classes["rlnClassDistribution"], [0.25, 0.75])
    np.testing.assert_allclose(classes["rlnEstimatedResolution"], [20.0, 16.0])
    np.testing.assert_allclose(classes["rlnAccuracyRotations"], [3.5, 3.5])
    np.testing.assert_allclose(blocks["model_class_2"]["rlnGoldStandardFsc"], np.linspace(1, 0, 9), atol=1e-6)
    np.testing.assert_allclose(blocks["model_class_1"]["rlnReferenceSigma2"], np.ones(9))  # tau2 / 2
    np.testing.assert_allclose(blocks["model_group_1"]["rlnSigma2Noise"], np.arange(1, 10))
    assert int(blocks["model_groups"]["rlnGroupNrParticles"].iloc[0]) == 7


def test_data_star_round_trips_poses(tmp_path):
    n = 5
    table = pd.DataFrame({"rlnImageName": [f"p{i}.mrc" for i in range(n)], "rlnOpticsGroup": 1})
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"], "rlnImagePixelSize": [2.5]})
    rot = random_rotations(n, np.random.default_rng(0))
    poses = PoseTable.new(n, rot, np.arange(3 * n, dtype=float).reshape(n, 3) / 7)
    poses.cls[:] = [0, 1, 1, 0, 2]
    write_data_star(tmp_path / "d.star", ParticleSet.from_table(table, optics), poses, halves=np.array([1, 2, 1, 2, 2]))
    back = ParticleSet.read(tmp_path / "d.star")
    np.testing.assert_allclose(back.rotations(), rot, atol=1e-5)
    np.testing.assert_allclose(back.offsets_px(), poses.offset_px, atol=1e-5)
    np.testing.assert_allclose(back.offsets_A(), poses.offset_px * 2.5, atol=1e-5)
    assert list(back.table["rlnClassNumber"]) == [1, 2, 2, 1, 3]
    assert list(back.halves()) == [1, 2, 1, 2, 2]
    assert back.optics is not None and float(back.optics["rlnImagePixelSize"].iloc[0]) == 2.5


def test_latest_optimiser_state_is_the_highest_iteration(tmp_path):
    assert latest_optimiser_state(tmp_path) is None
    for it in (9, 10, 2):
        save_optimiser_state(tmp_path, it, {"iteration": it, "x": torch.full((2,), float(it))})
    it, state, path = latest_optimiser_state(tmp_path)
    assert it == 10 and path.name == f"{run_root(10)}_optimiser.pt" and float(state["x"][0]) == 10.0
    assert run_root(None) == "run" and run_root(7) == "run_it007"
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically, no temporary file left


def test_checkpoint_with_foreign_objects_is_refused(tmp_path):
    import os as _os

    import torch

    from subtomo.errors import SubtomoError
    from subtomo.io.run_files import load_optimiser_state

    path = tmp_path / "run_it001_optimiser.pt"
    torch.save({"payload": _os.system}, path)  # unpickling this would hand over a callable
    with pytest.raises(SubtomoError, match="holds objects a checkpoint may not hold"):
        load_optimiser_state(path)


def test_torn_newest_checkpoint_falls_back_to_the_one_before(tmp_path):
    save_optimiser_state(tmp_path, 1, {"iteration": 1, "x": np.arange(3)})
    save_optimiser_state(tmp_path, 2, {"iteration": 2, "x": np.arange(4)})
    newest = tmp_path / f"{run_root(2)}_optimiser.pt"
    newest.write_bytes(newest.read_bytes()[:40])  # killed while writing (without the atomic rename)
    warnings: list[str] = []
    it, state, path = latest_optimiser_state(tmp_path, warn=warnings.append)
    assert it == 1 and list(state["x"]) == [0, 1, 2] and path.name == f"{run_root(1)}_optimiser.pt"
    assert len(warnings) == 1 and "Falling back" in warnings[0]
