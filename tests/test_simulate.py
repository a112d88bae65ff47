"""The simulator: atomic potentials, projection geometry, and a tiny project checked against its ground truth."""

from __future__ import annotations

import filecmp
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import affine_transform, map_coordinates

from subtomo.ctf.model import Optics, ctf_1d, ctf_2d
from subtomo.errors import SubtomoError
from subtomo.fourier import lowpass
from subtomo.geometry.euler import euler_to_matrix, random_rotations
from subtomo.io.mrc import read_mrc, read_mrc_header
from subtomo.io.star import read_star_table
from subtomo.io.text import read_coords, read_order, read_tlt
from subtomo.jobs.base import execute
from subtomo.jobs.simulate import SPEC, SimulateParams
from subtomo.simulate import potential as pot
from subtomo.simulate.presets import config_for
from subtomo.simulate.tiltseries import Detector, FourierSliceProjector, ImageCtfGrid, interaction_constant, tilt_scheme

P_ZYX = np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]])  # (x, y, z) <-> (z, y, x)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rotate_map(vol: np.ndarray, a: np.ndarray, order: int = 1) -> np.ndarray:
    """particle(r) = reference(Aᵀ r) about the box centre N//2 (RELION convention)."""
    n = vol.shape[0]
    m = P_ZYX @ a.T @ P_ZYX
    c = np.full(3, n // 2)
    return affine_transform(vol, m, offset=c - m @ c, order=order)


# ------------------------------------------------------------------------------------ potential
def test_carbon_atom_integral_and_profile():
    model = pot.AtomicModel(np.array([[0.3, -0.2, 0.45]]), np.array(["C"]), np.array(["A"]))
    px, box, b = 1.0, 32, 100.0
    v = pot.potential_map(model, box, px, bfactor_A2=b, centre_A=np.zeros(3), implicit_hydrogens=False).double()
    expected = 47.878 * (0.0893 + 0.2563 + 0.7570 + 1.0487 + 0.3575)  # V·Å³, analytic
    assert float(v.sum()) * px ** 3 == pytest.approx(expected, rel=1e-4)
    assert pot.atom_potential_integral_V_A3("C") == pytest.approx(expected, rel=1e-12)
    assert float(v.min()) > -1e-3 * float(v.max())  # positive (up to band-limit ringing)
    ax = (np.arange(box) - box // 2) * px
    z, y, x = np.meshgrid(ax, ax, ax, indexing="ij")
    r = np.sqrt((x - 0.3) ** 2 + (y + 0.2) ** 2 + (z - 0.45) ** 2)
    analytic = pot.atom_potential_radial_V("C", r, b)
    assert np.abs(v.numpy() - analytic).max() < 0.01 * analytic.max()


def test_structure_potential_integral_and_symmetry_orientation():
    model = pot.read_atomic_model(Path(pot.__file__).parents[1] / "data" / "3j9i_Tacidophilum_20S_proteasome.pdb.gz")
    assert len(model) == 46228
    oriented, rms = pot.orient_for_symmetry(model, "D7")
    assert rms < 0.5  # the deposited model is D7-symmetric: after orientation the RELION D7 operators hold
    small = oriented.subset(np.arange(len(oriented)) % 40 == 0)
    v = pot.potential_map(small, 40, 8.0, bfactor_A2=50.0, centre_A=np.zeros(3))
    per_atom = sum(pot.atom_potential_integral_V_A3(e) + pot.IMPLICIT_HYDROGENS.get(e, 0) * pot.atom_potential_integral_V_A3("H")
                   for e in small.elements)
    assert float(v.double().sum()) * 8.0 ** 3 == pytest.approx(per_atom, rel=1e-4)


# ------------------------------------------------------------------------------------ geometry
def test_tilt_schemes_and_dose():
    tilts, acq = tilt_scheme(-9, 9, 3, "dose-symmetric")
    assert tilts.tolist() == [-9, -6, -3, 0, 3, 6, 9]
    assert [tilts[i] for i in np.argsort(acq)] == [0, 3, 6, -3, -6, 9, -9]
    tilts, acq = tilt_scheme(-6, 6, 3, "bidirectional")
    assert [tilts[i] for i in np.argsort(acq)] == [0, 3, 6, -3, -6]


def test_image_ctf_grid_matches_ctf_2d():
    optics = Optics(300.0, 2.7, 0.07)
    grid = ImageCtfGrid((48, 64), 4.0, optics)
    from subtomo.fourier import rfft_frequencies

    freq = rfft_frequencies((48, 64)) / 4.0
    ref = ctf_2d(freq, 31000.0, 29000.0, 33.0, 300.0, 2.7, 0.07)
    got = grid.ctf(30000.0, 1000.0, 33.0)
    assert torch.allclose(got, ref, atol=2e-4)


def test_fourier_slice_projection_matches_real_space_rotation():
    """The tilt-θ image of a rotated map = its real-space line integrals along n_θ = (-sin θ, 0, cos θ)."""
    rng = np.random.default_rng(0)
    n = 32
    ax = np.arange(n) - n // 2
    z, y, x = np.meshgrid(ax, ax, ax, indexing="ij")
    vol = np.zeros((n, n, n))
    for _ in range(6):  # asymmetric blob
        c = rng.uniform(-6, 6, 3)
        vol += np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * rng.uniform(1.5, 3) ** 2))
    a = euler_to_matrix(37.0, 71.0, -122.0)
    theta = math.radians(40.0)
    proj = FourierSliceProjector(torch.as_tensor(vol, dtype=torch.float32), n)
    f = proj.project(torch.as_tensor(a[None], dtype=torch.float32), torch.tensor([theta]))
    from subtomo.fourier import ifft_centered

    img = ifft_centered(f, (n, n))[0].numpy()
    # real space: image(x_img, y) = sum_h particle(x_img u_x + y u_y + h n), particle(r) = vol(Aᵀ r)
    ux = np.array([math.cos(theta), 0, math.sin(theta)])
    nb = np.array([-math.sin(theta), 0, math.cos(theta)])
    xi, yi, hi = np.meshgrid(ax, ax, np.arange(-n, n) * 0.5, indexing="ij")
    r = xi[..., None] * ux + yi[..., None] * np.array([0, 1.0, 0]) + hi[..., None] * nb
    rr = r @ a  # Aᵀ r as rows
    coords = np.stack([rr[..., 2], rr[..., 1], rr[..., 0]]) + n // 2
    vals = map_coordinates(vol, coords.reshape(3, -1), order=3).reshape(xi.shape)
    real = vals.sum(-1).T * 0.5  # (y, x)
    cc = np.corrcoef(img.ravel(), real.ravel())[0, 1]
    assert cc > 0.99
    assert img.sum() == pytest.approx(real.sum(), rel=0.02)


