"""Scale-out (issue 19): the E-step as a map-reduce gives the in-process result, wherever its tasks run.

Tolerance stated: the same batches are scored wherever they run, so poses, classes and
Pmax are identical; the partial sums are added in a tree instead of one after another, so
the sums and maps agree to float32 rounding (max |diff| / max |value| < 1e-5).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pickle
import signal
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from subtomo.em import sampling
from subtomo.em.components import fourier_components
from subtomo.em.expectation import EStepOptions
from subtomo.em.iteration import InMemorySource, PassConfig, PoseTable, estep_pass
from subtomo.em.parallel import SerialRunner, contiguous_groups, tree_pairs, tree_reduce
from subtomo.errors import SubtomoError
from subtomo.geometry.euler import random_rotations
from subtomo.testing.synthetic import make_set, two_reference_estep_case

torch.set_num_threads(1)
HAVE_DASK = all(importlib.util.find_spec(m) is not None for m in ("dask", "distributed", "dask_jobqueue"))
needs_dask = pytest.mark.skipif(not HAVE_DASK, reason="dask is not installed: pip install 'subtomo[cluster]'")
BOX, N, BATCH = 20, 14, 3


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


@pytest.fixture(scope="module")
def case():
    c = two_reference_estep_case(N, BOX)  # K = 2
    cfg = PassConfig(BOX, 12, c.mask, sampling.global_rotations(1, rng=np.random.default_rng(3)), False,
                     sampling.translation_grid(1.0, 1.0, 3), EStepOptions(), batch_size=BATCH)
    return c.data, c.source, c.sigma2, c.maps, cfg


def _pass(case, runner=None, src=None, **estep):
    ds, src0, sigma2, maps, cfg = case
    if estep:
        cfg = replace(cfg, estep=replace(cfg.estep, **estep))
    poses = PoseTable.new(N, random_rotations(N, np.random.default_rng(0)), np.zeros((N, 3)))
    idx = np.arange(1, N)  # not all particles: indices are global
    stats, summ = estep_pass(src or src0, idx, poses, maps, sigma2, fourier_components(BOX, BOX, 3), cfg, "cpu",
                             runner=runner)
    return poses, stats, summ


def _same(a, b, tol=1e-5):
    (pa, sa, ma), (pb, sb, mb) = a, b
    for f in ("rot", "offset_px", "cls", "n_sig"):
        assert np.array_equal(getattr(pa, f), getattr(pb, f)), f
    np.testing.assert_allclose(pa.max_prob, pb.max_prob, rtol=1e-5, atol=1e-6)
    assert _rel(sa.data, sb.data) < tol and _rel(sa.weight, sb.weight) < tol
    assert _rel(sa.sigma2_num, sb.sigma2_num) < tol and torch.equal(sa.sigma2_den, sb.sigma2_den)
    np.testing.assert_allclose(sa.class_weight.numpy(), sb.class_weight.numpy(), rtol=1e-5)
    assert ma == pytest.approx(mb, rel=1e-5)


def test_tree_reduce_order_and_groups():
    parts = list("abcde")
    assert tree_reduce(parts, lambda x, y: f"({x}{y})") == "(((ab)(cd))e)"
    assert tree_pairs(5) == [[(0, 1), (2, 3)], [(0, 1)], [(0, 1)]]
    assert contiguous_groups(7, 3) == [(0, 2), (2, 5), (5, 7)] and contiguous_groups(2, 8) == [(0, 1), (1, 2)]


@pytest.mark.parametrize("estep", [{}, {"pass_memory_bytes": 1}], ids=["coarse refs held", "particle groups"])
def test_map_reduce_in_process_equals_the_batch_loop(case, estep):
    """Same batches as tasks (5 batches in 5 tasks), same poses; sums to float rounding."""
    _same(_pass(case, SerialRunner(workers=2), **estep), _pass(case, **estep))


@pytest.fixture(scope="module")
def client():
    if not HAVE_DASK:
        pytest.skip("dask is not installed: pip install 'subtomo[cluster]'")
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as c:
        yield c


@needs_dask
def test_estep_on_two_worker_processes_equals_in_process(case, client):
    from subtomo.jobs._cluster import DaskRunner

    runner = DaskRunner(client, count_bytes=True)
    assert runner.workers == 2
    on_cluster = _pass(case, runner)
    _same(on_cluster, _pass(case))
    _same(on_cluster, _pass(case, SerialRunner(workers=2)), tol=1e-6)  # the same tree of sums
    sent = runner.bytes_scattered
    _pass(case, runner)  # the source went once; a second pass sends only its references and settings
    assert runner.bytes_scattered - sent < 0.5 * sent


class KillOnceSource(InMemorySource):
    """Kills the worker process that first reads a batch (once: the marker file records it)."""

    def __init__(self, src: InMemorySource, marker: str) -> None:
        super().__init__(src.vols, src.pixel_size_A, src.ctfs)
        self.marker = marker

    def volumes(self, idx, device) -> torch.Tensor:
        from distributed import get_worker

        try:
            get_worker()
        except ValueError:
            return super().volumes(idx, device)  # not on a worker
        if not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return super().volumes(idx, device)


@needs_dask
def test_a_worker_killed_mid_pass_gives_the_same_result(case, client, tmp_path):
    import cloudpickle

    from subtomo.jobs._cluster import DaskRunner

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import this test module
    marker = tmp_path / "killed"
    got = _pass(case, DaskRunner(client), src=KillOnceSource(case[1], str(marker)))
    assert marker.exists()  # a worker did die
    _same(got, _pass(case))
    client.wait_for_workers(2, timeout=60)  # the nanny restarted it


def _project(tmp_path, n=16):
    from subtomo.testing.synthetic import write_star_project

    ds = make_set(n=n, box=20, pixel_size_A=12.0, snr=3.0, seed=2, max_offset_px=0.0, ctf=False)
    write_star_project(ds, tmp_path)
    return ds


def _job_results(ctx, data="run_data.star", maps=("run_class001.mrc",)):
    from subtomo.io.mrc import read_mrc
    from subtomo.io.particles import ParticleSet

    parts = ParticleSet.read(ctx.dir / data, ctx.project)
    return parts.rotations(), parts.table.get("rlnClassNumber"), [read_mrc(ctx.dir / m)[0] for m in maps]


def _same_job(a, b):
    assert np.allclose(a[0], b[0], atol=1e-4)  # poses identical (written with 6 digits)
    if a[1] is not None:
        assert list(a[1]) == list(b[1])
    for ma, mb in zip(a[2], b[2]):
        assert np.abs(ma - mb).max() <= 1e-5 * np.abs(mb).max()


@needs_dask
def test_refine3d_job_on_local_2_equals_none(tmp_path):
    from subtomo.jobs.base import execute
    from subtomo.jobs.refine3d import SPEC, Refine3DParams

    ds = _project(tmp_path)
    kw = dict(i="particles.star", particle_diameter=ds.diameter_A, ctf=False, healpix_step=15.0, offset_range=0.0,
              max_iter=2, batch_size=2, threads=1)
    none = execute(SPEC, Refine3DParams(**kw), tmp_path, quiet=True)
    local = execute(SPEC, Refine3DParams(**kw, cluster="local:2"), tmp_path, quiet=True)
    _same_job(_job_results(local), _job_results(none))
    log = (local.dir / "run.out").read_text()
    assert "dashboard http" in log and "E-step tasks: 8/8" in log  # both halves at once: 8 particles (4 batches) a half, 4 tasks each


@needs_dask
def test_class3d_job_on_a_running_scheduler_equals_none(tmp_path, client):
    from subtomo.jobs.base import execute
    from subtomo.jobs.class3d import SPEC, Class3DParams

    ds = _project(tmp_path, n=12)
    kw = dict(i="particles.star", K=2, iter=2, particle_diameter=ds.diameter_A, ctf=False, healpix_step=15.0,
              offset_range=0.0, batch_size=4, threads=1)
    none = execute(SPEC, Class3DParams(**kw), tmp_path, quiet=True)
    remote = execute(SPEC, Class3DParams(**kw, cluster=client.scheduler.address), tmp_path, quiet=True)
    maps = ("run_it002_class001.mrc", "run_it002_class002.mrc")
    _same_job(_job_results(remote, "run_it002_data.star", maps), _job_results(none, "run_it002_data.star", maps))


CLUSTER_YAML = """\
queue: gpu
account: cryoet
cores: 16
memory: 64GB
walltime: "04:00:00"
gpus: 2
jobs: 4
job_extra_directives: ["--constraint=a100"]
job_script_prologue: ["module load cuda"]
"""


@needs_dask
def test_slurm_config_renders_the_batch_script(tmp_path):
    from subtomo.jobs._slurm import read_slurm_config, slurm_cluster

    (tmp_path / "cluster.yaml").write_text(CLUSTER_YAML)
    cfg = read_slurm_config(tmp_path / "cluster.yaml")
    with slurm_cluster(cfg) as cluster:
        script = cluster.job_script()
    for line in ("#SBATCH -p gpu", "#SBATCH -A cryoet", "#SBATCH -n 1", "#SBATCH --cpus-per-task=16",
                 "#SBATCH -t 04:00:00", "#SBATCH --gres=gpu:2", "#SBATCH --constraint=a100", "module load cuda"):
        assert line in script, line
    assert "--nworkers 2" in script and "--nthreads 1" in script  # one worker process per GPU, one task each
    assert "#SBATCH --mem=60G" in script  # 64 GB = 59.6 GiB, as dask-jobqueue writes it
    (tmp_path / "cpu.yaml").write_text("cores: 8\nmemory: 16GB\nadaptive: {minimum: 1, maximum: 10}\n")
    with slurm_cluster(read_slurm_config(tmp_path / "cpu.yaml")) as cluster:
        script = cluster.job_script()
    assert "#SBATCH --cpus-per-task=8" in script and "--nthreads 8" in script and "gres" not in script


@needs_dask
def test_slurm_workers_get_the_compute_settings_through_their_environment(tmp_path):
    """The exported variables, read back as Dask reads a worker's environment, are the settings of local workers."""
    import dask

    from subtomo.jobs._cluster import COMPUTE_WORKER_SETTINGS, compute_worker_environment
    from subtomo.jobs._slurm import read_slurm_config, slurm_cluster

    env = compute_worker_environment()
    (tmp_path / "cluster.yaml").write_text(CLUSTER_YAML)
    with slurm_cluster(read_slurm_config(tmp_path / "cluster.yaml"), env) as cluster:
        script = cluster.job_script()
    lines = script.splitlines()
    exports = [lines.index(f"export {k}={v}") for k, v in env.items()]
    assert max(exports) < lines.index("module load cuda")  # before the user's prologue, which may override them
    collected = dask.config.collect_env(env)
    for key, value in COMPUTE_WORKER_SETTINGS.items():
        got = collected
        for part in key.replace("-", "_").split("."):
            got = got[part]
        assert got == value, key


