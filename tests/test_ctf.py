"""CTF estimation (Steps 8, 10, 11): accuracy on simulated images, importers, job options."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from subtomo.ctf.estimate import CtfSearchParams, Optics, astig_vector, effective_band, estimate_ctf, uv_angle
from subtomo.ctf.importers import ctffind_to_table, find_result_file, read_ctffind4, read_imod_defocus
from subtomo.ctf.series import apply_lower_tilt_defoci, average_trials
from subtomo.ctf.synthetic import synthetic_tilt_images
from subtomo.errors import SubtomoError
from subtomo.io.mrc import write_mrc
from subtomo.io.star import read_star_table
from subtomo.jobs import ctf as ctf_job
from subtomo.jobs import import_tomograms
from subtomo.jobs.base import execute

CTFFIND_FILE = Path("/work/shared/data/formats/ctf_mdoc_mtf/cryocat_TS_017/017_ctffind4.txt")
OPTICS = Optics(300.0, 2.7, 0.07, 2.0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _angle_diff(a, b):
    return (np.asarray(a) - np.asarray(b) + 90) % 180 - 90


# ----------------------------------------------------------------------------- estimation

def test_uv_angle_round_trip():
    u, v, a = np.array([30000.0, 21000.0]), np.array([29000.0, 20500.0]), np.array([35.0, -80.0])
    u2, v2, a2 = uv_angle(*astig_vector(u, v, a))
    assert np.allclose(u2, u) and np.allclose(v2, v) and np.allclose(_angle_diff(a2, a), 0, atol=1e-9)
    # (U, V, angle) and (V, U, angle + 90) are the same CTF
    u3, v3, a3 = uv_angle(*astig_vector(v, u, a + 90))
    assert np.allclose(u3, u) and np.allclose(_angle_diff(a3, a), 0, atol=1e-9)


def test_band_adapts_to_image_size_and_nyquist():
    b = effective_band((512, 512), 2.0, CtfSearchParams())
    assert (b.box_px, b.res_min_A, b.res_max_A) == (256, 30.0, 8.0)
    b = effective_band((300, 400), 5.0, CtfSearchParams())
    assert b.box_px == 150 and b.res_max_A == pytest.approx(11.0) and b.res_min_A == pytest.approx(30.0)
    b = effective_band((320, 320), 8.0, CtfSearchParams())  # large pixels: the band widens to lower resolution
    assert b.res_max_A == pytest.approx(17.6) and b.res_min_A == pytest.approx(44.0)
    assert b.notes


def test_estimate_recovers_defocus_astigmatism_and_flags_noise():
    rng = np.random.default_rng(0)
    n = 6
    tilt = np.array([-50.0, -30.0, -10.0, 10.0, 30.0, 50.0])
    d = rng.uniform(15000, 45000, n)
    astig = np.array([1200.0, 900.0, 1500.0, 100.0, 1100.0, 800.0])
    angle = rng.uniform(-90, 90, n)
    imgs = synthetic_tilt_images(d + astig / 2, d - astig / 2, angle, tilt, OPTICS, size=512, snr=0.15, seed=1)
    noise = synthetic_tilt_images([30000.0], [30000.0], [0.0], [0.0], OPTICS, size=512, snr=0.0, seed=2)
    fit = estimate_ctf(torch.cat([imgs, noise]), np.append(tilt, 0.0), OPTICS, CtfSearchParams(), diagnostics=True)
    err = fit.defocus_mean_A[:n] - d
    assert np.all(np.abs(err) < 500), err
    big = astig > 500
    assert np.all(np.abs(_angle_diff(fit.defocus_angle_deg[:n][big], angle[big])) < 10)
    assert np.all(np.abs((fit.defocus_u_A - fit.defocus_v_A)[:n] - astig) < 500)
    assert not fit.failed[:n].any(), fit.reasons
    assert fit.failed[n], "a pure-noise image must be flagged"
    assert np.all(fit.max_resolution_A[:n] < 20) and np.all(fit.max_resolution_A >= 2 * OPTICS.pixel_size_A)
    assert fit.diagnostics[0]["spectrum"].shape == fit.diagnostics[0]["model2d"].shape


def test_tilted_plane_model_sign():
    """Right side more underfocused at positive tilt (docs/conventions.md): the fit with the
    true tilt sign fits the Thon rings more significantly and to higher resolution than
    with the opposite sign, and the defocus is reported at the image centre."""
    optics = Optics(300.0, 2.7, 0.07, 4.0)
    img = synthetic_tilt_images([25000.0], [25000.0], [0.0], [55.0], optics, size=512, snr=0.1, seed=4)
    right = estimate_ctf(img, [55.0], optics, CtfSearchParams(astigmatism_A=0))
    wrong = estimate_ctf(img, [-55.0], optics, CtfSearchParams(astigmatism_A=0))
    assert right.significance[0] > wrong.significance[0] + 3
    assert right.max_resolution_A[0] < wrong.max_resolution_A[0]
    assert abs(right.defocus_mean_A[0] - 25000.0) < 300


def test_average_trials_and_lower_tilt_defoci():
    from subtomo.ctf.estimate import CtfFit

    u = np.array([20000.0, 21000.0, 30000.0, 50000.0])
    fit = CtfFit(u, u - 100, np.zeros(4), np.ones(4), np.full(4, 10.0), np.array([False, False, False, True]),
                 np.full(4, 10.0), [""] * 3 + ["noise"])
    avg = average_trials(fit)
    assert np.allclose(avg.defocus_u_A, [20500.0, 30000.0])  # the failed trial is left out
    assert not avg.failed.any()

    import pandas as pd

    table = pd.DataFrame({
        "rlnMicrographName": [f"{i}@s.mrcs" for i in range(1, 6)],
        "rlnTomoNominalStageTiltAngle": [-45.0, -30.0, 0.0, 15.0, 45.0],
        "rlnMicrographPreExposure": np.arange(5.0),
        "rlnDefocusU": [1.0, 2.0, 30000.0, 32000.0, 9.0], "rlnDefocusV": [1.0, 2.0, 30000.0, 32000.0, 9.0],
        "rlnDefocusAngle": np.zeros(5), "rlnCtfFigureOfMerit": np.ones(5), "rlnCtfMaxResolution": np.ones(5),
        "subtomoCtfFitFailed": [1, 0, 0, 0, 1], "subtomoCtfSignificance": np.ones(5), "subtomoCtfSource": ["fit"] * 5,
    })
    out, n_rep, _ = apply_lower_tilt_defoci(table, 30.0)
    assert n_rep == 2
    assert out["rlnDefocusU"].tolist() == [31000.0, 2.0, 30000.0, 32000.0, 31000.0]  # |30| = T keeps its own
    assert out["subtomoCtfFitFailed"].tolist() == [0, 0, 0, 0, 0]
    assert out["subtomoCtfSource"].tolist()[0] == "lower_tilts"
    with pytest.raises(SubtomoError, match="no image"):
        apply_lower_tilt_defoci(table, 0.0)


# ----------------------------------------------------------------------------- importers

def test_read_real_ctffind4_output():
    df = read_ctffind4(CTFFIND_FILE)
    assert len(df) == 60
    assert df["micrograph"].tolist() == list(range(1, 61))
    first = df.iloc[0]
    assert first["defocus_u_A"] == pytest.approx(14477.870117)
    assert first["defocus_v_A"] == pytest.approx(13500.001953)
    assert first["angle_deg"] == pytest.approx(75.000012)
    assert first["cc"] == pytest.approx(0.001071)
    assert first["fit_res_A"] == pytest.approx(12.144508)
    vals = ctffind_to_table(df, 60, CTFFIND_FILE)
    assert vals["defocus_u_A"][59] == pytest.approx(18853.355469)
    with pytest.raises(SubtomoError, match="60 CTFFIND rows but the tilt series has 61"):
        ctffind_to_table(df, 61, CTFFIND_FILE)


def test_read_imod_defocus_versions(tmp_path):
    v3 = tmp_path / "a.defocus"
    v3.write_text("1 0 0. 0. 0 3\n"
                  "1 1 -60.0 -60.0 3000.0 3100.0 30.0\n"
                  "2 3 -57.0 -54.0 2500.0 2500.0 0.0\n"
                  "3 3 -54.0 -54.0 2700.0 2700.0 0.0\n")
    r = read_imod_defocus(v3, 4)
    # nm -> A; IMOD angle is the axis of the smaller defocus: U (31000) lies at 30 - 90 = -60 deg
    assert r["defocus_u_A"][0] == pytest.approx(31000.0) and r["defocus_v_A"][0] == pytest.approx(30000.0)
    assert _angle_diff(r["angle_deg"][0], -60.0) == pytest.approx(0, abs=1e-6)
    assert r["defocus_u_A"][1] == pytest.approx(25000.0)
    assert r["defocus_u_A"][2] == pytest.approx(26000.0)  # two lines cover view 3: averaged
    assert r["covered"].tolist() == [True, True, True, False]
    assert r["defocus_u_A"][3] == pytest.approx(26000.0)  # nearest covered view
    v2 = tmp_path / "b.defocus"
    v2.write_text("1 1 -3.0 -3.0 4000 2\n2 2 0.0 0.0 4100\n")
    r2 = read_imod_defocus(v2, 2)
    assert r2["defocus_u_A"].tolist() == pytest.approx([40000.0, 41000.0])
    assert r2["defocus_v_A"].tolist() == pytest.approx([40000.0, 41000.0])
    plain = tmp_path / "c.defocus"
    plain.write_text("1 2 -3.0 0.0 3500\n")
    assert read_imod_defocus(plain, 2)["defocus_u_A"].tolist() == pytest.approx([35000.0, 35000.0])
    with pytest.raises(SubtomoError, match="views 1-3"):
        read_imod_defocus(_write(tmp_path / "d.defocus", "1 3 0 0 3000\n"), 2)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_find_result_file(tmp_path):
    (tmp_path / "res").mkdir()
    f = _write(tmp_path / "res" / "TS_01_output.txt", "x")
    assert find_result_file("res", "TS_01", tmp_path, (".txt",)) == f
    assert find_result_file("res/{name}_output.txt", "TS_01", tmp_path, (".txt",)) == f
    with pytest.raises(SubtomoError, match="no .txt file for tomogram TS_02"):
        find_result_file("res", "TS_02", tmp_path, (".txt",))


# ----------------------------------------------------------------------------- job

TILTS = np.array([-45.0, -30.0, -15.0, 0.0, 15.0, 30.0, 45.0])
TRUE_D = np.array([26000.0, 27000.0, 25500.0, 28000.0, 26500.0, 27500.0, 25000.0])
SIZE = 384


def make_project(root: Path, name: str = "TS01", trials: int | None = None, noise_stack: bool = False) -> Path:
    d = root / "Tomograms" / name
    d.mkdir(parents=True)
    px = OPTICS.pixel_size_A
    write_mrc(d / f"{name}.mrc", np.zeros((16, 48, 48), np.float32), px)
    (d / f"{name}.coords").write_text("24 24 8\n")
    snr = 0.0 if noise_stack else 0.08
    imgs = synthetic_tilt_images(TRUE_D + 300, TRUE_D - 300, np.full(7, 20.0), TILTS, OPTICS, size=SIZE, snr=snr, seed=11)
    write_mrc(d / f"{name}.mrcs", imgs.numpy(), px, stack=True)
    (d / f"{name}.tlt").write_text("".join(f"{t:.2f}\n" for t in TILTS))
    (d / f"{name}.order").write_text("".join(f"{t:.1f} {3.0 * i:.1f}\n" for i, t in enumerate(TILTS)))
    if trials is not None:
        k = trials // 2
        td = np.repeat(TRUE_D[:k] + 1000, 2) + np.tile([-400.0, 400.0], k)
        tt = np.repeat(TILTS[:k], 2)
        timgs = synthetic_tilt_images(td, td, np.zeros(len(td)), tt, OPTICS, size=SIZE, snr=0.08, seed=12)
        write_mrc(d / f"{name}.trial", timgs.numpy(), px, stack=True)
    execute(import_tomograms.SPEC, import_tomograms.ImportParams(), root, quiet=True)
    if trials is not None and trials > 2 * (trials // 2):  # a .trial changed after import
        write_mrc(d / f"{name}.trial", torch.cat([timgs, timgs[:1]]).numpy(), px, stack=True)
    return d


def run_ctf(root: Path, **kw):
    kw.setdefault("plots", False)
    kw.setdefault("device", "cpu")
    return execute(ctf_job.SPEC, ctf_job.CtfParams(**kw), root, quiet=True)


@pytest.fixture(scope="module")
def fitted_project(tmp_path_factory):
    root = tmp_path_factory.mktemp("ctfproj")
    make_project(root)
    ctx = run_ctf(root, plots=True)
    return root, ctx


def test_job_writes_contract_outputs(fitted_project):
    root, ctx = fitted_project
    table = read_star_table(ctx.path("TS01_ctffind.star"))
    for col in ("rlnMicrographName", "rlnTomoNominalStageTiltAngle", "rlnMicrographPreExposure", "rlnDefocusU",
                "rlnDefocusV", "rlnDefocusAngle", "rlnCtfFigureOfMerit", "rlnCtfMaxResolution", "subtomoCtfFitFailed"):
        assert col in table.columns
    assert table["rlnMicrographName"].tolist() == [f"{i}@Tomograms/TS01/TS01.mrcs" for i in range(1, 8)]
    assert np.allclose(table["rlnTomoNominalStageTiltAngle"], TILTS)
    mean = (table["rlnDefocusU"] + table["rlnDefocusV"]).to_numpy() / 2
    assert np.all(np.abs(mean - TRUE_D) < 500), mean - TRUE_D
    assert table["subtomoCtfFitFailed"].sum() == 0
    tomos = read_star_table(ctx.path("ctf_tomograms.star"))
    assert tomos["subtomoCtfResultsStar"].tolist() == [f"{ctx.name}TS01_ctffind.star"]
    assert tomos["subtomoSkipCtf"].tolist() == [0]
    assert tomos["subtomoCtfReplacedByTrend"].tolist() == [0] and tomos["subtomoCtfUnknown"].tolist() == [0]
    assert np.allclose(table["subtomoCtfFittedDefocus"], mean)
    assert "rlnTomoTiltSeriesName" in tomos.columns
    cmds = ctx.path("relion_subtomo_commands.txt").read_text().splitlines()
    assert len(cmds) == 7 and "--tomo TS01 --image 7" in cmds[6] and f"--update {ctx.name}" in cmds[0]
    assert len(list(ctx.path("Diagnostics/TS01").glob("*.png"))) == 7
    assert ctx.path("Diagnostics/TS01_summary.png").exists()
    # later stages find the node
    from subtomo.jobs.pipeline import Pipeline

    assert Pipeline(root).latest_output(("CtfFind",), "ctf_tomograms.star") == f"{ctx.name}ctf_tomograms.star"


def test_job_lower_tilt_defoci_changes_only_high_tilts(fitted_project):
    root, ctx = fitted_project
    base = read_star_table(ctx.path("TS01_ctffind.star"))
    ctx2 = run_ctf(root, lower_tilt_defoci=20.0)
    t = read_star_table(ctx2.path("TS01_ctffind.star"))
    low = np.abs(TILTS) < 20
    high = np.abs(TILTS) > 20
    assert np.allclose(t["rlnDefocusU"][low], base["rlnDefocusU"][low])
    dmean = ((base["rlnDefocusU"] + base["rlnDefocusV"]) / 2)[low].mean()
    got = ((t["rlnDefocusU"] + t["rlnDefocusV"]) / 2)[high]
    assert np.allclose(got, dmean, atol=1.0)
    assert set(t["subtomoCtfSource"][high]) == {"lower_tilts"}


def test_job_update_single_image_keeps_the_rest(fitted_project):
    root, ctx = fitted_project
    base = read_star_table(ctx.path("TS01_ctffind.star"))
    path = ctx.path("TS01_ctffind.star")
    edited = base.copy()
    edited.loc[0, "rlnDefocusU"] = 12345.0  # a manual edit (Step 10) survives an update of another image
    from subtomo.io.star import write_star

    write_star(path, {"TS01": edited})
    ctx2 = run_ctf(root, update=ctx.name, tomo=["TS01"], image=[4], defocus_step=250.0)
    t = read_star_table(ctx2.path("TS01_ctffind.star"))
    assert t["rlnDefocusU"][0] == 12345.0
    others = [i for i in range(7) if i != 3]
    assert np.allclose(t["rlnDefocusU"][others], edited["rlnDefocusU"][others])
    assert abs((t["rlnDefocusU"][3] + t["rlnDefocusV"][3]) / 2 - TRUE_D[3]) < 500
    write_star(path, {"TS01": base})
    with pytest.raises(SubtomoError, match="--image needs --update"):
        run_ctf(root, tomo=["TS01"], image=[4])


def test_job_skip_ctf_and_imports(fitted_project, tmp_path):
    root, _ = fitted_project
    ctx = run_ctf(root, skip_ctf=True)
    t = read_star_table(ctx.path("TS01_ctffind.star"))
    assert (t["rlnDefocusU"] == 0).all() and (t["rlnDefocusV"] == 0).all()
    assert read_star_table(ctx.path("ctf_tomograms.star"))["subtomoSkipCtf"].tolist() == [1]
    # CTFFIND4 text in a directory, named after the tomogram
    res = root / "ctffind_results"
    res.mkdir(exist_ok=True)
    rows = "".join(f"{i + 1} {20000 + i} {19000 + i} 12.5 0.0 0.05 9.5\n" for i in range(7))
    _write(res / "TS01_ctffind4.txt", "# Output from CTFFind version 4.1.8\n" + rows)
    ctx = run_ctf(root, import_ctffind="ctffind_results")
    t = read_star_table(ctx.path("TS01_ctffind.star"))
    assert t["rlnDefocusU"].tolist() == [20000 + i for i in range(7)]
    assert t["rlnDefocusAngle"].tolist() == [12.5] * 7 and t["rlnCtfMaxResolution"].tolist() == [9.5] * 7
    _write(res / "TS01_ctffind4.txt", rows[: rows.index("\n") + 1])
    with pytest.raises(SubtomoError, match="1 CTFFIND rows but the tilt series has 7"):
        run_ctf(root, import_ctffind="ctffind_results")
    _write(root / "imod_TS01.defocus", "1 0 0. 0. 0 3\n1 7 -45 45 2500 2600 100\n")
    ctx = run_ctf(root, import_imod="imod_{name}.defocus")
    t = read_star_table(ctx.path("TS01_ctffind.star"))
    assert np.allclose(t["rlnDefocusU"], 26000.0) and np.allclose(t["rlnDefocusAngle"], 10.0)


def test_job_use_trials(tmp_path):
    root = tmp_path / "wrong"
    make_project(root, trials=15)
    with pytest.raises(SubtomoError, match=r"TS01\.trial: holds 15 trial images .* exactly 2 per tilt \(14\)"):
        run_ctf(root, use_trials=True)
    root = tmp_path / "good"
    make_project(root, trials=14, noise_stack=True)
    ctx = run_ctf(root, use_trials=True)
    t = read_star_table(ctx.path("TS01_ctffind.star"))
    mean = (t["rlnDefocusU"] + t["rlnDefocusV"]).to_numpy() / 2
    # the trials are 1000 A more underfocused than the (pure-noise) stack: their mean is used
    assert np.all(np.abs(mean - (TRUE_D + 1000)) < 500), mean - TRUE_D - 1000
    assert t["subtomoCtfFitFailed"].sum() == 0 and set(t["subtomoCtfSource"]) == {"trials"}
    plain = run_ctf(root)
    assert read_star_table(plain.path("TS01_ctffind.star"))["subtomoCtfFitFailed"].sum() >= 6
    # no Thon rings at low tilt: the CTF is unknown (said in ctf_tomograms.star), and prepare refuses it
    tomos = read_star_table(plain.path("ctf_tomograms.star"))
    assert tomos["subtomoCtfUnknown"].tolist() == [1] and tomos["subtomoCtfReplacedByTrend"].tolist() == [0]
    from subtomo.jobs import prepare

    with pytest.raises(SubtomoError, match="CTF is unknown.*--skip-ctf"):
        execute(prepare.SPEC, prepare.PrepareParams(i=str(plain.path("ctf_tomograms.star"))), root, quiet=True)


# ----------------------------------------------------------------------------- guards of the fast paths

def test_fast_ctf2_equals_model():
    """The hot-loop CTF² of estimate.py is RELION's CTF (subtomo.ctf.model) squared."""
    from subtomo.ctf.model import ctf_from_defocus
    from subtomo.ctf.model import ctf_squared as _ctf2

    s2 = torch.linspace(0, 0.25 ** 2, 2001, dtype=torch.float64)
    for optics in (OPTICS, Optics(200.0, 0.01, 0.1, 1.0), Optics(300.0, 2.7, 0.0, 5.0)):
        for d in (5000.0, 23456.0, 60000.0):
            ref = ctf_from_defocus(s2, torch.tensor(d, dtype=torch.float64), optics.voltage_kV, optics.cs_mm,
                                   optics.amplitude_contrast) ** 2
            assert torch.allclose(_ctf2(s2, torch.tensor(d, dtype=torch.float64), optics), ref, atol=1e-9)


