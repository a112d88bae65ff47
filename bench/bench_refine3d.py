"""Benchmark of 3D auto-refine from random orientations against the oracle (true poses).

Default (``--preset benchmark``): the real pipeline on a simulated project
(``subtomo simulate --preset P`` -> import -> CTF -> prepare -> extract -> refine3d), with the
ground truth of ``DIR/GroundTruth``. The CTF step uses the true per-tilt defoci
(``GroundTruth/tilts.star`` written as a CtfFind-like node) unless ``--estimate-ctf`` runs
``subtomo ctf``; the particle set is the true particles only (a perfect Select step: fiducials
and junk removed).

Prints: final gold-standard resolution, oracle resolution (true poses, same CTF model and
halves) and their ratio; FSC(final map, true map) = 0.5 after aligning the true map to the
refined frame (global rotation from the poses, symmetry-aware; global shift by
cross-correlation; handedness check); the median angular error vs the true poses after
removing the global rotation (minimum over the structure's point group); wall time, time
per iteration, peak memory (RSS of the refine3d process); and the same run with CTF
correction off (``--ctf false``). ``--scaling`` adds time per iteration vs particles and box.

    python bench/bench_refine3d.py --preset benchmark --dir /tmp/bench_refine --threads 2
"""

from __future__ import annotations

import argparse
import glob
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _common import add_json_option, write_figures

from subtomo.fourier import fsc_maps
from subtomo.geometry.euler import euler_to_matrix
from subtomo.geometry.symmetry import symmetry_matrices
from subtomo.io.mrc import read_mrc
from subtomo.io.particles import read_particles
from subtomo.io.star import read_star_table, write_particles, write_star
from subtomo.simulate import scoring

RSS_WRAPPER = ("import resource, sys; from subtomo.cli.main import build_cli\n"
               "try:\n    build_cli()(args=sys.argv[1:], prog_name='subtomo')\nexcept SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
               "print(f'PEAK_RSS_MB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}', flush=True)\n"
               "sys.exit(code or 0)\n")


def sh(args: list[str], cwd: Path, log: Path | None = None) -> str:
    """Run ``subtomo ARGS`` in ``cwd`` in its own process (peak RSS printed at the end)."""
    cmd = [sys.executable, "-c", RSS_WRAPPER, *args]
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    out = r.stdout + r.stderr
    if log is not None:
        log.write_text(out)
    if r.returncode != 0:
        raise RuntimeError(f"subtomo {' '.join(args)} failed:\n{out[-3000:]}")
    return out


def latest(project: Path, pattern: str) -> Path:
    files = sorted(glob.glob(str(project / pattern)))
    if not files:
        raise FileNotFoundError(pattern)
    return Path(files[-1])


def truth_ctf_node(project: Path) -> Path:
    """A CtfFind-like node (per-tomogram <t>_ctffind.star + ctf_tomograms.star) from the true defoci."""
    tomos = read_star_table(latest(project, "Import/job*/all_tomograms.star"))
    gt = read_star_table(project / "GroundTruth" / "tilts.star")
    out = project / "CtfTruth"
    out.mkdir(exist_ok=True)
    paths = []
    for t in tomos["rlnTomoName"]:
        g = gt[gt.rlnTomoName == t]
        tab = g[["rlnMicrographName", "rlnTomoNominalStageTiltAngle", "rlnMicrographPreExposure",
                 "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"]].reset_index(drop=True)
        tab["rlnCtfFigureOfMerit"] = 1.0
        tab["rlnCtfMaxResolution"] = 10.0
        tab["subtomoCtfFitFailed"] = 0
        write_star(out / f"{t}_ctffind.star", {t: tab})
        paths.append(f"CtfTruth/{t}_ctffind.star")
    tomos = tomos.copy()
    tomos["subtomoCtfResultsStar"] = paths
    return write_star(out / "ctf_tomograms.star", {"global": tomos})


def true_particles_star(project: Path) -> Path:
    """The extracted particles that are real particles (a perfect Select step)."""
    df, optics = read_particles(latest(project, "Extract/job*/particles_subtomo.star"))
    gt = read_star_table(project / "GroundTruth" / "picks.star")
    key = ["rlnTomoName", "rlnTomoParticleId"]
    m = df[key].merge(gt[key + ["subtomoKind"]], on=key, how="left")
    df = df[(m["subtomoKind"] == "particle").to_numpy()].reset_index(drop=True)
    df = df.drop(columns=[c for c in optics.columns if c in df.columns and c != "rlnOpticsGroup"])
    return write_particles(project / "particles_true.star", df, optics)


