"""Benchmark: ``subtomo reconstruct`` (weighted back-projection) time, memory and accuracy.

Prints
* time and throughput (output voxels/s) of the WBP of a memory-mapped stack of
  ``--tilts`` images of ``--size`` × ``--size`` px into a tomogram ``--thickness`` thick, at
  binning 1 and 2, on the CPU (1 thread) and, if present, on the GPU, with the peak
  resident memory of the process (stack generation and the output arrays included)
  against the stack's size;
* accuracy: the correlation of the binning-1 tomogram of analytic Gaussian blobs with the
  same blobs drawn directly in 3D (low-pass limited by the missing wedge, so < 1);
* with ``--preset P``: a project simulated at preset P (seed 1), its aligned stacks
  reconstructed by ``subtomo reconstruct`` and correlated with the simulator's tomograms;
* with ``--protocol P``: the protocol (import → CTF from the true defoci → prepare → extract →
  refine3d de novo, as ``bench_refine3d.prepare_project`` runs it, with the demo's refine3d
  settings) twice on the same simulated project (preset P, ``--seed``): on the simulator's
  tomograms and on tomograms made by ``subtomo reconstruct`` from the simulator's aligned
  stacks; prints both gold-standard resolutions (and FSC with the truth). Heavy: use
  ``--threads 1`` on shared machines.

Usage: python bench/bench_reconstruct.py [--size 512] [--tilts 41] [--thickness 128] [--preset demo] [--json PATH]
       python bench/bench_reconstruct.py --protocol demo --threads 1 [--dir /tmp/bench_reconstruct_protocol]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import mrcfile
import numpy as np
from _common import add_json_option, peak_rss_MB, write_figures


def blob_stack(path: Path, n: int, tilts: np.ndarray, nz: int, rng: np.random.Generator, count: int = 60):
    """Write projections of random Gaussian blobs (tilt axis y) as a stack; return the blob centres (x, y, z)."""
    centres = np.stack([rng.uniform(8, n - 8, count), rng.uniform(8, n - 8, count), rng.uniform(8, nz - 8, count)], 1)
    x = np.arange(n)[None, :]
    y = np.arange(n)[:, None]
    with mrcfile.new_mmap(path, shape=(len(tilts), n, n), mrc_mode=2, overwrite=True) as m:
        for t, theta in enumerate(np.radians(tilts)):
            img = np.full((n, n), 100.0)
            for cx, cy, cz in centres:
                u = (cx - n / 2) * np.cos(theta) + (cz - nz / 2) * np.sin(theta) + n / 2
                img += np.exp(-((x - u) ** 2 + (y - cy) ** 2) / (2 * 2.0 ** 2))
            m.data[t] = img.astype(np.float32)
    return centres


def blob_volume(centres: np.ndarray, n: int, nz: int, sigma: float = 2.0) -> np.ndarray:
    """The same blobs drawn directly in 3D (each in a window of ±5 sigma)."""
    vol = np.zeros((nz, n, n), np.float32)
    r = int(5 * sigma) + 1
    for cx, cy, cz in centres:
        lo = [max(0, int(c) - r) for c in (cz, cy, cx)]
        hi = [min(s, int(c) + r + 1) for c, s in zip((cz, cy, cx), vol.shape)]
        z, y, x = np.meshgrid(*(np.arange(a, b) for a, b in zip(lo, hi)), indexing="ij", sparse=True)
        vol[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] += np.exp(
            -((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * sigma ** 2)).astype(np.float32)
    return vol


def bench_simulated(preset: str, figs: dict) -> None:
    """Reconstruct every tomogram of a simulated project with the job; correlate with the simulator's."""
    from subtomo.io.mrc import read_mrc
    from subtomo.jobs.base import execute
    from subtomo.jobs.reconstruct import SPEC, ReconstructParams
    from subtomo.jobs.simulate import SPEC as SIM
    from subtomo.jobs.simulate import SimulateParams

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        execute(SIM, SimulateParams(project_dir="p", preset=preset, seed=1, threads=1), root, quiet=True)
        figs[f"simulate_{preset}_s"] = time.perf_counter() - t0
        for d in sorted((root / "p" / "Tomograms").iterdir()):
            truth, _ = read_mrc(d / f"{d.name}.mrc")
            t0 = time.perf_counter()
            ctx = execute(SPEC, ReconstructParams(i=f"Tomograms/{d.name}/{d.name}.mrcs", thickness=truth.shape[0],
                                                  device="cpu", threads=1), root / "p", quiet=True)
            figs[f"reconstruct_{preset}_{d.name}_s"] = time.perf_counter() - t0
            vol, _ = read_mrc(ctx.path(f"{d.name}.mrc"))
            figs[f"corr_with_simulator_{preset}_{d.name}"] = float(np.corrcoef(vol.ravel(), truth.ravel())[0, 1])
            figs[f"max_abs_diff_{preset}_{d.name}_sigma"] = float(np.abs(vol - truth).max())


