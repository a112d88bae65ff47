"""Benchmark of automatic 2D class selection (``select --auto``) against the simulator's truth.

For each project — two particle types (the shipped 20S proteasome, D7, ~175 Å, and human
apoferritin, PDB 6Z6U, a ~125 Å hollow sphere whose projection is a disc like a gold
bead's) at two pixel sizes — it runs the protocol's front end as a user would:

    simulate -> import -> ctf --skip-ctf -> prepare --skip-ctf -> extract --project
    -> class2d -> select --auto

and prints, per project, how many of the real particles and of the false picks (gold
beads and junk) the selection kept. Target (issue 21): >= 97 % of the real particles and
<= 2 % of the false picks.

    python bench/bench_select.py                 # four projects, about 4 min on 2 cores
    python bench/bench_select.py --quick         # one small project (harness check)
    python bench/bench_select.py --keep DIR      # keep the projects in DIR (re-used if present)

The apoferritin model is read from ``--apoferritin`` (default: the copy in the shared
data folder, ``/work/shared/data/structures/6z6u_human_apoferritin_24mer.pdb.gz``; PDB
entry 6Z6U, CC0).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from _common import add_json_option, peak_rss_MB, write_figures

from subtomo.io.star import read_star_table
from subtomo.jobs.base import execute
from subtomo.jobs.registry import load_spec
from subtomo.simulate import scoring

APOFERRITIN = Path("/work/shared/data/structures/6z6u_human_apoferritin_24mer.pdb.gz")


@dataclass
class BenchProject:
    """One simulated project of the benchmark and the 2D classification run on it."""

    name: str
    structure: str  # "default" (proteasome) or a model file
    pixel_size_A: float
    tomo_size: list[int]
    n_particles: int  # per tomogram
    n_fiducials: int = 4
    n_junk: int = 6
    n_tomograms: int = 2
    classes2d: int = 8
    iterations2d: int = 12
    simulate_extra: dict = field(default_factory=dict)


def projects(quick: bool, apoferritin: Path) -> list[BenchProject]:
    if quick:
        return [BenchProject("proteasome_10A_quick", "default", 10.0, [192, 192, 64], 20, 2, 3, 1, 4, 6)]
    return [
        BenchProject("proteasome_10A", "default", 10.0, [288, 288, 64], 60, 5, 8),
        BenchProject("proteasome_7A", "default", 7.0, [384, 384, 96], 60, 5, 8),
        BenchProject("apoferritin_10A", str(apoferritin), 10.0, [256, 256, 64], 60, 5, 8),
        BenchProject("apoferritin_7A", str(apoferritin), 7.0, [352, 352, 96], 60, 5, 8),
    ]


def _job(command: str, root: Path, **params):
    spec = load_spec({"import": "import_tomograms"}.get(command, command))
    return execute(spec, spec.params(**params), root, argv=["subtomo", command], quiet=True)


def run_front_end(bp: BenchProject, root: Path, seed: int) -> dict[str, str]:
    """simulate .. class2d in ``root`` (skipped if ``root`` already holds a finished class2d)."""
    marker = root / "bench_jobs.json"
    if marker.exists():
        return json.loads(marker.read_text())
    root.mkdir(parents=True, exist_ok=True)
    common = dict(device="cpu", seed=seed)
    jobs: dict[str, str] = {}
    _job("simulate", root, project_dir=".", preset="tiny", structure=bp.structure, pixel_size=bp.pixel_size_A,
         tomo_size=bp.tomo_size, n_tomograms=bp.n_tomograms, n_particles=bp.n_particles,
         n_fiducials=bp.n_fiducials, n_junk=bp.n_junk, tilt_step=3.0, ice_thickness=min(600.0, bp.tomo_size[2] * bp.pixel_size_A),
         **bp.simulate_extra, **common)
    truth = json.loads((root / "GroundTruth" / "simulation.json").read_text())
    box, diameter = int(truth["box_px"]), round(float(truth["structure"]["diameter_A"]) * 1.1)
    _job("import", root)
    _job("ctf", root, skip_ctf=True, **common)
    _job("prepare", root, skip_ctf=True, **common)
    jobs["extract"] = _job("extract", root, box=box, project=True, **common).name
    jobs["class2d"] = _job("class2d", root, K=bp.classes2d, iter=bp.iterations2d, particle_diameter=diameter,
                           **common).name
    jobs["diameter_A"] = str(diameter)
    marker.write_text(json.dumps(jobs))
    return jobs


def score_selection(root: Path, jobs: dict[str, str], select_job: str) -> dict[str, int]:
    """Kept real particles, gold beads and junk picks against the ground truth (``GroundTruth/picks.star``)."""
    picks = scoring.load_picks(root).astype({"rlnTomoName": str, "rlnTomoParticleId": int})
    kind = dict(zip(zip(picks["rlnTomoName"], picks["rlnTomoParticleId"]), picks["subtomoKind"].astype(str)))

    def kinds(path: Path) -> list[str]:
        t = read_star_table(path)
        return [kind.get(k, "?") for k in zip(t["rlnTomoName"].astype(str), t["rlnTomoParticleId"].astype(int))]

    every, kept = kinds(root / jobs["extract"] / "particles_subtomo.star"), kinds(root / select_job / "output_2Dto3D.star")
    return {"real_total": every.count("particle"), "real_kept": kept.count("particle"),
            "false_total": len(every) - every.count("particle"), "false_kept": len(kept) - kept.count("particle"),
            "fiducials_kept": kept.count("fiducial"), "junk_kept": kept.count("junk")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one small project only")
    ap.add_argument("--keep", default=None, help="directory for the projects (kept; re-used when present)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--only", default=None, help="run only the project of this name")
    ap.add_argument("--apoferritin", default=str(APOFERRITIN), help="apoferritin model (PDB/mmCIF)")
    add_json_option(ap)
    args = ap.parse_args()
    apo = Path(args.apoferritin)
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_select_"))
    figures: dict[str, float] = {}
    rows = []
    for bp in projects(args.quick, apo):
        if args.only and bp.name != args.only:
            continue
        if bp.structure != "default" and not Path(bp.structure).exists():
            raise SystemExit(f"{bp.structure}: apoferritin model not found; give it with --apoferritin PATH.")
        root = base / bp.name
        t0 = time.time()
        jobs = run_front_end(bp, root, args.seed)
        t1 = time.time()
        sel = _job("select", root, i=f"{jobs['class2d']}run_it{bp.iterations2d:03d}_data.star", auto=True,
                   particle_diameter=float(jobs["diameter_A"]))
        s = score_selection(root, jobs, sel.name)
        s["front_end_s"], s["select_s"] = t1 - t0, time.time() - t1
        rows.append((bp.name, s))
        real_frac = s["real_kept"] / max(s["real_total"], 1)
        false_frac = s["false_kept"] / max(s["false_total"], 1)
        for key, val in (("real_kept_fraction", real_frac), ("false_kept_fraction", false_frac),
                         ("real_total", s["real_total"]), ("false_total", s["false_total"])):
            figures[f"select.{bp.name}.{key}"] = val
        print(f"{bp.name:<18} real kept {s['real_kept']:>3}/{s['real_total']:<3} ({100 * real_frac:5.1f} %)  "
              f"false kept {s['false_kept']:>2}/{s['false_total']:<2} ({100 * false_frac:4.1f} %; beads "
              f"{s.get('fiducials_kept', '?')}, junk {s.get('junk_kept', '?')})  "
              f"[{s['front_end_s']:.0f} s front end, {s['select_s']:.1f} s select]  "
              f"{'PASS' if real_frac >= 0.97 and false_frac <= 0.02 else 'FAIL'}", flush=True)
    figures["select.peak_rss_MB"] = peak_rss_MB()
    write_figures(args.json, figures)
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    if rows and not all(r[1]["real_kept"] >= 0.97 * r[1]["real_total"] and r[1]["false_kept"] <= 0.02 * r[1]["false_total"]
                        for r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