@needs_dask
def test_a_job_s_local_workers_run_with_the_compute_settings(tmp_path):
    """open_runner's LocalCluster workers see COMPUTE_WORKER_SETTINGS (not Dask's defaults) in their own config."""
    from types import SimpleNamespace

    import dask
    import torch

    from subtomo.jobs._cluster import COMPUTE_WORKER_SETTINGS, open_runner

    logs: list[str] = []
    ctx = SimpleNamespace(params=SimpleNamespace(cluster="local:1", cluster_config=None, threads=1), project=tmp_path,
                          device=torch.device("cpu"), log=logs.append, warn=logs.append, progress=lambda it, n, what: it)
    with open_runner(ctx) as runner:
        seen = runner.client.run(lambda: {k: dask.config.get(k) for k in COMPUTE_WORKER_SETTINGS})
    assert list(seen.values()) == [COMPUTE_WORKER_SETTINGS]
    assert any("dashboard" in line for line in logs)


@needs_dask
@pytest.mark.parametrize("text, words", [
    ("queue: gpu\ncores: 4\nmemory: 8GB\nwalltime: 2h\n", ["walltime"]),
    ("cores: 4\nmemory: lots\n", ["memory", "64GB"]),
    ("cores: 4\nmemory: 8GB\ngpu: 1\n", ["gpu", "Allowed keys"]),
    ("cores: 4\nmemory: 8GB\njobs: 2\nadaptive: {maximum: 4}\n", ["not both"]),
    ("cores: [4\n", ["not valid YAML"]),
    ("- cores\n", ["key: value"]),
])
def test_bad_cluster_yaml_names_the_file_and_the_problem(tmp_path, text, words):
    from subtomo.jobs._slurm import read_slurm_config

    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    with pytest.raises(SubtomoError) as err:
        read_slurm_config(path)
    assert str(path) in str(err.value)
    for w in words:
        assert w in str(err.value)


