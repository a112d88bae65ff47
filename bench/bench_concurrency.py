"""Concurrency benchmark (issue 16): 8 jobs started at once in one project, repeated.

Each round makes a fresh project and starts 8 ``subtomo mask`` commands as separate processes at
the same moment; afterwards every job must be in ``default_pipeline.star`` exactly once, with
the status "Succeeded", its output node and its success sentinel, and no command may fail.
Prints the count of rounds in which that held.

    python bench/bench_concurrency.py [--rounds 20] [--jobs 8] [--dir /tmp/subtomo_concurrency]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_json_option, write_figures  # noqa: E402

from subtomo.jobs.base import SUCCESS_SENTINEL  # noqa: E402
from subtomo.jobs.pipeline import STATUS_SUCCEEDED, Pipeline  # noqa: E402


def one_round(project: Path, n_jobs: int) -> tuple[bool, str]:
    """Start ``n_jobs`` mask jobs at once; (all recorded with their final state, what went wrong)."""
    shutil.rmtree(project, ignore_errors=True)
    project.mkdir(parents=True)
    cmd = [sys.executable, "-m", "subtomo", "mask", "--sphere", "60", "--box", "16", "--angpix", "5"]
    procs = [subprocess.Popen(cmd, cwd=project, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(n_jobs)]
    codes = [p.wait(120) for p in procs]
    if any(codes):
        errs = [p.stderr.read().decode()[-300:] for p, c in zip(procs, codes) if c and p.stderr]
        return False, f"exit codes {codes}: {errs[:1]}"
    processes = Pipeline(project).processes
    names = [p.name for p in processes]
    if len(processes) != n_jobs or len(set(names)) != n_jobs:
        return False, f"{len(processes)} jobs in the pipeline ({len(set(names))} distinct) for {n_jobs} started"
    if bad := [p.name for p in processes if p.status != STATUS_SUCCEEDED]:
        return False, f"not Succeeded: {bad}"
    if bad := [p.name for p in processes if p.outputs != [(p.name + "mask.mrc", "Mask")]]:
        return False, f"outputs missing: {bad}"
    if bad := [n for n in names if not (project / n / SUCCESS_SENTINEL).exists()]:
        return False, f"no success sentinel: {bad}"
    return True, ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/subtomo_concurrency"))
    add_json_option(ap)
    args = ap.parse_args()
    good, t0 = 0, time.time()
    for r in range(args.rounds):
        ok, why = one_round(args.dir / f"round{r:02d}", args.jobs)
        good += ok
        print(f"round {r + 1}: {'all ' + str(args.jobs) + ' jobs recorded, Succeeded' if ok else 'FAILED: ' + why}", flush=True)
    print(f"{good} of {args.rounds} rounds of {args.jobs} concurrent jobs: every job in the pipeline with its final "
          f"state ({time.time() - t0:.0f} s)")
    write_figures(args.json, {"concurrency.good_rounds": good, "concurrency.rounds": args.rounds})


if __name__ == "__main__":
    main()
