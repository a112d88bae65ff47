"""Benchmark: 3D CTF model building and subtomogram extraction from a large tomogram.

Prints
* the time of ``ctf3d_from_tilts`` for 100 particles × 41 tilts at box 64 (full size and a
  current size of 32), on the CPU with 1 thread and, if present, on the GPU;
* extraction throughput (subtomograms/s) and peak resident memory of ``subtomo extract``
  run in a fresh process on a tomogram of ≥ 2 GB (written with mrcfile.new_mmap under
  /tmp and deleted afterwards), against the tomogram's size (target: peak increase < 10%).

Usage: python bench/bench_extract.py [--gb 2.2] [--particles 300] [--box 64] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
from _common import add_json_option, write_figures


def bench_ctf3d(figs: dict, device: str = "cpu", threads: int = 1) -> None:
    import torch

    from subtomo.tomo.ctf3d import ctf3d_from_tilts

    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    b, box = 100, 64
    tilts = np.tile(np.arange(-60.0, 61.0, 3.0), (b, 1))
    t = tilts.shape[1]
    dose = np.abs(tilts) / 3 * 2.5
    args = dict(defocus_A=rng.uniform(30000, 40000, (b, t)), tilt_deg=tilts, bfactor_A2=4 * dose,
                scale=np.cos(np.deg2rad(tilts)), box=box, pixel_size_A=2.2, voltage_kV=300.0, cs_mm=2.7,
                amplitude_contrast=0.07, device=device)
    for size in (box, 32):
        ctf3d_from_tilts(**args, size=size)  # warm-up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            ctf3d_from_tilts(**args, size=size)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        figs[f"extract.ctf3d_{device}_{b}x{t}_box{box}_size{size}_ms"] = min(times) * 1e3
        print(f"ctf3d_from_tilts {b} particles x {t} tilts, box {box}, size {size}, {device} "
              f"({threads} thread(s)): {min(times) * 1e3:.0f} ms (best of 3)")
    # astigmatic variant
    args["defocus_v_A"] = args["defocus_A"] - 1000
    args["astig_angle_deg"] = np.full((b, t), 30.0)
    t0 = time.perf_counter()
    ctf3d_from_tilts(**args)
    figs[f"extract.ctf3d_{device}_{b}x{t}_box{box}_astigmatic_ms"] = (time.perf_counter() - t0) * 1e3
    print(f"  astigmatic, size {box}: {figs[f'extract.ctf3d_{device}_{b}x{t}_box{box}_astigmatic_ms']:.0f} ms")


def make_tomogram(path: Path, gb: float) -> tuple[int, int, int]:
    import mrcfile

    nz = 200
    nxy = int(np.sqrt(gb * 1e9 / 4 / nz))
    shape = (nz, nxy - nxy % 2, nxy + 100)
    rng = np.random.default_rng(0)
    block = rng.standard_normal((shape[1], shape[2])).astype(np.float32)
    t0 = time.perf_counter()
    with mrcfile.new_mmap(path, shape=shape, mrc_mode=2, overwrite=True) as mrc:
        for z in range(nz):
            mrc.data[z] = np.roll(block, 37 * z, axis=1)
        mrc.voxel_size = 2.2
    size = path.stat().st_size
    print(f"tomogram {shape[2]}x{shape[1]}x{shape[0]} (x,y,z) = {size / 1e9:.2f} GB written in {time.perf_counter() - t0:.1f} s")
    return shape


CHILD = textwrap.dedent("""
    import json, resource, sys, time, torch
    torch.set_num_threads(1)
    from subtomo.jobs.base import execute
    from subtomo.jobs.extract import SPEC, ExtractParams
    def status_mb(key):
        # VmHWM is this process image's peak RSS (ru_maxrss would inherit the parent's peak across fork+exec)
        for line in open('/proc/self/status'):
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    base = status_mb('VmRSS')
    args = json.loads(sys.argv[1])
    t0 = time.perf_counter()
    execute(SPEC, ExtractParams(**args), sys.argv[2], quiet=True)
    dt = time.perf_counter() - t0
    peak = status_mb('VmHWM')
    print(json.dumps({"baseline_mb": base, "peak_mb": peak, "seconds": dt}))