def test_cluster_option_syntax():
    from subtomo.jobs.context import ComputeParams, parse_cluster

    assert parse_cluster("local:3") == ("local", 3) and parse_cluster("none") == ("none", None)
    assert parse_cluster("tcp://10.0.0.5:8786") == ("tcp", "tcp://10.0.0.5:8786")
    for bad, word in (("local:0", "local:N"), ("lokal:2", "none, local:N"), ("tcp://host", "tcp://HOST:PORT")):
        with pytest.raises(ValidationError, match=word):
            ComputeParams(cluster=bad)


@needs_dask
def test_slurm_without_cluster_yaml_stops_with_the_fix(tmp_path):
    """Checked with the job's inputs: refused before a job directory exists."""
    from subtomo.jobs.base import execute
    from subtomo.jobs.class3d import SPEC as CLASS3D
    from subtomo.jobs.class3d import Class3DParams
    from subtomo.jobs.refine3d import SPEC, Refine3DParams

    ds = _project(tmp_path, n=4)
    with pytest.raises(SubtomoError, match="cluster.yaml does not exist.*--cluster-config"):
        execute(SPEC, Refine3DParams(i="particles.star", particle_diameter=ds.diameter_A, ctf=False, max_iter=1,
                                     cluster="slurm"), tmp_path, quiet=True)
    (tmp_path / "bad.yaml").write_text("queue: [unclosed\n")
    with pytest.raises(SubtomoError, match="bad.yaml"):
        execute(CLASS3D, Class3DParams(i="particles.star", particle_diameter=ds.diameter_A, ctf=False, K=2, iter=1,
                                       cluster="slurm", cluster_config="bad.yaml"), tmp_path, quiet=True)
    assert not (tmp_path / "Refine3D").exists() and not (tmp_path / "Class3D").exists()


