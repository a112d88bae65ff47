"""Benchmark of 3D classification: two synthetic conformations, global search or --skip-align.

Prints classification accuracy against the true classes, class distribution, time per
iteration and peak memory.  python bench/bench_class3d.py --n 200 --box 48
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from subtomo.em.classify import ClassifyOptions, classify3d
from subtomo.em.iteration import InMemorySource
from subtomo.em.synthetic import blob_reference, make_set


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--box", type=int, default=48)
    ap.add_argument("--px", type=float, default=6.0)
    ap.add_argument("--snr", type=float, default=0.5)
    ap.add_argument("--iter", type=int, default=10)
    ap.add_argument("--global-search", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    a = blob_reference(args.box, rng)
    b = a.clone()
    # conformation B: one region of A changed (a focused-classification-like difference)
    extra = blob_reference(args.box, rng, n_blobs=3, radius_px=args.box * 0.25)
    b = b + 0.6 * extra
    half = args.n // 2
    sa = make_set(n=half, box=args.box, pixel_size_A=args.px, snr=args.snr, seed=1, reference=a)
    sb = make_set(n=args.n - half, box=args.box, pixel_size_A=args.px, snr=args.snr, seed=2, reference=b)
    src = InMemorySource(torch.cat([sa.volumes, sb.volumes]), args.px, torch.cat([sa.ctfs, sb.ctfs]))
    rot = np.concatenate([sa.rot, sb.rot])
    off = np.concatenate([sa.offset_px, sb.offset_px])
    truth = np.array([0] * half + [1] * (args.n - half))
    opts = ClassifyOptions(n_classes=2, particle_diameter_A=sa.diameter_A, n_iter=args.iter,
                           skip_align=not args.global_search, local=args.global_search, sigma_ang_deg=5.0,
                           healpix_order=3, offset_range_px=2)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.time()
        res = classify3d(src, opts, Path(tmp), initial_ref=a, initial_rot=rot, initial_offset_px=off, log=print)
        wall = time.time() - t
    cls = res["poses"].cls
    acc = max((cls == truth).mean(), (cls != truth).mean())
    print(f"accuracy {acc:.3f}, class distribution {res['class_priors'].numpy().round(3)}, {wall:.0f} s "
          f"({wall / args.iter:.1f} s/iteration), peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
