"""Scale-out of the refine3d E-step: this process (``none``) against Dask (``local:1``, ``local:2``), and a cost model.

Part 1, measured on the ``benchmark`` preset (``bench_refine3d.prepare_project``: 400 true
particles, box 64, 5 A/px, CTF on) read from their files as a job reads them
(``SubtomogramSource``): one refine3d iteration from the true map low-passed to ``--ini-high``
(a mid-refinement E-step: current size ~2 x box x px / ini-high) with a global search at
``--order`` (2: 7.5 deg), the same state for every mode, one thread per worker. Every mode's
cluster is opened and warmed up (iteration 1) first; then ``--repeats`` rounds each time
iteration 2 once per mode, in turn, so that the VM's drifting speed hits every mode alike
(the speed-up is the median of the per-round ratios). Per mode: E-step wall time, CPU time (this
process + all workers), bytes sent to the workers per iteration (each pass's shared inputs,
times the workers that fetch them) and the partial sums the tasks return, and the largest
pose and half-map differences against ``none``.

Part 2, bytes per pass against box size and class count (serialised, not estimated).

Part 3, a cost model of one refine3d iteration at box 128 for 10,000 and 100,000 particles on
1, 8 and 64 workers, from pieces measured here: the per-particle E-step cost, the per-pass
preparation (projection of the coarse references) and the M-step of an iteration at box 128
(order 2, current size 64; two runs of simulated particles held in memory: slope and
intercept), and the cluster's efficiency (part 1: E-step CPU time of ``none`` over
``local:1``). The tree reduction assumes 1 GB/s between nodes (stated, not measured).

    python bench/bench_scale.py --project /tmp/bench_scale --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import pickle
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from _common import add_json_option, write_figures
from bench_engine import CyclicSource
from bench_refine3d import prepare_project

from subtomo.em.components import fourier_components
from subtomo.em.expectation import EStepOptions
from subtomo.em.iteration import InMemorySource, PassConfig, PassPayload
from subtomo.em.maximisation import SufficientStats
from subtomo.em.refine import RefineOptions, initialise_refinement, refine_iteration
from subtomo.em.sampling import global_rotations, translation_grid
from subtomo.io.mrc import read_mrc
from subtomo.io.particles import ParticleSet
from subtomo.testing.synthetic import make_set
from subtomo.tomo.particle_source import SubtomogramSource


def payload_bytes(box: int, k: int) -> int:
    """Bytes of one pass's shared inputs (references, noise, components, settings) at a 7.5 deg global search."""
    comps = fourier_components(box, box, 3)
    cfg = PassConfig(box, box // 2, torch.ones((box,) * 3), global_rotations(2), False, translation_grid(3.0, 2.0, 3),
                     EStepOptions(), batch_size=32)
    pay = PassPayload(torch.zeros((k,) + (box,) * 3), torch.ones(box // 2 + 1), comps, cfg, 2, True, "cpu", "x")
    return len(pickle.dumps(pay))


def stats_bytes(box: int, k: int) -> int:
    """Bytes of one task's partial sums (what each task returns into the reduction tree)."""
    return len(pickle.dumps(SufficientStats.zeros(k, box, 3)))


def open_mode(mode: str, stack: contextlib.ExitStack):
    """(runner, CPU-seconds-of-the-workers function, worker count) of ``mode``; its cluster closes with ``stack``."""
    if mode == "none":
        return None, lambda: 0.0, 0
    from distributed import Client, LocalCluster

    from subtomo.jobs._cluster import DaskRunner, compute_worker_config

    n_workers = int(mode.split(":")[1])
    stack.enter_context(compute_worker_config())
    cluster = stack.enter_context(LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                                               dashboard_address=":0", silence_logs=logging.ERROR))
    client = stack.enter_context(Client(cluster))
    return DaskRunner(client, n_workers, count_bytes=True), lambda: sum(client.run(time.process_time).values()), n_workers


def timed_iteration(src, opts: RefineOptions, state, cpu_of_workers, n_workers: int) -> dict:
    """Iteration 2 from a copy of ``state`` (after iteration 1): E-step wall and CPU time, bytes, the result."""
    state = copy.deepcopy(state)
    c0, w0, b0 = time.process_time(), cpu_of_workers(), getattr(opts.runner, "bytes_scattered", 0)
    res = refine_iteration(src, opts, state, device="cpu")
    client_cpu, worker_cpu = time.process_time() - c0, cpu_of_workers() - w0
    shared = getattr(opts.runner, "bytes_scattered", 0) - b0
    rec = res.record
    n_tasks = 2 * 4 * n_workers  # two halves, four tasks per worker slot (estep_passes)
    return {"res": res, "estep_s": rec.estep_seconds, "iteration_s": rec.seconds, "mstep_s": rec.seconds - rec.estep_seconds,
            "estep_cpu_s": client_cpu + worker_cpu if n_workers else client_cpu - (rec.seconds - rec.estep_seconds),
            "client_cpu_s": client_cpu, "worker_cpu_s": worker_cpu,
            "sent_MB": shared * n_workers / 1e6, "returned_MB": n_tasks * stats_bytes(src.box, 1) / 1e6,
            "size": rec.size, "coarse_size": rec.coarse_size}


def part1(args) -> tuple[dict, dict]:
    project = Path(args.project)
    prepare_project(project, "benchmark", args.seed, args.threads, False, [])
    particles = ParticleSet.read(project / "particles_true.star", project)
    src = SubtomogramSource(particles, True)
    sim = json.loads((project / "GroundTruth" / "simulation.json").read_text())
    diameter = float(sim["structure"]["diameter_A"])
    ref = torch.as_tensor(read_mrc(project / "GroundTruth" / "class001.mrc")[0])
    halves = np.arange(src.n) % 2 + 1
    opts = RefineOptions(particle_diameter_A=diameter, healpix_order=args.order, ini_high_A=args.ini_high, seed=1)
    modes = args.modes.split(",")
    print(f"part 1: {src.n} particles of the benchmark preset (box {src.box}, {src.pixel_size_A:g} A/px), refine3d "
          f"iteration 2 from the truth low-passed to {args.ini_high:g} A, global order {args.order}, one thread per "
          f"worker; {args.repeats} rounds, each timing every mode once in turn (the VM's speed drifts)")
    print(f"{'round':>5} {'mode':>8} {'E-step s':>9} {'E-step CPU s':>13} {'M-step s':>9} {'sent MB':>8} {'sums MB':>8} "
          f"{'max pose diff':>14} {'map rel diff':>13}")
    rows: dict[str, list[dict]] = {m: [] for m in modes}
    ref_res = None
    with contextlib.ExitStack() as stack:
        setups = {}
        for mode in modes:  # every cluster open at once (idle workers cost little); iteration 1 warms them up
            runner, cpu_of_workers, n_workers = open_mode(mode, stack)
            o = replace(opts, runner=runner)
            state = initialise_refinement(src, o, halves, initial_ref=ref, device="cpu")
            refine_iteration(src, o, state, device="cpu")
            setups[mode] = (o, state, cpu_of_workers, n_workers)
        for rnd in range(args.repeats):
            for mode in modes:
                o, state, cpu_of_workers, n_workers = setups[mode]
                r = timed_iteration(src, o, state, cpu_of_workers, n_workers)
                half_maps = torch.stack([m.maps[0] for m in r["res"].models])
                if ref_res is None:
                    ref_res = (r["res"].poses.rot.copy(), half_maps)
                r["pose_diff"] = float(np.abs(r["res"].poses.rot - ref_res[0]).max())
                r["map_diff"] = float((half_maps - ref_res[1]).abs().max() / ref_res[1].abs().max())
                rows[mode].append(r)
                print(f"{rnd + 1:5d} {mode:>8} {r['estep_s']:9.2f} {r['estep_cpu_s']:13.2f} {r['mstep_s']:9.2f} "
                      f"{r['sent_MB']:8.2f} {r['returned_MB']:8.2f} {r['pose_diff']:14.2e} {r['map_diff']:13.2e}",
                      flush=True)
    figures = {}
    for mode, rs in rows.items():
        key = mode.replace(":", "")
        figures.update({f"scale.{key}.{k}": float(np.median([r[k] for r in rs]))
                        for k in ("estep_s", "estep_cpu_s", "mstep_s", "sent_MB", "returned_MB")})
        figures.update({f"scale.{key}.{k}": max(r[k] for r in rs) for k in ("pose_diff", "map_diff")})
    if "local:1" in rows and "local:2" in rows:
        ratios = [a["estep_s"] / b["estep_s"] for a, b in zip(rows["local:1"], rows["local:2"])]
        figures["scale.local2_over_local1_speedup"] = float(np.median(ratios))
        figures["scale.local2_over_local1_speedup_min"] = float(min(ratios))
        print(f"E-step speed-up of local:2 over local:1 per round: {' '.join(f'{x:.2f}' for x in ratios)}; median "
              f"{np.median(ratios):.2f}x (current size {rows['local:2'][0]['size']}, coarse {rows['local:2'][0]['coarse_size']})")
    return {m: rs[0] for m, rs in rows.items()}, figures


def part2(figures: dict) -> None:
    print("part 2: bytes per pass sent to each worker (shared inputs) and returned per task (partial sums), MB")
    print(f"{'box':>5} " + " ".join(f"{'K=' + str(k) + ' in':>10} {'K=' + str(k) + ' sums':>10}" for k in (1, 4)))
    for box in (32, 64, 128):
        vals = [(payload_bytes(box, k) / 1e6, stats_bytes(box, k) / 1e6) for k in (1, 4)]
        print(f"{box:5d} " + " ".join(f"{a:10.2f} {b:10.2f}" for a, b in vals))
        for k, (a, b) in zip((1, 4), vals):
            figures[f"scale.payload_box{box}_K{k}_MB"], figures[f"scale.sums_box{box}_K{k}_MB"] = a, b
    print("  both grow as K x N^3 (8x per doubling of the box); the particles never travel (read by path)")


def box128_costs(n_small: int, n_large: int) -> dict:
    """E-step seconds per particle and per pass (projection, preparation) and M-step seconds at box 128, measured.

    One refine3d iteration (global search at order 2, the refine3d default, current size 64)
    on simulated particles held in memory, with ``n_small`` and ``n_large`` particles: the
    slope is the per-particle cost, the intercept the per-pass preparation of both halves.
    """
    box, px = 128, 4.0
    ds = make_set(n=16, box=box, pixel_size_A=px, snr=1.0, seed=5, max_offset_px=1.0)
    out = {}
    for n in (n_small, n_large):  # 16 particles held, cycled through (the same work, 16 particles' memory)
        src = CyclicSource(InMemorySource(ds.volumes, px, ds.ctfs), n)
        opts = RefineOptions(particle_diameter_A=ds.diameter_A, healpix_order=2, ini_high_A=box * px / 22, seed=1)
        state = initialise_refinement(src, opts, np.arange(n) % 2 + 1, initial_ref=ds.reference, device="cpu")
        rec = refine_iteration(src, opts, state, device="cpu").record
        out[n] = (rec.estep_seconds, rec.seconds - rec.estep_seconds, rec.size)
    per_particle = (out[n_large][0] - out[n_small][0]) / (n_large - n_small)
    return {"per_particle_s": per_particle, "prep_s": max(0.0, out[n_small][0] - n_small * per_particle) / 2,
            "mstep_s": out[n_large][1], "size": out[n_large][2]}


def part3(args, rows: dict, figures: dict) -> None:
    c = box128_costs(args.n128, 4 * args.n128)
    eff = (figures["scale.none.estep_cpu_s"] / figures["scale.local1.estep_cpu_s"]
           if {"none", "local:1"} <= rows.keys() else 1.0)
    sums_gb = stats_bytes(128, 1) / 1e9
    print(f"part 3: box 128, refine3d iteration at order 2 (7.5 deg), current size {c['size']}, one thread "
          f"({args.n128} and {4 * args.n128} simulated particles): {c['per_particle_s']:.3f} s/particle, "
          f"{c['prep_s']:.1f} s preparation per pass (projection of the coarse references), M-step {c['mstep_s']:.1f} s")
    print(f"  cluster efficiency (E-step CPU of none / local:1, part 1): {eff:.2f}; sums {sums_gb * 1e3:.0f} MB per task, "
          f"reduced in a tree at an assumed 1 GB/s between nodes")
    print("  model: wall = (passes a worker prepares x preparation + n x s/particle / workers) / efficiency")
    print("         + log2(tasks) x sums / bandwidth + M-step; a worker prepares both halves' passes with 1 worker, one with more")
    print(f"{'particles':>10} " + " ".join(f"{str(w) + ' workers':>12}" for w in (1, 8, 64)))
    for n in (10_000, 100_000):
        cells = []
        for w in (1, 8, 64):
            passes = 2 if w == 1 else 1
            wall = ((passes * c["prep_s"] + n * c["per_particle_s"] / w) / eff
                    + math.ceil(math.log2(8 * w)) * sums_gb + c["mstep_s"])
            figures[f"scale.model_box128_n{n}_w{w}_min"] = wall / 60
            cells.append(f"{wall / 60:8.1f} min")
        print(f"{n:10d} " + " ".join(cells))
    figures.update({"scale.box128_s_per_particle": c["per_particle_s"], "scale.box128_prep_s": c["prep_s"],
                    "scale.box128_mstep_s": c["mstep_s"], "scale.cluster_efficiency": eff})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", default="/tmp/bench_scale", help="benchmark-preset project (made if absent)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="threads of the project preparation")
    ap.add_argument("--order", type=int, default=2, help="HEALPix order of the global search (2: 7.5 deg)")
    ap.add_argument("--ini-high", type=float, default=20.0, help="low-pass of the starting reference [A]")
    ap.add_argument("--modes", default="none,local:1,local:2")
    ap.add_argument("--repeats", type=int, default=5, help="rounds of timed iterations (every mode once per round)")
    ap.add_argument("--n128", type=int, default=32, help="particles of the smaller box-128 run of part 3 (4x in the larger)")
    ap.add_argument("--no-model", action="store_true", help="skip part 3 (the box-128 pass)")
    add_json_option(ap)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows, figures = part1(args)
    part2(figures)
    if not args.no_model:
        part3(args, rows, figures)
    write_figures(args.json, figures)


if __name__ == "__main__":
    main()