def test_running_mean_over_one_period_removes_ctf2_oscillation():
    """Background by a running mean over one CTF period: the mean of CTF² is 1/2 on unevenly
    spaced bins (uniform in s, not in phase), so a smooth background plus rings leaves the
    rings minus 1/2 (the CTFFIND-like pre-processing the defocus search relies on)."""
    from subtomo.ctf.estimate import _window_matrix
    from subtomo.ctf.model import ctf_squared as _ctf2
    from subtomo.ctf.model import phase_periods as _phase_periods

    s = torch.linspace(1 / 30, 1 / 8, 400, dtype=torch.float64)
    d = torch.tensor(25000.0, dtype=torch.float64)
    u = _phase_periods(s ** 2, d, OPTICS)
    W = _window_matrix(u)
    c = _ctf2(s ** 2, d, OPTICS)
    inner = (u > u[0] + 0.5) & (u < u[-1] - 0.5)  # full windows only
    assert torch.allclose((W @ c)[inner], torch.full_like(c[inner], 0.5), atol=5e-3)
    bg = 3.0 - 20 * s + 40 * s ** 2  # smooth on the scale of a ring
    assert float((bg - W @ bg)[inner].abs().max()) < 0.02  # vs. a ring amplitude of 0.5 and a 1.8 drop of bg


