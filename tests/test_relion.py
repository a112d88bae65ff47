"""Issue 15: RELION compatibility proven by running RELION 3.1 itself on our files.

``.ci/run`` installs RELION 3.1 (Debian ``relion``); where its programs are absent these
tests skip and say so. Each runs RELION single-threaded on a few small files (seconds).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import torch
from scipy.ndimage import affine_transform, gaussian_filter

from subtomo.fourier import fft_centered, ifft_centered
from subtomo.geometry.euler import euler_to_matrix
from subtomo.io.mrc import write_mrc
from subtomo.io.particles import ParticleSet
from subtomo.io.star import write_star
from subtomo.tomo.ctf3d import ctf3d_from_tilts, from_relion_cube, relion_ctf_cube, to_relion_cube
from subtomo.tomo.ctf_models import TomoCtf, relion_ctf_star

RELION = shutil.which("relion_reconstruct")
pytestmark = pytest.mark.skipif(RELION is None, reason="RELION 3.1 is not installed (relion_reconstruct not on PATH); "
                                                        "`apt-get install -y relion` (as .ci/run does) runs these tests")
KV, CS, Q0 = 300.0, 2.7, 0.07


def _relion(*args: str, cwd: Path, timeout: float = 60) -> None:
    proc = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin:/usr/local/bin"})
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"


def _sphere(n: int, radius: float) -> np.ndarray:
    k = np.arange(n) - n // 2
    kz, ky, kx = np.meshgrid(k, k, k, indexing="ij")
    return kx * kx + ky * ky + kz * kz < radius * radius


def _tilt_series(n_t: int = 21):
    tilts = np.linspace(-60.0, 60.0, n_t)
    dose = np.argsort(np.argsort(np.abs(tilts))) * 3.0  # dose-symmetric order
    return tilts, dose


# ---------------------------------------------------------------- the 3D CTF volume

def test_relion_ctf_volume_equals_ours_with_the_stated_tilt_sign(tmp_path):
    """relion_reconstruct --reconstruct_ctf on the per-tilt table our export writes (rlnAngleTilt = −θ)."""
    n, px = 32, 6.0
    tilts = np.array([-51.0, -30.0, -9.0, 12.0, 33.0, 54.0])  # not symmetric about 0: ±θ give other planes
    dose = np.array([15.0, 9.0, 3.0, 0.0, 6.0, 12.0])
    offsets = np.linspace(-800, 800, len(tilts))
    t = TomoCtf("t", "t.mrc", (100, 100, 50), px, KV, CS, Q0, False, tilts, dose, 30000 + offsets, 29200 + offsets,
                np.full(len(tilts), 25.0), np.zeros((1, 3)))
    rows = pd.DataFrame({"rlnTomoNominalStageTiltAngle": tilts, "rlnDefocusU": t.defocus_u_A, "rlnDefocusV": t.defocus_v_A,
                         "rlnDefocusAngle": t.defocus_angle_deg, "rlnCtfBfactor": 4 * dose,
                         "rlnCtfScalefactor": np.cos(np.deg2rad(tilts))})
    table = relion_ctf_star(t, rows)
    np.testing.assert_allclose(table["rlnAngleTilt"], -tilts)  # our θ is RELION's Euler (0, −θ, 0)
    write_star(tmp_path / "ours.star", {"images": table})
    write_star(tmp_path / "script.star", {"images": table.assign(rlnAngleTilt=tilts)})  # relion_prepare_subtomo's +θ
    for name in ("ours", "script"):
        _relion("relion_reconstruct", "--i", f"{name}.star", "--o", f"{name}.mrc", "--reconstruct_ctf", str(n),
                "--angpix", str(px), cwd=tmp_path)
    relion = mrcfile.read(tmp_path / "ours.mrc")
    script = mrcfile.read(tmp_path / "script.mrc")
    exact = relion_ctf_cube(t.defocus_u_A, t.defocus_v_A, t.defocus_angle_deg, tilts, 4 * dose, np.cos(np.deg2rad(tilts)),
                            n, px, KV, CS, Q0)
    inside = _sphere(n, n / 2 - 1)  # RELION's own edge voxels differ by rounding of the radius
    corr = np.corrcoef(relion[inside], exact[inside])[0, 1]
    assert corr > 0.99, corr  # measured 1.0000 (RELION 3.1.3)
    # the table relion_prepare_subtomo would write (+θ) gives the mirror image (kx -> -kx) of our geometry
    mirrored = np.roll(exact[:, :, ::-1], 1, axis=2)
    assert np.corrcoef(script[inside], mirrored[inside])[0, 1] > 0.99
    assert np.corrcoef(script[inside], exact[inside])[0, 1] < 0.9
    # our on-the-fly model: kernel="relion" is RELION's volume; the default tent kernel takes the CTF at each voxel's
    # own frequency and weights by distance to the plane (docs/conventions.md)
    fly = {kernel: to_relion_cube(ctf3d_from_tilts(t.defocus_u_A[None], tilts[None], (4 * dose)[None],
                                                   np.cos(np.deg2rad(tilts))[None], n, px, KV, CS, Q0,
                                                   defocus_v_A=t.defocus_v_A[None], astig_angle_deg=t.defocus_angle_deg[None],
                                                   kernel=kernel))[0].numpy() for kernel in ("relion", "tent")}
    both = inside & (relion != 0)
    assert np.corrcoef(relion[both], fly["relion"][both])[0, 1] > 0.999  # measured 1.0000 (RELION 3.1.3)
    assert np.corrcoef(relion[both], fly["tent"][both])[0, 1] > 0.85  # measured 0.91 at N = 32


# ---------------------------------------------------------------- reconstruction with known poses

def _test_map(n: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vol = np.zeros((n,) * 3)
    for _ in range(12):
        z, y, x = rng.integers(n // 2 - 7, n // 2 + 7, 3)
        vol[z, y, x] += rng.uniform(0.5, 1.5)
    return gaussian_filter(vol, 1.2).astype(np.float32)


def _rotated(vol: np.ndarray, a: np.ndarray) -> np.ndarray:
    """particle(r) = V(Aᵀ r) about the box centre N/2 (arrays (z, y, x), vectors (x, y, z))."""
    n = vol.shape[0]
    m = a.T[::-1, ::-1]  # Aᵀ in (z, y, x) order
    c = np.full(3, n // 2, dtype=np.float64)
    return affine_transform(vol, m, offset=c - m @ c, order=3, mode="constant")


def _particles(tmp_path: Path, n: int = 32, px: float = 8.0, count: int = 24):
    """Subtomograms CTF3D · V(Aᵀ k) with RELION CTF volumes, true poses and halves; a particle STAR."""
    rng = np.random.default_rng(7)
    vol = _test_map(n)
    tilts, dose = _tilt_series()
    rows, angles = [], rng.uniform([-180, 0, -180], [180, 180, 180], (count, 3))
    angles[:, 1] = np.degrees(np.arccos(rng.uniform(-1, 1, count)))
    for i, (rot, tilt, psi) in enumerate(angles, start=1):
        defocus = 25000 + 1500 * rng.standard_normal() + np.zeros(len(tilts))
        cube = relion_ctf_cube(defocus, defocus, np.zeros(len(tilts)), tilts, 4 * dose, np.cos(np.deg2rad(tilts)), n, px,
                               KV, CS, Q0)
        f = fft_centered(torch.from_numpy(_rotated(vol, euler_to_matrix(rot, tilt, psi))), 3)
        img = ifft_centered(f * from_relion_cube(torch.from_numpy(cube)), (n,) * 3).numpy()
        img = img + 0.002 * img.std() * rng.standard_normal(img.shape)
        write_mrc(tmp_path / f"Subtomograms/p{i:03d}.mrc", img.astype(np.float32), px)
        write_mrc(tmp_path / f"Subtomograms/p{i:03d}_ctf.mrc", cube, px)
        rows.append({"rlnImageName": f"Subtomograms/p{i:03d}.mrc", "rlnCtfImage": f"Subtomograms/p{i:03d}_ctf.mrc",
                     "rlnAngleRot": rot, "rlnAngleTilt": tilt, "rlnAnglePsi": psi, "rlnOriginXAngst": 0.0,
                     "rlnOriginYAngst": 0.0, "rlnOriginZAngst": 0.0, "rlnRandomSubset": 1 + i % 2, "rlnOpticsGroup": 1,
                     "rlnGroupNumber": 1})
    optics = pd.DataFrame([{"rlnOpticsGroup": 1, "rlnOpticsGroupName": "opticsGroup1", "rlnVoltage": KV,
                            "rlnSphericalAberration": CS, "rlnAmplitudeContrast": Q0, "rlnImagePixelSize": px,
                            "rlnImageSize": n, "rlnImageDimensionality": 3}])
    path = ParticleSet.from_table(pd.DataFrame(rows), optics, tmp_path).write(tmp_path / "particles.star")
    return ParticleSet.read(path, tmp_path), vol


def _fsc(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    n = a.shape[0]
    fa, fb = np.fft.fftshift(np.fft.fftn(a)), np.fft.fftshift(np.fft.fftn(b))
    k = np.arange(n) - n // 2
    kz, ky, kx = np.meshgrid(k, k, k, indexing="ij")
    shell = np.round(np.sqrt(kx ** 2 + ky ** 2 + kz ** 2)).astype(int).ravel()
    num = np.bincount(shell, (fa * fb.conj()).real.ravel())
    den = np.sqrt(np.bincount(shell, (np.abs(fa) ** 2).ravel()) * np.bincount(shell, (np.abs(fb) ** 2).ravel()))
    return (num / np.maximum(den, 1e-30))[: n // 2 + 1]


def test_relion_reconstruct_of_our_particles_equals_our_reconstruction(tmp_path):
    from subtomo.em.oracle import oracle_reconstruction
    from subtomo.tomo.particle_source import SubtomogramSource

    n = 32
    parts, vol = _particles(tmp_path, n)
    _relion("relion_reconstruct", "--i", "particles.star", "--o", "relion.mrc", "--ctf", "--3d_rot", cwd=tmp_path,
            timeout=120)
    relion = mrcfile.read(tmp_path / "relion.mrc").astype(np.float64)
    src = SubtomogramSource(parts, use_ctf=True)
    ours = oracle_reconstruction(src, parts.rotations(), parts.offsets_px(), parts.halves(), diameter_A=n * 8.0 * 0.9)
    mine = (ours.half_maps[0] + ours.half_maps[1]).numpy().astype(np.float64) / 2
    fsc = _fsc(relion, mine)
    upto = int(0.8 * n / 2)
    assert fsc[1:upto + 1].min() > 0.9, np.round(fsc, 3)
    assert _fsc(relion, vol)[1:upto + 1].min() > 0.9  # and both are the map the particles were made from


# ---------------------------------------------------------------- postprocessing

NOISE = 1.0  # noise std / signal std of each half map

def _half_maps(tmp_path: Path, n: int = 64, px: float = 2.0) -> None:
    """Two half maps: the same atom-like map (B 150 Å²) plus independent white noise; a soft spherical mask."""
    rng = np.random.default_rng(3)
    atoms = np.zeros((n,) * 3)
    pos = rng.normal(n / 2, 5.0, (600, 3)).astype(int).clip(8, n - 9)
    np.add.at(atoms, tuple(pos.T), 1.0)
    k = np.fft.fftfreq(n) / px
    s2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2
    signal = np.fft.ifftn(np.fft.fftn(atoms) * np.exp(-150.0 * s2 / 4)).real
    for h in (1, 2):
        noisy = signal + NOISE * signal.std() * rng.standard_normal(signal.shape)
        write_mrc(tmp_path / f"run_half{h}_class001_unfil.mrc", noisy.astype(np.float32), px)
    r = np.sqrt(((np.indices((n,) * 3) - n // 2) ** 2).sum(0))
    mask = np.clip((24.0 - r) / 6.0, 0, 1)
    write_mrc(tmp_path / "mask.mrc", (0.5 - 0.5 * np.cos(np.pi * mask)).astype(np.float32), px)


def test_relion_postprocess_agrees_with_ours(tmp_path):
    from subtomo.io.star import read_star
    from subtomo.jobs.base import execute
    from subtomo.jobs.postprocess import SPEC, PostProcessParams

    n, px = 64, 2.0
    _half_maps(tmp_path, n, px)
    (tmp_path / "relion").mkdir()
    _relion("relion_postprocess", "--i", "run_half1_class001_unfil.mrc", "--i2", "run_half2_class001_unfil.mrc",
            "--mask", "mask.mrc", "--angpix", str(px), "--auto_bfac", "--autob_lowres", "10", "--o", "relion/postprocess",
            cwd=tmp_path, timeout=120)
    theirs = read_star(tmp_path / "relion/postprocess.star")["general"]
    ctx = execute(SPEC, PostProcessParams(i="run_half1_class001_unfil.mrc", mask="mask.mrc", autob_lowres=10.0,
                                          directional=False, device="cpu"), tmp_path, quiet=True)
    ours = read_star(ctx.path("postprocess.star"))["general"]
    res_r, res_o = float(theirs["rlnFinalResolution"]), float(ours["rlnFinalResolution"])
    assert abs(1 / res_r - 1 / res_o) <= 1 / (n * px) + 1e-9, (res_r, res_o)  # within one Fourier shell
    b_r, b_o = float(theirs["rlnBfactorUsedForSharpening"]), float(ours["rlnBfactorUsedForSharpening"])
    assert abs(b_o - b_r) <= 0.1 * abs(b_r), (b_r, b_o)


# ---------------------------------------------------------------- export -> relion_refine -> import

def _angle_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Rotation angle between matrices a and b, (n,) [deg]."""
    tr = np.einsum("nij,nij->n", a, b)
    return np.degrees(np.arccos(np.clip((tr - 1) / 2, -1, 1)))


