"""``subtomo select``: exact class selection, 2D -> 3D mapping, clear errors with no trace."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from subtomo.errors import SubtomoError
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
                          "rlnCtfImage": f"{i:06d}@Prepare/job002/CtfModels/{t}_ctf.star",
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