def test_consistency_flags_a_planted_wrong_defocus():
    import pandas as pd

    from subtomo.ctf.series import flag_inconsistent_defoci

    tilts = np.arange(-60.0, 61.0, 6.0)
    rng = np.random.default_rng(3)
    d = 32000.0 + 300 * rng.standard_normal(len(tilts)) + 20 * tilts  # smooth trend + jitter
    d[16] += 4500.0  # one wrong ring order
    failed = np.zeros(len(tilts), int)
    failed[3] = 1  # already failed: stays failed and is not part of the trend
    d[3] = 8000.0
    table = pd.DataFrame({"rlnTomoNominalStageTiltAngle": tilts, "rlnDefocusU": d + 200, "rlnDefocusV": d - 200,
                          "subtomoCtfFitFailed": failed})
    out, msgs = flag_inconsistent_defoci(table, 2000.0)
    assert out["subtomoCtfFitFailed"].tolist() == [int(i in (3, 16)) for i in range(len(tilts))]
    assert np.allclose(out["rlnDefocusU"], table["rlnDefocusU"])  # the fitted value is kept
    assert len(msgs) == 1 and msgs[0].startswith("image 17 (tilt 36.0 deg)")
    # only the re-estimated rows are checked; 0 disables the check
    assert flag_inconsistent_defoci(table, 2000.0, rows=[0, 1])[1] == []
    assert flag_inconsistent_defoci(table, 0.0)[0]["subtomoCtfFitFailed"].sum() == 1