def test_interaction_constant_300kV():
    assert interaction_constant(300.0) == pytest.approx(6.526e-4, rel=2e-3)


def test_invalid_parameters_are_refused():
    with pytest.raises(SubtomoError):
        config_for("tiny", {"class_fractions": [0.7, 0.7]})
    with pytest.raises(SubtomoError):
        config_for("nope", {})


# ------------------------------------------------------------------------------------ project
def simulate(root: Path, name: str, seed: int = 1, **overrides) -> Path:
    threads = torch.get_num_threads()
    try:  # one thread: the tiny project is made of small ops, which extra threads only slow down
        execute(SPEC, SimulateParams(project_dir=name, preset="tiny", seed=seed, threads=1, **overrides), root, quiet=True)
    finally:
        torch.set_num_threads(threads)
    return root / name


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return simulate(tmp_path_factory.mktemp("sim"), "proj")


def test_layout_and_ground_truth(tiny):
    t = tiny / "Tomograms" / "TS_01"
    assert sorted(p.name for p in t.iterdir()) == sorted(f"TS_01{e}" for e in (".mrc", ".mrcs", ".coords", ".tlt", ".order", ".trial"))
    cfg = config_for("tiny", {})
    shape, px = read_mrc_header(t / "TS_01.mrc")
    nx, ny, nz = cfg.tomo_size
    assert shape == (nz, ny, nx) and px == pytest.approx(cfg.pixel_size)
    ts_shape, ts_px = read_mrc_header(t / "TS_01.mrcs")
    tilts = read_tlt(t / "TS_01.tlt")
    assert ts_shape == (len(tilts), ny, nx) and ts_px == pytest.approx(px)
    assert read_mrc_header(t / "TS_01.trial")[0][0] == 2 * len(tilts)
    order = read_order(t / "TS_01.order")
    assert order[0, 1] == 0 and np.all(np.diff(order[:, 1]) > 0)  # acquisition order, dose grows
    coords = read_coords(t / "TS_01.coords")
    picks = read_star_table(tiny / "GroundTruth" / "picks.star")
    assert len(picks) == len(coords) == cfg.n_particles + cfg.n_fiducials + cfg.n_junk
    assert picks["rlnTomoParticleId"].tolist() == list(range(1, len(coords) + 1))
    assert set(picks["subtomoKind"]) == {"particle", "fiducial", "junk"}
    assert sorted(picks.loc[picks.subtomoKind == "particle", "rlnClassNumber"].unique()) == [1, 2]
    assert (picks.loc[picks.subtomoKind != "particle", "rlnClassNumber"] == 0).all()
    assert np.allclose(picks[["subtomoPickedX", "subtomoPickedY", "subtomoPickedZ"]].to_numpy(), coords, atol=0.006)
    tilt_truth = read_star_table(tiny / "GroundTruth" / "tilts.star")
    assert np.allclose(tilt_truth["rlnTomoNominalStageTiltAngle"], tilts, atol=0.006)
    assert (tilt_truth["rlnDefocusU"] >= tilt_truth["rlnDefocusV"]).all()
    m1, mpx = read_mrc(tiny / "GroundTruth" / "class001.mrc")
    m2, _ = read_mrc(tiny / "GroundTruth" / "class002.mrc")
    assert mpx == pytest.approx(px) and m1.shape[0] % 2 == 0
    assert 0.8 < m2.sum() / m1.sum() < 0.95  # the variant lacks ~10 % of the mass
    info = json.loads((tiny / "GroundTruth" / "simulation.json").read_text())
    assert info["structure"]["symmetry"] == "D7" and info["seed"] == 1
    # no truth inside the inputs
    assert not any("GroundTruth" in p.read_text(errors="ignore") for p in t.glob("*.coords"))


