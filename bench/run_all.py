"""The benchmark suite in one command: every stage's benchmark, one table, one JSON record.

Runs bench_simulate, bench_ctf, bench_extract, bench_class2d, bench_select, bench_refine3d,
bench_class3d and bench_post, each in its own process with ``--json``, on the simulator's ``benchmark``
preset (one simulated project, seed 1, shared by ctf, class2d and refine3d; class3d makes its
own two-conformation ``demo`` project). A stage that fails is recorded with the end of its
stderr and the suite goes on. At the end it prints one table (stage | figure | value | unit)
and writes ``OUT/<UTC date>_<git commit>.json`` (date, commit, machine, figures, seconds per
stage, failures, the exact commands) so that runs months apart can be compared.

    python bench/run_all.py                        # about 30 min on 2 cores
    python bench/run_all.py --quick --threads 1    # tiny sizes: checks the harness in a few minutes
    python bench/run_all.py --only ctf,post --compare bench/results/OLD.json
    python bench/run_all.py --compare OLD.json NEW.json   # compare two records, run nothing

Each stage's full output goes to ``WORK/logs/<stage>.log`` (default WORK: bench/out/run_all).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
STAGES = ("simulate", "ctf", "extract", "class2d", "select", "refine3d", "class3d", "post")
SEED = 1  # the seed of the shared simulated project (bench_refine3d's default)
UNITS = (("_subtomograms_per_s", "1/s"), ("_ms_per_window", "ms/window"), ("_s_per_iter", "s/iteration"),
         ("_s_per_series", "s/series"), ("_ms", "ms"), ("_s", "s"), ("_MB", "MB"), ("_A2", "Å²"), ("_A", "Å"),
         ("_deg", "deg"), ("_px", "px"), ("_pct", "%"))

# run a bench script up to its argument parsing only (for --dry-run): exit 0 if it accepts the arguments
PARSE_ONLY = ("import argparse, os, runpy, sys\n"
              "parse = argparse.ArgumentParser.parse_args\n"
              "def parse_then_exit(self, *a, **k):\n    parse(self, *a, **k)\n    sys.exit(0)\n"
              "argparse.ArgumentParser.parse_args = parse_then_exit\n"
              "sys.argv = sys.argv[1:]\n"
              "sys.path.insert(0, os.path.dirname(sys.argv[0]))\n"
              "runpy.run_path(sys.argv[0], run_name='__main__')\n")


def stage_commands(stage: str, projects: Path, threads: int, quick: bool) -> list[list[str]]:
    """The benchmark invocations of one stage (script name + arguments, without ``--json``)."""
    preset = "tiny" if quick else "benchmark"
    shared = str(projects / preset)  # bench_simulate --out PROJECTS writes PROJECTS/<preset>
    thr = ["--threads", str(threads)]
    seed = ["--seed", str(SEED)]
    if stage == "simulate":
        return [["bench_simulate.py", "--presets", preset, *seed, *thr, "--out", str(projects)]]
    if stage == "ctf":
        size = ["--size", "256"] if quick else []
        return [["bench_ctf.py", *thr, *seed, *size, "--preset", preset, "--project", shared]]
    if stage == "extract":
        size = ["--gb", "0.05", "--particles", "20", "--box", "32"] if quick else []
        return [["bench_extract.py", *size]]
    if stage == "class2d":
        synth = ["--n", "100", "--box", "32", "--K", "4", "--iterations", "3"] if quick else []
        proj = ["--K", "3", "--iterations", "3"] if quick else ["--K", "10", "--iterations", "25"]
        return [["bench_class2d.py", *thr, *synth],
                ["bench_class2d.py", *thr, "--project", shared, "--preset", preset, *seed, *proj]]
    if stage == "select":
        return [["bench_select.py", *(["--quick"] if quick else [])]]
    if stage == "refine3d":
        its = ["--max-iter", "3"] if quick else ["--max-iter", "12"]
        return [["bench_refine3d.py", "--preset", preset, "--dir", shared, *seed, *thr, *its, "--no-ctf-run"]]
    if stage == "class3d":
        runs = ["--iter", "2", "--runs", "skip,focused"] if quick else []
        return [["bench_class3d.py", "--project", str(projects / "class3d" / "proj"), *thr, *runs]]
    if stage == "post":
        return [["bench_post.py", *thr, "--sizes", "48" if quick else "64,128", "--no-scaling"]]
    raise ValueError(stage)


def git_commit() -> tuple[str, bool]:
    """Short commit of HEAD and whether the working tree differs from it."""
    def git(*a: str) -> str:
        r = subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""
    return git("rev-parse", "--short", "HEAD") or "unknown", bool(git("status", "--porcelain", "--untracked-files=no"))


def machine() -> dict:
    """What the figures were measured on."""
    import torch

    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.processor())
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__,
            "device": f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"}


def run_stage(stage: str, cmds: list[list[str]], work: Path, threads: int) -> tuple[dict, list[dict]]:
    """Run one stage's commands in turn (each its own process); its figures and failures."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    figures, failed = {}, []
    log = work / "logs" / f"{stage}.log"
    with log.open("w") as out:
        for i, cmd in enumerate(cmds):
            js = work / "json" / f"{stage}_{i}.json"
            js.unlink(missing_ok=True)
            err = work / "logs" / f"{stage}_{i}.stderr"
            full = [sys.executable, str(BENCH / cmd[0]), *cmd[1:], "--json", str(js)]
            out.write(f"$ {' '.join(full)}\n")
            out.flush()
            with err.open("w") as fe:
                rc = subprocess.run(full, cwd=REPO, env=env, stdout=out, stderr=fe).returncode
            stderr = err.read_text()
            out.write(stderr)
            if rc == 0 and js.exists():
                figures.update(json.loads(js.read_text()))
            else:
                why = f"exit status {rc}" if rc else "no JSON written"
                failed.append({"stage": stage, "command": " ".join(cmd), "error": why,
                               "stderr_tail": stderr.strip().splitlines()[-15:]})
    return figures, failed