def test_job_flags_inconsistent_image_and_lower_tilt_mean_skips_it(tmp_path):
    """A fit far from its neighbours is flagged (value kept) and left out of the lower-tilt mean."""
    root = tmp_path / "p"
    make_project(root)
    ctx = run_ctf(root, max_defocus_deviation=2500.0)
    t = read_star_table(ctx.path("TS01_ctffind.star"))
    assert t["subtomoCtfFitFailed"].sum() == 0
    # plant a wrong value by hand, then re-fit another image: the planted one is not re-checked
    # (manual override, Step 10), but a fresh fit of it is compared with its neighbours
    from subtomo.io.star import write_star

    t.loc[3, ["rlnDefocusU", "rlnDefocusV"]] = [40000.0, 40000.0]
    write_star(ctx.path("TS01_ctffind.star"), {"TS01": t})
    ctx2 = run_ctf(root, update=ctx.name, tomo=["TS01"], image=[3], max_defocus_deviation=2500.0)
    t2 = read_star_table(ctx2.path("TS01_ctffind.star"))
    assert t2["subtomoCtfFitFailed"].sum() == 0 and t2["rlnDefocusU"][3] == 40000.0
    from subtomo.ctf.series import apply_lower_tilt_defoci, flag_inconsistent_defoci

    flagged, msgs = flag_inconsistent_defoci(t2, 2500.0)
    assert flagged["subtomoCtfFitFailed"].tolist() == [0, 0, 0, 1, 0, 0, 0] and "image 4" in msgs[0]
    out, _, _ = apply_lower_tilt_defoci(flagged, 20.0)
    low_ok = [2, 4]  # |tilt| < 20 and not flagged
    expect = ((t2["rlnDefocusU"] + t2["rlnDefocusV"]) / 2)[low_ok].mean()
    assert abs((out["rlnDefocusU"][0] + out["rlnDefocusV"][0]) / 2 - expect) < 1.0
    assert out["subtomoCtfFitFailed"][3] == 1 and out["rlnDefocusU"][3] == 40000.0


