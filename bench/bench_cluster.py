"""Time of one refine3d iteration with the E-step in this process (``none``) and on Dask (``local:1``, ``local:2``).

Simulated subtomograms (``subtomo.testing.synthetic.make_set``, CTF on) held in memory; one
global-search iteration (both halves' E-steps, then the M-step on the client) from the same
initial state, with one thread per worker. Prints per mode: wall time of iteration 1 (workers
warming up) and of iteration 2, CPU time (iteration 2) of this process and (both) of the workers, bytes sent to the workers during the iteration,
and the largest differences of poses and half maps against ``none``; then the bytes of one
pass's shared inputs (references, noise, components, settings) against box size and class count.

On a 2-core machine shared with other work expect little gain from ``local:2``: both cores
are already busy, and each worker process pays its own start-up and per-pass preparation.

    python bench/bench_cluster.py --n 128 --box 32 --order 1
"""

from __future__ import annotations

import argparse
import logging
import pickle
import time
from dataclasses import replace

import numpy as np
import torch
from _common import add_json_option, write_figures

from subtomo.em.components import fourier_components
from subtomo.em.expectation import EStepOptions
from subtomo.em.iteration import InMemorySource, PassConfig, PassPayload
from subtomo.em.refine import RefineOptions, initialise_refinement, refine_iteration
from subtomo.em.sampling import global_rotations, translation_grid
from subtomo.testing.synthetic import make_set


def two_iterations(src, opts, state):
    """Iterations 1 (workers warming up: first torch calls, caches) and 2; (result of 2, wall s of 1, wall s and CPU s of 2)."""
    t0 = time.time()
    refine_iteration(src, opts, state, device="cpu")
    t1, c1 = time.time(), time.process_time()
    res = refine_iteration(src, opts, state, device="cpu")
    return res, t1 - t0, time.time() - t1, time.process_time() - c1


def payload_bytes(box: int, k: int) -> int:
    """Bytes of one pass's shared inputs (what goes to every worker once per pass) at a global 15 deg search."""
    comps = fourier_components(box, box, 3)
    cfg = PassConfig(box, box // 2, torch.ones((box,) * 3), global_rotations(1), False, translation_grid(3.0, 2.0, 3),
                     EStepOptions(), batch_size=32)
    pay = PassPayload(torch.zeros((k,) + (box,) * 3), torch.ones(box // 2 + 1), comps, cfg, 2, True, "cpu", "x")
    return len(pickle.dumps(pay))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=128, help="particles")
    ap.add_argument("--box", type=int, default=32, help="box [px]")
    ap.add_argument("--order", type=int, default=1, help="HEALPix order of the global search (1: 15 deg oversampled)")
    ap.add_argument("--modes", default="none,local:1,local:2")
    add_json_option(ap)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from distributed import Client, LocalCluster

    from subtomo.jobs._cluster import DaskRunner

    ds = make_set(n=args.n, box=args.box, pixel_size_A=10.0, snr=2.0, seed=3, max_offset_px=1.0)
    src = InMemorySource(ds.volumes, ds.pixel_size_A, ds.ctfs)
    halves = np.arange(args.n) % 2 + 1
    opts = RefineOptions(particle_diameter_A=ds.diameter_A, healpix_order=args.order, offset_range_px=2,
                         offset_step_px=2, batch_size=8, seed=1)
    figures: dict = {}
    ref = None
    print(f"{args.n} particles, box {args.box}, global search order {args.order}; iterations 1 and 2 per mode "
          "(client CPU: iteration 2; worker CPU and bytes sent: both; differences: iteration 2 against none)")
    print(f"{'mode':>8} {'it1 wall s':>10} {'it2 wall s':>10} {'client CPU s':>13} {'worker CPU s':>13} {'sent MB':>8} "
          f"{'max pose diff':>14} {'map rel diff':>13}")
    for mode in args.modes.split(","):
        state = initialise_refinement(src, opts, halves, device="cpu")
        if mode == "none":
            res, first, wall, cpu = two_iterations(src, opts, state)
            wcpu, sent = 0.0, 0
        else:
            nw = int(mode.split(":")[1])
            with LocalCluster(n_workers=nw, threads_per_worker=1, processes=True, dashboard_address=":0",
                              silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
                runner = DaskRunner(client, nw, count_bytes=True)
                w0 = sum(client.run(time.process_time).values())
                res, first, wall, cpu = two_iterations(src, replace(opts, runner=runner), state)
                wcpu, sent = sum(client.run(time.process_time).values()) - w0, runner.bytes_scattered
        maps = torch.stack(res.half_maps)
        if ref is None:
            ref = (res.poses.rot.copy(), maps)
        dpose = float(np.abs(res.poses.rot - ref[0]).max())
        dmap = float((maps - ref[1]).abs().max() / ref[1].abs().max())
        print(f"{mode:>8} {first:10.2f} {wall:10.2f} {cpu:13.2f} {wcpu:13.2f} {sent / 1e6:8.2f} {dpose:14.2e} {dmap:13.2e}")
        key = mode.replace(":", "")
        figures.update({f"cluster.{key}.iteration_s": wall, f"cluster.{key}.first_iteration_s": first, f"cluster.{key}.client_cpu_s": cpu,
                        f"cluster.{key}.worker_cpu_s": wcpu, f"cluster.{key}.sent_MB": sent / 1e6,
                        f"cluster.{key}.max_pose_diff": dpose, f"cluster.{key}.map_rel_diff": dmap})
    if "cluster.none.iteration_s" in figures:
        for key in ("local1", "local2"):
            if f"cluster.{key}.iteration_s" in figures:
                figures[f"cluster.{key}.speedup_vs_none"] = figures["cluster.none.iteration_s"] / figures[f"cluster.{key}.iteration_s"]
                print(f"speed-up of {key} over none: {figures[f'cluster.{key}.speedup_vs_none']:.2f}x")
    print("bytes of one pass's shared inputs (sent once per worker and pass), global 15 deg search:")
    for box in (32, 64, 128):
        row = [payload_bytes(box, k) for k in (1, 4)]
        print(f"  box {box:3d}: K=1 {row[0] / 1e6:7.2f} MB, K=4 {row[1] / 1e6:7.2f} MB")
        figures[f"cluster.payload_box{box}_K1_MB"] = row[0] / 1e6
        figures[f"cluster.payload_box{box}_K4_MB"] = row[1] / 1e6
    write_figures(args.json, figures)


if __name__ == "__main__":
    main()
