"""Masks, corrected FSC, sharpening, EMDB XML, local resolution, and the three jobs."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from subtomo.errors import SubtomoError
from subtomo.fourier import (
    fft_centered,
    fsc,
    fsc_maps,
    ifft_centered,
    lowpass,
    raised_cosine_lowpass,
    rfft_frequencies,
    shell_index,
    soft_sphere_mask,
)
from subtomo.io.mrc import read_mrc, write_mrc
from subtomo.io.mtf import read_mtf
from subtomo.io.star import read_star
from subtomo.jobs.base import execute
from subtomo.post import masks as M
from subtomo.post.emdb import read_fsc_xml, write_fsc_xml
from subtomo.post.fsc import cone_weights, directional_fsc, masked_corrected_fsc, randomize_phases_beyond
from subtomo.post.localres import local_resolution
from subtomo.post.sharpen import choose_bfactor, divide_by_mtf, plausible_bfactor_range, sharpen

SHIPPED_MTF = Path(str(files("subtomo") / "data" / "mtf_k3_standard_300kV_FL2.star"))  # K3 curve shipped with the package


def _noise(n: int, seed: int) -> torch.Tensor:
    return torch.randn((n, n, n), generator=torch.Generator().manual_seed(seed))


def _blob_signal(n: int, px: float, res_A: float, radius_px: float, seed: int = 0) -> torch.Tensor:
    s = lowpass(_noise(n, seed), res_A, px) * soft_sphere_mask((n, n, n), radius_px, 3)
    return s / s.std()


# ---------------------------------------------------------------------------------------- FSC

def test_fsc_identical_is_one_and_independent_noise_is_zero():
    a, b = _noise(32, 1), _noise(32, 2)
    assert torch.allclose(fsc_maps(a, a), torch.ones(17), atol=1e-5)
    c = fsc_maps(a, b)[3:]
    assert abs(float(c.mean())) < 0.03
    assert float(c.abs().max()) < 0.2


def test_phase_randomisation_keeps_low_shells_and_decorrelates_high_ones():
    n, cut = 32, 8
    shape = (n, n, n)
    f = fft_centered(_noise(n, 3), 3)
    shells = shell_index(shape)
    fr = randomize_phases_beyond(f, shells, cut, shape, torch.Generator().manual_seed(0))
    assert torch.allclose(fr.abs(), f.abs(), rtol=1e-4, atol=1e-4)  # amplitudes kept
    # the randomised spectrum is that of a real map (Hermitian-consistent): round trip is exact
    back = fft_centered(ifft_centered(fr, shape), 3)
    assert torch.allclose(back, fr, atol=1e-3 * float(f.abs().mean()))
    c = fsc(f, fr, shells, n // 2 + 1)
    assert torch.allclose(c[:cut], torch.ones(cut), atol=1e-5)
    assert abs(float(c[cut:].mean())) < 0.05 and float(c[cut + 1:].abs().max()) < 0.25


def test_corrected_fsc_removes_tight_mask_correlation():
    n, px = 48, 2.0
    signal = lowpass(_noise(n, 4), 16.0, px)  # fills the box; nothing beyond shell 7
    signal = signal / signal.std() * 3
    h1, h2 = signal + _noise(n, 5), signal + _noise(n, 6)
    tight = M.sphere_mask((n, n, n), 20, edge_px=0)  # hard edge cutting through the density
    res, _ = masked_corrected_fsc(h1, h2, tight, px, seed=1)
    shells = np.arange(len(res.unmasked))
    noise_only = shells >= res.randomize_from + 2  # true FSC = 0 here (signal band-limited)
    masked, corr = res.masked.numpy()[noise_only], res.corrected.numpy()[noise_only]
    assert masked.mean() > 0.25  # the hard mask's convolution inflates the masked FSC
    assert np.all(corr < masked - 0.1)
    assert abs(corr.mean()) < 0.05
    assert res.resolution_shell <= 9 and res.resolution_A >= 10.5  # not fooled to Nyquist by the mask


def test_identical_half_maps_are_refused_with_remedy():
    a = _blob_signal(32, 2.0, 8.0, 10)
    with pytest.raises(SubtomoError, match="subtomo mask"):
        masked_corrected_fsc(a, a.clone(), M.sphere_mask((32,) * 3, 24, edge_px=3), 2.0)


# ---------------------------------------------------------------------------------------- sharpening

@pytest.mark.parametrize("b_true", [150.0, 400.0])
def test_auto_bfactor_recovers_known_decay(b_true):
    n, px = 64, 1.5
    shape = (n, n, n)
    f = fft_centered(_noise(n, 7), 3)
    s2 = (rfft_frequencies(shape).norm(dim=-1) / px) ** 2
    decayed = ifft_centered(f * torch.exp(-b_true * s2 / 4), shape)
    ones = torch.ones(n // 2 + 1)
    res = sharpen(decayed, ones, 2 * px, px, lowpass_A=0)
    assert res.fit is not None and res.fit.n_points > 10
    assert abs(res.bfactor_A2 + b_true) < 0.1 * b_true
    # the sharpened Guinier curve is flat (the decay is undone)
    assert abs(np.polyfit(res.guinier_x[5:], res.guinier["sharpened"][5:], 1)[0]) < 0.1 * b_true / 4


def test_low_resolution_is_not_sharpened_and_user_bfactor_is_used():
    n, px = 32, 5.0
    avg = _blob_signal(n, px, 30.0, 10)
    curve = torch.ones(n // 2 + 1)
    res = sharpen(avg, curve, 30.0, px)
    assert res.bfactor_A2 == 0 and res.fit is None and res.bfactor_source == "none"
    assert "low-resolution limit" in res.bfactor_reason
    res2 = sharpen(avg, curve, 30.0, px, adhoc_bfactor_A2=-500.0)
    assert res2.bfactor_A2 == -500.0 and res2.fit is None and res2.bfactor_source == "user"


def test_map_at_15A_gets_no_automatic_sharpening():
    """A blurred map at 15 Å: a Guinier fit there would give a large negative B (the issue's -3,400 Å² at
    16 Å); the automatic B-factor is not fitted (worse than the 10 Å limit), so the map is only low-passed."""
    n, px = 48, 4.0
    shape = (n, n, n)
    truth = _blob_signal(n, px, 12.0, 14, seed=3)
    s2 = (rfft_frequencies(shape).norm(dim=-1) / px) ** 2
    avg = ifft_centered(fft_centered(truth, 3) * torch.exp(-800.0 * s2 / 4), shape)
    curve = torch.ones(n // 2 + 1)
    forced = sharpen(avg, curve, 15.0, px, autob_lowres_A=40.0)  # what a fit over 40-15 Å would do
    assert forced.bfactor_source == "fit" and forced.bfactor_A2 < -300
    res = sharpen(avg, curve, 15.0, px)
    assert res.bfactor_A2 == 0 and res.fit is None and res.bfactor_source == "none"
    assert "15.0 A" in res.bfactor_reason and "--adhoc-bfac" in res.bfactor_reason
    plain = ifft_centered(fft_centered(avg, 3) * raised_cosine_lowpass(shape, n * px / 15.0, 2.0), shape)
    assert torch.allclose(res.map, plain, atol=1e-4 * float(avg.abs().max()))  # low-pass only


def test_implausible_fitted_bfactor_is_refused():
    x = np.linspace(1 / 100, 1 / 16, 12)  # 10 to 4 Å
    y = -2000.0 / 4 * x  # B = -2000 Å² at 4 Å: amplitude gain at 4 Å of exp(31)
    choice = choose_bfactor(x, y, 4.0)
    assert choice.fit is not None and abs(choice.fit.bfactor + 2000) < 1
    assert choice.bfactor_A2 == 0 and choice.source == "none" and "implausible" in choice.reason
    lowest, highest = plausible_bfactor_range(4.0)
    assert highest == 0 and -900 < lowest < -800
    ok = choose_bfactor(x, -400.0 / 4 * x, 4.0)
    assert ok.source == "fit" and abs(ok.bfactor_A2 + 400) < 1
    rising = choose_bfactor(x, 100.0 / 4 * x, 4.0)
    assert rising.bfactor_A2 == 0 and "positive" in rising.reason


def test_mtf_division_matches_analytic_value():
    path = SHIPPED_MTF
    x, y = read_mtf(path)
    n, px, mtf_px = 32, 2.0, 0.8
    shape = (n, n, n)
    f = fft_centered(_noise(n, 8), 3)
    g = divide_by_mtf(f, shape, px, x, y, mtf_px)
    for k in (3, 10, 16):  # voxel (kx = k, 0, 0): s = k / (N px)
        expected = np.interp(k / (n * px) * mtf_px, x, y)
        ratio = (g[0, 0, k] / f[0, 0, k]).abs().item()
        assert ratio == pytest.approx(1 / expected, rel=1e-4)
    # a corner beyond Nyquist is untouched
    assert torch.allclose(g[n // 2, n // 2, n // 2], f[n // 2, n // 2, n // 2])


def test_fsc_weighting_zeroes_beyond_fsc_zero():
    from subtomo.post.sharpen import fsc_weighting

    n = 16
    shells = shell_index((n,) * 3)
    f = torch.ones((n, n, n // 2 + 1), dtype=torch.complex64)
    curve = torch.tensor([1, 0.9, 0.5, 0.2, -0.1, 0.3, 0.0, 0.2, 0.2], dtype=torch.float32)
    w = fsc_weighting(f, curve, shells)
    assert float(w[0, 0, 2].real) == pytest.approx(math.sqrt(2 * 0.5 / 1.5), rel=1e-5)
    assert float(w[0, 0, 4].real) == 0.0  # FSC <= 0
    assert float(w[0, 0, 5].real) == 0.0  # beyond the first FSC < 1e-4


# ---------------------------------------------------------------------------------------- XML

def test_emdb_xml_has_one_coordinate_per_shell(tmp_path):
    s = np.arange(17) / (32 * 2.0)
    c = np.linspace(1, 0, 17)
    p = write_fsc_xml(tmp_path / "fsc.xml", s, c)
    root = ET.parse(p).getroot()
    assert root.tag == "fsc" and root.get("xaxis") == "Resolution (A-1)" and root.get("yaxis") == "Correlation Coefficient"
    assert len(root.findall("coordinate")) == 17
    xs, ys = read_fsc_xml(p)
    assert np.allclose(xs, s, atol=1e-6) and np.allclose(ys, c, atol=1e-6)


# ---------------------------------------------------------------------------------------- masks

def _brute_force_mask(binary: np.ndarray, extend: float, width: float) -> np.ndarray:
    """RELION's definition by explicit distances (independent of the distance transform)."""
    pts = np.argwhere(binary).astype(float)
    grid = np.argwhere(np.ones_like(binary)).astype(float)
    d = np.sqrt(((grid[:, None, :] - pts[None]) ** 2).sum(-1)).min(1).reshape(binary.shape)
    ext = binary | (d < extend)
    pts = np.argwhere(ext).astype(float)
    d = np.sqrt(((grid[:, None, :] - pts[None]) ** 2).sum(-1)).min(1).reshape(binary.shape)
    out = ext.astype(float)
    edge = (~ext) & (d < width)
    out[edge] = 0.5 + 0.5 * np.cos(np.pi * d[edge] / width)
    return out