def test_output_passes_import(tiny):
    from subtomo.jobs.import_tomograms import SPEC as IMPORT
    from subtomo.jobs.import_tomograms import ImportParams

    ctx = execute(IMPORT, ImportParams(), tiny, quiet=True)
    table = read_star_table(ctx.dir / "all_tomograms.star")
    assert table["rlnTomoName"].tolist() == ["TS_01"]
    assert int(table["subtomoHasTrials"].iloc[0]) == 1


def _particles(project: Path):
    tomo, px = read_mrc(project / "Tomograms" / "TS_01" / "TS_01.mrc")
    ref, _ = read_mrc(project / "GroundTruth" / "class001.mrc")
    picks = read_star_table(project / "GroundTruth" / "picks.star")
    return tomo, px, ref, picks[(picks.subtomoKind == "particle") & (picks.rlnClassNumber == 1)]


def _cut(tomo: np.ndarray, row, n: int) -> np.ndarray | None:
    c = np.floor([row.rlnCoordinateZ, row.rlnCoordinateY, row.rlnCoordinateX]).astype(int)
    sl = tuple(slice(ci - n // 2, ci + n // 2) for ci in c)
    if any(s.start < 0 or s.stop > size for s, size in zip(sl, tomo.shape)):
        return None
    return tomo[sl]


def test_true_pose_correlates_better_than_wrong_poses(tiny):
    tomo, px, ref, particles = _particles(tiny)
    n = ref.shape[0]
    lp = lambda v: lowpass(torch.as_tensor(np.ascontiguousarray(v)), 30.0, px).numpy()  # noqa: E731

    def cc(a, b):
        a, b = a - a.mean(), b - b.mean()
        return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))

    rng = np.random.default_rng(5)
    good, bad = [], []
    for _, row in particles.iterrows():
        sub = _cut(tomo, row, n)
        if sub is None:
            continue
        sub = -lp(sub)  # protein is dark in the tomogram
        a = euler_to_matrix(row.rlnAngleRot, row.rlnAngleTilt, row.rlnAnglePsi)
        good.append(cc(sub, lp(rotate_map(ref, a))))
        wrong = [a.T] + list(random_rotations(3, rng))  # the transposed matrix = the classic convention bug
        bad.append(np.mean([cc(sub, lp(rotate_map(ref, w))) for w in wrong]))
    assert len(good) >= 3
    assert np.mean(good) > 0.2
    assert np.mean(good) > np.mean(bad) + 0.1
    assert np.mean(np.asarray(good) > np.asarray(bad)) >= 0.75