# ----------------------------------------------------------------------------- the one CTF phase

def test_chi_analytic_value_and_ctf_zeros():
    """chi at one frequency by hand, and the CTF vanishes where chi = atan(Q0 / sqrt(1 - Q0²)) - k pi."""
    import math

    from subtomo.ctf.model import chi, cs_to_angstrom, ctf_from_defocus, electron_wavelength_A

    lam = electron_wavelength_A(300.0)
    assert lam == pytest.approx(0.019687, abs=1e-6)  # 300 kV
    assert cs_to_angstrom(2.7) == 2.7e7
    s2 = torch.tensor([0.01], dtype=torch.float64)  # (1/10 Å)²
    expect = -math.pi * lam * 20000.0 * 0.01 + 0.5 * math.pi * 2.7e7 * lam ** 3 * 0.01 ** 2
    assert float(chi(s2, 20000.0, 300.0, 2.7)) == pytest.approx(expect, rel=1e-12)
    assert float(chi(s2, 20000.0, 300.0, 2.7, phase_shift_deg=90.0)) == pytest.approx(expect - math.pi / 2, rel=1e-12)
    # zeros without Cs: pi lam D s² = k pi + atan(Q0/sqrt(1-Q0²)), k = 0, 1, ...
    q0, d = 0.07, 25000.0
    alpha = math.atan2(q0, math.sqrt(1 - q0 * q0))
    for k in range(1, 6):
        s2_zero = torch.tensor([(k * math.pi - alpha) / (math.pi * lam * d)], dtype=torch.float64)
        assert abs(float(ctf_from_defocus(s2_zero, torch.tensor(d, dtype=torch.float64), 300.0, 0.0, q0))) < 1e-9
        just_off = s2_zero * 1.01
        assert abs(float(ctf_from_defocus(just_off, torch.tensor(d, dtype=torch.float64), 300.0, 0.0, q0))) > 1e-3
    # at s = 0 only the amplitude contrast remains: -(sqrt(1-Q0²) sin 0 - Q0 cos 0) = Q0
    assert float(ctf_from_defocus(torch.zeros(1, dtype=torch.float64), torch.tensor(d), 300.0, 2.7, q0)) == pytest.approx(q0)


