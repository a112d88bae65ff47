"""Core of the likelihood engine: HEALPix, sampling, projection, scoring, posteriors, M-step sums."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from subtomo.em import healpix, sampling
from subtomo.em import reconstruct as rc
from subtomo.em.components import fourier_components
from subtomo.em.expectation import BatchPosterior, constant_term, log_likelihood, posterior, significant_count
from subtomo.em.maximisation import SufficientStats, accumulate
from subtomo.em.projector3d import Projector3D, insert3d, symmetrise3d
from subtomo.fourier import fft_centered, soft_sphere_mask
from subtomo.geometry.euler import euler_to_matrix, random_rotations
from subtomo.geometry.symmetry import symmetry_matrices
from subtomo.testing.synthetic import blob_reference

torch.set_num_threads(1)


def rotate_real(vol: torch.Tensor, a: np.ndarray) -> torch.Tensor:
    """particle(r) = vol(A^T r) by trilinear interpolation in real space (independent of the engine)."""
    n = vol.shape[-1]
    ax = torch.arange(n, dtype=torch.float32) - n // 2
    z, y, x = torch.meshgrid(ax, ax, ax, indexing="ij")
    r = torch.stack([x, y, z], -1).reshape(-1, 3)
    src = r @ torch.as_tensor(a, dtype=torch.float32)
    g = ((src + n // 2) * 2 / (n - 1) - 1).reshape(1, n, n, n, 3)
    return F.grid_sample(vol[None, None], g, align_corners=True)[0, 0]


# ------------------------------------------------------------------ HEALPix
@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_healpix_counts_and_uniformity(order):
    v = healpix.pix2vec_nest(order)
    assert len(v) == 12 * 4 ** order
    assert len(np.unique(np.round(v, 9), axis=0)) == len(v)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1, atol=1e-12)
    np.testing.assert_allclose(v.mean(0), 0, atol=1e-12)  # equal-area pixels are balanced
    if order >= 2:
        assert abs((v[:, 2] ** 2).mean() - 1 / 3) < 0.01  # E[z^2] = 1/3 on the sphere


def test_healpix_known_centres():
    ang = healpix.pix2ang_nest(0)
    # base pixels: north ring z = 2/3 at phi = 45 + 90 k, equator z = 0 at phi = 90 k, south z = -2/3
    np.testing.assert_allclose(ang[:4, 1], np.rad2deg(np.arccos(2 / 3)), atol=1e-9)
    np.testing.assert_allclose(ang[4:8, 1], 90, atol=1e-9)
    np.testing.assert_allclose(np.mod(ang[:4, 0], 360), [45, 135, 225, 315], atol=1e-9)
    np.testing.assert_allclose(np.mod(ang[4:8, 0], 360), [0, 90, 180, 270], atol=1e-9)
    # ring z values of order 1 (nside 2): 1 - 1/12, 2/3, 1/3, 0, ...
    z = np.unique(np.round(healpix.pix2vec_nest(1)[:, 2], 9))
    np.testing.assert_allclose(sorted(z)[-3:], [1 / 3, 2 / 3, 1 - 1 / 12], atol=1e-9)
    assert healpix.angular_step_deg(2) == 15.0


def test_healpix_children_are_nearest():
    v1, v2 = healpix.pix2vec_nest(2), healpix.pix2vec_nest(3)
    parent = (v2 @ v1.T).argmax(1)
    np.testing.assert_array_equal(parent, np.repeat(np.arange(len(v1)), 4))


@pytest.mark.parametrize("sym,order", [("C4", 4), ("D2", 4), ("O", 24)])
def test_symmetry_reduction(sym, order):
    mats = symmetry_matrices(sym)
    v = healpix.pix2vec_nest(3)
    keep = healpix.asymmetric_unit_mask(v, mats)
    assert abs(keep.sum() - len(v) / order) <= 0.1 * len(v) / order + 4
    # every direction is equivalent to a kept one (within the grid spacing)
    kept = v[keep]
    eq = np.einsum("gji,nj->gni", mats, v)  # g^T d
    best = np.max(np.einsum("gni,mi->gnm", eq, kept), axis=(0, 2))
    assert np.degrees(np.arccos(np.clip(best.min(), -1, 1))) < 8.0


def test_global_grid_children_and_local_prior():
    rs = sampling.global_rotations(1, "C1")
    assert rs.n == 48 * 12 and rs.children.shape[1:] == (8, 3, 3)
    ang = sampling.rotation_angle_deg(torch.matmul(rs.children, rs.matrices[:, None].transpose(-1, -2)))
    assert float(ang.max()) < rs.step_deg  # children lie within one coarse step of their parent
    loc = sampling.local_rotations(3, sigma_deg=4.0)
    a = sampling.rotation_angle_deg(loc.matrices)
    assert float(a.max()) <= 12.0 + 1e-3 and torch.all(loc.log_prior <= 0)
    tg = sampling.translation_grid(2.0, 1.0)
    assert tg.points.norm(dim=-1).max() <= 2.0 and len(tg.points) == 33
    assert float(tg.children.reshape(-1, 3).norm(dim=-1).min()) > 0.4  # RELION: t +- step/4, never the centre
    # classification's layout (issue 22): three children per axis at step/3, the search centre among them,
    # and the children of all coarse points tile a step/3 lattice without overlap
    tc = sampling.translation_grid(2.0, 1.0, children_contain_centre=True)
    ch = tc.children.reshape(-1, 3)
    assert tc.children.shape[1] == 27 and float(ch.norm(dim=-1).min()) < 1e-6
    assert len(torch.unique(torch.round(ch * 3).long(), dim=0)) == len(ch)  # no child twice
    assert torch.allclose(ch * 3, torch.round(ch * 3), atol=1e-5)  # on the step/3 lattice


# ------------------------------------------------------------------ projection
def test_projection_matches_real_space_rotation():
    rng = np.random.default_rng(0)
    vol = blob_reference(32, rng)
    comps = fourier_components(32, 32, 3, max_shell=10)
    proj = Projector3D(vol, pad=2)
    for a in random_rotations(3, rng):
        want = comps.extract(fft_centered(rotate_real(vol, a), 3)[None])[0]
        got = proj.project(torch.as_tensor(a, dtype=torch.float32)[None], comps.k)[0]
        corr = torch.vdot(want, got).real / (want.norm() * got.norm())
        assert corr > 0.99
        assert abs(float(got.norm() / want.norm()) - 1) < 0.05


def test_translation_phase_ramp_recentres():
    rng = np.random.default_rng(1)
    vol = blob_reference(24, rng)
    comps = fourier_components(24, 24, 3)
    shifted = torch.roll(vol, shifts=(-2, 1, 3), dims=(0, 1, 2))  # content moved by (x, y, z) = (3, 1, -2)
    # origin t such that shifting by +t recentres: t = -(3, 1, -2)
    x = comps.extract(fft_centered(shifted, 3)[None])[0] * comps.phase_ramps(torch.tensor([-3.0, -1.0, 2.0]))
    want = comps.extract(fft_centered(vol, 3)[None])[0]
    torch.testing.assert_close(x, want, atol=1e-3, rtol=1e-3)


# ------------------------------------------------------------------ scoring and posteriors
def test_log_likelihood_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    b, t, r, m = 3, 4, 5, 50
    x = torch.randn(b, m, dtype=torch.complex64, generator=g)
    ctf = torch.rand(b, m, generator=g)
    w = torch.rand(m, generator=g) + 0.5
    ph = torch.polar(torch.ones(t, m), torch.rand(t, m, generator=g) * 6)
    refs = torch.randn(r, m, dtype=torch.complex64, generator=g)
    got = log_likelihood(x, ctf, w, ph, refs) + constant_term(x, w)[:, None, None]
    diff = x[:, None, None, :] * ph[None, :, None, :] - ctf[:, None, None, :] * refs[None, None]
    want = -0.5 * ((diff.abs() ** 2) * w).sum(-1)
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4)
    # per-particle reference sets give the same numbers
    got_pp = log_likelihood(x, ctf, w, ph, refs[None].expand(b, r, m))
    torch.testing.assert_close(got_pp + constant_term(x, w)[:, None, None], want, atol=1e-3, rtol=1e-4)


def test_posterior_sums_to_one_and_significance():
    g = torch.Generator().manual_seed(0)
    logw = torch.randn(4, 6, 7, generator=g) * 30
    w, lse = posterior(logw)
    torch.testing.assert_close(w.reshape(4, -1).sum(1), torch.ones(4))
    torch.testing.assert_close(lse, torch.logsumexp(logw.reshape(4, -1), 1))
    count, order = significant_count(w.reshape(4, -1), 0.999)
    srt = torch.gather(w.reshape(4, -1), 1, order)
    for i in range(4):
        assert srt[i, : count[i]].sum() >= 0.999 - 1e-6
        assert count[i] == 1 or srt[i, : count[i] - 1].sum() < 0.999


# ------------------------------------------------------------------ M-step
def _posterior_for(rot: np.ndarray, off: np.ndarray) -> BatchPosterior:
    b = len(rot)
    return BatchPosterior(torch.as_tensor(rot, dtype=torch.float32)[:, None], torch.as_tensor(off, dtype=torch.float32)[:, None],
                          torch.zeros(b, 1, dtype=torch.long), torch.ones(b, 1), torch.ones(b), torch.zeros(b),
                          torch.ones(b, dtype=torch.long))


def test_delta_mstep_returns_the_particle():
    rng = np.random.default_rng(2)
    n = 24
    part = blob_reference(n, rng)
    comps = fourier_components(n, n, 3)
    x = comps.extract(fft_centered(part, 3)[None])
    stats = SufficientStats.zeros(1, n, 3)
    accumulate(stats, _posterior_for(np.eye(3)[None], np.zeros((1, 3))), x, x, torch.ones_like(x.real),
               torch.ones(comps.m), comps, [], insert3d, torch.zeros(1, 3), noise_stats=False)
    d, w = rc.hermitian_symmetrise(stats.data[0], stats.weight[0], 3)
    rec = rc.reconstruct(d, w, 3)
    # the engine drops DC and the corner (|k| >= N/2) components: compare with that band of the particle
    shells = rc.full_shells(n, 3)
    band = rc.map_from_fourier(rc.fourier_from_map(part, 3) * ((shells > 0) & (shells < n // 2)), 3)
    torch.testing.assert_close(rec, band, atol=1e-4, rtol=1e-4)


def test_sufficient_stats_are_additive():
    rng = np.random.default_rng(3)
    n, b = 16, 6
    comps = fourier_components(n, n, 3)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(b, comps.m, dtype=torch.complex64, generator=g)
    ctf = torch.rand(b, comps.m, generator=g)
    rot = random_rotations(b, rng)
    off = rng.normal(size=(b, 3))
    proj = [Projector3D(blob_reference(n, rng))]
    inv_s2 = torch.rand(comps.m, generator=g) + 0.5

    def run(sel):
        s = SufficientStats.zeros(1, n, 3)
        accumulate(s, _posterior_for(rot[sel], off[sel]), x[sel], x[sel], ctf[sel], inv_s2, comps, proj, insert3d,
                   torch.zeros(len(sel), 3))
        return s

    whole = run(np.arange(b))
    parts = run(np.arange(0, 3)) + run(np.arange(3, b))
    for name in ("data", "weight", "sigma2_num", "sigma2_den", "class_weight", "offset2", "offset_w", "n_particles"):
        torch.testing.assert_close(getattr(parts, name), getattr(whole, name), atol=1e-4, rtol=1e-4)


def test_symmetric_reconstruction_is_invariant():
    rng = np.random.default_rng(4)
    n = 24
    vol = blob_reference(n, rng)
    comps = fourier_components(n, n, 3)
    proj = Projector3D(vol)
    rot = random_rotations(6, rng)
    x = proj.project(torch.as_tensor(rot, dtype=torch.float32), comps.k)
    s = SufficientStats.zeros(1, n, 3)
    accumulate(s, _posterior_for(rot, np.zeros((6, 3))), x, x, torch.ones_like(x.real), torch.ones(comps.m), comps,
               [], insert3d, torch.zeros(6, 3), noise_stats=False)
    mats = torch.as_tensor(symmetry_matrices("C4"), dtype=torch.float32)
    d, w = rc.hermitian_symmetrise(s.data[0], s.weight[0], 3)
    d, w = symmetrise3d(d, w, mats)
    rec = rc.reconstruct(d, w, 3)
    a = symmetry_matrices("C4")[1]
    rot_rec = rotate_real(rec, a)
    inner = soft_sphere_mask((n, n, n), n / 2 - 4, 2)
    err = ((rot_rec - rec) * inner).norm() / (rec * inner).norm()
    assert err < 0.05
    # and an asymmetric map is not invariant (the test can fail)
    err0 = ((rotate_real(vol, a) - vol) * inner).norm() / (vol * inner).norm()
    assert err0 > 0.3


def test_insert3d_matches_brute_force_trilinear_splat():
    rng = np.random.default_rng(11)
    n = 12
    comps = fourier_components(n, n, 3)
    rot = torch.as_tensor(random_rotations(2, rng), dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    vals = torch.randn(2, comps.m, dtype=torch.complex64, generator=g)
    wts = torch.rand(2, comps.m, generator=g)
    data = torch.zeros(n, n, n, dtype=torch.complex64)
    weight = torch.zeros(n, n, n)
    insert3d(data, weight, rot, comps.k, vals, wts)
    ref_d = np.zeros((n, n, n), dtype=np.complex128)
    ref_w = np.zeros((n, n, n))
    q = (torch.matmul(comps.k[None], rot) + n // 2).reshape(-1, 3).double().numpy()
    for (x, y, z), v, w in zip(q, vals.reshape(-1).numpy(), wts.reshape(-1).numpy()):
        x0, y0, z0 = int(np.floor(x)), int(np.floor(y)), int(np.floor(z))
        for dz in (0, 1):
            for dy in (0, 1):
                for dx in (0, 1):
                    ix, iy, iz = x0 + dx, y0 + dy, z0 + dz
                    if 0 <= ix < n and 0 <= iy < n and 0 <= iz < n:
                        f = (1 - abs(x - ix)) * (1 - abs(y - iy)) * (1 - abs(z - iz))
                        ref_d[iz, iy, ix] += f * v
                        ref_w[iz, iy, ix] += f * w
    np.testing.assert_allclose(data.numpy(), ref_d, atol=1e-4)
    np.testing.assert_allclose(weight.numpy(), ref_w, atol=1e-4)


def test_noise_stats_ignore_components_without_data():
    """Residuals where the CTF is zero (missing wedge) must not inflate sigma^2 (den counts only CTF != 0)."""
    rng = np.random.default_rng(12)
    n = 16
    comps = fourier_components(n, n, 3)
    proj = [Projector3D(blob_reference(n, rng))]
    a = proj[0].project(torch.eye(3)[None], comps.k)
    ctf = (comps.k[:, 2].abs() <= comps.k[:, 0].abs()).float()[None]  # a wedge
    x = ctf * a + 1000.0 * (1 - ctf)  # garbage where nothing was measured
    s = SufficientStats.zeros(1, n, 3)
    accumulate(s, _posterior_for(np.eye(3)[None], np.zeros((1, 3))), x, x, ctf, torch.ones(comps.m), comps, proj,
               insert3d, torch.zeros(1, 3))
    assert float(s.sigma2_num.sum()) < 1e-6
    assert float(s.sigma2_den.sum()) == float(ctf.sum())


def test_fine_mask_outside_reference_support_keeps_the_posterior():
    """Components where the reference is (nearly) zero add (almost) nothing: the fine pass may skip them."""
    from subtomo.em.expectation import BatchData, EStepOptions, Orientations, expectation_batch
    from subtomo.fourier import lowpass

    rng = np.random.default_rng(13)
    n = 16
    ref = lowpass(blob_reference(n, rng), 4 * 10.0, 10.0)  # shell 4 (+1 edge)
    comps = fourier_components(n, n, 3)
    proj = [Projector3D(ref)]
    rot = random_rotations(3, rng)
    x = proj[0].project(torch.as_tensor(rot, dtype=torch.float32), comps.k)
    x = x + 0.3 * torch.randn(x.shape, dtype=torch.complex64, generator=torch.Generator().manual_seed(0))
    rs = sampling.global_rotations(1, rng=np.random.default_rng(0))
    tr = sampling.translation_grid(1, 1, 3)
    batch = BatchData(x, torch.ones(x.shape), torch.zeros(3, 3), torch.zeros(3, 3))
    orient = Orientations(rs.matrices, rs.children, rs.log_prior, rs.child_log_prior)
    args = (batch, comps, comps.shell < 6, torch.ones(comps.m) * 4, proj, orient, tr.points, tr.children,
            torch.zeros(1), EStepOptions())
    full = expectation_batch(*args)
    cut = expectation_batch(*args, fine_mask=comps.shell < 7)
    torch.testing.assert_close(cut.weight, full.weight, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(cut.rot, full.rot)
    # only the projector's interpolation leakage beyond the support is dropped
    torch.testing.assert_close(cut.log_lik, full.log_lik, atol=1.0, rtol=1e-2)


def test_pose_change_is_measured_modulo_the_symmetry():
    rng = np.random.default_rng(4)
    a = random_rotations(6, rng)
    d7 = symmetry_matrices("D7")
    g = d7[rng.integers(1, len(d7), size=6)]
    b = np.einsum("nij,njk->nik", a, g)  # A g: the same particle of a D7 reference
    np.testing.assert_allclose(sampling.pose_change_deg(a, b, d7), 0.0, atol=1e-3)
    assert np.all(sampling.pose_change_deg(a, b) > 20.0)  # in C1 these are large changes
    small = euler_to_matrix(np.zeros(6), np.full(6, 5.0), np.zeros(6))  # 5 deg about y
    c = np.einsum("nij,njk->nik", b, small)
    np.testing.assert_allclose(sampling.pose_change_deg(a, c, d7), 5.0, atol=1e-3)


def test_expected_angular_accuracy_follows_the_noise():
    from subtomo.em.iteration import InMemorySource, PoseTable, expected_angular_accuracy_deg

    rng = np.random.default_rng(2)
    ref = blob_reference(20, rng)
    src = InMemorySource(torch.zeros(4, 20, 20, 20), 10.0, None)
    poses = PoseTable.new(4, random_rotations(4, rng), np.zeros((4, 3)))
    comps = fourier_components(20, 20, 3)
    acc = [expected_angular_accuracy_deg(src, np.arange(4), poses, ref, torch.full((11,), s2), comps, "cpu",
                                         use_ctf=False) for s2 in (1e2, 1e3, 1e4)]
    assert acc[0] < acc[1] < acc[2]  # noisier data: coarser accuracy
    # sum |dA|^2 / (2 sigma^2) = ln 100 with |dA| ~ linear in the angle: angle ~ sigma, x100 sigma^2 ~ x10
    assert 5 < acc[2] / acc[0] < 20


def test_precomputed_coarse_references_give_the_same_posterior():
    """Stacked-only precomputed references (power recomputed per chunk) = projecting in the E-step."""
    from subtomo.em.expectation import BatchData, EStepOptions, Orientations, expectation_batch, precompute_stacked_refs

    rng = np.random.default_rng(21)
    n = 16
    ref = blob_reference(n, rng)
    comps = fourier_components(n, n, 3)
    proj = [Projector3D(ref), Projector3D(ref.flip(0))]
    rot = random_rotations(4, rng)
    x = proj[0].project(torch.as_tensor(rot, dtype=torch.float32), comps.k)
    x = x + 0.3 * torch.randn(x.shape, dtype=torch.complex64, generator=torch.Generator().manual_seed(1))
    rs = sampling.global_rotations(1, rng=np.random.default_rng(0))
    tr = sampling.translation_grid(1, 1, 3)
    coarse = comps.shell < 6
    batch = BatchData(x, torch.ones(x.shape), torch.zeros(4, 3), torch.zeros(4, 3))
    orient = Orientations(rs.matrices, rs.children, rs.log_prior, rs.child_log_prior)
    args = (batch, comps, coarse, torch.ones(comps.m) * 4, proj, orient, tr.points, tr.children,
            torch.log(torch.tensor([0.5, 0.5])), EStepOptions(memory_bytes=2 ** 16))  # many rotation chunks
    plain = expectation_batch(*args)
    stacked = precompute_stacked_refs(proj, rs.matrices, comps.k[coarse], chunk_bytes=2 ** 14)
    assert stacked[0].shape == (2, len(rs.matrices), 2 * int(coarse.sum()))
    pre = expectation_batch(*args, coarse_refs=stacked)
    torch.testing.assert_close(pre.weight, plain.weight, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(pre.rot, plain.rot)
    torch.testing.assert_close(pre.log_lik, plain.log_lik, rtol=1e-5, atol=1e-2)
    assert (pre.cls == 0).all()  # the data are class 1, not its mirror