def test_extend_and_soft_edge_single_voxel_analytic():
    b = torch.zeros((24, 24, 24), dtype=torch.bool)
    b[12, 12, 12] = True
    m = M.extend_and_soften(b, extend_px=3, soft_edge_px=5).numpy()
    line = m[12, 12, 12:]
    assert np.all(line[:3] == 1)  # distance 0, 1, 2 < 3 -> extended
    for x in range(3, 12):  # nearest extended voxel is (12, 12, 14) at distance x - 2
        d = x - 2
        assert line[x] == pytest.approx(0.5 + 0.5 * math.cos(math.pi * d / 5) if d < 5 else 0.0, abs=1e-6)


def test_extend_and_soft_edge_match_brute_force():
    rng = np.random.default_rng(0)
    b = np.zeros((14, 14, 14), dtype=bool)
    b[tuple(rng.integers(4, 10, size=(3, 5)))] = True
    m = M.extend_and_soften(torch.from_numpy(b), 2.5, 3.0).numpy()
    assert np.allclose(m, _brute_force_mask(b, 2.5, 3.0), atol=1e-6)


def test_automask_of_a_sphere_has_the_expected_extent():
    n, R, E, W = 32, 6, 3, 4
    ball = M.sphere_mask((n,) * 3, 2 * R, edge_px=0)  # binary ball as the "map"
    m, thr = M.automask(ball * 5.0, 1.0, threshold=2.5, extend_px=E, soft_edge_px=W)
    assert thr == 2.5
    r = (torch.stack(torch.meshgrid(*[torch.arange(n) - n // 2] * 3, indexing="ij")).float().norm(dim=0))
    assert torch.all(m[r <= R + E - 1] == 1)
    assert torch.all(m[r >= R + E + W + 1] == 0)
    soft = (m > 0) & (m < 1)
    assert soft.any() and torch.all(r[soft] > R + E - 1.5) and torch.all(r[soft] < R + E + W + 1)
    # edge values: 0.5 + 0.5 cos(pi d / W) with d ~ r - (R + E) along an axis
    axis = m[n // 2, n // 2, n // 2:].numpy()
    first_zero_ext = int(np.argmax(axis < 1))  # first voxel outside the extended mask
    d = np.arange(len(axis)) - (first_zero_ext - 1)
    sel = (d > 0) & (d < W)
    assert np.allclose(axis[sel], 0.5 + 0.5 * np.cos(np.pi * d[sel] / W), atol=1e-6)


def test_cylinder_union_subtract_and_refusals():
    n = 32
    cyl = M.cylinder_mask((n,) * 3, 8, 16, axis_xyz=(1, 0, 0))
    assert cyl[n // 2, n // 2, n // 2 + 7] == 1 and cyl[n // 2, n // 2, n // 2 + 9] == 0  # along x, half-length 8
    assert cyl[n // 2, n // 2 + 3, n // 2] == 1 and cyl[n // 2, n // 2 + 5, n // 2] == 0  # radius 4
    sph = M.sphere_mask((n,) * 3, 10)
    assert torch.equal(M.union(cyl, sph), torch.maximum(cyl, sph))
    hole = M.subtract(cyl, sph)
    assert hole[n // 2, n // 2, n // 2] == 0 and hole[n // 2, n // 2, n // 2 + 7] == 1
    with pytest.raises(SubtomoError, match="all black"):
        M.check_mask(torch.zeros((8, 8, 8)))
    with pytest.raises(SubtomoError, match="all white"):
        M.check_mask(torch.ones((8, 8, 8)))


# ---------------------------------------------------------------------------------------- local / directional

def test_localres_left_high_right_low():
    n, px = 48, 2.0
    full = _noise(n, 10)
    low = lowpass(_noise(n, 11), 12.0, px) * 2.5
    x = torch.arange(n)
    sig = torch.where(x[None, None, :] < n // 2, full, low)
    h1, h2 = sig + 0.3 * _noise(n, 12), sig + 0.3 * _noise(n, 13)
    mask = torch.ones((n,) * 3)
    mask[:, :, :4] = 0
    mask[:, :, -4:] = 0
    res = local_resolution(h1, h2, mask, px, window_px=12, step_px=4)
    c = res.centres_zyx
    left = np.median(res.values_A[c[:, 2] < n // 2 - 8])
    right = np.median(res.values_A[c[:, 2] >= n // 2 + 8])
    assert left < 5.0 and right > 7.0  # truth: Nyquist (4 Å) and ~10.7 Å
    m = res.map_A.numpy()
    assert np.median(m[:, :, 8:16]) < np.median(m[:, :, 32:40])
    assert (m[:, :, :4] == 0).all()


def test_directional_fsc_shows_the_missing_wedge():
    n, px = 48, 2.0
    shape = (n,) * 3
    sig = _noise(n, 20)
    k = rfft_frequencies(shape)
    r = k.norm(dim=-1) * n
    wedge = (k[..., 2].abs() > math.tan(math.radians(60)) * k[..., 0].abs()) & (r >= 5)

    def observe(v):
        return ifft_centered(torch.where(wedge, 0, fft_centered(v, 3)), shape)

    h1, h2 = observe(sig + 0.5 * _noise(n, 21)), observe(sig + 0.5 * _noise(n, 22))
    res, tr = masked_corrected_fsc(h1, h2, None, px)
    d = directional_fsc(tr, n, px, 25.0)
    rz = d.resolutions_A[d.names.index("z")]
    rxy = [d.resolutions_A[i] for i, nm in enumerate(d.names) if nm.startswith("xy")]
    assert rz > 3 * max(rxy)
    # with a mask the default still measures the unmasked maps (masking would fill the empty wedge)
    mask = M.sphere_mask(shape, 36, edge_px=5)
    res, tr = masked_corrected_fsc(h1, h2, mask, px, randomize_at_fsc=0.99)
    d = directional_fsc(tr, n, px, 25.0, randomize_from=res.randomize_from)
    assert d.resolutions_A[d.names.index("z")] > 3 * d.resolutions_A[d.names.index("xy090")]
    masked = directional_fsc(tr, n, px, 25.0, randomize_from=res.randomize_from, use_masked=True)
    assert masked.resolutions_A[0] < d.resolutions_A[0]  # the leak the docstring describes
    w = cone_weights(shape, torch.tensor([[0.0, 0.0, 1.0]]), 25.0)
    assert 0.05 < float(w.mean()) < 0.15  # double cone of 25° ~ 9% of the sphere


# ---------------------------------------------------------------------------------------- jobs

def _project_with_halves(tmp: Path, n: int = 40, px: float = 3.0) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """Refine3D-like half maps: a particle blurred by B = 300 Å² plus independent noise."""
    from subtomo.jobs.pipeline import STATUS_SUCCEEDED, Pipeline, Process

    shape = (n,) * 3
    truth = _noise(n, 30) * soft_sphere_mask(shape, 10, 3)
    truth = truth / truth.std()
    s2 = (rfft_frequencies(shape).norm(dim=-1) / px) ** 2
    blurred = ifft_centered(fft_centered(truth, 3) * torch.exp(-300.0 * s2 / 4), shape)
    h1, h2 = blurred + 0.3 * _noise(n, 31), blurred + 0.3 * _noise(n, 32)
    d = tmp / "Refine3D" / "job001"
    d.mkdir(parents=True)
    write_mrc(d / "run_half1_class001_unfil.mrc", h1.numpy(), px)
    write_mrc(d / "run_half2_class001_unfil.mrc", h2.numpy(), px)
    pipe = Pipeline(tmp)
    pipe.add(Process("Refine3D/job001/", "Refine3D", STATUS_SUCCEEDED,
                     outputs=[("Refine3D/job001/run_half1_class001_unfil.mrc", "DensityMap")]))
    pipe.save()
    return tmp, truth, (h1 + h2) / 2


def test_postprocess_and_localres_jobs(tmp_path):
    from subtomo.jobs.localres import SPEC as LSPEC
    from subtomo.jobs.localres import LocalResParams
    from subtomo.jobs.postprocess import SPEC, PostProcessParams

    project, truth, average = _project_with_halves(tmp_path)
    mtf = SHIPPED_MTF
    ctx = execute(SPEC, PostProcessParams(device="cpu", mtf=str(mtf), mtf_angpix=1.5), project, quiet=True)
    job = ctx.dir
    for name in ("postprocess.mrc", "postprocess_masked.mrc", "postprocess_automask.mrc", "postprocess.star",
                 "postprocess_fsc.xml", "postprocess_fsc.png", "postprocess_guinier.png",
                 "postprocess_directional_fsc.png", "RELION_JOB_EXIT_SUCCESS"):
        assert (job / name).exists(), name
    blocks = read_star(job / "postprocess.star")
    general = blocks["general"]
    for label in ("rlnFinalResolution", "rlnBfactorUsedForSharpening", "rlnUnfilteredMapHalf1", "rlnUnfilteredMapHalf2",
                  "rlnMaskName", "rlnRandomiseFrom"):
        assert label in general, label
    assert set(blocks["fsc"].columns) >= {
        "rlnSpectralIndex", "rlnResolution", "rlnAngstromResolution", "rlnFourierShellCorrelationCorrected",
        "rlnFourierShellCorrelationParticleMaskFraction", "rlnFourierShellCorrelationUnmaskedMaps",
        "rlnFourierShellCorrelationMaskedMaps", "rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps"}
    assert set(blocks["guinier"].columns) == {
        "rlnResolutionSquared", "rlnLogAmplitudesOriginal", "rlnLogAmplitudesMTFCorrected", "rlnLogAmplitudesWeighted",
        "rlnLogAmplitudesSharpened", "rlnLogAmplitudesIntercept"}
    assert "directional_resolution" in blocks and len(blocks["directional_resolution"]) == 7
    assert len(blocks["fsc"]) == 21
    xs, ys = read_fsc_xml(job / "postprocess_fsc.xml")
    assert len(xs) == 21 and np.allclose(ys, blocks["fsc"]["rlnFourierShellCorrelationCorrected"], atol=1e-5)
    res_A = float(general["rlnFinalResolution"])
    assert 6.0 <= res_A <= 9.0
    b = float(general["rlnBfactorUsedForSharpening"])
    assert -450 < b < -120  # true blur 300 Å² (FSC weighting flattens the fitted slope a little)
    sharp, px = read_mrc(job / "postprocess.mrc")
    assert px == pytest.approx(3.0) and sharp.shape == (40, 40, 40)
    target = lowpass(truth, res_A, 3.0).numpy().ravel()
    cc_sharp = np.corrcoef(sharp.ravel(), target)[0, 1]
    cc_avg = np.corrcoef(average.numpy().ravel(), target)[0, 1]
    assert cc_sharp > cc_avg + 0.03  # sharpening brings the map closer to the unblurred truth
    mask, _ = read_mrc(job / "postprocess_automask.mrc")
    assert 0 <= mask.min() and mask.max() == 1
    # localres picks the postprocess automask by default
    lctx = execute(LSPEC, LocalResParams(device="cpu", window_A=36.0, step_px=4), project, quiet=True)
    lmap, _ = read_mrc(lctx.dir / "localres.mrc")
    assert lmap.shape == (40, 40, 40) and (lmap[mask <= 0] == 0).all()
    inside = lmap[mask >= 1]
    assert np.all(inside >= 6.0 - 1e-3) and 5.0 < np.median(inside) < 20.0
    for name in ("localres_hist.png", "localres_slices.png", "localres.star"):
        assert (lctx.dir / name).exists()


def test_postprocess_refuses_identical_halves_with_remedy(tmp_path):
    from subtomo.jobs.postprocess import SPEC, PostProcessParams

    a = _blob_signal(32, 3.0, 9.0, 9)
    write_mrc(tmp_path / "m_half1_unfil.mrc", a.numpy(), 3.0)
    write_mrc(tmp_path / "m_half2_unfil.mrc", a.numpy(), 3.0)
    with pytest.raises(SubtomoError, match="adjust the automask parameters or make a mask with subtomo mask"):
        execute(SPEC, PostProcessParams(device="cpu", i="m_half1_unfil.mrc"), tmp_path, quiet=True)
    job = next((tmp_path / "PostProcess").iterdir())
    assert (job / "RELION_JOB_EXIT_FAILURE").exists() and not (job / "postprocess.mrc").exists()
    write_mrc(tmp_path / "black.mrc", np.zeros((32, 32, 32), np.float32), 3.0)
    with pytest.raises(SubtomoError, match="all black|zero everywhere"):
        execute(SPEC, PostProcessParams(device="cpu", i="m_half1_unfil.mrc", mask="black.mrc"), tmp_path, quiet=True)
    assert len(list((tmp_path / "PostProcess").iterdir())) == 1  # refused before a job directory was made
    with pytest.raises(SubtomoError, match="half2"):  # missing partner named
        (tmp_path / "m_half2_unfil.mrc").unlink()
        execute(SPEC, PostProcessParams(device="cpu", i="m_half1_unfil.mrc"), tmp_path, quiet=True)


def test_mask_job_cli_sphere_and_all_black_refused(tmp_path, monkeypatch):
    from subtomo.cli.main import build_cli

    monkeypatch.chdir(tmp_path)
    write_mrc(tmp_path / "ref.mrc", _blob_signal(32, 4.0, 16.0, 8).numpy(), 4.0)
    runner = CliRunner()
    r = runner.invoke(build_cli(), ["mask", "--i", "ref.mrc", "--threshold", "1e9"])
    assert r.exit_code == 1 and "all black" in r.output
    assert not (tmp_path / "MaskCreate").exists()  # refused before anything was written
    r = runner.invoke(build_cli(), ["mask", "--ref", "ref.mrc", "--sphere", "64", "--soft-edge", "3"])
    assert r.exit_code == 0, r.output
    out = next((tmp_path / "MaskCreate").iterdir())
    m, px = read_mrc(out / "mask.mrc")
    assert px == pytest.approx(4.0) and m[16, 16, 16] == 1 and m[16, 16, 16 + 8] == 1  # radius 8 px
    assert m[16, 16, 16 + 9] == pytest.approx(0.75) and m[16, 16, 16 + 11] == 0  # 0.5 + 0.5 cos(pi/3); 3 px edge
    assert (out / "mask_slices.png").exists()
    r = runner.invoke(build_cli(), ["mask", "--ref", "ref.mrc", "--sphere", "200", "--subtract", str(out / "mask.mrc"),
                                    "--soft-edge", "0"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(build_cli(), ["mask", "--i", "ref.mrc", "--lowpass", "20"])
    assert r.exit_code == 0, r.output
    assert "threshold" in r.output
