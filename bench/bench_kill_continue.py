"""Kill-and-continue benchmark: refine3d killed with SIGKILL at random moments resumes to the same maps.

A tiny simulated project goes through import -> prepare (true defoci) -> extract. One
uninterrupted ``refine3d`` run is the reference. Then, N times, a fresh ``refine3d`` is
started, killed with SIGKILL after a random delay (anywhere in the E-step, the M-step or a
checkpoint write), and continued once with ``--continue-job``. Each continued job must end
with half maps identical (bit for bit) to the reference's. Prints how many of the N did.

    python bench/bench_kill_continue.py --dir /tmp/killbench [--kills 10] [--max-iter 6]
"""

from __future__ import annotations

import argparse
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_json_option, write_figures  # noqa: E402
from bench_refine3d import sh, truth_ctf_node  # noqa: E402

from subtomo.io.mrc import read_mrc  # noqa: E402


def make_project(root: Path, seed: int) -> Path:
    project = root / "proj"
    if not (project / "GroundTruth").exists():
        sh(["simulate", str(project), "--preset", "tiny", "--seed", str(seed), "--threads", "1"], root)
    if not list(project.glob("Extract/job*/particles_subtomo.star")):
        sh(["import"], project)
        truth_ctf_node(project)
        sh(["prepare", "--i", "CtfTruth/ctf_tomograms.star", "--threads", "1"], project)
        truth, _ = read_mrc(project / "GroundTruth" / "class001.mrc")
        sh(["extract", "--box", str(truth.shape[-1]), "--threads", "1"], project)
    return project


def refine_args(max_iter: int, diameter: float) -> list[str]:
    return ["refine3d", "--particle-diameter", str(diameter), "--max-iter", str(max_iter), "--threads", "1",
            "--healpix-step", "15", "--seed", "3"]


def half_maps(job: Path) -> list[np.ndarray]:
    return [read_mrc(job / f"run_half{h}_class001_unfil.mrc")[0] for h in (1, 2)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/subtomo_killbench"))
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--max-iter", type=int, default=6)
    ap.add_argument("--diameter", type=float, default=160.0, help="particle diameter [Å] (tiny preset: proteasome)")
    ap.add_argument("--seed", type=int, default=1)
    add_json_option(ap)
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    project = make_project(args.dir, args.seed)
    base = refine_args(args.max_iter, args.diameter)
    t0 = time.time()
    shutil.rmtree(project / "Reference", ignore_errors=True)  # timed afresh: the kill moments scale with it
    sh([*base, "--output", "Reference"], project)
    scale_s = ref_s = time.time() - t0
    reference = half_maps(project / "Reference")
    rng = random.Random(args.seed)
    killed_runs = identical = attempts = n_continued = 0
    while killed_runs < args.kills and attempts < 3 * args.kills:
        attempts += 1
        out = project / f"Killed{killed_runs:02d}"
        shutil.rmtree(out, ignore_errors=True)
        delay = rng.uniform(0.05, 0.95) * scale_s
        start = time.time()
        proc = subprocess.Popen([sys.executable, "-m", "subtomo", *base, "--output", out.name], cwd=project,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while time.time() - start < delay and proc.poll() is None:
            time.sleep(0.05)
        if proc.poll() is not None:  # finished first: the machine is faster now; rescale and try again
            scale_s = time.time() - start
            print(f"(a run finished in {scale_s:.1f} s before its kill at {delay:.1f} s: kill moments rescaled)", flush=True)
            continue
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_runs += 1
        continued = (out / "job.json").exists()
        if continued:
            sh(["refine3d", "--continue-job", out.name, "--threads", "1"], project)
        else:  # killed before the job made its directory: nothing to continue, run it again
            shutil.rmtree(out, ignore_errors=True)
            sh([*base, "--output", out.name], project)
        n_continued += continued
        same = all(np.array_equal(a, b) for a, b in zip(reference, half_maps(out)))
        identical += same
        print(f"run {killed_runs}: killed after {delay:.1f} s of about {scale_s:.0f} s, "
              + ("continued" if continued else "started again (no job directory yet)")
              + f" -> half maps {'identical' if same else 'DIFFERENT'}", flush=True)
    print(f"{identical} of {killed_runs} killed runs ({n_continued} continued with --continue-job) ended with half "
          f"maps identical to the uninterrupted run (reference run {ref_s:.0f} s)")
    write_figures(args.json, {"kill.identical_runs": identical, "kill.killed_runs": killed_runs,
                              "kill.continued_runs": n_continued, "kill.reference_s": ref_s})


if __name__ == "__main__":
    main()