def test_one_optics_for_estimation_3d_models_and_simulator():
    from subtomo.ctf import estimate, model
    from subtomo.simulate import tiltseries

    assert estimate.Optics is model.Optics and tiltseries.Optics is model.Optics
    assert model.Optics(300.0, 2.7, 0.07, 2.0).cs_A == 2.7e7


# ----------------------------------------------------------------------------- the series' defocus trend

def _series_table(defocus_A: np.ndarray, tilts: np.ndarray, dose: np.ndarray, failed=None):
    import pandas as pd

    n = len(tilts)
    return pd.DataFrame({
        "rlnMicrographName": [f"{i + 1}@s.mrcs" for i in range(n)], "rlnTomoNominalStageTiltAngle": tilts,
        "rlnMicrographPreExposure": dose, "rlnDefocusU": defocus_A + 250.0, "rlnDefocusV": defocus_A - 250.0,
        "rlnDefocusAngle": np.full(n, 30.0), "rlnCtfFigureOfMerit": np.ones(n), "rlnCtfMaxResolution": np.full(n, 10.0),
        "subtomoCtfFitFailed": np.zeros(n, int) if failed is None else np.asarray(failed, int),
        "subtomoCtfSignificance": np.full(n, 10.0), "subtomoCtfSource": ["fit"] * n,
    })


