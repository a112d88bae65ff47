"""3D classification: two synthetic conformations separate; K = 1 agrees with refine3d's reconstruction."""

from __future__ import annotations

import numpy as np
import torch

from subtomo.em.classify import ClassifyOptions, classify3d
from subtomo.em.iteration import InMemorySource
from subtomo.em.refine import oracle, particle_mask, split_halves
from subtomo.em.synthetic import blob_reference, make_set
from subtomo.fourier import fsc_maps
from subtomo.io.star import read_star

torch.set_num_threads(1)


def _two_class_set():
    rng = np.random.default_rng(21)
    a = blob_reference(24, rng)
    b = blob_reference(24, rng)
    sa = make_set(n=24, box=24, pixel_size_A=10.0, snr=2.0, seed=1, reference=a, max_offset_px=0.0)
    sb = make_set(n=24, box=24, pixel_size_A=10.0, snr=2.0, seed=2, reference=b, max_offset_px=0.0)
    vols = torch.cat([sa.volumes, sb.volumes])
    ctfs = torch.cat([sa.ctfs, sb.ctfs])
    rot = np.concatenate([sa.rot, sb.rot])
    truth = np.array([0] * 24 + [1] * 24)
    return vols, ctfs, rot, truth, sa.diameter_A


def test_focused_style_classification_separates_classes(tmp_path):
    vols, ctfs, rot, truth, diam = _two_class_set()
    src = InMemorySource(vols, 10.0, ctfs)
    opts = ClassifyOptions(n_classes=2, particle_diameter_A=diam, n_iter=5, skip_align=True, batch_size=16, seed=0,
                           ini_high_A=40)
    res = classify3d(src, opts, tmp_path, initial_rot=rot, log=lambda m: None)
    cls = res["poses"].cls
    acc = max((cls == truth).mean(), (cls != truth).mean())
    assert acc >= 0.9
    assert abs(float(res["class_priors"].sum()) - 1) < 1e-5
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
    res = classify3d(src, opts, tmp_path, initial_rot=ds.rot, log=lambda m: None)
    orc = oracle(src, ds.rot, np.zeros((30, 3)), split_halves(None, 30, 0), diameter_A=ds.diameter_A)
    mask = particle_mask(24, ds.diameter_A, ds.pixel_size_A, "cpu")  # class3d flattens the solvent
    f = fsc_maps(res["maps"][0], orc["map"] * mask)
    assert float(f[1:8].mean()) > 0.97
    assert float(res["class_priors"][0]) == 1.0
