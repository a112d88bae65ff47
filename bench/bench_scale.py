"""Scale-out of the refine3d E-step: this process (``none``) against Dask (``local:1``, ``local:2``), and a cost model.

Part 1, measured on the ``benchmark`` preset (``bench_refine3d.prepare_project``: 400 true
particles, box 64, 5 A/px, CTF on) read from their files as a job reads them
(``SubtomogramSource``): one refine3d iteration from the true map low-passed to ``--ini-high``
(a mid-refinement E-step: current size ~2 x box x px / ini-high) with a global search at
``--order`` (2: 7.5 deg), the same state for every mode, one thread per worker. Per mode:
E-step wall time of iteration 2 (iteration 1 warms the workers up), E-step CPU time (this
process + all workers), bytes sent to the workers per iteration (each pass's shared inputs,
times the workers that fetch them) and the partial sums the tasks return, and the largest
pose and half-map differences against ``none``.

Part 2, bytes per pass against box size and class count (serialised, not estimated).

Part 3, a cost model of one iteration at box 128 for 10,000 and 100,000 particles on 1, 8 and
64 workers, from measured pieces: the per-particle E-step cost and the per-pass projection
of a 7.5 deg global pass at box 128 (``bench_engine.py``'s worker, current size = box / 2),
the per-pass overhead of the cluster (part 1: ``local:1`` minus ``none``) and the M-step (part
1, scaled by N^3 log N from box 64 to 128: derived, marked so).

    python bench/bench_scale.py --project /tmp/bench_scale --threads 1
"""

from __future__ import annotations

import argparse
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
from bench_engine import run_config as engine_config
from bench_refine3d import prepare_project

from subtomo.em.components import fourier_components
from subtomo.em.expectation import EStepOptions
from subtomo.em.iteration import PassConfig, PassPayload
from subtomo.em.maximisation import SufficientStats
from subtomo.em.refine import RefineOptions, initialise_refinement, refine_iteration
from subtomo.em.sampling import global_rotations, translation_grid
from subtomo.io.mrc import read_mrc
from subtomo.io.particles import ParticleSet
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


