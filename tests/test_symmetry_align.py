"""Symmetry-axis alignment (relion_align_symmetry's job) and refine3d's C1-then-align route."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from subtomo.em.maps import rotate_map
from subtomo.em.symmetry_align import align_symmetry, symmetry_score
from subtomo.fourier import fft_centered, ifft_centered, phase_shift
from subtomo.geometry.euler import random_rotations
from subtomo.geometry.symmetry import axis_rotation, symmetry_matrices

PX = 5.0


def blob_map(box: int, rng: np.random.Generator, n_blobs: int, ops: np.ndarray | None = None,
             sigma_px: float = 1.5, radius_px: float | None = None) -> torch.Tensor:
    """Gaussian blobs (sigma ``sigma_px``) at random points, repeated by ``ops`` about the box centre."""
    radius_px = radius_px or 0.3 * box
    ax = torch.arange(box, dtype=torch.float32) - box // 2
    z, y, x = torch.meshgrid(ax, ax, ax, indexing="ij")
    vol = torch.zeros(box, box, box)
    ops = np.eye(3)[None] if ops is None else ops
    for _ in range(n_blobs):
        c = rng.uniform(-radius_px, radius_px, 3)
        c *= min(1.0, radius_px / np.linalg.norm(c))
        amp = rng.uniform(0.5, 1.5)
        for g in ops:
            gc = g @ c
            vol += amp * torch.exp(-((x - gc[0]) ** 2 + (y - gc[1]) ** 2 + (z - gc[2]) ** 2) / (2 * sigma_px ** 2))
    return vol / vol.std()


def move(vol: torch.Tensor, rot: np.ndarray, shift_px) -> torch.Tensor:
    """out(r) = vol(R^T (r - shift)): rotated about the centre, then translated."""
    out = rotate_map(vol, rot)
    shape = tuple(vol.shape)
    return ifft_centered(phase_shift(fft_centered(out, 3), torch.tensor(shift_px, dtype=torch.float32), shape), shape)


def ncc(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_d7_map_recovered_in_the_standard_frame(one_torch_thread):
    rng = np.random.default_rng(4)
    d7 = symmetry_matrices("D7")
    ref = blob_map(32, rng, 4, d7)
    r0 = random_rotations(1, rng)[0]
    moved = move(ref, r0, [1.5, -2.0, 1.0])
    assert symmetry_score(ref, "D7", PX) > 0.99 and symmetry_score(moved, "D7", PX) < 0.8
    res = align_symmetry(moved, "D7", PX)
    assert res.score > 0.97
    # the aligned map is the standard-orientation map; any g in the normaliser of D7 (D14: the
    # 2-fold axes may be swapped with the lines between them) is an equally valid frame
    best = max(ncc(res.volume, rotate_map(ref, g)) for g in symmetry_matrices("D14"))
    assert best > 0.95
    # the shift undoes the applied one: the symmetry centre of the moved map is at +shift
    np.testing.assert_allclose(res.centre_px, [1.5, -2.0, 1.0], atol=0.3)
    # a map without symmetry scores clearly lower
    other = align_symmetry(blob_map(32, np.random.default_rng(9), 40), "D7", PX)
    assert other.score < res.score - 0.15


def test_c4_axis_found(one_torch_thread):
    rng = np.random.default_rng(7)
    ref = blob_map(32, rng, 6, symmetry_matrices("C4"))
    r0 = random_rotations(1, rng)[0]
    moved = move(ref, r0, [-1.0, 0.5, 2.0])
    res = align_symmetry(moved, "C4", PX)
    assert res.score > 0.97 > symmetry_score(moved, "C4", PX)
    # the true axis in the moved map, R0 e_z, must come back to +-z; the angle about it is free
    axis = res.rotation @ r0 @ np.array([0.0, 0.0, 1.0])
    assert abs(axis[2]) > np.cos(np.radians(3.0))
    # the aligned map is the reference up to a rotation about z (and a flip), and a shift along z
    best = 0.0
    for flip in (np.eye(3), axis_rotation((1, 0, 0), np.pi)):
        for phi in np.arange(0, 90, 3.0):
            cand = rotate_map(ref, axis_rotation((0, 0, 1), np.radians(phi)) @ flip)
            for dz in np.arange(-3, 3.5, 0.5):  # C4 fixes the centre across the axis only
                shifted = ifft_centered(phase_shift(fft_centered(cand, 3), torch.tensor([0.0, 0.0, dz]), cand.shape),
                                        cand.shape)
                best = max(best, ncc(res.volume, shifted))
    assert best > 0.95


def test_c1_is_the_identity():
    vol = blob_map(16, np.random.default_rng(1), 5)
    res = align_symmetry(vol, "C1", PX)
    np.testing.assert_allclose(res.rotation, np.eye(3))
    assert res.score == 1.0 and torch.equal(res.volume, vol)


def _errors_modulo(est: np.ndarray, true: np.ndarray, sym: np.ndarray) -> np.ndarray:
    from subtomo.simulate.scoring import global_rotation

    return global_rotation(est, true, sym)[1]


@pytest.fixture
def d2_project(tmp_path):
    from subtomo.testing.synthetic import make_set, write_star_project

    ds = make_set(n=32, box=24, pixel_size_A=10.0, snr=2.0, seed=11, max_offset_px=0.5, ctf=False, max_tilt_deg=89.0,
                  sym_mats=symmetry_matrices("D2"))
    write_star_project(ds, tmp_path)
    return tmp_path, ds


def test_refine3d_job_c1_then_align_d2(d2_project, one_torch_thread):
    from subtomo.geometry.euler import euler_to_matrix
    from subtomo.io.particles import read_particles
    from subtomo.jobs.base import SUCCESS_SENTINEL, execute
    from subtomo.jobs.refine3d import SPEC, Refine3DParams

    project, ds = d2_project
    params = Refine3DParams(i="particles.star", particle_diameter=ds.diameter_A, ctf=False, sym="D2",
                            healpix_step=15.0, auto_local_healpix_step=7.5, offset_range=1.0, max_iter=4,
                            batch_size=16, threads=1, seed=3)
    ctx = execute(SPEC, params, project, quiet=True)
    for name in ("c1_stage/run_class001.mrc", "c1_stage/run_data.star", "c1_stage/run_it001_data.star",
                 "c1_stage/run_class001_symaligned.mrc", "run_class001.mrc", "run_half1_class001_unfil.mrc",
                 "run_data.star", "run_model.star", "run_it001_data.star"):
        assert (ctx.dir / name).exists(), name
    df, _ = read_particles(ctx.dir / "run_data.star")
    est = euler_to_matrix(df["rlnAngleRot"].to_numpy(), df["rlnAngleTilt"].to_numpy(), df["rlnAnglePsi"].to_numpy())
    d2 = symmetry_matrices("D2")
    assert np.median(_errors_modulo(est, ds.rot, d2)) < 10.0
    from subtomo.io.mrc import read_mrc

    final, _ = read_mrc(ctx.dir / "run_class001.mrc")
    assert symmetry_score(torch.from_numpy(final.copy()), "D2", 10.0) > 0.95
    assert "symmetry alignment (D2" in (ctx.dir / "run.out").read_text()

    # --continue-job: (a) stage 2 interrupted after iteration 2 (stage 1 read back from its files),
    # (b) stage 1 interrupted after iteration 2 (stage 2 not started); both end as the full run
    def interrupt(d, keep_iter):
        (d / SUCCESS_SENTINEL).unlink(missing_ok=True)  # an interrupted job has not finished
        for f in d.iterdir():
            m = f.name.startswith("run_it") and int(f.name[6:9]) > keep_iter
            if m or (f.is_file() and f.name.startswith("run_") and not f.name.startswith("run_it")
                     and f.name != "run.out"):
                f.unlink()

    for stage1_iter, stage2_iter in ((None, 2), (2, 0)):
        if stage1_iter is not None:
            interrupt(ctx.dir / "c1_stage", stage1_iter)
        interrupt(ctx.dir, stage2_iter)
        assert not (ctx.dir / "c1_stage" / "run_class001_symaligned.mrc").exists() or stage1_iter is None
        assert not (ctx.dir / "run_data.star").exists()
        again = execute(SPEC, params.model_copy(update={"continue_job": str(ctx.dir)}), project, quiet=True)
        assert again.dir == ctx.dir
        df2, _ = read_particles(ctx.dir / "run_data.star")
        est2 = euler_to_matrix(df2["rlnAngleRot"].to_numpy(), df2["rlnAngleTilt"].to_numpy(),
                               df2["rlnAnglePsi"].to_numpy())
        np.testing.assert_allclose(est2, est, atol=1e-4)
    out = (ctx.dir / "run.out").read_text()
    assert "continuing from run_it002_optimiser.pt" in out and "[C1] continuing from run_it002_optimiser.pt" in out