def unit_of(key: str) -> str:
    """The unit named by a figure's suffix (``gold_A`` -> Å, ``s_per_iter`` -> s/iteration); '' for pure numbers."""
    name = "_" + key.rsplit(".", 1)[-1]
    return next((u for suffix, u in UNITS if name.endswith(suffix)), "")


def fmt(v) -> str:
    if v is None:
        return "-"
    return str(v) if isinstance(v, int) else f"{v:.4g}"


def print_table(figures: dict) -> None:
    rows = [(k.split(".", 1)[0], k.split(".", 1)[1], fmt(v), unit_of(k)) for k, v in figures.items()]
    rank = {s: i for i, s in enumerate(STAGES)}
    rows.sort(key=lambda r: (rank.get(r[0], len(rank)), r[1]))
    head = ("stage", "figure", "value", "unit")
    w = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    line = lambda r: f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:>{w[2]}}  {r[3]}"  # noqa: E731
    print(line(head))
    print("  ".join("-" * x for x in w))
    for r in rows:
        print(line(r))


def compare(old_path: str, new: dict, new_label: str) -> None:
    """Old vs new value of every figure both records have, with the relative change."""
    old = json.loads(Path(old_path).read_text())
    a, b = old.get("figures", {}), new.get("figures", {})
    shared = [k for k in sorted(b) if k in a]
    print(f"\ncompare {old_path} ({old.get('date', '?')[:10]}, {old.get('commit', '?')}) with {new_label} "
          f"({new.get('date', '?')[:10]}, {new.get('commit', '?')}): {len(shared)} shared figures, "
          f"{len(set(a) - set(b))} only in the old, {len(set(b) - set(a))} only in the new")
    for what in ("quick", "threads", "machine"):
        if old.get(what) != new.get(what):
            print(f"  note: {what} differs: old {old.get(what)}, new {new.get(what)}")
    w = max([len(k) for k in shared] + [6])
    print(f"{'figure':<{w}}  {'old':>10}  {'new':>10}  {'change':>8}  unit")
    for k in shared:
        x, y = a[k], b[k]
        ch = f"{100 * (y - x) / abs(x):+.1f}%" if isinstance(x, (int, float)) and isinstance(y, (int, float)) and x else ""
        print(f"{k:<{w}}  {fmt(x):>10}  {fmt(y):>10}  {ch:>8}  {unit_of(k)}")