def _dose_symmetric_series(seed: int, drift_A: float):
    """41 tilts (-60..60, 3 deg, dose-symmetric), true defocus 30000 Å + a drift over the acquisition,
    and fits scattered by 150 Å / cos(tilt)."""
    from subtomo.simulate.tiltseries import tilt_scheme

    tilts, acq = tilt_scheme(-60.0, 60.0, 3.0, "dose-symmetric")
    true = 30000.0 + drift_A * acq / acq.max()
    rng = np.random.default_rng(seed)
    fitted = true + 150.0 * rng.standard_normal(len(tilts)) / np.cos(np.radians(tilts))
    return tilts, 3.0 * acq, true, fitted


def test_trend_flags_a_planted_high_tilt_outlier_and_replaces_it_by_the_trend():
    from subtomo.ctf.trend import check_against_trend

    for seed, drift in ((0, 0.0), (1, 2000.0)):
        tilts, dose, true, fitted = _dose_symmetric_series(seed, drift)
        wrong = int(np.flatnonzero(tilts == 54.0)[0])
        fitted[wrong] = true[wrong] + 3000.0  # a neighbouring ring order at high tilt
        check = check_against_trend(_series_table(fitted, tilts, dose))
        assert check.flagged == [wrong], check.messages
        t = check.table
        assert t["subtomoCtfFitFailed"].tolist() == [int(i == wrong) for i in range(len(tilts))]
        assert t["subtomoCtfSource"][wrong] == "trend" and check.replaced == [wrong]
        replaced = (t["rlnDefocusU"][wrong] + t["rlnDefocusV"][wrong]) / 2
        assert abs(replaced - check.trend.predict(tilts[wrong:wrong + 1], dose[wrong:wrong + 1] / dose.max())[0]) < 1e-6
        assert abs(replaced - true[wrong]) < 400  # the trend, not the plain mean (~ 31000 Å with the drift)
        assert t["rlnDefocusU"][wrong] - t["rlnDefocusV"][wrong] == pytest.approx(500.0)  # the series' astigmatism
        others = np.arange(len(tilts)) != wrong
        assert np.allclose(t["rlnDefocusU"][others], fitted[others] + 250.0)
        assert "image" in check.messages[0] and "tilt 54.0" in check.messages[0]


