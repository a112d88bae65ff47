"""Benchmark of 3D and focused classification (Steps 19, 25) on planted heterogeneity.

A simulated project with two conformations (``subtomo simulate --class-fractions 0.7,0.3``:
class 2 lacks about 10 % of the mass) goes through import -> prepare (the true defoci, as a
CtfFind-like node from GroundTruth/tilts.star, see bench_refine3d.py) -> extract. The
classification starts from the TRUE poses written into a data.star (a perfect refine3d; fair
for a classification benchmark, and much faster than refining first); fiducials are left out
(a perfect 2D selection) but junk picks are kept, with random poses. The consensus reference is
a K = 1 reconstruction from those poses (class3d --K 1 --skip-align --iter 1), not the truth.

Runs (each class3d --K 3 --ref consensus; K = 3 leaves a class for the junk picks): global search, local search (--local), and focused
classification with --skip-align and a mask over the region where the true maps differ (made by
``subtomo mask`` from |class001 - class002| of GroundTruth/), plus --skip-align without a mask.
Prints the accuracy on the true particles after the best label matching, where the junk goes,
the class distributions and the time per iteration.

    python bench/bench_class3d.py --project /tmp/c3bench/proj [--iter 8] [--runs global,local,focused,skip]
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_json_option, write_figures  # noqa: E402
from bench_refine3d import latest, sh, truth_ctf_node  # noqa: E402

from subtomo.geometry.euler import matrix_to_euler, random_rotations  # noqa: E402
from subtomo.io.mrc import read_mrc, write_mrc  # noqa: E402
from subtomo.io.particles import read_particles
from subtomo.io.star import read_star_table, write_particles  # noqa: E402
from subtomo.simulate.scoring import oracle_poses  # noqa: E402


def make_project(project: Path, seed: int, threads: int, fractions: str) -> None:
    if not (project / "GroundTruth").exists():
        sh(["simulate", str(project), "--preset", "demo", "--class-fractions", fractions, "--seed", str(seed),
            "--threads", str(threads)], project.parent)
    if not glob.glob(str(project / "Extract/job*/particles_subtomo.star")):
        sh(["import"], project)
        truth_ctf_node(project)
        sh(["prepare", "--i", "CtfTruth/ctf_tomograms.star", "--threads", str(threads)], project)
        truth, _ = read_mrc(project / "GroundTruth" / "class001.mrc")
        sh(["extract", "--box", str(truth.shape[-1]), "--threads", str(threads)], project)


def true_pose_star(project: Path, seed: int) -> tuple[Path, np.ndarray, np.ndarray]:
    """particles_truepose.star (true particles + junk, true poses; junk random), true class and kind per row."""
    df, optics = read_particles(latest(project, "Extract/job*/particles_subtomo.star"))
    gt = read_star_table(project / "GroundTruth" / "picks.star")
    key = ["rlnTomoName", "rlnTomoParticleId"]
    m = df[key].merge(gt[key + ["subtomoKind", "rlnClassNumber"]], on=key, how="left")
    keep = (m["subtomoKind"] != "fiducial").to_numpy()
    df, m = df[keep].reset_index(drop=True), m[keep].reset_index(drop=True)
    kind = m["subtomoKind"].to_numpy()
    px = float(optics["rlnImagePixelSize"].iloc[0])
    rot, off = oracle_poses(df, "GroundTruth/picks.star", project, px)
    junk = kind != "particle"
    rot[junk] = random_rotations(int(junk.sum()), np.random.default_rng(seed))
    off[junk] = 0.0
    eul = matrix_to_euler(rot)
    for j, c in enumerate(("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")):
        df[c] = eul[:, j]
    for j, a in enumerate("XYZ"):
        df[f"rlnOrigin{a}Angst"] = off[:, j] * px
    df = df.drop(columns=[c for c in optics.columns if c in df.columns and c != "rlnOpticsGroup"])
    path = write_particles(project / "particles_truepose.star", df, optics)
    return path, m["rlnClassNumber"].to_numpy().astype(int), kind


def difference_mask(project: Path) -> str:
    """Mask over the region where the two true conformations differ (subtomo mask on |class1 - class2|)."""
    out = project / "GroundTruth_diff.mrc"
    if not out.exists():
        a, px = read_mrc(project / "GroundTruth" / "class001.mrc")
        b, _ = read_mrc(project / "GroundTruth" / "class002.mrc")
        write_mrc(out, np.abs(a - b).astype(np.float32), px)
    log = sh(["mask", "--i", out.name, "--lowpass", "30", "--threshold-fraction", "0.3", "--extend", "2",
              "--soft-edge", "4"], project)
    print("focus mask: " + " ".join(line.split("] ", 1)[-1] for line in log.splitlines() if "% of the box" in line))
    return re.findall(r"wrote (\S+\.mrc)", log)[-1]


def last_job(project: Path) -> Path:
    return Path(sorted(glob.glob(str(project / "Class3D/job*/")))[-1])


def score(job: Path, truth: np.ndarray, kind: np.ndarray, k: int) -> dict:
    data_files = sorted(glob.glob(str(job / "run_it*_data.star")))
    df = read_star_table(data_files[-1], "particles")
    cls = df["rlnClassNumber"].to_numpy().astype(int)
    part = kind == "particle"
    n_true = int(truth[part].max())
    best, best_perm = -1.0, None
    for perm in itertools.permutations(range(1, k + 1), n_true):  # predicted class perm[j] <-> true class j + 1
        lab = np.zeros_like(cls)  # predicted classes matched to no true class (e.g. a junk class) count as wrong
        for j, pc in enumerate(perm):
            lab[cls == pc] = j + 1
        acc = float((lab[part] == truth[part]).mean())
        if acc > best:
            best, best_perm = acc, perm
    per_true = {int(t): float((cls[part & (truth == t)] == best_perm[t - 1]).mean()) for t in np.unique(truth[part])}
    junk = {int(c): int((cls[~part] == c).sum()) for c in range(1, k + 1)}
    dist = [float((cls == c).mean()) for c in range(1, k + 1)]
    secs = [float(x) for x in re.findall(r"iteration\s+\d+:.*?, ([0-9.]+) s$", (job / "run.out").read_text(), re.M)]
    return {"accuracy": best, "per_true_class": per_true, "junk_per_class": junk, "distribution": dist,
            "label_map": best_perm, "s_per_iter": float(np.mean(secs)) if secs else float("nan"), "iterations": len(secs)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--project", type=Path, default=Path("/tmp/c3bench/proj"))
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--fractions", default="0.7,0.3")
    ap.add_argument("--iter", type=int, default=8)
    ap.add_argument("--K", type=int, default=3, help="classes (3: room for the junk picks)")
    ap.add_argument("--healpix-step", type=float, default=15.0)
    ap.add_argument("--runs", default="global,local,focused,skip")
    ap.add_argument("--threads", type=int, default=1)
    add_json_option(ap)
    args = ap.parse_args()
    project = args.project.resolve()
    project.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    make_project(project, args.seed, args.threads, args.fractions)
    sim = json.loads((project / "GroundTruth" / "simulation.json").read_text())
    diam = round(float(sim["structure"]["diameter_A"]) * 1.1)
    star, truth, kind = true_pose_star(project, args.seed)
    rel = str(star.relative_to(project))
    figs = {"class3d.project_s": time.time() - t0}
    print(f"project ready in {time.time() - t0:.0f} s: {int((kind == 'particle').sum())} particles "
          f"(class 2 fraction {float((truth[kind == 'particle'] == 2).mean()):.2f}), {int((kind != 'particle').sum())} junk, "
          f"box {read_mrc(project / 'GroundTruth' / 'class001.mrc')[0].shape[-1]}, {sim.get('pixel_size_A')} A/px")
    thr = ["--threads", str(args.threads)]
    common = ["--i", rel, "--particle-diameter", str(diam), *thr]
    sh(["class3d", *common, "--K", "1", "--iter", "1", "--skip-align"], project)
    cons = last_job(project)
    ref = str((cons / "run_it001_class001.mrc").relative_to(project))
    runs = {
        "global": ["--healpix-step", str(args.healpix_step), "--offset-range", "3"],
        "local": ["--local", "--healpix-step", str(args.healpix_step / 2), "--sigma-ang", "5", "--offset-range", "2"],
        "skip": ["--skip-align"],
    }
    if "focused" in args.runs:
        runs["focused"] = ["--skip-align", "--focus-mask", difference_mask(project)]
    results = {}
    for name in args.runs.split(","):
        t = time.time()
        sh(["class3d", *common, "--K", str(args.K), "--iter", str(args.iter), "--ref", ref, *runs[name]], project)
        job = last_job(project)
        r = score(job, truth, kind, args.K)
        r["wall_s"] = time.time() - t
        results[name] = r
        figs.update({f"class3d.{name}_K{args.K}_it{args.iter}.accuracy": r["accuracy"],
                     f"class3d.{name}_K{args.K}_it{args.iter}.s_per_iter": r["s_per_iter"],
                     f"class3d.{name}_K{args.K}_it{args.iter}.wall_s": r["wall_s"]})
        print(f"{name:8s} {job.relative_to(project)}: accuracy {r['accuracy']:.3f} (per true class "
              + ", ".join(f"{c}: {v:.2f}" for c, v in r["per_true_class"].items())
              + f"), classes {np.round(r['distribution'], 3).tolist()}, junk per class {r['junk_per_class']}, "
              f"{r['s_per_iter']:.1f} s/iteration, {r['wall_s']:.0f} s total", flush=True)
    (project / "bench_class3d.json").write_text(json.dumps(results, indent=1, default=str))
    write_figures(args.json, figs)


if __name__ == "__main__":
    main()