def result_path(out: Path, date: datetime.datetime, commit: str, quick: bool) -> Path:
    stem = f"{date:%Y-%m-%d}_{commit}" + ("_quick" if quick else "")
    path, n = out / f"{stem}.json", 2
    while path.exists():  # never overwrite an earlier run of the same day and commit
        path, n = out / f"{stem}_{n}.json", n + 1
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(BENCH / "results"), help="where the JSON record goes (default bench/results)")
    ap.add_argument("--only", default=None, help=f"comma-separated stages to run, of {','.join(STAGES)}")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads per benchmark")
    ap.add_argument("--quick", action="store_true", help="tiny preset and sizes: checks the harness in a few minutes")
    ap.add_argument("--compare", nargs="+", metavar="JSON",
                    help="OLD.json: compare this run with it; OLD.json NEW.json: compare two records and run nothing")
    ap.add_argument("--work", default=str(BENCH / "out" / "run_all"), help="logs and the simulated projects")
    ap.add_argument("--keep", action="store_true", help="keep the simulated projects under WORK")
    ap.add_argument("--dry-run", action="store_true", help="print the commands and check that each script accepts them")
    args = ap.parse_args()
    if args.compare and len(args.compare) == 2:
        compare(args.compare[0], json.loads(Path(args.compare[1]).read_text()), args.compare[1])
        return
    if args.compare and len(args.compare) > 2:
        ap.error("--compare takes OLD.json, or OLD.json NEW.json")
    stages = args.only.split(",") if args.only else list(STAGES)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        ap.error(f"--only: unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    stages = [s for s in STAGES if s in stages]
    work = Path(args.work).resolve()
    for sub in ("logs", "json"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    projects = Path(tempfile.mkdtemp(prefix="projects_", dir=work))
    commands = {s: stage_commands(s, projects, args.threads, args.quick) for s in stages}
    if args.dry_run:
        ok = True
        for s, cmds in commands.items():
            for cmd in cmds:
                argv = [str(BENCH / cmd[0]), *cmd[1:], "--json", "x.json"]
                print(" ".join([sys.executable, *argv]))
                r = subprocess.run([sys.executable, "-c", PARSE_ONLY, *argv], cwd=REPO, capture_output=True, text=True)
                if r.returncode:
                    ok = False
                    print(f"  REJECTED: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
        shutil.rmtree(projects)
        sys.exit(0 if ok else 1)

    date = datetime.datetime.now(datetime.timezone.utc)
    commit, dirty = git_commit()
    print(f"benchmark suite ({'quick' if args.quick else 'benchmark preset'}), {args.threads} thread(s), commit {commit}"
          f"{' + uncommitted changes' if dirty else ''}; stages {', '.join(stages)}; logs in {work / 'logs'}", flush=True)
    figures, seconds, failed = {}, {}, []
    try:
        for s in stages:
            t = time.time()
            f, bad = run_stage(s, commands[s], work, args.threads)
            seconds[s] = round(time.time() - t, 1)
            figures.update(f)
            failed += bad
            print(f"  {s:9s} {'FAILED' if bad else 'ok':6s} {seconds[s]:7.0f} s  {len(f):3d} figures", flush=True)
            for b in bad:
                print(f"    {b['command']}: {b['error']}\n      " + "\n      ".join(b["stderr_tail"][-5:]), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(projects, ignore_errors=True)
    record = {"date": date.isoformat(timespec="seconds"), "commit": commit, "uncommitted_changes": dirty,
              "quick": args.quick, "threads": args.threads, "machine": machine(), "figures": figures,
              "stage_seconds": seconds, "failed": failed,
              "commands": {s: [" ".join(c).replace(str(projects), "PROJECTS") for c in cmds] for s, cmds in commands.items()}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = result_path(out, date, commit, args.quick)
    path.write_text(json.dumps(record, indent=1) + "\n")
    print()
    print_table(figures)
    print(f"\n{len(figures)} figures from {len(stages)} stage(s) in {sum(seconds.values()) / 60:.1f} min; "
          f"{len(failed)} failed command(s); written to {path}")
    if args.compare:
        compare(args.compare[0], record, str(path))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