def reconstruct_into_layout(project: Path, threads: int) -> dict:
    """Replace each Tomograms/<t>/<t>.mrc of a simulated project by subtomo reconstruct of its aligned stack."""
    import shutil

    from subtomo.io.mrc import read_mrc
    from subtomo.jobs.base import execute
    from subtomo.jobs.reconstruct import SPEC, ReconstructParams

    corr = {}
    for d in sorted((project / "Tomograms").iterdir()):
        truth, _ = read_mrc(d / f"{d.name}.mrc")
        ctx = execute(SPEC, ReconstructParams(i=f"Tomograms/{d.name}/{d.name}.mrcs", thickness=truth.shape[0],
                                              device="cpu", threads=threads), project, quiet=True)
        vol, _ = read_mrc(ctx.path(f"{d.name}.mrc"))
        corr[d.name] = float(np.corrcoef(vol.ravel(), truth.ravel())[0, 1])
        (d / f"{d.name}.mrc").unlink()
        shutil.copyfile(ctx.path(f"{d.name}.mrc"), d / f"{d.name}.mrc")
    return corr


def bench_protocol(preset: str, seed: int, threads: int, base: Path, figs: dict) -> None:
    """Refined resolution of the protocol on the simulator's tomograms vs on subtomo reconstruct's."""
    import argparse as _argparse

    from bench_refine3d import prepare_project, report, run_refine, sh

    base.mkdir(parents=True, exist_ok=True)
    results = {}
    for tag in ("simulator", "reconstructed"):
        project = (base / tag).resolve()
        if not (project / "GroundTruth").exists():
            sh(["simulate", str(project), "--preset", preset, "--seed", str(seed), "--threads", str(threads)], base)
            if tag == "reconstructed":
                for name, c in reconstruct_into_layout(project, threads).items():
                    figs[f"protocol.corr_with_simulator_{name}"] = c
                    print(f"{name}: subtomo reconstruct vs the simulator's tomogram: correlation {c:.4f}", flush=True)
        info = prepare_project(project, preset, seed, threads, False, [])
        diameter = round(float(info["sim"]["structure"]["diameter_A"]) * 1.1)  # as the demo
        args = _argparse.Namespace(diameter=diameter, threads=threads, seed=seed, max_iter=12, offset_range=3.0,
                                   healpix_step=15.0, sym="C1",
                                   sym_eval=info["sim"]["structure"].get("symmetry") or "C1")
        r = run_refine(project, project / "particles_true.star", args, True, tag)
        report(tag, r)
        results[tag] = r
        figs[f"protocol.{tag}.gold_A"] = r["gold_A"]
        figs[f"protocol.{tag}.fsc_truth_05_A"] = r["fsc_truth_05_A"]
    a, b = results["simulator"], results["reconstructed"]
    print(f"protocol ({preset}, seed {seed}): refined gold-standard resolution {a['gold_A']:.2f} A on the simulator's "
          f"tomograms, {b['gold_A']:.2f} A on subtomo reconstruct's; FSC(map, truth)=0.5 at {a['fsc_truth_05_A']:.1f} vs "
          f"{b['fsc_truth_05_A']:.1f} A", flush=True)


def main() -> None:
    import torch

    from subtomo.tomo.reconstruct import reconstruct_stack

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--tilts", type=int, default=41)
    ap.add_argument("--thickness", type=int, default=128)
    ap.add_argument("--preset", default=None, help="also reconstruct a project simulated at this preset")
    ap.add_argument("--protocol", default=None, choices=["tiny", "demo", "benchmark"],
                    help="only: the protocol's refined resolution on simulator vs reconstructed tomograms at this preset")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dir", default="/tmp/bench_reconstruct_protocol", help="--protocol: projects folder (reused)")
    add_json_option(ap)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.protocol:
        figs_p: dict = {}
        bench_protocol(args.protocol, args.seed, args.threads, Path(args.dir), figs_p)
        write_figures(args.json, figs_p)
        return
    tilts = np.linspace(-60, 60, args.tilts)
    figs: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        stack = Path(tmp) / "stack.mrcs"
        centres = blob_stack(stack, args.size, tilts, args.thickness, np.random.default_rng(0))
        figs["stack_MB"] = stack.stat().st_size / 2 ** 20
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        for device in devices:
            for binning in (1, 2):
                nz = args.thickness // binning
                with mrcfile.mmap(stack, mode="r") as m:
                    out = np.zeros((nz, args.size // binning, args.size // binning), np.float32)
                    t0 = time.perf_counter()
                    reconstruct_stack(m.data, tilts, nz, out, binning, device)
                    dt = time.perf_counter() - t0
                figs[f"wbp_{device}_bin{binning}_s"] = dt
                figs[f"wbp_{device}_bin{binning}_Mvoxel_per_s"] = out.size / dt / 1e6
                if binning == 1 and device == "cpu":
                    first = out
        figs["peak_rss_wbp_MB"] = peak_rss_MB()  # before the accuracy check's full-size copies
        truth = blob_volume(centres, args.size, args.thickness)
        figs["corr_with_blobs_bin1"] = float(np.corrcoef(first.ravel(), truth.ravel())[0, 1])
    if args.preset:
        bench_simulated(args.preset, figs)
    for k, v in figs.items():
        print(f"{k:32s} {v:10.3f}")
    write_figures(args.json, figs)


if __name__ == "__main__":
    main()