def prepare_project(project: Path, preset: str, seed: int, threads: int, estimate_ctf: bool, extra_sim: list[str],
                    project_2d: bool = False) -> dict:
    """Simulate (unless GroundTruth/ exists), import, CTF, prepare and extract (``--project`` too if ``project_2d``)."""
    project = project.resolve()
    t = time.time()
    if not (project / "GroundTruth").exists():
        sh(["simulate", str(project), "--preset", preset, "--seed", str(seed), "--threads", str(threads), *extra_sim],
           project.parent)
    sim = json.loads((project / "GroundTruth" / "simulation.json").read_text())
    done = "subtomo_proj2d.star" if project_2d else "particles_subtomo.star"
    if not glob.glob(str(project / "Extract/job*" / done)):
        sh(["import"], project)
        if estimate_ctf:
            sh(["ctf", "--threads", str(threads)], project)
            prep = ["prepare", "--threads", str(threads)]
        else:
            truth_ctf_node(project)
            prep = ["prepare", "--i", "CtfTruth/ctf_tomograms.star", "--threads", str(threads)]
        sh(prep, project)
        truth, _ = read_mrc(project / "GroundTruth" / "class001.mrc")
        sh(["extract", "--box", str(truth.shape[-1]), "--threads", str(threads), *(["--project"] if project_2d else [])],
           project)
    true_particles_star(project)
    return {"seconds": time.time() - t, "sim": sim}


# ------------------------------------------------------------------ evaluation against the truth
def fsc_at(curve: np.ndarray, box: int, px: float, thr: float) -> float:
    below = np.nonzero(np.asarray(curve)[1:] < thr)[0]
    last = int(below[0]) if len(below) else len(curve) - 1
    return box * px / max(last, 1)


def iteration_errors(project: Path, job: Path, sym_name: str) -> list[tuple[int, float, float]]:
    """(iteration, median angular error deg, fraction < 10 deg) vs the true poses for every run_itNNN_data.star."""
    from subtomo.simulate.scoring import oracle_poses

    sym = symmetry_matrices(sym_name)
    out = []
    for f in sorted(glob.glob(str(job / "run_it*_data.star"))):
        df, _ = read_particles(Path(f))
        px = float(df["rlnImagePixelSize"].iloc[0]) if "rlnImagePixelSize" in df.columns else 1.0
        true_rot, _ = oracle_poses(df, "GroundTruth/picks.star", project, px)
        est = euler_to_matrix(df["rlnAngleRot"].to_numpy(), df["rlnAngleTilt"].to_numpy(), df["rlnAnglePsi"].to_numpy())
        _, err = scoring.global_rotation(est, true_rot, sym)
        out.append((int(re.search(r"run_it(\d+)_data", f).group(1)), float(np.median(err)), float((err < 10).mean())))
    return out


def evaluate(project: Path, job: Path, sym_name: str, diameter_A: float, use_ctf: bool, threads: int,
             refine_sym: str = "C1") -> dict:
    from subtomo.em.oracle import oracle_reconstruction
    from subtomo.io.particles import ParticleSet
    from subtomo.simulate.scoring import oracle_poses
    from subtomo.tomo.particle_source import SubtomogramSource

    torch.set_num_threads(threads)
    df, _ = read_particles(job / "run_data.star")
    truth, px = read_mrc(project / "GroundTruth" / "class001.mrc")
    truth = torch.from_numpy(truth.astype(np.float32))
    box = truth.shape[-1]
    final, _ = read_mrc(job / "run_class001.mrc")
    final = torch.from_numpy(final.astype(np.float32))
    true_rot, true_off = oracle_poses(df, "GroundTruth/picks.star", project, px)
    est = euler_to_matrix(df["rlnAngleRot"].to_numpy(), df["rlnAngleTilt"].to_numpy(), df["rlnAnglePsi"].to_numpy())
    sym = symmetry_matrices(sym_name)
    g_mat, err = scoring.global_rotation(est, true_rot, sym)
    aligned = scoring.truth_in_map_frame(truth, final, g_mat)  # unmasked, as recorded before
    best = {"hand": aligned.hand, "fsc": aligned.fsc}
    src = SubtomogramSource(ParticleSet.read(job / "run_data.star", project), use_ctf)
    orc = oracle_reconstruction(src, true_rot, true_off, df["rlnRandomSubset"].to_numpy(), use_ctf=use_ctf,
                                diameter_A=diameter_A, sym=refine_sym)
    f_or = fsc_maps(orc.map, truth).numpy()
    model = read_star_table(job / "run_model.star", "model_class_1")
    gs = model["rlnGoldStandardFsc"].to_numpy()
    return {"gold_A": fsc_at(gs, box, px, 0.143), "oracle_A": orc.resolution_A,
            "fsc_truth_05_A": fsc_at(best["fsc"], box, px, 0.5), "hand": best["hand"],
            "oracle_fsc_truth_05_A": fsc_at(f_or, box, px, 0.5),
            "median_err_deg": float(np.median(err)), "frac_err_lt_10": float((err < 10).mean())}