def test_round_trip_export_relion_refine_import(tmp_path):
    from subtomo.jobs.base import execute
    from subtomo.jobs.export_relion import SPEC as EXPORT
    from subtomo.jobs.export_relion import ExportRelionParams
    from subtomo.jobs.import_relion import SPEC as IMPORT
    from subtomo.jobs.import_relion import ImportRelionParams

    n = 32
    parts, vol = _particles(tmp_path, n, count=16)
    write_mrc(tmp_path / "ref.mrc", vol, 8.0)
    exp = execute(EXPORT, ExportRelionParams(i="particles.star", ref="ref.mrc", particle_diameter=200.0), tmp_path,
                  quiet=True)
    assert "relion_refine" in exp.path("relion_commands.txt").read_text()
    star = exp.rel(exp.path("particles_relion.star"))
    (tmp_path / "rr").mkdir()
    _relion("relion_refine", "--i", star, "--o", "rr/run", "--ref", exp.rel(exp.path("reference.mrc")), "--iter", "2",
            "--K", "1", "--ctf", "--ctf_corrected_ref", "--particle_diameter", "200", "--healpix_order", "5", "--sigma_ang", "1",
            "--offset_range", "2", "--offset_step", "1", "--ini_high", "16", "--tau2_fudge", "1", "--flatten_solvent",
            "--zero_mask", "--oversampling", "1", "--pad", "1", "--dont_combine_weights_via_disc", "--j", "1",
            "--random_seed", "0",  # RELION's default seed is the clock: runs differ, and some of them fail
            cwd=tmp_path, timeout=300)
    imp = execute(IMPORT, ImportRelionParams(i="rr/run_it002_data.star", model="rr/run_it002_model.star"), tmp_path,
                  quiet=True)
    back = ParticleSet.read(imp.path("particles.star"), tmp_path)
    assert len(back) == len(parts) and back.image_paths()[0].exists()
    err = _angle_deg(back.rotations(), parts.rotations())
    print(f"round trip through relion_refine: pose error median {np.median(err):.2f} deg, max {err.max():.2f} deg")
    assert np.median(err) < 2.0 and err.max() < 4.0, np.round(err, 2)