def test_a_file_backed_source_travels_without_its_particles(tmp_path):
    from subtomo.io.particles import ParticleSet
    from subtomo.tomo.particle_source import SubtomogramSource

    _project(tmp_path, n=8)
    src = SubtomogramSource(ParticleSet.read(tmp_path / "particles.star", tmp_path), use_ctf=False)
    full = src.volumes(np.arange(8), "cpu")  # now cached in this process
    sent = pickle.dumps(src)
    assert len(sent) < full.numel() * full.element_size() / 4 and src._vols  # the original keeps its cache
    back = pickle.loads(sent)
    assert torch.equal(back.volumes(np.arange(8), "cpu"), full)  # a worker reads them from the files


@needs_dask
def test_a_stopped_refinement_continued_on_the_cluster_ends_as_an_uninterrupted_one(tmp_path, client):
    """Stop after iteration 1 (the run files written), read the state back, continue with the tasks on the cluster."""
    import pandas as pd

    from subtomo.em.refine import RefineOptions, RefineState, auto_refine
    from subtomo.io.particles import ParticleSet
    from subtomo.jobs._cluster import DaskRunner
    from subtomo.jobs._em_runs import RefineFiles, resume_state

    ds = make_set(n=16, box=20, pixel_size_A=12.0, snr=3.0, seed=9, max_offset_px=0.5)
    src = InMemorySource(ds.volumes, ds.pixel_size_A, ds.ctfs)
    opts = RefineOptions(particle_diameter_A=ds.diameter_A, healpix_order=1, offset_range_px=1, offset_step_px=2,
                         max_iter=3, batch_size=3, max_order=1, seed=1)
    full = auto_refine(src, opts, log=lambda m: None)
    table = pd.DataFrame({"rlnImageName": [f"p{i}.mrc" for i in range(16)], "rlnImagePixelSize": ds.pixel_size_A})
    files = RefineFiles(tmp_path, ParticleSet.from_table(table), ds.pixel_size_A)
    on_cluster = replace(opts, runner=DaskRunner(client))
    auto_refine(src, on_cluster, log=lambda m: None, on_iteration=files, stop_after=1)
    state = resume_state(tmp_path, RefineState.from_dict, "cpu", lambda m: None)
    cont = auto_refine(src, on_cluster, log=lambda m: None, resume=state)
    assert cont.iterations == full.iterations
    assert np.array_equal(cont.poses.rot, full.poses.rot)
    assert _rel(cont.final_map, full.final_map) < 1e-5


def _class2d_case():
    from subtomo.em.class2d import Class2DSettings, initialise
    from subtomo.testing.patterns2d import dataset

    imgs, _ = dataset(n_per=8, noise=0.5, seed=3)
    st = Class2DSettings(n_classes=3, pixel_size_A=5.0, particle_diameter_A=150.0, batch_size=5, seed=5)
    model, poses = initialise(imgs, st)
    return imgs, st, model, poses


def _same_2d(a, b):
    (ma, pa, _), (mb, pb, _) = a, b
    for f in ("cls", "psi_deg", "origin_px", "n_sig"):
        assert np.array_equal(getattr(pa, f), getattr(pb, f)), f
    assert _rel(ma.maps, mb.maps) < 1e-5 and _rel(ma.sigma2, mb.sigma2) < 1e-5
    assert torch.allclose(ma.class_priors, mb.class_priors, rtol=1e-6)


