"""Benchmark of 3D classification with alignment on an asymmetric particle (issue 22: class collapse).

A simulated project of an asymmetric particle (``subtomo simulate --asymmetric-cut 0.3``: the
shipped proteasome minus nine chains at one end, C1) with a large, compact compositional variant
(``--variant-mass-fraction 0.16``: three whole chains at the other end, 16.7 % of the mass) in one
third of the particles, at 12 A/px in a box of 32 (Nyquist 24 A: every class map is limited by
the box, not by the data), 2 x 90 particles, no junk or fiducials. import -> prepare (true
defoci, see bench_refine3d.py) -> extract. The classification starts from the TRUE poses (a
perfect refine3d: refining from scratch takes longer than all the runs here on 2 cores; global
searches do not use the input rotations anyway) with the consensus reference = a K = 1
reconstruction from those poses (class3d --K 1 --skip-align --iter 1).

Runs (class3d --ref consensus --iter N, default 25):
  skip    --K 2 --skip-align              (the separability of the data with perfect poses)
  g75     --K 2, global search at 7.5 deg (healpix order 2 + oversampling: 15 deg coarse)
  g15     --K 2, global search at 15 deg
  g75k3   --K 3, global search at 7.5 deg (one class should end nearly empty; its accuracy and class
          sizes per iteration are printed on one line each)
  local   --K 2 --local (7.5 deg, sigma 5 deg)
  relion15, relion75
          RELION 3.1's relion_refine_mpi on the same particles (subtomo export-relion of the true-pose
          STAR file, RELION's own CTF volumes) from the same consensus reference, --K 2 --tau2_fudge 4
          --healpix_order 2 (15 deg) or 3 (7.5 deg), oversampling 1, the same offset range (fine step
          1 px), --ranks MPI ranks, --random_seed 0; scored per iteration as ours.
Translational searches: --offset-range (default 2 px around the true offsets, step 1 px oversampled).
For every iteration: the accuracy on the true labels after the best label matching, the class
sizes (fractions of hard assignments), the correlation between the class maps matched to the two
true classes (inside the particle mask), the mean pose change from the previous iteration, the
median angular error against the true poses, and the mean Pmax.

    python bench/bench_class3d_collapse.py --project /tmp/c22/proj [--iter 25] [--runs skip,g75,g15,g75k3]
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_json_option, write_figures  # noqa: E402
from bench_refine3d import latest, sh, truth_ctf_node  # noqa: E402

from subtomo.geometry.euler import angular_distance_deg, euler_to_matrix, matrix_to_euler  # noqa: E402
from subtomo.io.mrc import read_mrc  # noqa: E402
from subtomo.io.particles import read_particles  # noqa: E402
from subtomo.io.star import read_star_table, write_particles  # noqa: E402
from subtomo.simulate.scoring import oracle_poses  # noqa: E402

RELION_RUNS = {"relion15": 2, "relion75": 3}  # run name -> RELION's --healpix_order (K = 2)
RUNS = {
    "skip": (2, ["--skip-align"]),
    "g75": (2, ["--healpix-step", "7.5"]),
    "g15": (2, ["--healpix-step", "15"]),
    "g75k3": (3, ["--healpix-step", "7.5"]),
    "local": (2, ["--local", "--healpix-step", "7.5", "--sigma-ang", "5"]),
}


def make_project(project: Path, seed: int, threads: int, n_per_tomo: int) -> None:
    """Simulate (asymmetric particle, 1/3 variant lacking 16 % of the mass, 12 A/px, box 32), import, prepare, extract."""
    thr = ["--threads", str(threads)]
    if not (project / "GroundTruth").exists():
        sh(["simulate", str(project), "--preset", "demo", "--pixel-size", "12", "--box", "32", "--n-particles",
            str(n_per_tomo), "--class-fractions", "0.667,0.333", "--variant-mass-fraction", "0.16",
            "--asymmetric-cut", "0.3", "--n-fiducials", "0", "--n-junk", "0", "--seed", str(seed), *thr], project.parent)
    if not glob.glob(str(project / "Extract/job*/particles_subtomo.star")):
        sh(["import"], project)
        truth_ctf_node(project)
        sh(["prepare", "--i", "CtfTruth/ctf_tomograms.star", *thr], project)
        sh(["extract", "--box", "32", *thr], project)


def true_pose_star(project: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """particles_truepose.star (true poses), the true class (1/2) and rotation (n, 3, 3) per row."""
    df, optics = read_particles(latest(project, "Extract/job*/particles_subtomo.star"))
    gt = read_star_table(project / "GroundTruth" / "picks.star")
    key = ["rlnTomoName", "rlnTomoParticleId"]
    m = df[key].merge(gt[key + ["rlnClassNumber"]], on=key, how="left")
    px = float(optics["rlnImagePixelSize"].iloc[0])
    rot, off = oracle_poses(df, "GroundTruth/picks.star", project, px)
    eul = matrix_to_euler(rot)
    for j, c in enumerate(("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")):
        df[c] = eul[:, j]
    for j, a in enumerate("XYZ"):
        df[f"rlnOrigin{a}Angst"] = off[:, j] * px
    df = df.drop(columns=[c for c in optics.columns if c in df.columns and c != "rlnOpticsGroup"])
    path = write_particles(project / "particles_truepose.star", df, optics)
    return path, m["rlnClassNumber"].to_numpy().astype(int), rot


def job_dir(project: Path, output: str) -> Path:
    """The job directory a ``subtomo`` command made, from its first log line ("... -> Class3D/job006/ ...").

    Not the newest directory: another benchmark process may be making jobs in the same project.
    """
    found = re.search(r" -> (\S+/job\d+)/", output)
    if found is None:
        raise RuntimeError(f"no job directory in the command's output:\n{output[-2000:]}")
    return project / found.group(1)


def run_relion(project: Path, star: Path, ref: str, diameter: float, healpix_order: int, args) -> Path:
    """relion_refine_mpi 3D classification (K = 2) of the export-relion files; a folder scored like our jobs."""
    if shutil.which("relion_refine_mpi") is None or shutil.which("mpirun") is None:
        raise SystemExit("relion_refine_mpi or mpirun not found: apt-get install -y relion")
    exp = job_dir(project, sh(["export-relion", "--i", str(star.relative_to(project)), "--particle-diameter",
                                str(diameter)], project))
    out = project / f"RelionClass3D_order{healpix_order}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    cmd = ["mpirun", "-n", str(args.ranks), "--oversubscribe", "relion_refine_mpi", "--o", f"{out.name}/run",
           "--i", str((exp / "particles_relion.star").relative_to(project)), "--ref", ref, "--ctf_corrected_ref",
           "--ini_high", "60", "--ctf", "--particle_diameter", str(diameter), "--K", "2", "--iter", str(args.relion_iter),
           "--tau2_fudge", "4", "--healpix_order", str(healpix_order), "--oversampling", "1",
           "--offset_range", str(args.offset_range), "--offset_step", "2", "--flatten_solvent", "--zero_mask",
           "--norm", "--scale", "--pad", "2", "--sym", "C1", "--j", "1", "--pool", "3",
           "--dont_combine_weights_via_disc", "--random_seed", "0"]
    r = subprocess.run(cmd, cwd=project, capture_output=True, text=True, env=env)
    (out / "relion.log").write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        raise RuntimeError(f"relion_refine_mpi failed:\n{(r.stdout + r.stderr)[-3000:]}")
    return scored_relion_iterations(star, exp, out)


def scored_relion_iterations(star: Path, exp: Path, out: Path, folder: str = "scored") -> Path:
    """RELION's finished iterations in ``out`` as a folder the scorer reads (also for a run still going).

    RELION keeps the particles in another order: every ``run_itNNN_data.star`` is written back in
    the order of ``star`` (matched by image name through the export ``exp``) beside links to its
    class maps.
    """
    scored = out / folder
    shutil.rmtree(scored, ignore_errors=True)
    scored.mkdir()
    ours, _ = read_particles(star)
    exported, _ = read_particles(exp / "particles_relion.star")
    assert len(ours) == len(exported)
    for f in sorted(glob.glob(str(out / "run_it*_data.star"))):
        it = int(re.search(r"run_it(\d+)_data", f).group(1))
        if it == 0:
            continue
        theirs, optics = read_particles(f)
        row = {name: i for i, name in enumerate(theirs["rlnImageName"])}
        theirs = theirs.iloc[[row[name] for name in exported["rlnImageName"]]].reset_index(drop=True)
        theirs = theirs.drop(columns=[c for c in optics.columns if c in theirs.columns and c != "rlnOpticsGroup"])
        write_particles(scored / Path(f).name, theirs, optics)
        for k in (1, 2):
            (scored / f"run_it{it:03d}_class{k:03d}.mrc").symlink_to(out / f"run_it{it:03d}_class{k:03d}.mrc")
    return scored


def best_match(cls: np.ndarray, truth: np.ndarray, k: int) -> tuple[float, tuple[int, ...]]:
    """Accuracy under the best assignment of predicted classes (1..k) to the true classes; perm[j] <-> true j+1."""
    n_true = int(truth.max())
    best, best_perm = -1.0, tuple(range(1, n_true + 1))
    for perm in itertools.permutations(range(1, k + 1), n_true):
        lab = np.zeros_like(cls)
        for j, pc in enumerate(perm):
            lab[cls == pc] = j + 1
        acc = float((lab == truth).mean())
        if acc > best:
            best, best_perm = acc, perm
    return best, best_perm


def _rotations(df) -> np.ndarray:
    return euler_to_matrix(df["rlnAngleRot"].to_numpy(), df["rlnAngleTilt"].to_numpy(), df["rlnAnglePsi"].to_numpy())


def map_correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    x, y = a[mask] - a[mask].mean(), b[mask] - b[mask].mean()
    return float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum() + 1e-30))


def score_iterations(job: Path, truth: np.ndarray, rot_true: np.ndarray, k: int) -> list[dict]:
    """Per iteration: accuracy, class sizes, class-map correlation, pose change, pose error, Pmax."""
    rows, prev = [], None
    box = None
    for f in sorted(glob.glob(str(job / "run_it*_data.star"))):
        it = int(re.search(r"run_it(\d+)_data", f).group(1))
        df = read_star_table(f, "particles")
        cls = df["rlnClassNumber"].to_numpy().astype(int)
        rot = _rotations(df)
        acc, perm = best_match(cls, truth, k)
        maps = [read_mrc(job / f"run_it{it:03d}_class{c:03d}.mrc")[0] for c in perm[:2]]
        if box is None:
            box = maps[0].shape[-1]
            ax = np.arange(box) - box // 2
            z, y, x = np.meshgrid(ax, ax, ax, indexing="ij")
            mask = np.sqrt(x * x + y * y + z * z) < box * 0.3
        rows.append({
            "iteration": it, "accuracy": acc,
            "sizes": [float((cls == c).mean()) for c in range(1, k + 1)],
            "map_cc": map_correlation(maps[0], maps[1], mask),
            "pose_change_deg": float(np.mean(angular_distance_deg(rot, prev))) if prev is not None else 0.0,
            "pose_error_deg": float(np.median(angular_distance_deg(rot, rot_true))),
            "pmax": float(df["rlnMaxValueProbDistribution"].mean()) if "rlnMaxValueProbDistribution" in df else float("nan"),
        })
        prev = rot
    return rows


def print_table(name: str, rows: list[dict], truth_sizes: list[float]) -> None:
    print(f"--- {name}: it, accuracy, class sizes (truth {truth_sizes}), cc(class maps), pose change deg, "
          "median pose error deg, Pmax")
    for r in rows:
        print(f"{r['iteration']:3d}  {r['accuracy']:.3f}  " + "/".join(f"{s:.3f}" for s in r["sizes"])
              + f"  cc {r['map_cc']:.3f}  d {r['pose_change_deg']:5.2f}  err {r['pose_error_deg']:5.2f}  Pmax {r['pmax']:.3f}")


def summarise(rows: list[dict], truth_sizes: list[float]) -> dict:
    acc = np.array([r["accuracy"] for r in rows])
    last = rows[-1]
    big = sorted(last["sizes"], reverse=True)
    size_err = max(abs(a - b) for a, b in zip(big, sorted(truth_sizes, reverse=True)))
    # K > 2: the classes beyond the true ones (the spare classes) should end nearly empty
    spare = float(sum(big[len(truth_sizes):]))
    return {"best": float(acc.max()), "best_it": int(rows[int(acc.argmax())]["iteration"]), "last": float(acc[-1]),
            "size_err": float(size_err), "spare": spare, "last_map_cc": last["map_cc"], "last_sizes": last["sizes"]}


def print_course(name: str, rows: list[dict]) -> None:
    """The accuracy and the class sizes of every iteration on two lines (a spare class filling up shows here)."""
    print(f"{name} accuracy per iteration: " + " ".join(f"{r['accuracy']:.3f}" for r in rows))
    print(f"{name} class sizes per iteration: " + " ".join("/".join(f"{x:.2f}" for x in r["sizes"]) for r in rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--project", type=Path, default=Path("/tmp/c3collapse/proj"))
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--n-per-tomo", type=int, default=90, help="particles per tomogram (2 tomograms)")
    ap.add_argument("--iter", type=int, default=25)
    ap.add_argument("--runs", default="skip,g75,g15,g75k3",
                    help=f"comma-separated, of {','.join([*RUNS, *RELION_RUNS])}")
    ap.add_argument("--offset-range", type=float, default=2.0,
                    help="translational search range [px] (class3d's default 5 costs 10x more; the start is the true offsets)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ranks", type=int, default=3, help="MPI ranks of the RELION runs (1 master + workers)")
    ap.add_argument("--relion-iter", type=int, default=12, help="iterations of the RELION runs")
    add_json_option(ap)
    args = ap.parse_args()
    project = args.project.resolve()
    project.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    make_project(project, args.seed, args.threads, args.n_per_tomo)
    sim = json.loads((project / "GroundTruth" / "simulation.json").read_text())
    diam = round(float(sim["structure"]["diameter_A"]) * 1.1)
    star, truth, rot_true = true_pose_star(project)
    truth_sizes = [round(float((truth == c).mean()), 3) for c in (1, 2)]
    print(f"project ready in {time.time() - t0:.0f} s: {len(truth)} particles, true sizes {truth_sizes}, variant lacks "
          f"{sim['structure']['variant_mass_fraction']:.3f} of the mass, box 32, {sim['pixel_size_A']} A/px")
    rel = str(star.relative_to(project))
    common = ["--i", rel, "--particle-diameter", str(diam), "--threads", str(args.threads)]
    cons = job_dir(project, sh(["class3d", *common, "--K", "1", "--iter", "1", "--skip-align"], project))
    ref = str((cons / "run_it001_class001.mrc").relative_to(project))
    figs: dict = {}
    results = {}
    for name in args.runs.split(","):
        t = time.time()
        if name in RELION_RUNS:
            k = 2
            job = run_relion(project, star, ref, diam, RELION_RUNS[name], args)
        else:
            k, extra = RUNS[name]
            off = [] if name == "skip" else ["--offset-range", str(args.offset_range)]
            job = job_dir(project, sh(["class3d", *common, "--K", str(k), "--iter", str(args.iter), "--ref", ref,
                                       *extra, *off], project))
        rows = score_iterations(job, truth, rot_true, k)
        s = summarise(rows, truth_sizes)
        s["wall_s"] = time.time() - t
        results[name] = {"job": str(job.relative_to(project)), "rows": rows, **s}
        print_table(f"{name} ({job.relative_to(project)}, K={k}, {s['wall_s']:.0f} s)", rows, truth_sizes)
        if k > 2:
            print_course(name, rows)
        ok = s["best"] >= 0.95 and s["best"] - s["last"] <= 0.02 and s["size_err"] <= 0.03 and s["spare"] <= 0.03
        print(f"{name}: best {s['best']:.3f} (it {s['best_it']}), last {s['last']:.3f}, size error {s['size_err']:.3f}, "
              f"spare classes {s['spare']:.3f}, class-map cc {s['last_map_cc']:.3f} -> "
              f"{'meets' if ok else 'FAILS'} the issue-22 criterion", flush=True)
        tag = f"class3d_collapse.{name}_K{k}_it{args.relion_iter if name in RELION_RUNS else args.iter}"
        figs.update({f"{tag}.best_accuracy": s["best"], f"{tag}.last_accuracy": s["last"],
                     f"{tag}.size_error": s["size_err"], f"{tag}.spare_size": s["spare"], f"{tag}.wall_s": s["wall_s"]})
    (project / "bench_class3d_collapse.json").write_text(json.dumps(results, indent=1, default=str))
    write_figures(args.json, figs)


if __name__ == "__main__":
    main()
