"""Fourier primitives: FSC, shells, shifts, resizing, cropping, the CTF formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from subtomo import fourier as F
from subtomo.ctf.model import ctf_1d, ctf_2d, electron_wavelength_A


def test_fsc_of_identical_maps_is_one_and_of_noise_near_zero():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(32, 32, 32, generator=g)
    assert torch.allclose(F.fsc_maps(a, a), torch.ones(17), atol=1e-5)
    b = torch.randn(32, 32, 32, generator=g)
    assert F.fsc_maps(a, b)[5:].abs().max() < 0.25  # ~3 sigma for >= 150 independent voxels


def test_fsc_resolution_threshold():
    curve = torch.tensor([1.0, 0.99, 0.9, 0.5, 0.2, 0.1, 0.05])
    assert F.resolution_at_threshold(curve, box=12, pixel_size_A=2.0) == pytest.approx(12 * 2.0 / 4)


def test_threshold_shell_edge_cases():
    """The shell before the first drop below the threshold; the last shell if it never drops; 0 if shell 1 is below."""
    curve = torch.tensor([1.0, 0.99, 0.9, 0.5, 0.2, 0.1, 0.05])
    assert F.threshold_shell(curve, 0.143) == 4
    assert F.threshold_shell(curve, 0.5) == 3  # 0.5 is not below 0.5
    assert F.threshold_shell(torch.ones(9), 0.143) == 8
    assert F.threshold_shell(torch.tensor([1.0, 0.1, 0.9]), 0.143) == 0
    assert F.resolution_at_threshold(torch.tensor([1.0, 0.1, 0.9]), 10, 3.0) == pytest.approx(30.0)  # at least shell 1


def test_phase_shift_moves_content_by_plus_shift():
    x = torch.zeros(16, 16, 16)
    x[8, 8, 8] = 1.0
    shifted = F.ifft_centered(F.phase_shift(F.fft_centered(x, 3), torch.tensor([3.0, -2.0, 1.0]), (16, 16, 16)),
                              (16, 16, 16))
    assert tuple(torch.nonzero(shifted > 0.5)[0].tolist()) == (9, 6, 11)  # (z, y, x)


def test_fourier_resize_keeps_mean_and_band_limited_content():
    z, y, x = torch.meshgrid(*[torch.arange(32.0) - 16] * 3, indexing="ij")
    blob = torch.exp(-(x ** 2 + y ** 2 + z ** 2) / (2 * 4.0 ** 2))
    small = F.fourier_resize(blob, 16)
    z2, y2, x2 = torch.meshgrid(*[torch.arange(16.0) - 8] * 3, indexing="ij")
    expected = torch.exp(-(x2 ** 2 + y2 ** 2 + z2 ** 2) / (2 * 2.0 ** 2))
    assert small.mean() == pytest.approx(blob.mean().item(), rel=1e-4)
    assert torch.allclose(small, expected, atol=2e-3)


def test_crop_and_pad_rfft_keep_low_frequencies():
    f = F.fft_centered(torch.randn(32, 32, 32), 3)
    c = F.crop_rfft(f, 16)
    assert c.shape == (16, 16, 9)
    assert torch.equal(c[1, 2, 3], f[1, 2, 3]) and torch.equal(c[-1, -2, 3], f[-1, -2, 3])
    p = F.pad_rfft(c, 32)
    assert torch.equal(F.crop_rfft(p, 16), c) and p[16, 0, 0] == 0


def test_lowpass_removes_high_shells():
    x = torch.randn(32, 32, 32)
    y = F.lowpass(x, resolution_A=8.0, pixel_size_A=1.0)  # shell 4
    power = F.radial_average(F.fft_centered(y, 3).abs() ** 2, F.shell_index((32, 32, 32)), 17)
    assert power[8:].max() < 1e-8 and power[2] > 0.5


def test_radial_average_counts_shells():
    shells = F.shell_index((16, 16))
    avg = F.radial_average(torch.ones(3, 16, 9), shells, 9)
    assert torch.allclose(avg, torch.ones(3, 9))


def test_soft_sphere_mask_profile():
    m = F.soft_sphere_mask((32, 32, 32), radius_px=8, edge_px=4)
    assert m[16, 16, 16] == 1 and m[16, 16, 16 + 8] == 1 and m[16, 16, 16 + 12] == pytest.approx(0.0, abs=1e-6)
    assert m[16, 16, 16 + 10] == pytest.approx(0.5, abs=1e-6)


def test_wavelength_300kv():
    assert electron_wavelength_A(300.0) == pytest.approx(0.019687, rel=1e-4)


def test_ctf_zeros_at_analytic_positions():
    # zeros of -sin(chi - asin(Q0)) with Cs = 0: pi*lambda*df*s^2 + asin(Q0) = n*pi
    lam, df, q0 = electron_wavelength_A(300), 30000.0, 0.07
    for n in (1, 2, 3):
        s = math.sqrt((n * math.pi - math.asin(q0)) / (math.pi * lam * df))
        assert ctf_1d(torch.tensor([s], dtype=torch.float64), df, 300, 0.0, q0).abs().item() < 1e-6


def test_ctf_astigmatism_direction_follows_relion():
    freq = torch.tensor([[0.1, 0.0], [0.0, 0.1]], dtype=torch.float64)
    # with angle 0, defocus U lies along x: the value along x equals a round CTF of defocus U
    c = ctf_2d(freq, 30000.0, 20000.0, 0.0, 300, 2.7, 0.1)
    assert c[0].item() == pytest.approx(ctf_1d(torch.tensor([0.1], dtype=torch.float64), 30000.0, 300, 2.7, 0.1).item())
    assert c[1].item() == pytest.approx(ctf_1d(torch.tensor([0.1], dtype=torch.float64), 20000.0, 300, 2.7, 0.1).item())
    c90 = ctf_2d(freq, 30000.0, 20000.0, 90.0, 300, 2.7, 0.1)
    assert c90[1].item() == pytest.approx(c[0].item())


def test_ctf_bfactor_and_scale():
    s = torch.tensor([0.05], dtype=torch.float64)
    plain = ctf_1d(s, 25000.0, 300, 2.7, 0.07)
    damped = ctf_1d(s, 25000.0, 300, 2.7, 0.07, bfactor_A2=100.0, scale=0.5)
    assert damped.item() == pytest.approx(plain.item() * 0.5 * np.exp(-100 * 0.05 ** 2 / 4))