def test_class2d_iteration_as_tasks_equals_the_batch_loop():
    from subtomo.em.class2d import iterate
    from subtomo.em.class2d_parallel import iterate_on

    imgs, st, model, poses = _class2d_case()
    _same_2d(iterate_on(SerialRunner(2), imgs, model, poses, st, 1), iterate(imgs, model, poses, st, 1))


@needs_dask
def test_class2d_iteration_on_two_worker_processes_equals_in_process(client):
    from subtomo.em.class2d import iterate
    from subtomo.em.class2d_parallel import iterate_on
    from subtomo.jobs._cluster import DaskRunner

    imgs, st, model, poses = _class2d_case()
    _same_2d(iterate_on(DaskRunner(client), imgs, model, poses, st, 1), iterate(imgs, model, poses, st, 1))


@needs_dask
def test_class2d_job_on_a_running_scheduler_equals_none(tmp_path, client):
    from subtomo.io.mrc import read_mrc
    from subtomo.io.star import read_star
    from subtomo.jobs.base import execute
    from subtomo.jobs.class2d import SPEC, Class2DParams
    from subtomo.testing.patterns2d import dataset, write_proj2d_project

    imgs, _ = dataset(n_per=6, noise=0.5, seed=0)
    star = write_proj2d_project(tmp_path, imgs)
    kw = dict(i=str(star), K=3, particle_diameter=150.0, highres_limit=None, seed=1, device="cpu", iter=2, batch_size=4,
              threads=1)
    none = execute(SPEC, Class2DParams(**kw, output="Class2D/none"), tmp_path, quiet=True)
    remote = execute(SPEC, Class2DParams(**kw, output="Class2D/remote", cluster=client.scheduler.address), tmp_path,
                     quiet=True)
    a, b = (read_star(j.dir / "run_it002_data.star")["particles"] for j in (remote, none))
    for col in ("rlnClassNumber", "rlnAnglePsi", "rlnOriginXAngst"):
        assert np.allclose(a[col], b[col], atol=1e-4), col
    ma, mb = (read_mrc(j.dir / "run_it002_classes.mrcs")[0] for j in (remote, none))
    assert np.abs(ma - mb).max() <= 1e-5 * np.abs(mb).max()
    assert "E-step tasks: 5/5" in (remote.dir / "run.out").read_text()  # 18 images in batches of 4


def test_iteration_zero_sums_as_tasks_equal_the_batch_loop(case):
    from subtomo.em.iteration import delta_stats, delta_stats_on

    ds, src, sigma2, _, _ = case
    poses = PoseTable.new(N, ds.rot, ds.offset_px)
    poses.cls[:] = np.arange(N) % 2
    comps = fourier_components(BOX, BOX, 3)
    got = delta_stats_on(SerialRunner(2), src, np.arange(1, N), poses, 2, sigma2, comps, "cpu", BATCH)
    want = delta_stats(src, np.arange(1, N), poses, 2, sigma2, comps, "cpu", BATCH)
    assert _rel(got.data, want.data) < 1e-5 and _rel(got.weight, want.weight) < 1e-5
    assert torch.equal(got.n_particles, want.n_particles) and float(got.n_particles) == N - 1


@needs_dask
def test_ctf_job_fits_each_series_as_a_task_and_equals_none(tmp_path, client):
    """One task per tilt series on two workers: the same tables as the fits one after another here."""
    from test_ctf import make_project, run_ctf

    from subtomo.io.star import read_star_table

    for name in ("TS01", "TS02"):
        make_project(tmp_path, name)
    here = run_ctf(tmp_path)
    remote = run_ctf(tmp_path, cluster=client.scheduler.address)
    for name in ("TS01", "TS02"):
        a, b = (read_star_table(j.path(f"{name}_ctffind.star")) for j in (here, remote))
        assert a.equals(b), name
    assert "CTF fits: 2/2" in (remote.dir / "run.out").read_text()


