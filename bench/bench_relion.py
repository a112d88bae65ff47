"""subtomo refine3d against RELION 3.1's relion_refine_mpi on the same particles (issue 15).

The same true particles of a simulated project (``bench_refine3d.prepare_project``: simulate
-> import -> true-defocus CTF node -> prepare -> extract -> a perfect Select) are refined

* by ``subtomo refine3d --ref REF --ini-high L`` (gold standard, C1), and
* by ``mpirun -n 3 relion_refine_mpi --auto_refine --split_random_halves`` (CPU, one thread per
  rank) on ``subtomo export-relion``'s files (the same subtomograms, RELION's own CTF volumes
  of the same 3D CTF models),

from the same reference (the true map low-passed to ``--ini-high``, CTF-corrected) and the same
initial sampling (``--healpix-order`` 3 = 7.5 deg by default, 2 = 15 deg; local from 3.75 deg;
offsets 3 px in 1 px steps), optionally both stopped after ``--max-iter`` iterations (RELION's
``--auto_iter_max``; a run stopped there reports the resolution it had reached).
For each: wall time, CPU time (of the process tree), iterations, final gold-standard
resolution (FSC 0.143 of RELION's or our run_model.star), FSC(final map, true map) = 0.5 after
aligning the truth to the map, and the median angular error against the true poses after
removing the global rotation (``bench_refine3d.evaluate``, the same scorer for both).

    python bench/bench_relion.py --preset benchmark --dir /tmp/bench_relion --threads 2

On 2 shared CPU cores the benchmark preset takes RELION over an hour; the table in
docs/performance.md ("RELION 3.1 on the same particles") is the demo preset with coarser
sampling and at most 8 iterations, about 15 minutes in all:

    python bench/bench_relion.py --preset demo --healpix-order 2 --max-iter 8 --threads 2

Needs RELION 3.1 (``apt-get install -y relion``) and mpirun; as root set
OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 (done here).
"""

from __future__ import annotations

import argparse
import glob
import os
import resource
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from _common import add_json_option, write_figures
from bench_refine3d import evaluate, prepare_project, sh

from subtomo.io.mrc import read_mrc, write_mrc
from subtomo.io.particles import read_particles
from subtomo.io.star import write_particles


def _children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def lowpass(vol: np.ndarray, px: float, res_A: float) -> np.ndarray:
    """Soft (raised-cosine, 2 shells) low-pass of a cube to ``res_A``."""
    n = vol.shape[0]
    k = np.fft.fftfreq(n)
    r = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2) * n
    cut = n * px / res_A
    w = np.clip((cut + 1 - r) / 2, 0, 1)
    return np.fft.ifftn(np.fft.fftn(vol) * (0.5 - 0.5 * np.cos(np.pi * w))).real.astype(np.float32)


def run_subtomo(project: Path, star: Path, ref: Path, args) -> dict:
    before = set(glob.glob(str(project / "Refine3D/job*")))
    cpu0, t = _children_cpu_s(), time.time()
    sh(["refine3d", "--i", str(star.relative_to(project)), "--ref", str(ref.relative_to(project)), "--ini-high",
        str(args.ini_high), "--particle-diameter", str(args.diameter), "--threads", str(args.threads), "--healpix-step",
        f"{7.5 * 2 ** (3 - args.healpix_order):g}", "--auto-local-healpix-step", "3.7", "--offset-range", "3",
        "--offset-step", "1", "--sym", args.sym, *(["--max-iter", str(args.max_iter)] if args.max_iter else [])],
       project, project / "refine_subtomo.log")
    wall, cpu = time.time() - t, _children_cpu_s() - cpu0
    job = Path(sorted(set(glob.glob(str(project / "Refine3D/job*"))) - before)[-1])
    iters = len([f for f in glob.glob(str(job / "run_it*_data.star")) if "run_it000" not in f])
    return {"wall_s": wall, "cpu_s": cpu, "iterations": iters, "job": job}


