"""``subtomo select``: exact class selection, 2D -> 3D mapping, clear errors with no trace."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from subtomo.errors import SubtomoError
from subtomo.io.mrc import write_mrc
from subtomo.io.star import read_star, write_star
from subtomo.jobs.base import execute
from subtomo.jobs.pipeline import STATUS_SUCCEEDED, Pipeline, Process
from subtomo.jobs.select import SPEC, SelectParams, map_2d_to_3d

TOMOS = ("TS_01", "TS_02")
PER_TOMO = 15
K = 4


def _optics(dim: int) -> pd.DataFrame:
    return pd.DataFrame({"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1], "rlnVoltage": [300.0],
                         "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.07],
                         "rlnImagePixelSize": [4.5], "rlnImageSize": [32], "rlnImageDimensionality": [dim]})


def _make_project(root: Path, rng: np.random.Generator) -> dict:
    """Extract job (3D + 2D stars) and a Class2D job (data/model of two iterations) on disk."""
    ex = "Extract/job003"
    rows3, rows2 = [], []
    for t in TOMOS:
        for i in range(1, PER_TOMO + 1):
            img3 = f"{ex}/Particles/Tomograms/{t}/{t}{i:06d}.mrc"
            common = {"rlnMicrographName": f"Tomograms/{t}/{t}.mrc", "rlnTomoName": t,
                      "rlnCoordinateX": rng.uniform(0, 500), "rlnCoordinateY": rng.uniform(0, 500),
                      "rlnCoordinateZ": rng.uniform(0, 100), "rlnTomoParticleId": i}
            rows3.append({**common, "rlnImageName": img3,
                          "subtomoCtfModel": f"{i:06d}@Prepare/job002/CtfModels/{t}_ctf.star",
                          "rlnOriginXAngst": rng.normal(), "rlnOpticsGroup": 1})
            rows2.append({**common, "rlnImageName": f"{i:06d}@{ex}/Particles/Tomograms/{t}/{t}_proj2d.mrcs",
                          "rlnImageOriginalName": img3, "rlnOpticsGroup": 1})
    p3 = pd.DataFrame(rows3).sample(frac=1.0, random_state=1).reset_index(drop=True)  # 3D order differs from 2D
    p2 = pd.DataFrame(rows2)
    (root / ex).mkdir(parents=True)
    write_star(root / ex / "particles_subtomo.star", {"optics": _optics(3), "particles": p3})
    write_star(root / ex / "subtomo_proj2d.star", {"optics": _optics(2), "particles": p2})
    cl = "Class2D/job004"
    (root / cl).mkdir(parents=True)
    classes = rng.integers(1, K + 1, len(p2))
    classes[classes == 4] = 3  # class 4 exists in the model but is empty
    for it, cls in ((1, rng.integers(1, K + 1, len(p2))), (2, classes)):
        d = p2.copy()
        d["rlnClassNumber"] = cls
        d["rlnAnglePsi"] = rng.uniform(0, 360, len(d))
        write_star(root / cl / f"run_it{it:03d}_data.star", {"optics": _optics(2), "particles": d})
        frac = np.array([(cls == k).mean() for k in range(1, K + 1)])
        model = pd.DataFrame({"rlnReferenceImage": [f"{k:06d}@{cl}/run_it{it:03d}_classes.mrcs" for k in range(1, K + 1)],
                              "rlnClassDistribution": frac, "rlnEstimatedResolution": [20.0, 35.0, 18.0, 999.0]})
        write_star(root / cl / f"run_it{it:03d}_model.star", {"model_general": {"rlnNrClasses": K}, "model_classes": model})
    pipe = Pipeline(root)
    pipe.add(Process(f"{ex}/", "Extract", STATUS_SUCCEEDED, outputs=[(f"{ex}/particles_subtomo.star", "ParticlesData"),
                                                                      (f"{ex}/subtomo_proj2d.star", "ParticlesData")]))
    pipe.add(Process(f"{cl}/", "Class2D", STATUS_SUCCEEDED, outputs=[(f"{cl}/run_it002_data.star", "ParticlesData")]))
    pipe.save()
    return {"p3": p3, "p2": p2, "classes": classes, "class_dir": root / cl}


@pytest.fixture()
def project(tmp_path):
    info = _make_project(tmp_path, np.random.default_rng(0))
    info["root"] = tmp_path
    return info


def _run(root: Path, **kw):
    return execute(SPEC, SelectParams(**kw), root, quiet=True)


def test_select_2d_classes_exact_and_mapped_to_3d(project):
    root = project["root"]
    ctx = _run(root, classes=[1, 3])  # default input: Class2D's last iteration
    keep = np.isin(project["classes"], [1, 3])
    sel2 = read_star(ctx.dir / "subtomo_proj2d_sel.star")
    got2 = sel2["particles"]
    assert list(got2["rlnImageName"]) == list(project["p2"]["rlnImageName"][keep])
    assert set(got2["rlnClassNumber"]) <= {1, 3}
    assert int(sel2["optics"]["rlnImageDimensionality"].iloc[0]) == 2
    out3 = read_star(ctx.dir / "output_2Dto3D.star")
    got3 = out3["particles"]
    p3 = project["p3"]
    want = set(project["p2"]["rlnImageOriginalName"][keep])
    expect3 = p3[p3["rlnImageName"].isin(want)]
    assert len(got3) == keep.sum()
    assert list(got3.columns) == list(p3.columns)  # every 3D column, no 2D column
    pd.testing.assert_frame_equal(got3.reset_index(drop=True), expect3.reset_index(drop=True), check_dtype=False)
    assert int(out3["optics"]["rlnImageDimensionality"].iloc[0]) == 3
    assert "Select/" in ctx.name
    # registered as an output node, so refine3d can default to it
    assert any(n.endswith("output_2Dto3D.star") for n, _ in ctx.outputs)


def test_fallback_mapping_by_tomogram_and_number(project):
    p2 = project["p2"].drop(columns=["rlnImageOriginalName", "rlnTomoParticleId"]).iloc[[0, 5, 20, 29]]
    p3 = project["p3"].drop(columns=["rlnTomoParticleId"])
    rows, how = map_2d_to_3d(p2, p3)
    assert how.startswith("tomogram")
    got = set(p3.iloc[rows]["rlnImageName"])
    assert got == set(project["p2"]["rlnImageOriginalName"].iloc[[0, 5, 20, 29]])


def test_rules(project):
    root = project["root"]
    classes = project["classes"]
    frac = np.array([(classes == k).mean() for k in range(1, K + 1)])
    ctx = _run(root, i=str(project["class_dir"] / "run_it002_model.star"), top_n_classes=1)
    got = read_star(ctx.dir / "subtomo_proj2d_sel.star")["particles"]
    assert set(got["rlnClassNumber"]) == {int(np.argmax(frac)) + 1}
    ctx = _run(root, max_class_resolution=25.0, map3d=False)
    got = read_star(ctx.dir / "subtomo_proj2d_sel.star")["particles"]
    assert set(got["rlnClassNumber"]) == {1, 3} and len(got) == np.isin(classes, [1, 3]).sum()
    assert not (ctx.dir / "output_2Dto3D.star").exists()
    thr = float(np.sort(frac)[-2])  # the two largest classes
    ctx = _run(root, min_class_fraction=thr, map3d=False)
    got = read_star(ctx.dir / "subtomo_proj2d_sel.star")["particles"]
    assert set(got["rlnClassNumber"]) == set(np.argsort(frac)[-2:] + 1)


def test_errors_leave_nothing(project):
    root = project["root"]
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    pipeline_before = (root / "default_pipeline.star").read_text()
    with pytest.raises(SubtomoError, match="5 do not exist"):
        _run(root, classes=[1, 5])
    with pytest.raises(SubtomoError, match="empty selection"):
        _run(root, classes=[4])  # class exists, holds no particle
    with pytest.raises(SubtomoError, match="empty selection"):
        _run(root, classes=[2], max_class_resolution=20.0)
    with pytest.raises(SubtomoError, match="nothing to select by"):
        _run(root)
    bad3 = project["p3"][project["p3"]["rlnTomoName"] == "TS_01"]  # TS_02 subtomograms missing
    write_star(root / "partial3d.star", {"optics": _optics(3), "particles": bad3})
    before.append(Path("partial3d.star"))
    with pytest.raises(SubtomoError, match="no subtomogram"):
        _run(root, classes=[1, 2, 3], particles3d="partial3d.star")
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == sorted(before)
    assert (root / "default_pipeline.star").read_text() == pipeline_before


def test_select_3d_class3d_data(project, tmp_path):
    root = project["root"]
    d = project["p3"].copy()
    d["rlnClassNumber"] = np.arange(len(d)) % 3 + 1
    d["rlnAngleRot"] = np.linspace(0, 300, len(d))
    (root / "Class3D/job005").mkdir(parents=True)
    write_star(root / "Class3D/job005/run_it025_data.star", {"optics": _optics(3), "particles": d})
    ctx = _run(root, i="Class3D/job005/run_it025_data.star", classes=[2])
    out = read_star(ctx.dir / "particles_selected.star")
    pd.testing.assert_frame_equal(out["particles"], d[d["rlnClassNumber"] == 2].reset_index(drop=True), check_dtype=False)
    assert not (ctx.dir / "output_2Dto3D.star").exists()
    with pytest.raises(SubtomoError, match="4 do not exist"):
        _run(root, i="Class3D/job005/run_it025_data.star", classes=[4])


# ----------------------------------------------------------------------------- automatic selection


def _disc(n: int, px: float, diameter_A: float, edge_A: float = 4.0) -> np.ndarray:
    yy, xx = np.mgrid[:n, :n] - n // 2
    r = np.hypot(yy, xx) * px
    return np.clip((diameter_A / 2 + edge_A / 2 - r) / edge_A, 0, 1)


def _particle_view(n: int, px: float, seed: int, noise: float) -> np.ndarray:
    """A structured particle-like projection: Gaussian lumps (7-12 Å) inside 75 Å, plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = (np.mgrid[:n, :n] - n // 2) * px
    img = np.zeros((n, n))
    for _ in range(14):
        r, a = 75 * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
        s = rng.uniform(7, 12)
        img += rng.uniform(0.5, 1.0) * np.exp(-((xx - r * np.cos(a)) ** 2 + (yy - r * np.sin(a)) ** 2) / (2 * s * s))
    return img + noise * rng.normal(size=(n, n))


def _class_averages(n: int = 48, px: float = 5.0) -> np.ndarray:
    """Classes: 1-3 particle views (3 noisy: a small, low-resolution class), 4 a gold bead, 5 a smooth blob, 6 noise."""
    rng = np.random.default_rng(7)
    yy, xx = (np.mgrid[:n, :n] - n // 2) * px
    bead = 8.0 * _disc(n, px, 100.0) - 1.5 * (_disc(n, px, 130.0) - _disc(n, px, 110.0))  # a bright disc with a fringe
    blob = 1.2 * np.exp(-(xx ** 2 + yy ** 2) / (2 * 25.0 ** 2))
    return np.stack([_particle_view(n, px, 1, 0.05), _particle_view(n, px, 2, 0.05), _particle_view(n, px, 3, 0.2),
                     bead + 0.05 * rng.normal(size=(n, n)), blob + 0.02 * rng.normal(size=(n, n)),
                     0.3 * rng.normal(size=(n, n))]).astype(np.float32)


def test_auto_keeps_a_worse_resolution_particle_class_and_rejects_the_bead():
    from subtomo.em.class_selection import score_classes

    images = _class_averages()
    counts = np.array([40, 35, 4, 8, 10, 3])
    s = score_classes(images, counts, 5.0, 180.0)
    assert list(s.keep) == [True, True, True, False, False, False], (s.verdict, s.score)
    assert s.verdict[3] == "bead-like" and s.contrast_ratio[3] > 3  # a compact very-high-contrast disc
    assert s.verdict[4] == "smooth blob" and s.detail_ratio[4] < 0.06
    assert s.verdict[5] == "noise/edge" and s.concentration[5] < 0.2
    assert 0.5 < s.contrast_ratio[0] < 2 and s.score[2] >= 0.5  # the small noisy class is still a particle
    # an empty class is never kept, whatever its image
    s2 = score_classes(images, np.array([40, 35, 4, 8, 10, 0]), 5.0, 180.0)
    assert s2.verdict[5] == "empty" and not s2.keep[5]


def test_select_auto_job_writes_scores_and_maps_kept_classes(project):
    root, cl = project["root"], project["class_dir"]
    images = _class_averages()
    K6 = len(images)
    rng = np.random.default_rng(3)
    p2 = project["p2"].copy()
    p2["rlnClassNumber"] = rng.choice(np.arange(1, K6 + 1), len(p2), p=[0.3, 0.3, 0.1, 0.1, 0.1, 0.1])
    write_mrc(cl / "run_it003_classes.mrcs", images, 5.0, stack=True)
    write_star(cl / "run_it003_data.star", {"optics": _optics(2), "particles": p2})
    frac = np.array([(p2["rlnClassNumber"] == k).mean() for k in range(1, K6 + 1)])
    # the bead's class has the best "resolution", the small particle class the worst
    model = pd.DataFrame({"rlnReferenceImage": [f"{k:06d}@{cl.relative_to(root)}/run_it003_classes.mrcs" for k in range(1, K6 + 1)],
                          "rlnClassDistribution": frac, "rlnEstimatedResolution": [30.0, 32.0, 80.0, 15.0, 60.0, 999.0]})
    write_star(cl / "run_it003_model.star", {"model_general": {"rlnNrClasses": K6}, "model_classes": model})
    ctx = _run(root, i=str(cl / "run_it003_data.star"), auto=True, particle_diameter=180.0)
    got = read_star(ctx.dir / "subtomo_proj2d_sel.star")["particles"]
    assert set(got["rlnClassNumber"]) == {1, 2, 3}
    assert len(read_star(ctx.dir / "output_2Dto3D.star")["particles"]) == np.isin(p2["rlnClassNumber"], [1, 2, 3]).sum()
    scores = read_star(ctx.dir / "class_scores.star")["class_scores"]
    assert list(scores["subtomoClassKept"]) == [1, 1, 1, 0, 0, 0]
    assert list(scores["subtomoClassVerdict"])[3:] == ["bead-like", "smooth blob", "noise/edge"]
    assert (ctx.dir / "selected_classes.png").exists()
    # --auto combines with other criteria: the largest two of the kept classes
    ctx = _run(root, i=str(cl / "run_it003_data.star"), auto=True, particle_diameter=180.0, top_n_classes=2, map3d=False)
    assert set(read_star(ctx.dir / "subtomo_proj2d_sel.star")["particles"]["rlnClassNumber"]) <= {1, 2}
    with pytest.raises(SubtomoError, match="particle-diameter"):
        _run(root, i=str(cl / "run_it003_data.star"), auto=True)  # no job.json beside the test's classification