def test_smooth_acquisition_drift_keeps_the_fitted_values():
    from subtomo.ctf.trend import check_against_trend

    for seed in range(3):
        tilts, dose, true, fitted = _dose_symmetric_series(seed, 2000.0)
        check = check_against_trend(_series_table(fitted, tilts, dose))
        assert check.flagged == [] and check.replaced == [] and not check.unknown
        assert np.array_equal(check.table["rlnDefocusU"].to_numpy(), fitted + 250.0)
        # the plain mean would be off by up to 1000 Å at the ends of the acquisition; the trend is not
        err = check.trend.predict(tilts, dose / dose.max()) - true
        assert np.abs(err).max() < 300


def test_failed_fits_get_the_trend_and_no_low_tilt_success_means_unknown():
    from subtomo.ctf.series import apply_lower_tilt_defoci
    from subtomo.ctf.trend import check_against_trend

    tilts, dose, true, fitted = _dose_symmetric_series(2, 2000.0)
    failed = np.abs(tilts) > 45
    fitted[failed] = 9000.0  # garbage of failed fits
    check = check_against_trend(_series_table(fitted, tilts, dose, failed))
    assert sorted(check.replaced) == list(np.flatnonzero(failed)) and check.flagged == []
    got = ((check.table["rlnDefocusU"] + check.table["rlnDefocusV"]) / 2)[failed]
    assert np.abs(got - true[failed]).max() < 600
    # no successful fit with |tilt| <= 30: the CTF is unknown, nothing is replaced, no mean of failed fits
    failed = np.abs(tilts) <= 30
    table = _series_table(fitted, tilts, dose, failed)
    check = check_against_trend(table)
    assert check.unknown and check.replaced == [] and check.table["rlnDefocusU"].equals(table["rlnDefocusU"])
    with pytest.raises(SubtomoError, match="CTF is unknown.*--skip-ctf"):
        apply_lower_tilt_defoci(table, 30.0)


def test_one_wrong_high_tilt_fit_does_not_set_a_slope():
    """Only low-tilt fits succeeded, plus one wrong fit at -39 deg late in the acquisition: the
    trend stays the robust mean instead of a slope through that one point (terms need 3 fits
    at each end of their variable)."""
    from subtomo.ctf.trend import check_against_trend, supported_terms

    tilts, dose, true, fitted = _dose_symmetric_series(4, 0.0)
    failed = np.abs(tilts) > 24
    lone = int(np.flatnonzero(tilts == -39.0)[0])
    failed[lone] = False
    fitted[lone] = true[lone] + 2500.0
    acq = dose / dose.max()
    assert supported_terms(tilts[~failed], acq[~failed], tilts) == [0]
    check = check_against_trend(_series_table(fitted, tilts, dose, failed))
    assert check.trend.terms == (0,)
    got = ((check.table["rlnDefocusU"] + check.table["rlnDefocusV"]) / 2)[failed]
    assert np.abs(got - 30000.0).max() < 150