def test_missing_wedge_matches_tilt_range(tiny):
    tomo, px, ref, particles = _particles(tiny)
    n = ref.shape[0]
    tilts = read_tlt(tiny / "Tomograms" / "TS_01" / "TS_01.tlt")
    tmax = math.radians(np.abs(tilts).max())
    k = np.fft.fftfreq(n)
    kz, ky, kx = np.meshgrid(k, k, k, indexing="ij")
    kr = np.sqrt(kx ** 2 + ky ** 2 + kz ** 2)
    band = (kr > 3 / n) & (kr < 0.45)
    ang = np.arctan2(np.abs(kz), np.abs(kx))  # angle of k from the x axis in the xz plane
    missing = band & (ang > tmax + math.radians(10))
    sampled = band & (ang < tmax - math.radians(10))
    window = np.hanning(n)[:, None, None] * np.hanning(n)[None, :, None] * np.hanning(n)[None, None, :]
    ratios = []
    for _, row in particles.iterrows():
        sub = _cut(tomo, row, n)
        if sub is None:
            continue
        power = np.abs(np.fft.fftn((sub - sub.mean()) * window)) ** 2
        ratios.append(power[missing].mean() / power[sampled].mean())
    assert ratios and np.median(ratios) < 0.1


def test_same_seed_identical_files(tmp_path, tiny):
    again = simulate(tmp_path, "again", seed=1)
    other = simulate(tmp_path, "other", seed=2, trials=False)
    for sub in ("Tomograms/TS_01", "GroundTruth"):
        names = sorted(p.name for p in (tiny / sub).iterdir())
        assert names == sorted(p.name for p in (again / sub).iterdir())
        for name in names:
            assert filecmp.cmp(tiny / sub / name, again / sub / name, shallow=False), f"{sub}/{name} differs"
    assert not filecmp.cmp(tiny / "Tomograms/TS_01/TS_01.mrcs", other / "Tomograms/TS_01/TS_01.mrcs", shallow=False)


def test_refuses_to_overwrite(tiny):
    with pytest.raises(SubtomoError, match="never overwrites"):
        execute(SPEC, SimulateParams(project_dir=str(tiny), preset="tiny"), tiny.parent, quiet=True)