def run_relion(project: Path, star: Path, ref: Path, args) -> dict:
    """relion_refine_mpi on the export-relion files; its outputs tagged with our particle ids for the scorer."""
    sh(["export-relion", "--i", str(star.relative_to(project)), "--particle-diameter", str(args.diameter)], project)
    exp = Path(sorted(glob.glob(str(project / "ExportRelion/job*")))[-1])
    out = project / "RelionRefine"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    cmd = ["mpirun", "-n", str(args.ranks), "--oversubscribe", "relion_refine_mpi", "--o", "RelionRefine/run",
           "--auto_refine", "--split_random_halves", "--i", str((exp / "particles_relion.star").relative_to(project)),
           "--ref", str(ref.relative_to(project)), "--ctf_corrected_ref", "--ini_high", str(args.ini_high), "--ctf",
           "--particle_diameter", str(args.diameter), "--flatten_solvent", "--zero_mask", "--oversampling", "1",
           "--healpix_order", str(args.healpix_order), "--auto_local_healpix_order", "4", "--offset_range", "3",
           "--offset_step", "1", "--sym", args.sym, "--low_resol_join_halves", "40", "--norm", "--scale", "--pad", "2",
           "--j", "1", "--dont_combine_weights_via_disc", "--pool", "3",
           *(["--auto_iter_max", str(args.max_iter)] if args.max_iter else [])]
    cpu0, t = _children_cpu_s(), time.time()
    r = subprocess.run(cmd, cwd=project, capture_output=True, text=True, env=env)
    wall, cpu = time.time() - t, _children_cpu_s() - cpu0
    (project / "refine_relion.log").write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        raise RuntimeError(f"relion_refine_mpi failed:\n{(r.stdout + r.stderr)[-3000:]}")
    # stopped by --auto_iter_max before converging, RELION writes only the iteration's files: the last one, its
    # half maps averaged, and its half-1 model (which holds the gold-standard FSC)
    last = sorted(glob.glob(str(out / "run_it*_data.star")))[-1].removesuffix("_data.star")
    converged = (out / "run_class001.mrc").exists()
    data = out / "run_data.star" if converged else Path(f"{last}_data.star")
    # RELION keeps only RELION 3.1 labels: put back rlnTomoName/rlnTomoParticleId (same order as the export)
    ours, optics = read_particles(star)
    theirs, roptics = read_particles(data)
    exported, _ = read_particles(exp / "particles_relion.star")
    index = {name: i for i, name in enumerate(exported["rlnImageName"])}
    rows = [index[name] for name in theirs["rlnImageName"]]
    for c in ("rlnTomoName", "rlnTomoParticleId"):
        theirs[c] = ours[c].to_numpy()[rows]
    theirs = theirs.drop(columns=[c for c in roptics.columns if c in theirs.columns and c != "rlnOpticsGroup"])
    tagged = project / "RelionEval"
    tagged.mkdir(exist_ok=True)
    write_particles(tagged / "run_data.star", theirs, roptics)
    if converged:
        for name in ("run_class001.mrc", "run_model.star"):
            shutil.copyfile(out / name, tagged / name)
    else:
        halves = [read_mrc(Path(f"{last}_half{h}_class001.mrc")) for h in (1, 2)]
        write_mrc(tagged / "run_class001.mrc", (halves[0][0] + halves[1][0]) / 2, halves[0][1])
        shutil.copyfile(f"{last}_half1_model.star", tagged / "run_model.star")
    iters = len([f for f in glob.glob(str(out / "run_it*_half1_model.star")) if "run_it000" not in f])
    return {"wall_s": wall, "cpu_s": cpu, "iterations": iters, "job": tagged, "converged": converged}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="benchmark", choices=["tiny", "demo", "benchmark"])
    ap.add_argument("--dir", default=None, help="project directory (reused if it exists; default: /tmp/bench_relion_<preset>)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="threads of subtomo refine3d")
    ap.add_argument("--ranks", type=int, default=3, help="MPI ranks of relion_refine_mpi (1 master + 2 workers)")
    ap.add_argument("--diameter", type=float, default=190.0)
    ap.add_argument("--ini-high", type=float, default=40.0, help="low-pass of the common reference [A]")
    ap.add_argument("--healpix-order", type=int, default=3, choices=[2, 3], help="initial HEALPix order (2: 15 deg, 3: 7.5)")
    ap.add_argument("--max-iter", type=int, default=None, help="stop both refinements after this many iterations")
    ap.add_argument("--sym", default="C1")
    ap.add_argument("--sym-eval", default="D7")
    add_json_option(ap)
    args = ap.parse_args()
    if shutil.which("relion_refine_mpi") is None or shutil.which("mpirun") is None:
        raise SystemExit("relion_refine_mpi or mpirun not found: apt-get install -y relion")
    torch.set_num_threads(args.threads)
    project = Path(args.dir or f"/tmp/bench_relion_{args.preset}").resolve()
    info = prepare_project(project, args.preset, args.seed, args.threads, False, [])
    star = project / "particles_true.star"
    truth, px = read_mrc(project / "GroundTruth" / "class001.mrc")
    ref = write_mrc(project / "reference_lowpass.mrc", lowpass(truth, px, args.ini_high), px)
    df, _ = read_particles(star)
    print(f"preset {args.preset}: {len(df)} particles, box {truth.shape[-1]}, {px:.2f} A/px; reference = truth "
          f"low-passed to {args.ini_high:g} A; project ready in {info['seconds']:.0f} s", flush=True)
    figs: dict = {"relion_bench.particles": len(df)}
    rows = []
    for tag, runner in (("subtomo refine3d", run_subtomo), (f"relion_refine_mpi x{args.ranks}", run_relion)):
        r = runner(project, star, ref, args)
        e = evaluate(project, r["job"], args.sym_eval, args.diameter, True, args.threads, args.sym)
        key = "subtomo" if tag.startswith("subtomo") else "relion"
        figs.update({f"relion_bench.{key}.wall_s": r["wall_s"], f"relion_bench.{key}.cpu_s": r["cpu_s"],
                     f"relion_bench.{key}.iterations": r["iterations"], f"relion_bench.{key}.gold_A": e["gold_A"],
                     f"relion_bench.{key}.fsc_truth_05_A": e["fsc_truth_05_A"],
                     f"relion_bench.{key}.median_angular_error_deg": e["median_err_deg"]})
        rows.append((tag, r, e))
    print(f"{'program':26s} {'wall s':>8s} {'CPU s':>8s} {'iter':>5s} {'gold A':>7s} {'FSC truth 0.5 A':>16s} {'median err deg':>15s}")
    for tag, r, e in rows:
        tag += "" if r.get("converged", True) else " (stopped)"
        print(f"{tag:26s} {r['wall_s']:8.0f} {r['cpu_s']:8.0f} {r['iterations']:5d} {e['gold_A']:7.1f} "
              f"{e['fsc_truth_05_A']:16.1f} {e['median_err_deg']:15.2f}")
    write_figures(args.json, figs)


if __name__ == "__main__":
    main()