def run_refine(project: Path, star: Path, args, use_ctf: bool, tag: str) -> dict:
    before = set(glob.glob(str(project / "Refine3D/job*")))
    cmd = ["refine3d", "--i", str(star.relative_to(project)), "--particle-diameter", str(args.diameter),
           "--threads", str(args.threads), "--seed", str(args.seed), "--max-iter", str(args.max_iter),
           "--offset-range", str(args.offset_range), "--healpix-step", str(args.healpix_step), "--sym", args.sym]
    if not use_ctf:
        cmd.append("--no-ctf")
    t = time.time()
    out = sh(cmd, project, project / f"refine_{tag}.log")
    wall = time.time() - t
    job = Path(sorted(set(glob.glob(str(project / "Refine3D/job*"))) - before)[-1])
    iters = [float(x) for x in re.findall(r"iteration +\d+.*?, ([0-9.]+) s(?: \(E-step [0-9.]+ s\))?\n", out)]
    peak = re.findall(r"PEAK_RSS_MB (\d+)", out)
    for it, med, frac in iteration_errors(project, job, args.sym_eval):
        print(f"  [{tag}] iteration {it:3d}: median angular error {med:.2f} deg ({100 * frac:.0f} % < 10 deg)", flush=True)
    res = evaluate(project, job, args.sym_eval, args.diameter, use_ctf, args.threads, args.sym)
    res.update({"wall_s": wall, "iterations": len(iters), "s_per_iter": float(np.mean(iters)) if iters else 0.0,
                "max_s_per_iter": float(np.max(iters)) if iters else 0.0, "peak_rss_mb": int(peak[-1]) if peak else -1,
                "job": str(job.relative_to(project))})
    return res


def figures(prefix: str, r: dict) -> dict:
    """The headline numbers of one refinement as flat JSON figures (keys with units)."""
    return {f"{prefix}gold_A": r["gold_A"], f"{prefix}oracle_A": r["oracle_A"], f"{prefix}ratio": r["gold_A"] / r["oracle_A"],
            f"{prefix}fsc_truth_05_A": r["fsc_truth_05_A"], f"{prefix}oracle_fsc_truth_05_A": r["oracle_fsc_truth_05_A"],
            f"{prefix}median_angular_error_deg": r["median_err_deg"], f"{prefix}err_lt_10deg_pct": 100 * r["frac_err_lt_10"],
            f"{prefix}iterations": r["iterations"], f"{prefix}wall_s": r["wall_s"], f"{prefix}s_per_iter": r["s_per_iter"],
            f"{prefix}max_s_per_iter": r["max_s_per_iter"], f"{prefix}peak_rss_MB": r["peak_rss_mb"]}


