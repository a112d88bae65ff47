"""3D classification: two synthetic conformations separate; K = 1 agrees with refine3d's reconstruction;
--ref with K > 1 and local/global searches (regression); the job's defaults and select on its output."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from subtomo.em import sampling
from subtomo.em.classify import ClassifyOptions, ClassifyState, class_decided_in_fine_pass, classify3d
from subtomo.em.gold_standard import split_halves
from subtomo.em.iteration import InMemorySource
from subtomo.em.maps import lowpass_map, particle_mask
from subtomo.em.oracle import oracle_reconstruction
from subtomo.errors import SubtomoError
from subtomo.fourier import fsc_maps
from subtomo.geometry.euler import matrix_to_euler
from subtomo.io.mrc import write_mrc
from subtomo.io.particles import ParticleSet
from subtomo.io.star import read_star, write_star
from subtomo.jobs._em_runs import ClassifyFiles, resume_state
from subtomo.jobs.base import execute
from subtomo.jobs.class3d import SPEC as C3D_SPEC
from subtomo.jobs.class3d import Class3DParams
from subtomo.jobs.pipeline import STATUS_SUCCEEDED, Pipeline, Process
from subtomo.jobs.select import SPEC as SELECT_SPEC
from subtomo.jobs.select import SelectParams
from subtomo.testing.synthetic import blob_reference, make_set, two_class_set

torch.set_num_threads(1)


def _two_class_set():
    return two_class_set(n_per=24, box=24, pixel_size_A=10.0, snr=2.0, seed=21)


def test_focused_style_classification_separates_classes(tmp_path):
    vols, ctfs, rot, truth, diam = _two_class_set()
    src = InMemorySource(vols, 10.0, ctfs)
    opts = ClassifyOptions(n_classes=2, particle_diameter_A=diam, n_iter=5, skip_align=True, batch_size=16, seed=0,
                           ini_high_A=40)
    table = pd.DataFrame({"rlnImageName": [f"p{i}.mrc" for i in range(len(rot))], "rlnImagePixelSize": 10.0})
    files = ClassifyFiles(tmp_path, ParticleSet.from_table(table), 10.0)
    res = classify3d(src, opts, initial_rot=rot, log=lambda m: None, on_iteration=files)
    files.gallery(res.model, res.iterations)
    cls = res.poses.cls
    acc = max((cls == truth).mean(), (cls != truth).mean())
    assert acc >= 0.9
    assert abs(float(res.class_priors.sum()) - 1) < 1e-5
    assert [r.iteration for r in res.history] == [1, 2, 3, 4, 5]
    model = read_star(tmp_path / "run_it005_model.star")
    assert abs(model["model_classes"]["rlnClassDistribution"].sum() - 1) < 1e-5
    assert (tmp_path / "run_it005_class002.mrc").exists() and (tmp_path / "run_it005_classes.png").exists()
    data = read_star(tmp_path / "run_it005_data.star")["particles"]
    assert set(data["rlnClassNumber"]) <= {1, 2}


def test_k1_map_matches_refine3d_reconstruction(tmp_path):
    ds = make_set(n=30, box=24, pixel_size_A=10.0, snr=3.0, seed=4, max_offset_px=0.0)
    src = InMemorySource(ds.volumes, ds.pixel_size_A, ds.ctfs)
    opts = ClassifyOptions(n_classes=1, particle_diameter_A=ds.diameter_A, n_iter=1, skip_align=True, batch_size=16,
                           ini_high_A=20.0, tau2_fudge=1000.0)  # weak prior: the data decide
    res = classify3d(src, opts, initial_rot=ds.rot, log=lambda m: None)
    assert not any(tmp_path.iterdir())  # the engine writes nothing
    orc = oracle_reconstruction(src, ds.rot, np.zeros((30, 3)), split_halves(None, 30, 0), diameter_A=ds.diameter_A)
    mask = particle_mask(24, ds.diameter_A, ds.pixel_size_A, "cpu")  # class3d flattens the solvent
    f = fsc_maps(res.maps[0], orc.map * mask)
    assert float(f[1:8].mean()) > 0.97
    assert float(res.class_priors[0]) == 1.0


def test_reference_with_k2_local_and_global_searches(tmp_path):
    """Regression: --ref with K > 1 (first iteration one reference per random class) crashed with
    IndexError in the E-step for local and global searches (K-long class prior, one map)."""
    vols, ctfs, rot, truth, diam = _two_class_set()
    src = InMemorySource(vols, 10.0, ctfs)
    ref = (blob_reference(24, np.random.default_rng(21)) + blob_reference(24, np.random.default_rng(22))) / 2
    for local, order in ((True, 1), (False, 0)):
        opts = ClassifyOptions(n_classes=2, particle_diameter_A=diam, n_iter=2, local=local, healpix_order=order,
                               sigma_ang_deg=5.0, offset_range_px=1.0, offset_step_px=2.0, batch_size=16,
                               ini_high_A=40)
        res = classify3d(src, opts, initial_ref=ref, initial_rot=rot, log=lambda m: None)
        assert res.iterations == 2 and res.maps.shape == (2, 24, 24, 24)
        assert set(np.unique(res.poses.cls)) <= {0, 1}
        assert abs(float(res.class_priors.sum()) - 1) < 1e-5
        assert torch.isfinite(res.maps).all()


def _fake_refined_project(root: Path, vols, rot, classes_truth):
    """Extract + Refine3D jobs on disk (subtomograms, run_data.star with poses, run_class001.mrc)."""
    ex, rf = "Extract/job002", "Refine3D/job003"
    rows = []
    for i, v in enumerate(vols):
        name = f"{ex}/Particles/Tomograms/TS_01/TS_01{i + 1:06d}.mrc"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        write_mrc(root / name, v.numpy(), 10.0)
        rows.append({"rlnMicrographName": "Tomograms/TS_01/TS_01.mrc", "rlnTomoName": "TS_01",
                     "rlnCoordinateX": 10.0 * i, "rlnCoordinateY": 5.0, "rlnCoordinateZ": 7.0,
                     "rlnTomoParticleId": i + 1, "rlnImageName": name, "rlnOpticsGroup": 1})
    optics = pd.DataFrame({"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1], "rlnVoltage": [300.0],
                           "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.07],
                           "rlnImagePixelSize": [10.0], "rlnImageSize": [24], "rlnImageDimensionality": [3]})
    parts = pd.DataFrame(rows)
    write_star(root / ex / "particles_subtomo.star", {"optics": optics, "particles": parts})
    rot_a, tilt_a, psi_a = matrix_to_euler(rot).T
    refined = parts.assign(rlnAngleRot=rot_a, rlnAngleTilt=tilt_a, rlnAnglePsi=psi_a, rlnOriginXAngst=0.0,
                           rlnOriginYAngst=0.0, rlnOriginZAngst=0.0)
    (root / rf).mkdir(parents=True)
    write_star(root / rf / "run_data.star", {"optics": optics, "particles": refined})
    write_mrc(root / rf / "run_class001.mrc", vols.mean(0).numpy(), 10.0)
    pipe = Pipeline(root)
    pipe.add(Process(f"{ex}/", "Extract", STATUS_SUCCEEDED, outputs=[(f"{ex}/particles_subtomo.star", "ParticlesData")]))
    pipe.add(Process(f"{rf}/", "Refine3D", STATUS_SUCCEEDED, outputs=[(f"{rf}/run_data.star", "ParticlesData"),
                                                                      (f"{rf}/run_class001.mrc", "DensityMap")]))
    pipe.save()
    return rf


def test_job_skip_align_defaults_to_refine3d_data_and_select_takes_a_class(tmp_path):
    """Steps 25 and 21: class3d --K 2 --skip-align reads the latest Refine3D run_data.star by
    default (RELION option names), and subtomo select --classes 1 keeps exactly that class."""
    vols, _, rot, truth, diam = _two_class_set()
    rf = _fake_refined_project(tmp_path, vols, rot, truth)
    ctx = execute(C3D_SPEC, Class3DParams(K=2, iter=3, tau2_fudge=4.0, particle_diameter=diam, skip_align=True,
                                          ctf=False, ini_high=40.0, threads=1), tmp_path, quiet=True)
    assert f"{rf}/run_data.star" in [str(Path(p)) for p in ctx.inputs]
    data_name = "run_it003_data.star"
    data = read_star(ctx.dir / data_name)["particles"]
    cls = data["rlnClassNumber"].to_numpy() - 1
    assert max((cls == truth).mean(), (cls != truth).mean()) >= 0.9
    assert np.allclose(data["rlnAngleTilt"], matrix_to_euler(rot)[:, 1], atol=1e-3)  # poses kept
    sel = execute(SELECT_SPEC, SelectParams(i=f"{ctx.name}{data_name}", classes=[1]), tmp_path, quiet=True)
    out = read_star(sel.dir / "particles_selected.star")["particles"]
    assert len(out) == int((cls == 0).sum()) and set(out["rlnClassNumber"]) == {1}
    assert list(out["rlnImageName"]) == list(data["rlnImageName"][cls == 0])
    # without poses --skip-align is refused with a clear error
    with pytest.raises(SubtomoError, match="need input poses"):
        execute(C3D_SPEC, Class3DParams(i="Extract/job002/particles_subtomo.star", K=2, iter=1, particle_diameter=diam,
                                        skip_align=True, ctf=False), tmp_path, quiet=True)


def test_focused_mask_over_one_region_separates_classes(tmp_path):
    """Focused classification: an off-centre mask (reference frame) restricts the comparison to one
    region; the classes still separate with poses fixed. (The masking of references rather than
    data matters on the planted-heterogeneity benchmark, bench/bench_class3d.py, not at this size.)"""
    vols, ctfs, rot, truth, diam = _two_class_set()
    src = InMemorySource(vols, 10.0, ctfs)
    z, y, x = torch.meshgrid(*[torch.arange(24.0)] * 3, indexing="ij")
    r = ((x - 14) ** 2 + (y - 12) ** 2 + (z - 12) ** 2).sqrt()
    focus = (0.5 + 0.5 * torch.cos(torch.pi * ((r - 6) / 3).clamp(0, 1))).float()
    opts = ClassifyOptions(n_classes=2, particle_diameter_A=diam, n_iter=4, skip_align=True, batch_size=16, seed=0,
                           ini_high_A=40, focus_mask=focus)
    res = classify3d(src, opts, initial_rot=rot, log=lambda m: None)
    cls = res.poses.cls
    assert max((cls == truth).mean(), (cls != truth).mean()) >= 0.9
    assert float(res.maps.abs().sum((1, 2, 3)).min()) > 0  # full maps are reconstructed, not only the region


def test_continue_from_the_saved_state_gives_the_same_classes(tmp_path):
    """--continue-job: the state written after iteration 2 and read back continues to the same result."""
    vols, ctfs, rot, truth, diam = _two_class_set()
    src = InMemorySource(vols[::2], 10.0, ctfs[::2])
    opts = ClassifyOptions(n_classes=2, particle_diameter_A=diam, n_iter=3, healpix_order=0, offset_range_px=1.0,
                           batch_size=12, ini_high_A=40)
    full = classify3d(src, opts, log=lambda m: None)
    table = pd.DataFrame({"rlnImageName": [f"p{i}.mrc" for i in range(src.n)], "rlnImagePixelSize": 10.0})
    part = classify3d(src, opts, log=lambda m: None, stop_after=2,
                      on_iteration=ClassifyFiles(tmp_path, ParticleSet.from_table(table), 10.0))
    assert part.stopped and part.iterations == 2 and (tmp_path / "run_it002_optimiser.pt").exists()
    state = resume_state(tmp_path, ClassifyState.from_dict, "cpu", lambda m: None)
    cont = classify3d(src, opts, log=lambda m: None, resume=state)
    assert cont.iterations == 3
    torch.testing.assert_close(cont.maps, full.maps, atol=1e-5, rtol=1e-4)
    np.testing.assert_array_equal(cont.poses.cls, full.poses.cls)


def _subunit_variant_set(n_full: int = 16, n_variant: int = 8, box: int = 20, snr: float = 5.0):
    """A small version of issue 22's case: an asymmetric particle (Gaussian blobs) and its variant
    lacking a compact subunit at one end (18 % of the mass), a third of the particles, random
    poses and offsets, box 20 at 10 A/px (Nyquist-limited), a sharp posterior (Pmax ~ 1)."""
    rng = np.random.default_rng(3)
    ax = torch.arange(box, dtype=torch.float32) - box // 2
    z, y, x = torch.meshgrid(ax, ax, ax, indexing="ij")

    def blob(c, s):
        return torch.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * s * s))

    centres = []
    while len(centres) < 8:
        c = rng.uniform(-0.25 * box, 0.25 * box, 3)
        if np.linalg.norm(c) < 0.25 * box:
            centres.append(c)
    core = sum(blob(c, 0.07 * box) for c in centres)
    full = core + 1.2 * blob(np.array([0.0, 0.0, 0.28 * box]), 0.08 * box)
    scale = float(full.std())
    full, variant = full / scale, core / scale
    sa = make_set(n=n_full, box=box, pixel_size_A=10.0, snr=snr, seed=1, reference=full, max_offset_px=1.0)
    sb = make_set(n=n_variant, box=box, pixel_size_A=10.0, snr=snr, seed=2, reference=variant, max_offset_px=1.0)
    src = InMemorySource(torch.cat([sa.volumes, sb.volumes]), 10.0, torch.cat([sa.ctfs, sb.ctfs]))
    return (src, torch.stack([full, variant]), np.concatenate([sa.rot, sb.rot]),
            np.concatenate([sa.offset_px, sb.offset_px]), np.array([0] * n_full + [1] * n_variant), sa.diameter_A)


def _converged_run(**options) -> tuple[list[float], list[float]]:
    """Accuracy and median offset error per iteration of 3 iterations started from the converged state."""
    src, refs, rot, off, truth, diam = _subunit_variant_set()
    options = {"offset_step_px": 3.0, **options}  # fine step 1 px (RELION's layout: pass 2.0)
    opts = ClassifyOptions(n_classes=2, particle_diameter_A=diam, n_iter=3, healpix_order=2, local=True,
                           sigma_ang_deg=3.0, offset_range_px=2.0, batch_size=32,
                           ini_high_A=20.0, sigma_offset_px=1.0, **options)
    accuracy, offset_err = [], []

    def record(it) -> None:
        accuracy.append(float((it.poses.cls == truth).mean()))
        offset_err.append(float(np.median(np.linalg.norm(it.poses.offset_px - off, axis=1))))

    classify3d(src, opts, initial_ref=refs, initial_rot=rot, initial_offset_px=off, log=lambda m: None,
               on_iteration=record)
    assert len(accuracy) == 3
    return accuracy, offset_err


def test_translations_through_the_current_offset_keep_converged_classes_and_offsets():
    """Issue 22's mechanism, on a small version of its case: started from the converged state (the
    true maps, poses and offsets), RELION's translation children (coarse +- step/4) never contain the
    current offset, so every particle moves sqrt(3) step/4 = 0.87 px every other iteration; with a
    sharp posterior that forced move costs more log-likelihood than the class difference. The
    default layout (three children per axis, one on the current offset) keeps the converged state."""
    accuracy, offset_err = _converged_run()
    assert max(offset_err) < 0.25, offset_err  # the optimal offsets are kept
    assert min(accuracy) >= 0.9 and np.mean(accuracy) >= 0.95, accuracy
    _, offset_err = _converged_run(translations_through_centre=False, offset_step_px=2.0)
    assert max(offset_err) > 0.8, offset_err  # RELION's layout: particles are pushed off their optimum



def _sharp_particles_off_the_coarse_grid(**options) -> int:
    """How many of 24 particles of a sharp map (power to Nyquist) join a blurred copy of it in one global E-step.

    The poses lie on the fine (oversampled) grid, half a coarse step from the coarse points."""
    box, rng = 20, np.random.default_rng(3)
    ax = torch.arange(box, dtype=torch.float32) - box // 2
    z, y, x = torch.meshgrid(ax, ax, ax, indexing="ij")
    sharp = torch.zeros(box, box, box)
    for _ in range(30):
        c = rng.uniform(-0.3 * box, 0.3 * box, 3)
        if np.linalg.norm(c) < 0.3 * box:
            sharp += torch.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * 0.8 ** 2))
    sharp = sharp / sharp.std()
    children = sampling.global_rotations(2, "C1", rng=np.random.default_rng([0, 1])).children.numpy()  # iteration 1's
    rot = children[rng.integers(0, children.shape[0], 24), rng.integers(0, children.shape[1], 24)].astype(np.float64)
    ds = make_set(n=24, box=box, pixel_size_A=10.0, snr=1.0, seed=7, reference=sharp, rot=rot, max_offset_px=0.0)
    opts = ClassifyOptions(n_classes=2, particle_diameter_A=ds.diameter_A, n_iter=1, healpix_order=2, offset_range_px=0.0,
                           batch_size=32, ini_high_A=20.0, **options)
    res = classify3d(InMemorySource(ds.volumes, 10.0, ds.ctfs), opts, initial_ref=torch.stack([sharp, lowpass_map(sharp, 7.0)]),
                     initial_rot=rot, initial_offset_px=np.zeros((24, 3)), log=lambda m: None)
    return int((res.poses.cls == 1).sum())


def test_a_blurred_class_does_not_take_particles_from_a_sharp_class():
    """Issue 22's K = 3 failure (a spare class filled up with particles of a true class): in the coarse
    pass (15 deg, at full resolution on a small box) a particle half a coarse step off its pose fits a
    blurred map better than the sharp map of its own class, so a joint choice of the significant
    coarse points (RELION's) sends it to the blurred class and the fine pass never scores its class
    at the right pose. Chosen within each class (the default here: the fine step resolves the box), the
    fine pass decides."""
    assert _sharp_particles_off_the_coarse_grid() <= 2  # the default
    assert _sharp_particles_off_the_coarse_grid(significant_per_class=False) >= 8


def test_auto_class_choice_decides_in_the_fine_pass_only_where_its_step_resolves_the_box():
    """--class-choice auto: per class where the fine step resolves the box by RELION's coarse-size rule
    (7.5 deg for a 200 A particle in 32 px of 12 A, issue 22's asymmetric case, or 40 px of 8 A, the
    proteasome: 72 and 60 px), joint at 15 deg on the proteasome's 40 px (30 px)."""
    o75 = ClassifyOptions(n_classes=3, particle_diameter_A=200.0, healpix_order=sampling.order_for_step(7.5))
    o15 = dataclasses.replace(o75, healpix_order=sampling.order_for_step(15.0))
    assert class_decided_in_fine_pass(o75, 32, 12.0) and class_decided_in_fine_pass(o75, 40, 8.0)
    assert class_decided_in_fine_pass(dataclasses.replace(o75, local=True), 40, 8.0)
    assert not class_decided_in_fine_pass(o15, 40, 8.0)
    assert class_decided_in_fine_pass(o15, 32, 12.0)  # issue 22's asymmetric case at 15 deg: 36 px
    assert not class_decided_in_fine_pass(dataclasses.replace(o75, significant_per_class=False), 32, 12.0)
