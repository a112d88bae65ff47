"""3D auto-refine on small synthetic subtomograms with known poses."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from subtomo.em.gold_standard import split_halves
from subtomo.em.iteration import InMemorySource
from subtomo.em.maps import rotate_map
from subtomo.em.oracle import oracle_reconstruction
from subtomo.em.refine import RefineOptions, RefineState, auto_refine
from subtomo.errors import SubtomoError
from subtomo.io.particles import ParticleSet
from subtomo.io.star import read_star
from subtomo.jobs._em_runs import RefineFiles, resume_state
from subtomo.testing.synthetic import align_to_reference, make_set

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def dataset():
    return make_set(n=40, box=24, pixel_size_A=10.0, snr=2.0, seed=5, max_offset_px=1.0)


def _opts(ds, **kw):
    base = dict(particle_diameter_A=ds.diameter_A, healpix_order=1, offset_range_px=2, offset_step_px=2,
                max_iter=6, batch_size=20, auto_local_order=3, max_order=2, seed=3)
    base.update(kw)
    return RefineOptions(**base)


def _files(ds, directory):
    """The job-side writer of the run files, for particles held in memory."""
    table = pd.DataFrame({"rlnImageName": [f"p{i}.mrc" for i in range(len(ds.rot))],
                          "rlnImagePixelSize": ds.pixel_size_A})
    return RefineFiles(directory, ParticleSet.from_table(table), ds.pixel_size_A)


def test_refine_from_random_orientations_recovers_poses(dataset, tmp_path):
    """The engine returns typed results and writes nothing; the job's writer makes RELION's files from them."""
    ds = dataset
    src = InMemorySource(ds.volumes, ds.pixel_size_A, ds.ctfs)
    seen = []
    res = auto_refine(src, _opts(ds), log=lambda m: None, on_iteration=lambda r: seen.append(r.iteration))
    assert not any(tmp_path.iterdir())
    assert seen == list(range(res.iterations + 1))  # iteration 0 (the random-orientation reconstruction) first
    assert res.final is not None and not res.stopped and res.final_map.shape == (24, 24, 24)
    _, err = align_to_reference(res.poses.rot, ds.rot)
    assert np.median(err) < 15.0  # within the sampling (15 deg fine step at order 1, 7.5 at order 2)
    orc = oracle_reconstruction(src, ds.rot, ds.offset_px, res.halves, diameter_A=ds.diameter_A)
    assert res.resolution_A <= 1.35 * orc.resolution_A


def test_run_files_of_a_refinement(dataset, tmp_path):
    ds = dataset
    src = InMemorySource(ds.volumes, ds.pixel_size_A, ds.ctfs)
    res = auto_refine(src, _opts(ds, max_iter=2), log=lambda m: None, on_iteration=_files(ds, tmp_path))
    for name in ("run_it000_half1_class001.mrc", "run_it000_half2_class001.mrc", "run_class001.mrc", "run_half1_class001_unfil.mrc", "run_half2_class001_unfil.mrc",
                 "run_data.star", "run_model.star", "run_it001_half1_class001.mrc", "run_it001_data.star",
                 "run_it001_model.star", "run_fsc.png", "run_class001_slices.png"):
        assert (tmp_path / name).exists(), name
    data = read_star(tmp_path / "run_data.star")["particles"]
    for col in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnRandomSubset",
                "rlnMaxValueProbDistribution", "rlnNrOfSignificantSamples", "rlnLogLikeliContribution"):
        assert col in data.columns
    back = ParticleSet.read(tmp_path / "run_data.star")  # poses round trip through RELION's columns
    np.testing.assert_allclose(back.rotations(), res.poses.rot, atol=1e-4)
    np.testing.assert_allclose(back.offsets_px(), res.poses.offset_px, atol=1e-4)
    np.testing.assert_array_equal(back.halves(), res.halves)
    model = read_star(tmp_path / "run_model.star")
    assert model["model_general"]["rlnCurrentResolution"] >= 2 * ds.pixel_size_A - 1e-9  # Å, as RELION
    assert "rlnGoldStandardFsc" in model["model_class_1"].columns


def test_ctf_on_beats_off_and_offsets_recovered(dataset, tmp_path):
    ds = dataset
    src = InMemorySource(ds.volumes, ds.pixel_size_A, ds.ctfs)
    halves = split_halves(None, ds.volumes.shape[0], 0)
    on = oracle_reconstruction(src, ds.rot, ds.offset_px, halves, diameter_A=ds.diameter_A, use_ctf=True)
    off = oracle_reconstruction(src, ds.rot, ds.offset_px, halves, diameter_A=ds.diameter_A, use_ctf=False)
    assert on.fsc[1:8].mean() > off.fsc[1:8].mean()


def test_continue_gives_the_same_result(tmp_path):
    ds = make_set(n=16, box=20, pixel_size_A=12.0, snr=3.0, seed=9, max_offset_px=0.5)
    src = InMemorySource(ds.volumes, ds.pixel_size_A, ds.ctfs)
    opts = RefineOptions(particle_diameter_A=ds.diameter_A, healpix_order=1, offset_range_px=1, offset_step_px=2,
                         max_iter=3, batch_size=8, max_order=1, seed=1)
    full = auto_refine(src, opts, log=lambda m: None)
    part = auto_refine(src, opts, log=lambda m: None, on_iteration=_files(ds, tmp_path), stop_after=1)
    assert part.stopped and (tmp_path / "run_it001_optimiser.pt").exists()
    state = resume_state(tmp_path, RefineState.from_dict, "cpu", lambda m: None)  # read back from the file
    assert state is not None and state.iteration == 1
    cont = auto_refine(src, opts, log=lambda m: None, resume=state)
    assert cont.iterations == full.iterations
    torch.testing.assert_close(cont.final_map, full.final_map, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(cont.poses.rot, full.poses.rot, atol=1e-6)


def test_random_subset_rules():
    np.testing.assert_array_equal(split_halves(np.array([1, 2, 2, 1]), 4, 0), [1, 2, 2, 1])
    with pytest.raises(SubtomoError):
        split_halves(np.array([1, 0, 2, 1]), 4, 0)
    with pytest.raises(SubtomoError):
        split_halves(np.array([1, 3, 2, 1]), 4, 0)
    np.testing.assert_array_equal(split_halves(np.zeros(6), 6, 0), split_halves(None, 6, 0))  # all 0: random
    s = split_halves(None, 11, 0)
    assert set(s) == {1, 2} and abs((s == 1).sum() - (s == 2).sum()) <= 1


def test_refine3d_job_writes_relion_outputs(tmp_path):
    from subtomo.jobs.base import execute
    from subtomo.jobs.refine3d import SPEC, Refine3DParams
    from subtomo.testing.synthetic import write_star_project

    ds = make_set(n=12, box=20, pixel_size_A=12.0, snr=3.0, seed=2, max_offset_px=0.0, ctf=False)
    write_star_project(ds, tmp_path)
    params = Refine3DParams(i="particles.star", particle_diameter=ds.diameter_A, ctf=False, healpix_step=15.0,
                            offset_range=0.0, max_iter=2, batch_size=6, threads=1)
    ctx = execute(SPEC, params, tmp_path, quiet=True)
    for name in ("run_class001.mrc", "run_half1_class001_unfil.mrc", "run_data.star", "run_model.star"):
        assert (ctx.dir / name).exists()
    blocks = read_star(ctx.dir / "run_data.star")
    assert "optics" in blocks and len(blocks["particles"]) == 12
    assert set(blocks["particles"]["rlnRandomSubset"]) == {1, 2}


def _errors_modulo(est: np.ndarray, true: np.ndarray, sym: np.ndarray) -> np.ndarray:
    """Per-particle angular errors after the best global rotation, minimum over the point group."""
    from subtomo.em.sampling import pose_change_deg

    rel = np.einsum("nji,njk->nik", true, est)  # g_i G
    best = None
    for g_mat in rel:
        err = pose_change_deg(true @ g_mat, est, sym)  # est_i vs true_i G, modulo g: true_i g G = true_i G (G^T g G)
        if best is None or np.median(err) < np.median(best):
            best = err
    return best


def test_symmetric_refinement_d2(tmp_path):
    from subtomo.geometry.symmetry import symmetry_matrices

    d2 = symmetry_matrices("D2")
    ds = make_set(n=32, box=24, pixel_size_A=10.0, snr=2.0, seed=11, max_offset_px=0.5, sym_mats=d2)
    src = InMemorySource(ds.volumes, ds.pixel_size_A, ds.ctfs)
    logs = []
    res = auto_refine(src, _opts(ds, sym="D2", auto_local_order=2, max_order=2, max_iter=5, batch_size=16),
                      log=logs.append)
    assert any("local" in m for m in logs)  # went through local searches
    # errors modulo D2 (the frame of a D2 refinement is defined up to the group)
    err = _errors_modulo(res.poses.rot, ds.rot, d2)
    assert np.median(err) < 15.0
    vol = res.final_map
    n = vol.shape[-1]
    ax = torch.arange(n, dtype=torch.float32) - n // 2
    z, y, x = torch.meshgrid(ax, ax, ax, indexing="ij")
    r = torch.stack([x, y, z], -1).reshape(-1, 3) @ torch.as_tensor(d2[1], dtype=torch.float32)  # g^T r
    grid = ((r + n // 2) * 2 / (n - 1) - 1).reshape(1, n, n, n, 3)
    rotated = torch.nn.functional.grid_sample(vol[None, None].float(), grid, align_corners=True)[0, 0]
    cc = float((vol * rotated).sum() / (vol.norm() * rotated.norm()))
    assert cc > 0.95  # the reconstruction is D2-symmetric


def test_rotate_map_matches_real_space_rotation():
    """rotate_map: identity = the input limited to the Nyquist sphere; a rotation = scipy's (out(r) = vol(A^T r))."""
    from scipy.ndimage import affine_transform

    from subtomo.fourier import fft_centered, frequency_radius, ifft_centered, lowpass, soft_sphere_mask
    from subtomo.geometry.euler import euler_to_matrix

    n = 24
    rng = np.random.default_rng(3)
    blob = lowpass(torch.from_numpy(rng.normal(size=(n, n, n)).astype(np.float32)), 5.0, 1.0)
    vol = blob * soft_sphere_mask((n, n, n), n / 3, 2.0)  # compact, like a particle
    limited = ifft_centered(fft_centered(vol, 3) * (torch.round(frequency_radius(vol.shape) * n) < n / 2), vol.shape)
    same = rotate_map(vol, np.eye(3))
    assert float(((same - limited) ** 2).sum() / (limited ** 2).sum()) < 0.01  # gridding correction: ~0.5 %
    assert abs(float(rotate_map(vol + 0.3, np.eye(3)).mean()) - float(vol.mean() + 0.3)) < 1e-4
    a = euler_to_matrix(np.array([30.0]), np.array([50.0]), np.array([-70.0]))[0]
    p = np.eye(3)[::-1]  # xyz <-> zyx
    m, c = p @ a.T @ p, np.full(3, n // 2)
    expected = torch.from_numpy(affine_transform(limited.numpy(), m, offset=c - m @ c, order=3).astype(np.float32))
    smooth = lambda v: lowpass(v, 8.0, 1.0)  # noqa: E731 - interpolation differs near Nyquist only
    got = smooth(rotate_map(vol, a))
    assert float(((got - smooth(expected)) ** 2).sum() / (smooth(expected) ** 2).sum()) < 0.01
    wrong = smooth(rotate_map(vol, a.T))
    assert float(((wrong - smooth(expected)) ** 2).sum() / (smooth(expected) ** 2).sum()) > 0.3


def _project_with_angles(root, error_deg: float):
    """A sharp-blob set written as a project whose STAR carries poses ``error_deg`` off the truth and the true origins."""
    from subtomo.geometry.euler import matrix_to_euler
    from subtomo.geometry.symmetry import axis_rotation
    from subtomo.io.star import write_star
    from subtomo.testing.synthetic import blob_reference, write_star_project
    from subtomo.tomo.extract import rescale

    ref = torch.from_numpy(rescale(blob_reference(48, np.random.default_rng(4)).numpy(), 24))  # blobs half as wide
    ds = make_set(n=24, box=24, pixel_size_A=10.0, snr=20.0, seed=4, max_offset_px=1.0, ctf=False, reference=ref)
    write_star_project(ds, root)
    rng = np.random.default_rng(1)
    start = np.stack([r @ axis_rotation(rng.normal(size=3), np.deg2rad(error_deg)) for r in ds.rot])
    blocks = read_star(root / "particles.star")
    angles = matrix_to_euler(start)
    for j, axis in enumerate(("Rot", "Tilt", "Psi")):
        blocks["particles"][f"rlnAngle{axis}"] = angles[:, j]
    for j, axis in enumerate("XYZ"):
        blocks["particles"][f"rlnOrigin{axis}Angst"] = ds.offset_px[:, j] * ds.pixel_size_A
    write_star(root / "particles.star", blocks)
    return ds, start


def test_refine3d_from_input_angles_searches_locally_around_them(tmp_path):
    """Poses 5 deg off the truth (as imported from template matching): local searches from iteration 1 improve them."""
    from subtomo.em.sampling import pose_change_deg
    from subtomo.io.mrc import read_mrc
    from subtomo.jobs.base import execute
    from subtomo.jobs.refine3d import SPEC, Refine3DParams

    ds, start = _project_with_angles(tmp_path, 5.0)
    assert abs(np.median(pose_change_deg(ds.rot, start)) - 5.0) < 1e-6
    params = Refine3DParams(i="particles.star", particle_diameter=ds.diameter_A, ctf=False, healpix_step=0.9,
                            offset_range=1.0, offset_step=0.5, max_iter=2, batch_size=24, threads=1,
                            from_input_angles=True)
    ctx = execute(SPEC, params, tmp_path, quiet=True)
    log = (ctx.dir / "run.out").read_text()
    assert "starting from the input angles (rlnAngleRot/Tilt/Psi) and origins of particles.star" in log
    assert "sigma 2.8125 deg" in log  # default: 3 x the 0.94 deg step
    iterations = [line for line in log.splitlines() if "iteration   " in line]
    assert len(iterations) == 3 and all("deg local" in line for line in iterations)  # local from iteration 1
    # gold-standard: each half reconstructed on its own at the input poses
    h1, _ = read_mrc(ctx.dir / "run_it000_half1_class001.mrc")
    h2, _ = read_mrc(ctx.dir / "run_it000_half2_class001.mrc")
    assert np.abs(h1 - h2).max() > 0.05 * np.abs(h1).max()
    out = ParticleSet.read(ctx.dir / "run_data.star", tmp_path)
    err = pose_change_deg(ds.rot, out.rotations())  # in the input's frame: no global alignment
    assert np.median(err) < 2.75  # measured 1.9 deg (from 5.0)
    # the input origins were the start: measured 0.26 px (zeros would be ~0.5, the mean of |uniform(-1, 1)|)
    assert np.abs(out.offsets_px() - ds.offset_px).mean() < 0.35


def test_refine3d_from_input_angles_needs_angles(tmp_path):
    from subtomo.jobs.base import execute
    from subtomo.jobs.refine3d import SPEC, Refine3DParams
    from subtomo.testing.synthetic import write_star_project

    ds = make_set(n=4, box=16, pixel_size_A=12.0, snr=3.0, seed=2, max_offset_px=0.0, ctf=False)
    write_star_project(ds, tmp_path)  # no rlnAngleRot/Tilt/Psi
    params = Refine3DParams(i="particles.star", particle_diameter=ds.diameter_A, ctf=False, from_input_angles=True)
    with pytest.raises(SubtomoError, match=r"particles\.star: --from-input-angles needs rlnAngleRot"):
        execute(SPEC, params, tmp_path, quiet=True)
    assert not (tmp_path / "Refine3D").exists()  # refused before a job directory was made
    lone = Refine3DParams(i="particles.star", particle_diameter=ds.diameter_A, ctf=False, sigma_ang=4.0)
    with pytest.raises(SubtomoError, match="--sigma-ang is the prior of --from-input-angles"):
        execute(SPEC, lone, tmp_path, quiet=True)
