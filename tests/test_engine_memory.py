"""Bounded-memory global search (issue 17): chunked and unchunked passes give the same poses and maps.

A global search either holds the coarse references of every rotation (when they fit
``EStepOptions.pass_memory_bytes``) or scores groups of particles against each projected
rotation chunk; rotations, fine pairs, insertions and particle reads are chunked by
``memory_bytes``. The posterior of a particle depends only on that particle, so every
chunking must give the same best poses (identical grid points) and the same sums up to
float rounding (stated tolerance: max |diff| / max |value| < 1e-4).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from subtomo.em import sampling
from subtomo.em.components import fourier_components
from subtomo.em.expectation import EStepOptions, coarse_group_bytes_per_particle, coarse_refs_bytes
from subtomo.em.iteration import PassConfig, PoseTable, _prepare_pass, estep_pass
from subtomo.geometry.euler import random_rotations
from subtomo.testing.synthetic import two_reference_estep_case

BOX, N, BATCH = 24, 12, 4


@pytest.fixture(scope="module")
def case():
    c = two_reference_estep_case(N, BOX)  # K = 2: the data are class 1
    rot_set = sampling.global_rotations(1, rng=np.random.default_rng(3))
    trans = sampling.translation_grid(2.0, 1.0, 3)
    return c.source, np.arange(N), c.mask, c.sigma2, c.maps, rot_set, trans


def _cfg(case, **estep) -> PassConfig:
    _, _, mask, _, _, rot_set, trans = case
    return PassConfig(BOX, 16, mask, rot_set, False, trans, EStepOptions(**estep), batch_size=BATCH)


def _run(case, cfg: PassConfig):
    src, idx, _, sigma2, maps, _, _ = case
    poses = PoseTable.new(N, random_rotations(N, np.random.default_rng(0)), np.zeros((N, 3)))
    stats, _ = estep_pass(src, idx, poses, maps, sigma2, fourier_components(BOX, BOX, 3), cfg, "cpu")
    return poses, stats


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def test_chunked_global_search_gives_the_same_poses_and_maps(case):
    ref_poses, ref_stats = _run(case, _cfg(case))  # references of every rotation precomputed
    variants = {
        "references held, power per chunk": _cfg(case, pass_memory_bytes=coarse_refs_bytes(2, 576, _mc(case)) + 1),
        "one batch per group, tiny chunks": _cfg(case, pass_memory_bytes=1, memory_bytes=2 ** 16),
        "two batches per group": _cfg(case, pass_memory_bytes=2 * BATCH * _per_particle(case) + 1),
        "all particles in one group": _cfg(case, pass_memory_bytes=N * _per_particle(case) + 1),
    }
    for name, cfg in variants.items():
        poses, stats = _run(case, cfg)
        assert np.array_equal(poses.rot, ref_poses.rot), name  # identical grid points
        assert np.array_equal(poses.offset_px, ref_poses.offset_px), name
        assert np.array_equal(poses.cls, ref_poses.cls), name
        np.testing.assert_allclose(poses.max_prob, ref_poses.max_prob, rtol=1e-3, atol=1e-4, err_msg=name)
        assert _rel(stats.data, ref_stats.data) < 1e-4, name
        assert _rel(stats.weight, ref_stats.weight) < 1e-4, name
        assert _rel(stats.sigma2_num, ref_stats.sigma2_num) < 1e-4, name
        torch.testing.assert_close(stats.class_weight, ref_stats.class_weight, rtol=1e-4, atol=1e-6)
    assert (ref_poses.cls == 0).mean() > 0.9  # the data are class 1, not its mirror


def _mc(case) -> int:
    src, idx, mask, sigma2, maps, rot_set, trans = case
    prep = _prepare_pass(src, idx, maps, sigma2, fourier_components(BOX, BOX, 3), _cfg(case), "cpu", 2, True)
    return int(prep.coarse_mask.sum())


def _per_particle(case) -> int:
    src, idx, mask, sigma2, maps, rot_set, trans = case
    prep = _prepare_pass(src, idx, maps, sigma2, fourier_components(BOX, BOX, 3), _cfg(case), "cpu", 2, True)
    return coarse_group_bytes_per_particle(trans.points.shape[0], 2, len(rot_set.matrices), int(prep.coarse_mask.sum()))


def test_held_memory_respects_the_pass_budget(case):
    src, idx, mask, sigma2, maps, rot_set, trans = case
    comps = fourier_components(BOX, BOX, 3)
    n_r = len(rot_set.matrices)
    # ample budget: the references of every rotation, exactly 4 K R 2Mc bytes, and their power (half that)
    prep = _prepare_pass(src, idx, maps, sigma2, comps, _cfg(case), "cpu", 2, True)
    mc = int(prep.coarse_mask.sum())
    nbytes = [t.numel() * t.element_size() for t in prep.coarse_refs]
    assert nbytes[0] == coarse_refs_bytes(2, n_r, mc) == 4 * 2 * n_r * 2 * mc and 2 * nbytes[1] == nbytes[0]
    assert prep.groups is None
    # references alone fit, with their power not within half the budget: the power is recomputed per chunk
    prep = _prepare_pass(src, idx, maps, sigma2, comps, _cfg(case, pass_memory_bytes=3 * nbytes[0] - 1), "cpu", 2, True)
    assert prep.coarse_refs[1] is None and prep.coarse_refs[0].numel() * 4 == nbytes[0]
    # a budget below that: no references held, groups of particles whose scores fit it (two batches)
    per = coarse_group_bytes_per_particle(trans.points.shape[0], 2, n_r, mc)
    budget = 2 * BATCH * per + per // 2
    assert budget < coarse_refs_bytes(2, n_r, mc)
    cfg = _cfg(case, pass_memory_bytes=budget)
    prep = _prepare_pass(src, idx, maps, sigma2, comps, cfg, "cpu", 2, True)
    assert prep.coarse_refs is None and prep.groups is not None
    assert prep.groups.size == 2 * BATCH and prep.groups.size * per <= budget
    poses = PoseTable.new(N, random_rotations(N, np.random.default_rng(0)), np.zeros((N, 3)))
    seen = []
    from subtomo.em import iteration  # the group's scores are held between batches: watch them

    original = iteration._group_scores

    def watched(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append(prep.groups.held_bytes())
        return out

    iteration._group_scores = watched
    try:
        stats = iteration.SufficientStats.zeros(2, BOX, 3)
        for s in range(0, N, BATCH):
            iteration._batch_pass(src, idx[s:s + BATCH], poses, prep, cfg, stats, "cpu", True)
    finally:
        iteration._group_scores = original
    assert len(seen) == N // BATCH
    t = trans.points.shape[0]
    assert max(seen) == prep.groups.size * t * 2 * n_r * 4  # (G, T, K, R) float32
    assert max(seen) <= budget


def test_table_trilinear_matches_grid_sample():
    """The gather form of the projector's interpolation (compiled with SUBTOMO_COMPILE_PROJECTOR=1) = grid_sample."""
    from subtomo.em.projector3d import Projector3D, _trilinear

    rng = np.random.default_rng(4)
    ref = torch.as_tensor(rng.normal(size=(BOX,) * 3), dtype=torch.float32)
    comps = fourier_components(BOX, BOX, 3)  # up to Nyquist: corners reach the padded table's edge
    plain = Projector3D(ref, compiled=False)
    table = Projector3D(ref, compiled=True)
    rot = torch.as_tensor(random_rotations(5, rng), dtype=torch.float32)
    a = plain.project_stacked(rot, comps.k)
    q = torch.matmul(comps.k[None], rot) * table.pad + (table.big // 2 + 2)
    b = _trilinear(table.table, q, table.big + 4)  # eager: the kernel torch.compile fuses
    assert float((a - b).abs().max() / a.abs().max()) < 1e-5