def report(tag: str, r: dict) -> None:
    print(f"[{tag}] gold-standard {r['gold_A']:.1f} A | oracle {r['oracle_A']:.1f} A | ratio {r['gold_A'] / r['oracle_A']:.3f} | "
          f"FSC(map, truth)=0.5 at {r['fsc_truth_05_A']:.1f} A (truth {r['hand']}; oracle map {r['oracle_fsc_truth_05_A']:.1f} A) | "
          f"median angular error {r['median_err_deg']:.2f} deg ({100 * r['frac_err_lt_10']:.0f} % < 10 deg) | "
          f"{r['iterations']} iterations, wall {r['wall_s']:.0f} s ({r['s_per_iter']:.1f} s/iteration, max "
          f"{r['max_s_per_iter']:.1f}) | peak RSS {r['peak_rss_mb']} MB | {r['job']}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="benchmark", choices=["tiny", "demo", "benchmark"])
    ap.add_argument("--dir", default=None, help="project directory (reused if it exists; default: /tmp/bench_refine3d_<preset>)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--diameter", type=float, default=190.0, help="particle diameter [A] (the proteasome: 182 A)")
    ap.add_argument("--offset-range", type=float, default=3.0)
    ap.add_argument("--healpix-step", type=float, default=7.5)
    ap.add_argument("--max-iter", type=int, default=25)
    ap.add_argument("--sym", default="C1", help="point-group symmetry imposed in the refinement (and the oracle)")
    ap.add_argument("--sym-eval", default="D7", help="point group of the true structure, for the pose errors only")
    ap.add_argument("--estimate-ctf", action="store_true", help="run subtomo ctf instead of using the true defoci")
    ap.add_argument("--single-class", action="store_true", help="simulate one class only (no variant)")
    ap.add_argument("--no-ctf-run", action="store_true", help="skip the --no-ctf comparison")
    ap.add_argument("--only-no-ctf", action="store_true", help="run only the --no-ctf refinement")
    ap.add_argument("--scaling", action="store_true", help="time per iteration vs particles and box (3 iterations each)")
    add_json_option(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    project = Path(args.dir or f"/tmp/bench_refine3d_{args.preset}")
    extra = ["--class-fractions", "1.0"] if args.single_class else []
    info = prepare_project(project, args.preset, args.seed, args.threads, args.estimate_ctf, extra)
    star = project / "particles_true.star"
    df, optics = read_particles(star)
    print(f"preset {args.preset} (seed {args.seed}): {len(df)} particles, box {int(optics['rlnImageSize'].iloc[0])}, "
          f"{float(optics['rlnImagePixelSize'].iloc[0]):.2f} A/px; CTF from "
          f"{'subtomo ctf' if args.estimate_ctf else 'the true defoci'}; symmetry {args.sym}; {args.threads} threads; "
          f"project ready in {info['seconds']:.0f} s", flush=True)
    figs = {"refine3d.particles": len(df)}
    r = None if args.only_no_ctf else run_refine(project, star, args, True, "ctf")
    if r is not None:
        report("CTF on", r)
        figs.update(figures("refine3d.", r))
    if not args.no_ctf_run:
        r2 = run_refine(project, star, args, False, "noctf")
        report("CTF off", r2)
        figs.update(figures("refine3d.no_ctf.", r2))
    if r is not None and not args.no_ctf_run:
        print(f"CTF on vs off: FSC(map, truth)=0.5 at {r['fsc_truth_05_A']:.1f} vs {r2['fsc_truth_05_A']:.1f} A; "
              f"gold-standard {r['gold_A']:.1f} vs {r2['gold_A']:.1f} A", flush=True)
    if args.scaling:
        for frac in (0.25, 0.5, 1.0):
            sub = df.iloc[: max(8, int(len(df) * frac))].reset_index(drop=True)
            sub = sub.drop(columns=[c for c in optics.columns if c in sub.columns and c != "rlnOpticsGroup"])
            p = write_particles(project / f"particles_scaling_{frac}.star", sub, optics)
            t = time.time()
            out = sh(["refine3d", "--i", p.name, "--particle-diameter", str(args.diameter), "--threads", str(args.threads),
                      "--max-iter", "3", "--offset-range", str(args.offset_range)], project)
            iters = [float(x) for x in re.findall(r"iteration +\d+.*?, ([0-9.]+) s(?: \(E-step [0-9.]+ s\))?\n", out)]
            figs[f"refine3d.scaling_{len(sub)}.s_per_iter"] = np.mean(iters)
            print(f"[scaling] {len(sub)} particles, box {int(optics['rlnImageSize'].iloc[0])}: "
                  f"{np.mean(iters):.1f} s/iteration (iterations {', '.join(f'{x:.0f}' for x in iters)}; "
                  f"wall {time.time() - t:.0f} s)", flush=True)
    write_figures(args.json, figs)


if __name__ == "__main__":
    main()