def test_thon_rings_at_true_defocus(tmp_path):
    """The 0° image's power spectrum has its minima where the CTF of the true defocus has its zeros."""
    proj = simulate(tmp_path, "thon", seed=3, pixel_size=5.0, tomo_size=[192, 192, 64], ice_thickness=300.0,
                    n_particles=6, n_fiducials=0, n_junk=2, astigmatism=0.0, trials=False, ice_structure_factor=0.1)
    stack, px = read_mrc(proj / "Tomograms" / "TS_01" / "TS_01.mrcs")
    truth = read_star_table(proj / "GroundTruth" / "tilts.star")
    i0 = int(np.argmin(np.abs(truth["rlnTomoNominalStageTiltAngle"].to_numpy())))
    defocus = float(truth["rlnDefocusU"].iloc[i0])
    img = stack[i0] - stack[i0].mean()
    n = img.shape[0]
    ps = np.abs(np.fft.fft2(img)) ** 2
    f = np.fft.fftfreq(n)
    r = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2) * n
    shells = np.round(r).astype(int)
    radial = np.bincount(shells.ravel(), ps.ravel()) / np.bincount(shells.ravel())
    s = np.arange(len(radial)) / (n * px)
    use = (s > 0.025) & (s < 0.095)
    # remove the smooth background (noise, envelope) with a wide running mean
    from scipy.ndimage import uniform_filter1d

    detrended = radial / uniform_filter1d(radial, 9, mode="nearest")

    def score(d):
        c2 = ctf_1d(torch.as_tensor(s), d, 300.0, 2.7, 0.07).numpy() ** 2
        return np.corrcoef(detrended[use], c2[use])[0, 1]

    trial = defocus * np.linspace(0.7, 1.3, 61)
    scores = np.array([score(d) for d in trial])
    best = trial[int(np.argmax(scores))]
    assert score(defocus) > 0.3
    assert abs(best - defocus) / defocus < 0.04


def test_object_defocus_follows_its_height_and_position():
    """A point-like object at (x, z) seen at tilt θ lands at x_img = x cos θ + z sin θ with defocus D − h."""
    from subtomo.fourier import fft_centered
    from subtomo.simulate.tiltseries import TiltGeometry, image_filters, render_objects

    n, px, theta = 16, 4.0, 30.0
    ax = np.arange(n) - n // 2
    z, y, x = np.meshgrid(ax, ax, ax, indexing="ij")
    blob = torch.as_tensor(np.exp(-(x ** 2 + y ** 2 + z ** 2) / 2.0), dtype=torch.float32)
    proj = FourierSliceProjector(blob, 96)
    geom = TiltGeometry(tilts_deg=np.array([theta]), true_tilts_deg=np.array([theta]), shifts_px=np.zeros((1, 2)),
                        acquisition=np.zeros(1, int), pre_dose=np.zeros(1), dose_per_tilt=0.0,
                        defocus_A=np.array([20000.0]), astigmatism_A=np.zeros(1), astigmatism_angle_deg=np.zeros(1),
                        image_shape=(96, 768), pixel_size_A=px)
    optics = Optics(300.0, 2.7, 0.07)
    centre = np.array([[-2000.0, 0.0, 1500.0]])
    th = math.radians(theta)
    h = -centre[0, 0] * math.sin(th) + centre[0, 2] * math.cos(th)  # +2299 Å: up-beam is h < 0
    x_img = centre[0, 0] * math.cos(th) + centre[0, 2] * math.sin(th)
    pad = 96
    canvas = torch.zeros(1, 96 + 2 * pad, 768 + 2 * pad)
    render_objects(canvas, pad, proj, centre, np.eye(3)[None], geom, optics,
                   image_filters(proj.k2d / px, np.zeros(1), Detector()))
    img = canvas[0, pad:pad + 96, pad:pad + 768]
    col = int(round(768 / 2 + x_img / px))
    smooth = lowpass(img, 40.0, px)
    assert abs(int(torch.argmin(smooth[48])) - col) <= 1  # dark (protein) at x_img
    cut = img[:, col - 48:col + 48]
    power = (fft_centered(cut, 2).abs() ** 2).numpy()
    from subtomo.fourier import rfft_frequencies

    s = (rfft_frequencies((96, 96)).norm(dim=-1) / px).numpy()
    use = (s > 0.02) & (s < 0.11)

    def score(d):
        c2 = ctf_1d(torch.as_tensor(s), d, 300.0, 2.7, 0.07).numpy() ** 2
        return np.corrcoef(power[use] / np.exp(-(s[use] * 2 * math.pi) ** 2), c2[use])[0, 1]

    trial = np.linspace(15000, 25000, 201)
    best = trial[int(np.argmax([score(d) for d in trial]))]
    assert abs(best - (20000.0 - h)) < 150  # not D + h (= 22299)
