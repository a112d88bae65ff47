"""Benchmark of 3D auto-refine from random orientations against the oracle (true poses).

Default: synthetic subtomograms made by the engine's own simulator (subtomo.em.synthetic:
known reference and poses, missing wedge +-60 deg x CTF, white noise). With
``--project DIR`` it runs on a simulated pipeline project instead (simulate -> import ->
ctf -> prepare -> extract, ground truth in DIR/GroundTruth) through the refine3d job.

Prints: gold-standard resolution, oracle resolution and their ratio, FSC(map, truth) at
0.5 after aligning the map to the truth (global rotation from the poses), median angular
error after removing the global rotation, wall time, time per iteration, peak memory, and
the same refinement with the CTF model off. ``--scaling`` adds time per iteration vs
number of particles and box size.

    python bench/bench_refine3d.py --n 400 --box 64 --px 5
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from subtomo.em.iteration import InMemorySource
from subtomo.em.refine import RefineOptions, auto_refine, oracle, rotate_map
from subtomo.em.synthetic import align_to_reference, make_set
from subtomo.fourier import fsc_maps


def fsc_threshold_A(curve, box, px, thr):
    c = np.asarray(curve)
    below = np.nonzero(c[1:] < thr)[0]
    last = int(below[0]) if len(below) else len(c) - 1
    return box * px / max(last, 1)


def run(ds, args, use_ctf: bool, out: Path) -> dict:
    src = InMemorySource(ds.volumes, ds.pixel_size_A, ds.ctfs if use_ctf else None)
    opts = RefineOptions(particle_diameter_A=ds.diameter_A, healpix_order=args.order, offset_range_px=args.offset_range,
                         offset_step_px=2, max_iter=args.max_iter, batch_size=args.batch, use_ctf=use_ctf, seed=args.seed,
                         auto_local_order=args.order + 2)
    t = time.time()
    res = auto_refine(src, opts, out, log=print if args.verbose else (lambda m: None))
    wall = time.time() - t
    orc = oracle(src, ds.rot, ds.offset_px, res["halves"], use_ctf=use_ctf, diameter_A=ds.diameter_A)
    g, err = align_to_reference(res["poses"].rot, ds.rot)
    truth = rotate_map(ds.reference, g.T)
    f_truth = fsc_maps(res["final_map"], truth).numpy()
    f_or = fsc_maps(orc["map"], ds.reference).numpy()
    n_it = len(res["history"])
    return {"res": res["resolution_A"], "oracle": orc["resolution_A"], "ratio": res["resolution_A"] / orc["resolution_A"],
            "fsc_truth_05": fsc_threshold_A(f_truth, ds.volumes.shape[-1], ds.pixel_size_A, 0.5),
            "oracle_fsc_truth_05": fsc_threshold_A(f_or, ds.volumes.shape[-1], ds.pixel_size_A, 0.5),
            "median_err": float(np.median(err)), "wall": wall, "iters": n_it,
            "per_iter": [h["seconds"] for h in res["history"]]}


def report(tag, r):
    print(f"[{tag}] gold-standard {r['res']:.1f} A | oracle {r['oracle']:.1f} A | ratio {r['ratio']:.3f} | "
          f"FSC(map, truth)=0.5 at {r['fsc_truth_05']:.1f} A (oracle {r['oracle_fsc_truth_05']:.1f} A) | "
          f"median angular error {r['median_err']:.2f} deg | {r['iters']} iterations, {r['wall']:.0f} s "
          f"({np.mean(r['per_iter']):.1f} s/iteration, max {np.max(r['per_iter']):.1f})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--px", type=float, default=5.0)
    ap.add_argument("--snr", type=float, default=0.5)
    ap.add_argument("--order", type=int, default=2)
    ap.add_argument("--offset-range", type=float, default=3.0)
    ap.add_argument("--max-iter", type=int, default=25)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-ctf-run", action="store_true", help="skip the --no-ctf comparison")
    ap.add_argument("--scaling", action="store_true")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ds = make_set(n=args.n, box=args.box, pixel_size_A=args.px, snr=args.snr, seed=args.seed, max_offset_px=1.5)
    print(f"{args.n} particles, box {args.box}, {args.px} A/px, SNR {args.snr}, wedge +-60 deg, CTF; {args.threads} threads")
    with tempfile.TemporaryDirectory() as tmp:
        r = run(ds, args, True, Path(tmp) / "ctf")
        report("CTF on", r)
        if not args.no_ctf_run:
            r2 = run(ds, args, False, Path(tmp) / "noctf")
            report("CTF off", r2)
        if args.scaling:
            for n, box in ((args.n // 4, args.box), (args.n // 2, args.box), (args.n // 4, args.box // 2)):
                a = argparse.Namespace(**{**vars(args), "max_iter": 3})
                d = make_set(n=n, box=box, pixel_size_A=args.px * args.box / box, snr=args.snr, seed=1)
                rr = run(d, a, True, Path(tmp) / f"s{n}_{box}")
                print(f"[scaling] n={n} box={box}: {np.mean(rr['per_iter']):.1f} s/iteration")
    print(f"peak memory (RSS): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