""")


def bench_extract(gb: float, n_particles: int, box: int, keep: bool, figs: dict) -> None:
    import pandas as pd

    from subtomo.io.star import write_particles

    root = Path(tempfile.mkdtemp(prefix="subtomo_bench_extract_", dir="/tmp"))
    try:
        tdir = root / "Tomograms" / "big"
        tdir.mkdir(parents=True)
        tomo = tdir / "big.mrc"
        nz, ny, nx = make_tomogram(tomo, gb)
        size_mb = tomo.stat().st_size / 2 ** 20
        rng = np.random.default_rng(1)
        coords = np.stack([rng.uniform(0, nx, n_particles), rng.uniform(0, ny, n_particles),
                           rng.uniform(0, nz, n_particles)], 1)
        parts = pd.DataFrame({
            "rlnMicrographName": "Tomograms/big/big.mrc", "rlnTomoName": "big",
            "rlnCoordinateX": coords[:, 0], "rlnCoordinateY": coords[:, 1], "rlnCoordinateZ": coords[:, 2],
            "rlnTomoParticleId": np.arange(1, n_particles + 1), "rlnTomoTiltSeriesPixelSize": 2.2, "rlnOpticsGroup": 1,
        })
        optics = pd.DataFrame([{"rlnOpticsGroup": 1, "rlnVoltage": 300.0, "rlnSphericalAberration": 2.7,
                                "rlnAmplitudeContrast": 0.07, "rlnImagePixelSize": 2.2, "rlnImageDimensionality": 3}])
        write_particles(root / "particles.star", parts, optics)
        env = dict(os.environ, OMP_NUM_THREADS="1")
        runs = [("3D", "3d", dict(box=box, device="cpu", threads=1)),
                ("3D + z-projections, rescaled to box/2", "3d_proj_rescaled",
                 dict(box=box, rescale=box // 2, project=True, device="cpu", threads=1))]
        figs["extract.tomogram_MB"] = size_mb
        for label, key, extra in runs:
            args = dict(i="particles.star", **extra)
            out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args), str(root)], env=env,
                                 capture_output=True, text=True)
            if out.returncode:
                print(out.stderr)
                raise SystemExit("extraction failed")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            inc = r["peak_mb"] - r["baseline_mb"]
            figs.update({f"extract.{key}_subtomograms_per_s": n_particles / r["seconds"], f"extract.{key}_peak_rss_MB": r["peak_mb"],
                         f"extract.{key}_rss_increase_pct": 100 * inc / size_mb})
            print(f"extract {label}: {n_particles} subtomograms of {box}^3 in {r['seconds']:.1f} s = "
                  f"{n_particles / r['seconds']:.1f} subtomograms/s; peak RSS {r['peak_mb']:.0f} MB "
                  f"(process baseline after imports {r['baseline_mb']:.0f} MB, increase {inc:.0f} MB) vs tomogram "
                  f"{size_mb:.0f} MB: increase = {100 * inc / size_mb:.1f}% of the tomogram, whole peak = "
                  f"{100 * r['peak_mb'] / size_mb:.1f}%")
    finally:
        if keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def _rotated_map(vol, a_matrix, n: int):
    """particle(r) = reference(Aᵀ r) on an n³ grid centred at n//2 (trilinear, torch grid_sample)."""
    import torch

    m = vol.shape[-1]
    ax = torch.arange(n, dtype=torch.float64) - n // 2
    z, y, x = torch.meshgrid(ax, ax, ax, indexing="ij")
    r = torch.stack([x, y, z], -1).reshape(-1, 3)
    q = r @ torch.as_tensor(a_matrix, dtype=torch.float64)  # rows: (Aᵀ r)ᵀ = rᵀ A
    idx = q + m // 2  # reference voxel index (x, y, z)
    g = (2 * idx / (m - 1) - 1).reshape(1, n, n, n, 3).float()
    out = torch.nn.functional.grid_sample(vol[None, None].float(), g, mode="bilinear", padding_mode="zeros",
                                          align_corners=True)
    return out[0, 0]


