"""Weighted back-projection (issue 20): geometry of a projected blob, block independence,
binning, and ``subtomo reconstruct`` against the simulator's own tomogram."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from subtomo.errors import SubtomoError
from subtomo.io.mrc import read_mrc, write_mrc
from subtomo.jobs.base import execute
from subtomo.jobs.reconstruct import SPEC, ReconstructParams
from subtomo.jobs.simulate import SPEC as SIM_SPEC
from subtomo.jobs.simulate import SimulateParams
from subtomo.tomo.reconstruct import reconstruct_stack

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TILTS = np.arange(-60.0, 61.0, 3.0)


def project_blobs(centres_xyz: np.ndarray, size_xyz: tuple[int, int, int], sigma: float = 1.5) -> np.ndarray:
    """Analytic projections of Gaussian blobs: x_img = x_t cos θ + z_t sin θ about the centre size/2."""
    nx, ny, _ = size_xyz
    x = np.arange(nx)[None, :]
    y = np.arange(ny)[:, None]
    images = np.zeros((len(TILTS), ny, nx))
    for t, theta in enumerate(np.radians(TILTS)):
        for cx, cy, cz in centres_xyz:
            xt, zt = cx - nx / 2, cz - size_xyz[2] / 2
            u = xt * np.cos(theta) + zt * np.sin(theta) + nx / 2
            images[t] += np.exp(-((x - u) ** 2 + (y - cy) ** 2) / (2 * sigma ** 2))
    return 100.0 + images  # counts around a positive mean


def wbp(stack: np.ndarray, nz: int, binning: int = 1, rows: int = 64) -> np.ndarray:
    out = np.zeros((nz, stack.shape[1] // binning, stack.shape[2] // binning), np.float32)
    reconstruct_stack(stack, TILTS, nz, out, binning, "cpu", rows)
    return out


def test_blobs_come_back_at_their_positions():
    size = (64, 24, 32)
    centres = np.array([[20.0, 8.0, 10.0], [45.0, 16.0, 22.0]])
    vol = wbp(project_blobs(centres, size), size[2])
    for cx, cy, cz in centres:
        plane = vol[:, int(cy), :]  # (z, x) slice through the blob
        z, x = np.unravel_index(np.argmax(plane), plane.shape)
        assert (x, z) == (int(cx), int(cz))
    # and nothing comparable anywhere else: the blobs are the two strongest local features
    assert vol[10, 8, 20] > 5 * np.abs(vol[:, 0, :]).max()


def test_row_blocks_do_not_change_the_result():
    stack = project_blobs(np.array([[30.0, 10.0, 12.0]]), (48, 20, 24))
    assert np.array_equal(wbp(stack, 24, rows=64), wbp(stack, 24, rows=3))


def test_binning_matches_binned_reconstruction():
    size = (64, 32, 32)
    centres = np.array([[20.0, 10.0, 12.0], [44.0, 20.0, 20.0]])
    full = torch.as_tensor(wbp(project_blobs(centres, size, sigma=3.0), 32))
    binned = wbp(project_blobs(centres, size, sigma=3.0), 16, binning=2)
    pooled = torch.nn.functional.avg_pool3d(full[None, None], 2)[0, 0].numpy()
    assert np.corrcoef(pooled.ravel(), binned.ravel())[0, 1] > 0.9


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rec")
    threads = torch.get_num_threads()
    try:
        execute(SIM_SPEC, SimulateParams(project_dir="proj", preset="tiny", seed=3, threads=1), root, quiet=True)
    finally:
        torch.set_num_threads(threads)
    return root / "proj"


def test_reconstruct_job_matches_the_simulators_tomogram(tiny):
    truth, px = read_mrc(tiny / "Tomograms" / "TS_01" / "TS_01.mrc")
    ctx = execute(SPEC, ReconstructParams(i="Tomograms/TS_01/TS_01.mrcs", thickness=truth.shape[0], device="cpu",
                                          rows_per_block=16), tiny, quiet=True)
    vol, vpx = read_mrc(ctx.path("TS_01.mrc"))
    assert vol.shape == truth.shape and vpx == pytest.approx(px)
    corr = np.corrcoef(vol.ravel(), truth.ravel())[0, 1]
    print(f"correlation with the simulator's tomogram: {corr:.5f}")
    assert corr > 0.95
    assert abs(vol.mean()) < 1e-3 and vol.std() == pytest.approx(1.0, abs=1e-3)


def test_reconstruct_refuses_wrong_tilt_count_and_writes_nothing(tmp_path):
    write_mrc(tmp_path / "s.mrcs", np.ones((5, 16, 16), np.float32), 2.0, stack=True)
    (tmp_path / "s.tlt").write_text("-6\n-3\n0\n3\n")
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SubtomoError, match="4 tilt angles for 5 images"):
        execute(SPEC, ReconstructParams(i="s.mrcs", device="cpu"), tmp_path, quiet=True)
    assert sorted(tmp_path.rglob("*")) == before


def test_sirt_like_filter_is_the_landweber_weight():
    from subtomo.tomo.reconstruct import ramp_filter

    nx = 64
    images = torch.as_tensor(np.random.default_rng(0).normal(size=(3, 4, nx)).astype(np.float32))
    tilts = np.array([-3.0, 0.0, 3.0])
    plain = torch.fft.rfft(ramp_filter(images, tilts), dim=-1)
    k = np.fft.rfftfreq(nx)
    for n in (1, 5, 20):
        sirt = torch.fft.rfft(ramp_filter(images, tilts, n), dim=-1)
        ratio = (sirt.abs() / plain.abs()).mean(dim=(0, 1)).numpy()
        expected = 1 - (1 - np.minimum(1.0, (1 / nx) / np.maximum(k, 1e-12))) ** n
        assert np.allclose(ratio[1:], expected[1:], rtol=1e-3)  # ramp up to k = 1/nx, then damped
        assert ratio[0] == pytest.approx(1.0, rel=1e-3)
    huge = torch.fft.rfft(ramp_filter(images, tilts, 100000), dim=-1)
    assert torch.allclose(huge.abs(), plain.abs(), rtol=1e-3, atol=1e-4)