def run_mode(mode: str, src, opts: RefineOptions, halves: np.ndarray, ref: torch.Tensor) -> dict:
    """Iterations 1 and 2 of ``mode`` from the same initial state; the figures of iteration 2."""
    from distributed import Client, LocalCluster

    from subtomo.jobs._cluster import DaskRunner

    def two(o: RefineOptions, cpu_of_workers) -> tuple:
        state = initialise_refinement(src, o, halves, initial_ref=ref, device="cpu")
        refine_iteration(src, o, state, device="cpu")
        c0, w0, b0 = time.process_time(), cpu_of_workers(), getattr(o.runner, "bytes_scattered", 0)
        res = refine_iteration(src, o, state, device="cpu")
        return res, time.process_time() - c0, cpu_of_workers() - w0, getattr(o.runner, "bytes_scattered", 0) - b0

    if mode == "none":
        res, client_cpu, worker_cpu, shared = two(opts, lambda: 0.0)
        n_workers = 0
    else:
        n_workers = int(mode.split(":")[1])
        with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                          silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
            runner = DaskRunner(client, n_workers, count_bytes=True)
            res, client_cpu, worker_cpu, shared = two(replace(opts, runner=runner),
                                                       lambda: sum(client.run(time.process_time).values()))
    rec = res.record
    n_tasks = 2 * 4 * n_workers  # two halves, four tasks per worker slot (estep_map_reduce)
    box = src.box
    return {"res": res, "estep_s": rec.estep_seconds, "iteration_s": rec.seconds, "mstep_s": rec.seconds - rec.estep_seconds,
            "estep_cpu_s": client_cpu + worker_cpu if n_workers else client_cpu - (rec.seconds - rec.estep_seconds),
            "client_cpu_s": client_cpu, "worker_cpu_s": worker_cpu,
            "sent_MB": shared * n_workers / 1e6, "returned_MB": n_tasks * stats_bytes(box, 1) / 1e6,
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
    print(f"part 1: {src.n} particles of the benchmark preset (box {src.box}, {src.pixel_size_A:g} A/px), refine3d "
          f"iteration 2 from the truth low-passed to {args.ini_high:g} A, global order {args.order}, one thread per worker")
    print(f"{'mode':>8} {'E-step s':>9} {'E-step CPU s':>13} {'M-step s':>9} {'sent MB':>8} {'sums MB':>8} "
          f"{'vs none':>9} {'max pose diff':>14} {'map rel diff':>13}")
    rows, figures, ref_res = {}, {}, None
    for mode in args.modes.split(","):
        r = run_mode(mode, src, opts, halves, ref)
        half_maps = torch.stack([m.maps[0] for m in r["res"].models])
        if ref_res is None:
            ref_res = (r["res"].poses.rot.copy(), half_maps)
        r["pose_diff"] = float(np.abs(r["res"].poses.rot - ref_res[0]).max())
        r["map_diff"] = float((half_maps - ref_res[1]).abs().max() / ref_res[1].abs().max())
        rows[mode] = r
        r["speedup"] = rows["none"]["estep_s"] / r["estep_s"] if "none" in rows else float("nan")
        print(f"{mode:>8} {r['estep_s']:9.2f} {r['estep_cpu_s']:13.2f} {r['mstep_s']:9.2f} {r['sent_MB']:8.2f} "
              f"{r['returned_MB']:8.2f} {r['speedup']:9.2f} {r['pose_diff']:14.2e} {r['map_diff']:13.2e}")
        key = mode.replace(":", "")
        figures.update({f"scale.{key}.{k}": r[k] for k in ("estep_s", "estep_cpu_s", "mstep_s", "sent_MB", "returned_MB",
                                                          "pose_diff", "map_diff")})
    if "local:1" in rows and "local:2" in rows:
        figures["scale.local2_over_local1_speedup"] = rows["local:1"]["estep_s"] / rows["local:2"]["estep_s"]
        print(f"E-step speed-up of local:2 over local:1: {figures['scale.local2_over_local1_speedup']:.2f}x "
              f"(current size {rows['local:2']['size']}, coarse {rows['local:2']['coarse_size']})")
    return rows, figures


def part2(figures: dict) -> None:
    print("part 2: bytes per pass sent to each worker (shared inputs) and returned per task (partial sums), MB")
    print(f"{'box':>5} " + " ".join(f"{'K=' + str(k) + ' in':>10} {'K=' + str(k) + ' sums':>10}" for k in (1, 4)))
    for box in (32, 64, 128):
        vals = [(payload_bytes(box, k) / 1e6, stats_bytes(box, k) / 1e6) for k in (1, 4)]
        print(f"{box:5d} " + " ".join(f"{a:10.2f} {b:10.2f}" for a, b in vals))
        for k, (a, b) in zip((1, 4), vals):
            figures[f"scale.payload_box{box}_K{k}_MB"], figures[f"scale.sums_box{box}_K{k}_MB"] = a, b
    print("  both grow as K x N^3 (8x per doubling of the box); the particles never travel (read by path)")


def part3(args, rows: dict, figures: dict) -> None:
    eng = engine_config(128, "global", args.n128, argparse.Namespace(size_frac=0.5, threads=1, pass_memory_gb=0.0,
                                                                     no_profile=False, compiled=False))
    proj = eng["projection_s"]
    per_particle = (eng["wall_s"] - proj) / eng["n"]
    over = rows["local:1"]["estep_s"] - rows["none"]["estep_s"] if "local:1" in rows and "none" in rows else 0.0
    mstep64 = rows[next(iter(rows))]["mstep_s"]
    mstep128 = mstep64 * 8 * math.log(128) / math.log(64)  # derived: FFT-bound reconstructions scale as N^3 log N
    print(f"part 3: box 128, 7.5 deg global pass at size 64 (bench_engine, {eng['n']} particles, one thread): "
          f"{per_particle:.2f} s/particle, projection {proj:.1f} s per pass and worker; cluster overhead per "
          f"iteration {over:.2f} s (measured at box 64); M-step {mstep128:.1f} s (derived from {mstep64:.2f} s at box 64)")
    print("  model: wall = 2 halves x projection + n x s/particle / workers + overhead + M-step (one thread per worker)")
    print(f"{'particles':>10} " + " ".join(f"{str(w) + ' workers':>12}" for w in (1, 8, 64)))
    for n in (10_000, 100_000):
        cells = []
        for w in (1, 8, 64):
            wall = 2 * proj + n * per_particle / w + over + mstep128
            figures[f"scale.model_box128_n{n}_w{w}_h"] = wall / 3600
            cells.append(f"{wall / 3600:10.2f} h")
        print(f"{n:10d} " + " ".join(cells))
    figures.update({"scale.box128_s_per_particle": per_particle, "scale.box128_projection_s": proj,
                    "scale.cluster_overhead_s": over})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", default="/tmp/bench_scale", help="benchmark-preset project (made if absent)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="threads of the project preparation")
    ap.add_argument("--order", type=int, default=2, help="HEALPix order of the global search (2: 7.5 deg)")
    ap.add_argument("--ini-high", type=float, default=20.0, help="low-pass of the starting reference [A]")
    ap.add_argument("--modes", default="none,local:1,local:2")
    ap.add_argument("--n128", type=int, default=8, help="particles of the box-128 pass of part 3")
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