@needs_dask
def test_localres_job_in_blocks_of_windows_equals_none(tmp_path, client):
    """Blocks of windows as tasks: the same local-resolution map as all windows here."""
    from test_post import _project_with_halves

    from subtomo.io.mrc import read_mrc
    from subtomo.jobs.base import execute
    from subtomo.jobs.localres import SPEC, LocalResParams

    project, _, _ = _project_with_halves(tmp_path)
    kw = dict(device="cpu", window_A=36.0, step_px=3)
    here = execute(SPEC, LocalResParams(**kw), project, quiet=True)
    remote = execute(SPEC, LocalResParams(**kw, cluster=client.scheduler.address), project, quiet=True)
    a, b = (read_mrc(j.path("localres.mrc"))[0] for j in (here, remote))
    assert np.array_equal(a, b) and a.max() > 0
    assert "local resolution window blocks: " in (remote.dir / "run.out").read_text()


def test_each_gpu_worker_gets_its_own_device():
    """One worker per GPU: LocalCluster's names 0..N-1 and dask-jobqueue's <job>-<process> pick distinct GPUs."""
    from subtomo.jobs._cluster import gpu_index

    assert [gpu_index(str(i), 4) for i in range(4)] == [0, 1, 2, 3]
    assert [gpu_index(f"SLURMCluster-12-{i}", 2) for i in range(2)] == [0, 1]
    assert gpu_index("5", 4) == 1 and gpu_index("tcp://10.0.0.1:8786", 2) == 0 and gpu_index("w", 0) == 0


@needs_dask
def test_extract_job_one_task_per_tomogram_equals_none(tmp_path, client):
    """Each tomogram extracted by a task: the same boxes (edge noise from the tomogram's own seed) and table."""
    import pandas as pd
    from test_extract import _particles_star, _tomogram

    from subtomo.io.mrc import read_mrc
    from subtomo.io.particles import read_particles
    from subtomo.io.star import write_particles
    from subtomo.jobs.base import execute
    from subtomo.jobs.extract import SPEC, ExtractParams

    coords = np.array([[20.4, 24.7, 20.2], [2.5, 45.0, 20.0]])  # the second crosses two edges
    parts = []
    for k, t in enumerate(("tomo1", "tomo2")):
        (tmp_path / f"Tomograms/{t}").mkdir(parents=True)
        _tomogram(tmp_path / f"Tomograms/{t}/{t}.mrc", coords, noise=1.0, seed=k)
        _particles_star(tmp_path / f"{t}.star", f"Tomograms/{t}/{t}.mrc", coords, name=t)
        parts.append(read_particles(tmp_path / f"{t}.star"))
    write_particles(tmp_path / "both.star", pd.concat([p[0] for p in parts], ignore_index=True), parts[0][1])
    kw = dict(i="both.star", box=16, project=True, device="cpu")
    here = execute(SPEC, ExtractParams(**kw), tmp_path, quiet=True)
    remote = execute(SPEC, ExtractParams(**kw, cluster=client.scheduler.address), tmp_path, quiet=True)
    a, b = (read_particles(j.path("particles_subtomo.star"))[0] for j in (here, remote))
    assert len(a) == 4 and list(a["subtomoBoxCrossesEdge"]) == [0, 1, 0, 1]
    assert a.drop(columns=["rlnImageName"]).equals(b.drop(columns=["rlnImageName"]))
    for x, y in zip(a["rlnImageName"], b["rlnImageName"]):
        assert np.array_equal(read_mrc(tmp_path / x)[0], read_mrc(tmp_path / y)[0]), x
    assert "tomograms extracted: 2/2" in (remote.dir / "run.out").read_text()


@needs_dask
def test_prepare_export_one_task_per_tomogram_equals_none(tmp_path, client):
    """RELION CTF volumes of --export-relion made by a task per tomogram: the same files as here."""
    from test_ctf3d import _project

    from subtomo.io.mrc import read_mrc
    from subtomo.io.particles import read_particles
    from subtomo.jobs.base import execute
    from subtomo.jobs.prepare import SPEC, PrepareParams

    _project(tmp_path)
    kw = dict(i="CtfFind/job002/ctf_tomograms.star", export_relion=16, plot_box=16, device="cpu")
    here = execute(SPEC, PrepareParams(**kw), tmp_path, quiet=True)
    remote = execute(SPEC, PrepareParams(**kw, cluster=client.scheduler.address), tmp_path, quiet=True)
    a, b = (read_particles(j.path("particles_subtomo_relion.star"))[0]["rlnCtfImage"] for j in (here, remote))
    assert len(a) == 3
    for x, y in zip(a, b):
        assert np.array_equal(read_mrc(tmp_path / x)[0], read_mrc(tmp_path / y)[0]), x
    assert "RELION 3D CTF volumes (box 16), tomograms: 1/1" in (remote.dir / "run.out").read_text()
