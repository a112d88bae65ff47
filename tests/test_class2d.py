"""2D classification: in-plane rotation kernels, E/M steps on known data, the class2d job."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from subtomo.em.class2d import (
    Class2DSettings,
    Poses2D,
    Projector2D,
    Stats2D,
    fine_angles,
    iterate,
    reconstruct2d,
    stats_for_poses,
    tau2_from_power2d,
)
from subtomo.em.components import fourier_components
from subtomo.em.expectation import BatchData, EStepOptions, expectation_batch
from subtomo.em.model import EMModel
from subtomo.em.rotations2d import back_rotate2d, padded_rfft2d, project2d
from subtomo.em.sampling import translation_grid
from subtomo.fourier import fft_centered
from subtomo.io.mrc import read_mrc
from subtomo.io.star import read_star
from subtomo.jobs.base import SUCCESS_SENTINEL, execute
from subtomo.testing.patterns2d import BOX, PATTERNS, dataset, pattern, write_proj2d_project


def _rel(a, b):
    return float((a - b).abs().norm() / b.abs().norm())


# ----------------------------------------------------------------------------- kernels


def test_project2d_matches_rotated_pattern():
    comps = fourier_components(BOX, BOX, 2)
    fp = padded_rfft2d(torch.tensor(pattern(0), dtype=torch.float32)[None], 2)
    for psi in (30.0, 217.0):
        got = project2d(fp, torch.tensor([psi]), comps.k, 2)[0, 0]
        want = comps.extract(fft_centered(torch.tensor(pattern(0, psi), dtype=torch.float32)[None], 2))[0]
        assert _rel(got, want) < 0.03
    # the wrong rotation sense is far off
    bad = project2d(fp, torch.tensor([-30.0]), comps.k, 2)[0, 0]
    want = comps.extract(fft_centered(torch.tensor(pattern(0, 30.0), dtype=torch.float32)[None], 2))[0]
    assert _rel(bad, want) > 0.5


def test_back_rotate_exact_on_grid_and_accurate_off_grid():
    comps = fourier_components(BOX, BOX, 2)
    ref = comps.extract(fft_centered(torch.tensor(pattern(2), dtype=torch.float32)[None], 2))[0]
    for psi, gridding, tol in ((0.0, False, 1e-4), (90.0, False, 1e-4), (30.0, True, 0.03), (200.0, True, 0.03)):
        img = torch.tensor(pattern(2, psi), dtype=torch.float32)[None]
        f = comps.extract(fft_centered(img, 2))
        got = back_rotate2d(f[None], torch.tensor([psi]), comps.idx, comps.k, comps.size, 2, gridding,
                            dc=img.sum().reshape(1, 1).to(torch.complex64))[0]
        assert _rel(got, ref) < tol, (psi, _rel(got, ref))


# ----------------------------------------------------------------------------- E and M steps


def _true_model(settings: Class2DSettings, sigma2: torch.Tensor) -> EMModel:
    maps = torch.tensor(np.array([pattern(k) for k in PATTERNS]), dtype=torch.float32)
    k = len(PATTERNS)
    return EMModel(maps=maps, sigma2=sigma2, tau2=tau2_from_power2d(maps).float(), data_vs_prior=torch.zeros(k, BOX // 2 + 1),
                   fsc=torch.zeros(k, BOX // 2 + 1), class_priors=torch.full((k,), 1 / k, dtype=torch.float64),
                   pixel_size_A=5.0, tau2_fudge=2.0, sigma_offset_px=3.0, current_shell=BOX // 2 - 1, ndim=2)


def test_estep_recovers_known_rotations_and_shifts():
    torch.manual_seed(0)
    noise = 0.3
    imgs, truth = dataset(n_per=6, noise=noise, seed=3)
    st = Class2DSettings(n_classes=3, pixel_size_A=5.0, particle_diameter_A=150.0, highres_limit_A=None, seed=5)
    sigma2 = torch.full((BOX // 2 + 1,), noise ** 2 * BOX * BOX / 2)  # white noise: E|N(k)|^2 = N^2 s^2
    model = _true_model(st, sigma2)
    poses = Poses2D.new(len(imgs))
    _, new, _ = iterate(imgs, model, poses, st, 1)
    assert np.array_equal(new.cls, truth[:, 0].astype(int))
    dpsi = np.abs((new.psi_deg - truth[:, 1] + 180) % 360 - 180)
    assert dpsi.max() < 6.0, dpsi
    # the image content sits at +shift; RELION's origin is the shift that centres it: -shift
    doff = np.linalg.norm(new.origin_px + truth[:, 2:4], axis=1)
    assert doff.max() < 1.0, doff


def test_posterior_sums_to_one():
    imgs, _ = dataset(n_per=3, noise=1.0, seed=1)
    st = Class2DSettings(n_classes=3, pixel_size_A=5.0, particle_diameter_A=150.0)
    comps = fourier_components(BOX, 20, 2)
    model = _true_model(st, torch.full((BOX // 2 + 1,), BOX * BOX / 2.0))
    projectors = [Projector2D(model.maps[k]) for k in range(3)]
    orient, _, _ = fine_angles(st, np.random.default_rng(0))
    tr = translation_grid(3.0, 2.0, ndim=2)
    x = comps.extract(fft_centered(imgs, 2))
    batch = BatchData(x, torch.ones(x.shape), torch.zeros(len(x), 2), torch.zeros(len(x), 2))
    post = expectation_batch(batch, comps, comps.shell < 6, 1.0 / model.sigma2[comps.shell], projectors, orient,
                             tr.points, tr.children, torch.log(torch.full((3,), 1 / 3)), EStepOptions(max_keep=50))
    torch.testing.assert_close(post.weight.sum(1), torch.ones(len(x)), atol=1e-5, rtol=0)
    assert (post.weight >= 0).all() and (post.max_prob <= 1 + 1e-6).all()


def test_mstep_delta_posterior_returns_the_particle():
    psi_grid = torch.arange(60, dtype=torch.float64) * 6.0
    comps = fourier_components(BOX, BOX, 2)
    sigma2 = torch.ones(BOX // 2 + 1, dtype=torch.float64)
    for j, tol in ((0, 0.06), (15, 0.06), (5, 0.06)):  # 0, 90 and 30 degrees
        shift = np.array([1.5, -2.0])
        img = torch.tensor(pattern(1, float(psi_grid[j]), shift), dtype=torch.float32)[None]
        stats = stats_for_poses(img, np.array([0]), np.array([j]), -shift[None], psi_grid, 1, comps)
        avg, _ = reconstruct2d(stats, psi_grid, comps, sigma2, None)
        want = torch.tensor(pattern(1), dtype=torch.float32)
        assert _rel(avg[0], want) < tol, (j, _rel(avg[0], want))
        # with a weak prior (large T tau^2) the MAP average is the same particle
        big = torch.full((1, BOX // 2 + 1), 1e12, dtype=torch.float64)
        avg2, dvp = reconstruct2d(stats, psi_grid, comps, sigma2, big, 2.0)
        assert _rel(avg2[0], avg[0]) < 1e-3
        assert (dvp[0, 1:BOX // 2] > 1).all()


def test_sufficient_statistics_add_up():
    imgs, truth = dataset(n_per=4, noise=0.5, seed=2)
    n = len(imgs)
    rng = np.random.default_rng(0)
    cls, j = rng.integers(0, 3, n), rng.integers(0, 60, n)
    origin = rng.normal(size=(n, 2))
    psi_grid = torch.arange(60, dtype=torch.float64) * 6.0
    comps = fourier_components(BOX, 24, 2)
    whole = stats_for_poses(imgs, cls, j, origin, psi_grid, 3, comps)
    h = n // 3
    a = stats_for_poses(imgs[:h], cls[:h], j[:h], origin[:h], psi_grid, 3, comps)
    b = stats_for_poses(imgs[h:], cls[h:], j[h:], origin[h:], psi_grid, 3, comps)
    total = a + b
    assert isinstance(total, Stats2D)
    torch.testing.assert_close(total.data, whole.data, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(total.wsum, whole.wsum)
    torch.testing.assert_close(total.dc, whole.dc)
    assert float(total.n_particles) == n


# ----------------------------------------------------------------------------- the job


def _purity(classes: np.ndarray, kinds: np.ndarray) -> float:
    return sum(np.bincount(kinds[classes == c]).max() for c in np.unique(classes)) / len(classes)


def test_class2d_job_separates_patterns_and_continues(tmp_path):
    from subtomo.jobs.class2d import SPEC, Class2DParams

    imgs, truth = dataset(n_per=20, noise=0.5, seed=0)
    star = write_proj2d_project(tmp_path, imgs)
    common = dict(i=str(star), K=3, particle_diameter=150.0, highres_limit=None, seed=1, device="cpu")
    full = execute(SPEC, Class2DParams(iter=8, output="Class2D/full", **common), tmp_path, quiet=True)
    data = read_star(full.dir / "run_it008_data.star")
    got = data["particles"]
    assert list(got["rlnImageName"]) == list(read_star(star)["particles"]["rlnImageName"])
    assert int(data["optics"]["rlnImageDimensionality"].iloc[0]) == 2
    classes = got["rlnClassNumber"].to_numpy()
    assert _purity(classes, truth[:, 0].astype(int)) == 1.0
    assert len(np.unique(classes)) == 3
    model = read_star(full.dir / "run_it008_model.star")
    mc = model["model_classes"]
    assert len(mc) == 3 and abs(mc["rlnClassDistribution"].sum() - 1) < 1e-6
    assert mc["rlnReferenceImage"].iloc[1].startswith("000002@Class2D/full/run_it008_classes.mrcs")
    assert "rlnSigma2Noise" in model["model_group_1"].columns and "rlnReferenceTau2" in model["model_class_1"].columns
    maps, px = read_mrc(full.dir / "run_it008_classes.mrcs")
    assert maps.shape == (3, BOX, BOX) and abs(px - 5.0) < 1e-4
    assert (full.dir / "run_it008_classes.png").stat().st_size > 1000
    for col in ("rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "rlnMaxValueProbDistribution",
                "rlnLogLikeliContribution", "rlnNrOfSignificantSamples"):
        assert col in got.columns
    # interrupted after 4 iterations, then continued: the same result
    part = execute(SPEC, Class2DParams(iter=4, output="Class2D/part", **common), tmp_path, quiet=True)
    assert (part.dir / "run_it004_optimiser.pt").exists() and not (part.dir / "run_it005_data.star").exists()
    (part.dir / SUCCESS_SENTINEL).unlink()  # as if it had been interrupted (a finished job is not continued)
    cont = execute(SPEC, Class2DParams(iter=8, continue_job="Class2D/part", **common), tmp_path, quiet=True)
    a = read_star(full.dir / "run_it008_data.star")["particles"]
    b = read_star(cont.dir / "run_it008_data.star")["particles"]
    pd.testing.assert_frame_equal(a, b)
    np.testing.assert_array_equal(read_mrc(full.dir / "run_it008_classes.mrcs")[0], read_mrc(cont.dir / "run_it008_classes.mrcs")[0])