def bench_ctf_accuracy(figs: dict, seed: int = 0) -> None:
    """Simulated project (subtomo.simulate): how well does each 3D CTF model explain the extracted subtomograms?

    For every true particle: X = FT of the extracted subtomogram (translated by its origin), M = CTF3D · FT of
    the true map rotated to the true pose. Prints the correlation Σ Re(X M*) / sqrt(Σ|X|² Σ|M|²) over all
    particles in resolution bands, for the exact and relion defocus models, the wedge-only model, a model with
    the CTF sign flipped, and no model at all (M = map).
    """
    import torch

    from subtomo.fourier import fft_centered, phase_shift, shell_index
    from subtomo.geometry.euler import euler_to_matrix
    from subtomo.io.mrc import read_mrc
    from subtomo.io.particles import read_particles
    from subtomo.io.star import read_star_table, write_star
    from subtomo.jobs import extract as jx
    from subtomo.jobs import import_tomograms as ji
    from subtomo.jobs import prepare as jp
    from subtomo.jobs.base import execute
    from subtomo.simulate.presets import config_for
    from subtomo.simulate.project import simulate_project
    from subtomo.tomo.ctf3d import ParticleCtfModels

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="subtomo_bench_ctfacc_", dir="/tmp"))
    try:
        cfg = config_for("tiny", dict(pixel_size=4.0, tomo_size=[384, 384, 96], ice_thickness=360.0, n_particles=30,
                                      tilt_step=3.0, class_fractions=[1.0], n_fiducials=0, n_junk=0, trials=False))
        t0 = time.perf_counter()
        summary = simulate_project(cfg, root, seed, log=lambda m: None)
        print(f"simulated {cfg.tomo_size} px at {cfg.pixel_size} A, {cfg.n_particles} particles, "
              f"{len(np.arange(cfg.tilt_min, cfg.tilt_max + 1e-6, cfg.tilt_step))} tilts in {time.perf_counter() - t0:.0f} s")
        box = int(summary["box_px"])
        imp = execute(ji.SPEC, ji.ImportParams(), root, quiet=True)
        tomos = read_star_table(imp.dir / "all_tomograms.star")
        truth_tilts = read_star_table(root / "GroundTruth/tilts.star")
        ctf_dir = root / "CtfFind/job900"
        paths = []
        for name in tomos["rlnTomoName"]:
            rows = truth_tilts[truth_tilts["rlnTomoName"] == name]
            cols = ["rlnMicrographName", "rlnTomoNominalStageTiltAngle", "rlnMicrographPreExposure", "rlnDefocusU",
                    "rlnDefocusV", "rlnDefocusAngle"]
            paths.append(str(write_star(ctf_dir / f"{name}_ctffind.star", {name: rows[cols]}).relative_to(root)))
        tomos["subtomoCtfResultsStar"] = paths
        write_star(ctf_dir / "ctf_tomograms.star", tomos)
        ctf_in = str((ctf_dir / "ctf_tomograms.star").relative_to(root))
        variants = {
            "exact": execute(jp.SPEC, jp.PrepareParams(i=ctf_in, plot_box=32, device="cpu"), root, quiet=True),
            "relion": execute(jp.SPEC, jp.PrepareParams(i=ctf_in, defocus_model="relion", plot_box=32, device="cpu"),
                              root, quiet=True),
            "wedge-only": execute(jp.SPEC, jp.PrepareParams(i=ctf_in, skip_ctf=True, plot_box=32, device="cpu"), root,
                                  quiet=True),
        }
        ex = execute(jx.SPEC, jx.ExtractParams(i=f"{variants['exact'].name}particles_subtomo.star", box=box, device="cpu"),
                     root, quiet=True)
        parts, _ = read_particles(ex.dir / "particles_subtomo.star")
        picks = read_star_table(root / "GroundTruth/picks.star")
        parts = parts.merge(picks[["rlnTomoName", "rlnTomoParticleId", "subtomoKind", "rlnClassNumber", "rlnAngleRot",
                                   "rlnAngleTilt", "rlnAnglePsi"]], on=["rlnTomoName", "rlnTomoParticleId"])
        parts = parts[parts["subtomoKind"] == "particle"].reset_index(drop=True)
        px = float(parts["rlnImagePixelSize"].iloc[0])
        maps = {}
        shells = shell_index((box, box, box))
        nsh = box // 2 + 1
        models, params = {}, {}
        for name, job in variants.items():
            alt = parts.copy()
            alt["subtomoCtfModel"] = [r.replace(variants["exact"].name, job.name) for r in alt["subtomoCtfModel"]]
            params[name] = ParticleCtfModels.from_particles(alt, root)
            models[name] = params[name].volumes(np.arange(len(alt)), box)
        diff = np.abs(params["exact"].defocus_u_A - params["relion"].defocus_u_A)
        figs["extract.exact_vs_relion_defocus_diff_mean_A"] = np.nanmean(diff)
        print(f"exact vs relion defocus model: per-particle per-tilt defocus differs by {np.nanmean(diff):.0f} A on "
              f"average, {np.nanmax(diff):.0f} A at most")
        models["CTF sign flipped"] = -models["exact"]
        sums = {k: np.zeros((3, nsh)) for k in [*models, "no model (map only)"]}
        for i, row in parts.iterrows():
            x = torch.from_numpy(read_mrc(root / row["rlnImageName"])[0]).double()
            shift = torch.tensor([row["rlnOriginXAngst"], row["rlnOriginYAngst"], row["rlnOriginZAngst"]]) / px
            xf = phase_shift(fft_centered(x, 3), shift.double(), (box, box, box))
            k = int(row["rlnClassNumber"])
            if k not in maps:
                maps[k] = torch.from_numpy(read_mrc(root / f"GroundTruth/class{k:03d}.mrc")[0]).double()
            a = euler_to_matrix(row["rlnAngleRot"], row["rlnAngleTilt"], row["rlnAnglePsi"])
            vf = fft_centered(_rotated_map(maps[k], a, box).double(), 3)
            for name in sums:
                m = vf if name.startswith("no model") else vf * models[name][i].double()
                for j, val in enumerate(((xf * m.conj()).real, xf.abs() ** 2, m.abs() ** 2)):
                    sums[name][j] += np.bincount(shells.reshape(-1).numpy(), val.reshape(-1).numpy(), minlength=nsh)[:nsh]
        bands = [(2, nsh // 4), (nsh // 4, nsh // 2), (nsh // 2, 3 * nsh // 4), (3 * nsh // 4, nsh)]
        head = "  ".join(f"{box * px / b[0]:5.1f}-{box * px / max(b[1] - 1, 1):4.1f} A" for b in bands)
        print(f"correlation of extracted subtomograms with model x true map ({len(parts)} particles, box {box}, "
              f"{px:g} A/px), per resolution band:\n  {'model':22s}{head}")
        for name, (cross, xx, mm) in sums.items():
            vals = [cross[a:b].sum() / np.sqrt(xx[a:b].sum() * mm[a:b].sum() + 1e-30) for a, b in bands]
            if name in ("exact", "wedge-only", "no model (map only)"):
                tag = name.split(" ")[0].replace("-", "_")
                figs.update({f"extract.corr_{tag}_band{j + 1}": v for j, v in enumerate(vals)})
            print(f"  {name:22s}" + "  ".join(f"{v:12.4f}" for v in vals))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gb", type=float, default=2.2, help="tomogram size on disk [GB]")
    ap.add_argument("--particles", type=int, default=300)
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--keep", action="store_true", help="keep the temporary project")
    ap.add_argument("--skip-ctf3d", action="store_true")
    ap.add_argument("--skip-extract", action="store_true")
    ap.add_argument("--skip-accuracy", action="store_true", help="skip the simulated-project CTF model check")
    add_json_option(ap)
    a = ap.parse_args()
    figs = {}
    if not a.skip_ctf3d:
        bench_ctf3d(figs, "cpu", 1)
        import torch

        if torch.cuda.is_available():
            bench_ctf3d(figs, "cuda", 1)
    if not a.skip_extract:
        bench_extract(a.gb, a.particles, a.box, a.keep, figs)
    if not a.skip_accuracy:
        try:
            import subtomo.simulate.project  # noqa: F401
        except ImportError:
            print("subtomo.simulate not available: CTF model accuracy check skipped")
        else:
            bench_ctf_accuracy(figs)
    write_figures(a.json, figs)


if __name__ == "__main__":
    main()
