"""Benchmark of 2D classification: time per iteration, peak memory, class purity.

Synthetic projections: ``--patterns`` random blob patterns (64 px box by default), each
image a pattern at a random in-plane angle and shift plus white noise. Prints, per run,
the wall and CPU seconds per iteration (mean over iterations after the first; on a shared
machine the CPU time is the steadier figure), the process's peak
resident memory and the purity of the final classes against the true patterns.

    python bench/bench_class2d.py                      # 1000 x 64^2, K = 20, 25 iterations
    python bench/bench_class2d.py --iterations 5 --sweep   # vs particles and classes
    python bench/bench_class2d.py --project /tmp/c2 --K 10   # simulated project (made if missing)
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from _common import add_json_option, peak_rss_MB, write_figures

from subtomo.em.class2d import Class2DSettings, initialise, iterate


def make_patterns(n_patterns: int, box: int, rng: np.random.Generator) -> list[list[tuple]]:
    pats = []
    for _ in range(n_patterns):
        nb = rng.integers(2, 6)
        pats.append([(rng.uniform(-box / 5, box / 5), rng.uniform(-box / 5, box / 5), rng.uniform(2, box / 12),
                      rng.choice([-1, 1]) * rng.uniform(0.5, 1.0)) for _ in range(nb)])
    return pats


def render(pat, box: int, psi: float, shift) -> np.ndarray:
    yy, xx = np.meshgrid(np.arange(box) - box // 2, np.arange(box) - box // 2, indexing="ij")
    a = math.radians(psi)
    c, s = math.cos(a), math.sin(a)
    x, y = xx - shift[0], yy - shift[1]
    u, v = c * x - s * y, s * x + c * y
    return sum(amp * np.exp(-((u - bx) ** 2 + (v - by) ** 2) / (2 * w * w)) for bx, by, w, amp in pat)


def dataset(n: int, box: int, n_patterns: int, noise: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    pats = make_patterns(n_patterns, box, rng)
    kinds = np.arange(n) % n_patterns
    imgs = np.array([render(pats[k], box, rng.uniform(0, 360), rng.uniform(-2, 2, 2)) for k in kinds])
    imgs += noise * rng.normal(size=imgs.shape)
    return torch.tensor(imgs, dtype=torch.float32), kinds


def purity(classes: np.ndarray, kinds: np.ndarray) -> float:
    return sum(np.bincount(kinds[classes == c]).max() for c in np.unique(classes)) / len(classes)


def run(n: int, box: int, k: int, iterations: int, noise: float, px: float, device: str) -> dict:
    imgs, kinds = dataset(n, box, k, noise)
    imgs = imgs.to(device)
    st = Class2DSettings(n_classes=k, pixel_size_A=px, particle_diameter_A=0.8 * box * px, highres_limit_A=15.0, seed=0)
    t0 = time.time()
    model, poses = initialise(imgs, st)
    t_init = time.time() - t0
    times, cpu = [], []
    for it in range(1, iterations + 1):
        c0 = time.process_time()
        model, poses, info = iterate(imgs, model, poses, st, it)
        cpu.append(time.process_time() - c0)
        times.append(info.seconds)
        print(f"  it {it:2d}: {info.seconds:6.2f} s wall {cpu[-1]:6.2f} s cpu  res {info.resolution_A:5.1f} A  size {info.current_size:3d}  "
              f"changes {100 * info.class_change:5.1f} %  pmax {info.average_pmax:.2f}  nsig {info.mean_significant:6.1f}", flush=True)
    peak_mb = peak_rss_MB()
    return {"n": n, "box": box, "K": k, "init_s": t_init, "total_s": t_init + sum(times),
            "s_per_it": float(np.mean(times[1:] if len(times) > 1 else times)), "first_it_s": times[0], "cpu_s_per_it": float(np.mean(cpu[1:] if len(cpu) > 1 else cpu)),
            "total_cpu_s": float(sum(cpu)),
            "peak_rss_MB": peak_mb, "purity": purity(poses.cls, kinds)}


def simulated_project(project: str, k: int, iterations: int, threads: int, preset: str, seed: int) -> dict:
    """class2d on a simulated project's projections; precision/recall of the best class-based selection.

    Uses the latest ``extract --project`` of ``project``; when there is none, the project is
    simulated (``preset``, ``seed``; kept if it exists) and taken through import, prepare with
    the true defoci and ``extract --project`` (bench_refine3d.prepare_project). A class is kept when most of its members are true particles (the best
    achievable selection by whole classes given the ground truth), and the selection is
    also run through ``subtomo select`` to check the 2D-to-3D mapping.
    """
    import glob
    from pathlib import Path

    import pandas as pd
    from bench_refine3d import prepare_project

    from subtomo.io.star import read_star
    from subtomo.jobs.base import execute
    from subtomo.jobs.class2d import SPEC, Class2DParams
    from subtomo.jobs.select import SPEC as SEL
    from subtomo.jobs.select import SelectParams

    root = Path(project).resolve()
    if not glob.glob(str(root / "Extract/job*/subtomo_proj2d.star")):
        info = prepare_project(root, preset, seed, threads, estimate_ctf=False, extra_sim=[], project_2d=True)
        print(f"project {root} (preset {preset}, seed {seed}) prepared in {info['seconds']:.0f} s")
    t0 = time.time()
    ctx = execute(SPEC, Class2DParams(K=k, iter=iterations, threads=threads, device="cpu"), root, quiet=True)
    wall = time.time() - t0
    print(f"class2d: {wall:.1f} s for {iterations} iterations, K={k}; gallery {ctx.dir / f'run_it{iterations:03d}_classes.png'}")
    data = read_star(ctx.dir / f"run_it{iterations:03d}_data.star")["particles"]
    truth = read_star(root / "GroundTruth/picks.star")
    truth = truth if isinstance(truth, pd.DataFrame) else next(v for v in truth.values() if isinstance(v, pd.DataFrame))
    m = data.merge(truth[["rlnTomoName", "rlnTomoParticleId", "subtomoKind"]], on=["rlnTomoName", "rlnTomoParticleId"], how="left")
    is_true = (m["subtomoKind"] == "particle").to_numpy()
    good = [c for c, grp in m.groupby("rlnClassNumber") if (grp["subtomoKind"] == "particle").mean() > 0.5]
    kept = m["rlnClassNumber"].isin(good).to_numpy()
    tp = int((kept & is_true).sum())
    prec = tp / max(int(kept.sum()), 1)
    rec = tp / max(int(is_true.sum()), 1)
    kinds = m["subtomoKind"].value_counts().to_dict()
    print(f"particles {kinds}; kept classes {good}: {int(kept.sum())} kept, precision {100 * prec:.1f} %, recall {100 * rec:.1f} %")
    for c, grp in m.groupby("rlnClassNumber"):
        print(f"  class {c:3d}: {len(grp):4d} members  " + ", ".join(f"{kk} {v}" for kk, v in grp["subtomoKind"].value_counts().items()))
    sel = execute(SEL, SelectParams(classes=[int(c) for c in good]), root, quiet=True)
    out3 = read_star(sel.dir / "output_2Dto3D.star")["particles"]
    print(f"select: {len(out3)} subtomograms in {sel.dir / 'output_2Dto3D.star'}")
    return {"wall_s": wall, "s_per_iter": wall / iterations, "images": len(m), "precision_pct": 100 * prec,
            "recall_pct": 100 * rec, "selected_3d": len(out3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--K", type=int, default=20)
    ap.add_argument("--iterations", type=int, default=25)
    ap.add_argument("--noise", type=float, default=1.0)
    ap.add_argument("--pixel-size", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sweep", action="store_true", help="also vary the number of particles and classes")
    ap.add_argument("--project", help="simulated project: score class-based selection (simulated and extracted if missing)")
    ap.add_argument("--preset", default="benchmark", help="with --project: simulator preset if the project must be made")
    ap.add_argument("--seed", type=int, default=1, help="with --project: simulator seed if the project must be made")
    add_json_option(ap)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.project:
        r = simulated_project(a.project, a.K, a.iterations, a.threads, a.preset, a.seed)
        write_figures(a.json, {f"class2d.project_K{a.K}_it{a.iterations}.{key}": val for key, val in r.items()})
        return
    figs = {}
    cases = [(a.n, a.K)]
    if a.sweep:
        cases += [(a.n // 2, a.K), (a.n * 2, a.K), (a.n, a.K // 2), (a.n, a.K * 2)]
    for n, k in cases:
        print(f"n={n} box={a.box} K={k} iterations={a.iterations} threads={a.threads} device={a.device}", flush=True)
        r = run(n, a.box, k, a.iterations, a.noise, a.pixel_size, a.device)
        print("RESULT " + "  ".join(f"{key}={val:.3g}" if isinstance(val, float) else f"{key}={val}" for key, val in r.items()), flush=True)
        tag = f"class2d.synthetic_n{n}_K{k}_box{a.box}_it{a.iterations}"
        renamed = {"s_per_it": "s_per_iter", "cpu_s_per_it": "cpu_s_per_iter"}
        figs.update({f"{tag}.{renamed.get(key, key)}": r[key]
                     for key in ("s_per_it", "cpu_s_per_it", "total_s", "total_cpu_s", "purity", "peak_rss_MB")})
    write_figures(a.json, figs)


if __name__ == "__main__":
    main()
