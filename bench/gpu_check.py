"""The same refinement on cpu and cuda: time, peak memory, and how far apart the poses and maps are.

Runs ``subtomo.em.refine.auto_refine`` (gold-standard, from random orientations) on one
simulated set (``subtomo.testing.synthetic.make_set``) for ``--iters`` iterations, once per
device, each in its own process, with the same seed and options; then prints per device the
wall time and peak memory (cpu: resident high-water mark of the process; cuda:
``torch.cuda.max_memory_allocated``), and between the devices the largest and median
angular difference of the poses [deg], the largest offset difference [px], the share of
particles with the same best pose, the final maps' largest difference relative to the map's
range and their correlation, and both resolutions. ``--engine-box 128`` adds one 7.5 deg global
E-step pass at that box per device (bench_engine's worker: time per particle, peak memory
under the default ``pass_memory_bytes``). Without a GPU it says so and prints the cpu
figures only.

    python bench/gpu_check.py                     # box 32, 40 particles, 4 iterations
    python bench/gpu_check.py --engine-box 128    # plus a global pass at box 128 on each device
    python bench/gpu_check.py --devices cpu cpu   # the comparison itself, on a machine without a GPU
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _peak_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(device: str, out: str, args) -> None:
    """One refinement on ``device``; poses, map and figures saved to ``out``."""
    from subtomo.em.iteration import InMemorySource
    from subtomo.em.refine import RefineOptions, auto_refine
    from subtomo.testing.synthetic import make_set

    torch.set_num_threads(args.threads)
    ds = make_set(n=args.n, box=args.box, pixel_size_A=10.0, snr=2.0, seed=5, max_offset_px=1.0)
    src = InMemorySource(ds.volumes, ds.pixel_size_A, ds.ctfs)
    opts = RefineOptions(particle_diameter_A=ds.diameter_A, healpix_order=1, offset_range_px=2, offset_step_px=2,
                         max_iter=args.iters, batch_size=20, auto_local_order=3, max_order=2, seed=3)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    res = auto_refine(src, opts, device=device, log=lambda m: None)
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t
    figs = {"wall_s": wall, "peak_MB": _peak_mb(device), "resolution_A": res.resolution_A,
            "iterations": res.iterations}
    if args.engine_box:
        import bench_engine
        eng = bench_engine.worker(args.engine_box, "global", args.engine_n, 0.5, args.threads, False, device=device)
        figs.update({"engine_s_per_particle": eng["s_per_particle"], "engine_peak_MB": eng["peak_MB"]})
    torch.save({"rot": res.poses.rot, "offset": res.poses.offset_px, "map": res.final_map.cpu(), "figs": figs}, out)


def compare(a: dict, b: dict) -> dict:
    """Largest differences of poses [deg, px] and maps between two runs."""
    # rotation angle of R1 R2^T from the chordal distance |R1 - R2|_F = 2 sqrt(2) sin(angle / 2): no arccos
    # rounding near 0 deg (arccos of a trace of 3 - 1e-7 is already 0.02 deg)
    chord = np.linalg.norm(a["rot"] - b["rot"], axis=(1, 2))
    ang = np.degrees(2 * np.arcsin(np.clip(chord / np.sqrt(8), 0, 1)))
    off = np.linalg.norm(a["offset"] - b["offset"], axis=1)
    ma, mb = a["map"].double().flatten(), b["map"].double().flatten()
    rng = float(ma.max() - ma.min())
    return {"max_ang_deg": float(ang.max()), "median_ang_deg": float(np.median(ang)), "max_off_px": float(off.max()),
            "same_pose": float(np.mean(chord < 1e-6)), "map_max_rel": float((ma - mb).abs().max()) / max(rng, 1e-30),
            "map_corr": float(torch.corrcoef(torch.stack([ma, mb]))[0, 1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--box", type=int, default=32)
    ap.add_argument("--n", type=int, default=40, help="particles")
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--engine-box", type=int, default=0, help="also one global E-step pass at this box")
    ap.add_argument("--engine-n", type=int, default=16)
    ap.add_argument("--devices", nargs="+", default=None, choices=["cpu", "cuda"],
                    help="devices to run, the first two compared (default: cpu cuda)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.out, args)
        return
    devices = args.devices or ["cpu", "cuda"]
    if "cuda" in devices and not torch.cuda.is_available():
        print("cuda is not available on this machine (torch.cuda.is_available() is False): cpu figures only")
        devices = [d for d in devices if d != "cuda"]
    elif "cuda" in devices:
        print(f"cuda: {torch.cuda.get_device_name(0)}")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for j, dev in enumerate(devices):
            out = str(Path(tmp) / f"{j}_{dev}.pt")
            cmd = [sys.executable, __file__, "--worker", dev, "--out", out, "--box", str(args.box), "--n", str(args.n),
                   "--iters", str(args.iters), "--threads", str(args.threads), "--engine-box", str(args.engine_box),
                   "--engine-n", str(args.engine_n)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                print(f"{dev}: failed\n{(r.stdout + r.stderr)[-3000:]}")
                continue
            runs.append((dev, torch.load(out, weights_only=False)))
    print(f"refinement: box {args.box}, {args.n} particles, up to {args.iters} iterations, {args.threads} thread(s)")
    for dev, run in runs:
        f = run["figs"]
        line = (f"  {dev:<5} {f['wall_s']:8.1f} s   peak {f['peak_MB']:8.0f} MB   {f['iterations']} iterations   "
                f"resolution {f['resolution_A']:.1f} A")
        if "engine_s_per_particle" in f:
            line += (f"   | global pass box {args.engine_box}: {f['engine_s_per_particle']:.2f} s/particle, "
                     f"peak {f['engine_peak_MB']:.0f} MB")
        print(line)
    if len(runs) >= 2:
        c = compare(runs[0][1], runs[1][1])
        print(f"{runs[0][0]} vs {runs[1][0]}: poses max {c['max_ang_deg']:.3f} deg (median {c['median_ang_deg']:.3f}), "
              f"offsets max {c['max_off_px']:.3f} px, same best pose {100 * c['same_pose']:.1f} %; "
              f"maps max |diff| {c['map_max_rel']:.2e} of the range, correlation {c['map_corr']:.6f}")
        print(json.dumps(c))


if __name__ == "__main__":
    main()
