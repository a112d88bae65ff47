"""Subtomogram extraction: box placement and origin sign, normalisation, edges, rescaling, projections."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from subtomo.errors import SubtomoError
from subtomo.fourier import fft_centered, ifft_centered, phase_shift
from subtomo.io.mrc import read_mrc, write_mrc
from subtomo.io.particles import read_particles
from subtomo.io.star import write_particles
from subtomo.jobs.base import execute
from subtomo.tomo.extract import ExtractionSettings, TomogramBoxReader, box_start, extract_one, normalise, outside_sphere_mask

PX = 3.0
SHAPE = (40, 48, 56)  # z, y, x
BLOBS = ((0.0, 0.0, 0.0, 1.0), (3.0, 0.0, 0.0, 0.6), (0.0, 2.0, -2.0, 0.4))  # asymmetric pattern (dx, dy, dz, amp)


def _pattern(grid_zyx, centre_xyz, sigma=1.6):
    z, y, x = grid_zyx
    out = np.zeros(z.shape)
    for dx, dy, dz, a in BLOBS:
        out += a * np.exp(-((x - centre_xyz[0] - dx) ** 2 + (y - centre_xyz[1] - dy) ** 2 + (z - centre_xyz[2] - dz) ** 2)
                          / (2 * sigma ** 2))
    return out


def _tomogram(path, centres, noise=0.0, offset=0.0, seed=0):
    """Dark particles (negative density) at ``centres`` (x, y, z px) on a background."""
    grid = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in SHAPE], indexing="ij")
    vol = offset + noise * np.random.default_rng(seed).standard_normal(SHAPE)
    for c in centres:
        vol -= 10 * _pattern(grid, c)
    write_mrc(path, vol.astype(np.float32), PX)


def test_box_start_and_origin_sign():
    start, frac = box_start(np.array([10.3, 7.0, -0.25]), 16)
    np.testing.assert_array_equal(start, [10 - 8, 7 - 8, -1 - 8])
    np.testing.assert_allclose(frac, [0.3, 0.0, 0.75])


def test_particle_at_fractional_coordinate_lands_at_box_centre(tmp_path):
    c = np.array([27.3, 21.6, 19.45])
    _tomogram(tmp_path / "t.mrc", [c])
    n = 20
    settings = ExtractionSettings(box=n, bg_radius_A=8 * PX, pixel_size_A=PX, invert=True, normalise=False)
    with TomogramBoxReader(tmp_path / "t.mrc") as reader:
        sub = extract_one(reader, c, settings, np.random.default_rng(0))
    assert not sub.crosses_edge
    frac = c - np.floor(c)
    np.testing.assert_allclose(sub.origin_A, -frac * PX)
    box_grid = np.meshgrid(*[np.arange(n, dtype=np.float64) for _ in range(3)], indexing="ij")
    # the particle (made white by the inversion) sits at N//2 + frac ...
    np.testing.assert_allclose(sub.volume, 10 * _pattern(box_grid, np.full(3, n // 2) + frac), atol=1e-4)
    # ... and translating by +origin (RELION: centre = box centre - origin) centres it exactly
    shifted = ifft_centered(phase_shift(fft_centered(torch.from_numpy(sub.volume).double(), 3),
                                        torch.from_numpy(sub.origin_A / PX), (n, n, n)), (n, n, n)).numpy()
    centred = 10 * _pattern(box_grid, np.full(3, n // 2))
    assert np.abs(shifted - centred).max() < 0.02 * centred.max()
    assert np.unravel_index(np.argmax(shifted), shifted.shape) == (n // 2, n // 2, n // 2)


def test_edge_boxes_filled_with_background_noise_and_flagged(tmp_path):
    _tomogram(tmp_path / "t.mrc", [], noise=2.0, offset=5.0)
    n = 16
    settings = ExtractionSettings(box=n, bg_radius_A=6 * PX, pixel_size_A=PX, invert=False, normalise=False)
    with TomogramBoxReader(tmp_path / "t.mrc") as reader:
        sub = extract_one(reader, np.array([3.0, 24.0, 20.0]), settings, np.random.default_rng(1))
        inner = extract_one(reader, np.array([28.0, 24.0, 20.0]), settings, np.random.default_rng(1))
        gone = extract_one(reader, np.array([-40.0, 24.0, 20.0]), settings, np.random.default_rng(1))
    assert sub.crosses_edge and not inner.crosses_edge and gone.empty
    filled = sub.volume[:, :, : 8 - 3]  # x index < 0 in the tomogram
    assert filled.std() == pytest.approx(2.0, rel=0.15) and filled.mean() == pytest.approx(5.0, abs=0.3)
    assert np.array_equal(sub.volume[:, :, 5:], read_mrc(tmp_path / "t.mrc")[0][12:28, 16:32, 0:11])


def _particles_star(path, tomo, coords, name="tomo1"):
    parts = pd.DataFrame({
        "rlnMicrographName": tomo, "rlnTomoName": name,
        "rlnCoordinateX": coords[:, 0], "rlnCoordinateY": coords[:, 1], "rlnCoordinateZ": coords[:, 2],
        "rlnTomoParticleId": np.arange(1, len(coords) + 1),
        "rlnImageName": [f"Particles/Tomograms/{name}/{name}{i:06d}.mrc" for i in range(1, len(coords) + 1)],
        # the compact CTF reference as older versions wrote it (rlnCtfImage): read and moved to subtomoCtfModel
        "rlnCtfImage": [f"{i:06d}@Prepare/job002/CtfModels/{name}_ctf.star" for i in range(1, len(coords) + 1)],
        "rlnTomoTiltSeriesPixelSize": PX, "rlnOpticsGroup": 1,
    })
    optics = pd.DataFrame([{"rlnOpticsGroup": 1, "rlnOpticsGroupName": "opticsGroup1", "rlnVoltage": 300.0,
                            "rlnSphericalAberration": 2.7, "rlnAmplitudeContrast": 0.07, "rlnImagePixelSize": PX,
                            "rlnImageDimensionality": 3}])
    write_particles(path, parts, optics)


def test_extract_job_normalises_flags_rescales_and_projects(tmp_path):
    from subtomo.jobs.extract import SPEC, ExtractParams

    coords = np.array([[20.4, 24.7, 20.2], [35.0, 20.0, 22.9], [2.5, 45.0, 20.0]])  # the third crosses two edges
    (tmp_path / "Tomograms/tomo1").mkdir(parents=True)
    _tomogram(tmp_path / "Tomograms/tomo1/tomo1.mrc", coords, noise=1.0, offset=3.0)
    _particles_star(tmp_path / "Prepare/job002/particles_subtomo.star", "Tomograms/tomo1/tomo1.mrc", coords)
    with pytest.raises(SubtomoError, match="even"):
        execute(SPEC, ExtractParams(i="Prepare/job002/particles_subtomo.star", box=15), tmp_path, quiet=True)
    ctx = execute(SPEC, ExtractParams(i="Prepare/job002/particles_subtomo.star", box=16, bg_diameter=10 * PX,
                                      project=True, device="cpu"), tmp_path, quiet=True)
    parts, optics = read_particles(ctx.dir / "particles_subtomo.star")
    assert list(parts["subtomoBoxCrossesEdge"]) == [0, 0, 1]
    assert int(optics["rlnImageSize"][0]) == 16 and int(optics["rlnImageDimensionality"][0]) == 3
    assert parts["rlnImageName"][1] == f"{ctx.name}Particles/Tomograms/tomo1/tomo1000002.mrc"
    assert parts["subtomoCtfModel"][1] == "000002@Prepare/job002/CtfModels/tomo1_ctf.star"
    assert "rlnCtfImage" not in parts  # RELION's label names CTF volumes only (issue 15, finding 4)
    frac = coords - np.floor(coords)
    np.testing.assert_allclose(parts[["rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginZAngst"]].to_numpy(), -frac * PX,
                               atol=1e-6)
    bg = outside_sphere_mask(16, 5.0)
    for name in parts["rlnImageName"]:
        vol, px = read_mrc(tmp_path / name)
        assert vol.shape == (16, 16, 16) and px == pytest.approx(PX)
        assert vol[bg].mean() == pytest.approx(0.0, abs=1e-4) and vol[bg].std() == pytest.approx(1.0, abs=1e-4)
    first, _ = read_mrc(tmp_path / parts["rlnImageName"][0])
    assert first[8, 8, 8] > 5  # the dark particle is white after the default inversion
    # z-projections: one stack per tomogram, normalised sums of the boxes along z
    proj, popt = read_particles(ctx.dir / "subtomo_proj2d.star")
    assert list(proj["rlnImageName"]) == [f"{i:06d}@{ctx.name}Particles/Tomograms/tomo1/tomo1_proj2d.mrcs" for i in (1, 2, 3)]
    assert list(proj["rlnImageOriginalName"]) == list(parts["rlnImageName"])
    assert int(popt["rlnImageDimensionality"][0]) == 2 and list(proj["rlnTomoParticleId"]) == [1, 2, 3]
    stack, _ = read_mrc(ctx.dir / "Particles/Tomograms/tomo1/tomo1_proj2d.mrcs")
    assert stack.shape == (3, 16, 16)
    np.testing.assert_allclose(stack[0], normalise(first.sum(0), bg[8]), atol=1e-4)
    # rescaling: 16 -> 8 px, pixel size doubles, origins (Å) unchanged
    ctx2 = execute(SPEC, ExtractParams(i="Prepare/job002/particles_subtomo.star", box=16, rescale=8, device="cpu"),
                   tmp_path, quiet=True)
    p2, o2 = read_particles(ctx2.dir / "particles_subtomo.star")
    assert int(o2["rlnImageSize"][0]) == 8 and float(o2["rlnImagePixelSize"][0]) == pytest.approx(2 * PX)
    np.testing.assert_allclose(p2["rlnOriginXAngst"], parts["rlnOriginXAngst"])
    small, spx = read_mrc(tmp_path / p2["rlnImageName"][0])
    assert small.shape == (8, 8, 8) and spx == pytest.approx(2 * PX)
    bg8 = outside_sphere_mask(8, 0.75 * 4)
    assert small[bg8].std() == pytest.approx(1.0, abs=1e-4) and small[4, 4, 4] > 2
    # the default input is the latest Prepare job's particles_subtomo.star: none recorded here
    with pytest.raises(SubtomoError, match="prepare"):
        execute(SPEC, ExtractParams(box=16), tmp_path, quiet=True)


def test_tomogram_name_that_would_escape_the_project_is_refused(tmp_path):
    from subtomo.jobs.extract import SPEC, ExtractParams

    coords = np.array([[20.0, 24.0, 20.0]])
    project = tmp_path / "deep" / "project"
    (project / "Tomograms/tomo1").mkdir(parents=True)
    _tomogram(project / "Tomograms/tomo1/tomo1.mrc", coords)
    _particles_star(project / "picks.star", "Tomograms/tomo1/tomo1.mrc", coords, name="../../../x")
    with pytest.raises(SubtomoError, match="rlnTomoName '../../../x' cannot be used as a file name"):
        execute(SPEC, ExtractParams(i="picks.star", box=16, device="cpu"), project, quiet=True)
    assert not (project / "Extract").exists()  # refused before a job directory was made
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep"]  # nothing written outside the project
