"""Ground-truth scoring: gauge removal (global rotation, symmetry, hand), selection and class accuracy."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from subtomo.em.maps import rotate_map
from subtomo.fourier import lowpass, soft_sphere_mask
from subtomo.geometry.euler import angular_distance_deg, random_rotations
from subtomo.geometry.symmetry import symmetry_matrices
from subtomo.simulate import scoring


def test_global_rotation_recovers_the_frame_under_symmetry_flips_and_outliers():
    rng = np.random.default_rng(0)
    true = random_rotations(80, rng)
    g = random_rotations(1, rng)[0]
    sym = symmetry_matrices("D7")
    flips = sym[rng.integers(0, len(sym), 80)]
    est = np.einsum("nij,njk,kl->nil", true, flips, g)  # est_i = true_i g_i G
    est[:8] = random_rotations(8, rng)  # outliers
    g_found, err = scoring.global_rotation(est, true, sym)
    assert angular_distance_deg(sym @ g_found, g).min() < 0.01  # G is defined up to the point group
    assert np.all(err[8:] < 1e-3) and np.median(err[:8]) > 10


def test_truth_in_map_frame_finds_rotation_shift_and_hand():
    rng = np.random.default_rng(1)
    n = 24
    truth = lowpass(torch.from_numpy(rng.normal(size=(n, n, n)).astype(np.float32)), 4.0, 1.0)
    truth = truth * soft_sphere_mask((n, n, n), 8, 2)
    g = random_rotations(1, rng)[0]
    mirrored = rotate_map(torch.flip(truth, dims=(0,)), g.T)
    mirrored = torch.roll(mirrored, shifts=(2, -1, 1), dims=(0, 1, 2))
    aligned = scoring.truth_in_map_frame(truth, mirrored, g)
    assert aligned.hand == "mirrored" and aligned.correlation > 0.95
    assert aligned.fsc[1:6].min() > 0.95
    plain = torch.roll(rotate_map(truth, g.T), shifts=(-3, 0, 2), dims=(0, 1, 2))
    aligned = scoring.truth_in_map_frame(truth, plain, g)
    assert aligned.hand == "as is" and aligned.correlation > 0.95
    wrong = scoring.truth_in_map_frame(truth, plain, random_rotations(1, rng)[0])
    assert wrong.correlation < 0.6


def _picks() -> pd.DataFrame:
    kinds = ["particle"] * 6 + ["gold", "junk"]
    return pd.DataFrame({"rlnTomoName": ["T"] * 8, "rlnTomoParticleId": np.arange(1, 9), "subtomoKind": kinds,
                         "rlnClassNumber": [1, 1, 1, 2, 2, 2, 0, 0]})


def test_selection_scores_count_real_particles():
    picks = _picks()
    candidates = picks[["rlnTomoName", "rlnTomoParticleId"]]
    kept = candidates.iloc[[0, 1, 2, 3, 6]]  # 4 real + the gold bead
    score = scoring.selection_scores(kept, candidates, picks)
    assert (score.kept, score.kept_particles, score.true_particles) == (5, 4, 6)
    assert np.isclose(score.precision, 0.8) and np.isclose(score.recall, 4 / 6)


def test_classification_accuracy_is_label_permutation_invariant():
    picks = _picks()
    particles = picks[["rlnTomoName", "rlnTomoParticleId"]].copy()
    particles["rlnClassNumber"] = [2, 2, 1, 1, 1, 1, 2, 1]  # swapped labels, one error; false picks ignored
    accuracy, table = scoring.classification_accuracy(particles, picks)
    assert np.isclose(accuracy, 5 / 6)
    assert table.tolist() == [[1, 2], [3, 0]]


def test_ctf_errors_match_images_by_name():
    truth = pd.DataFrame({"rlnTomoName": ["T", "T"], "rlnMicrographName": ["1@T.mrcs", "2@T.mrcs"],
                          "rlnDefocusU": [30000.0, 31000.0], "rlnDefocusV": [29000.0, 30000.0]})
    est = pd.DataFrame({"rlnMicrographName": ["2@T.mrcs", "1@T.mrcs"], "rlnTomoNominalStageTiltAngle": [3.0, 0.0],
                        "rlnDefocusU": [31500.0, 29000.0], "rlnDefocusV": [30500.0, 29000.0],
                        "subtomoCtfFitFailed": [0, 1]})
    err = scoring.ctf_errors({"T": est}, truth).sort_values("tilt_deg")
    assert err["error_A"].tolist() == [-500.0, 500.0]
    assert err["flagged"].tolist() == [True, False]
