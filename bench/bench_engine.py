"""The E-step at real sizes: time per particle, peak memory, floating-point work and where the time goes.

For each box (default 64 and 96, about 4 min; ``--boxes 64 96 128 192`` for the full set,
about 20 min on one thread of a loaded 2-core machine) and each search (``global``: 7.5 deg, HEALPix order 3, R = 36 864 coarse
rotations; ``local``: 1.9 deg, order 5, sigma 3.75 deg, R = 928 rotations per particle), one
E-step pass (``subtomo.em.iteration.estep_pass``, as refine3d calls it) runs on simulated
particles (``subtomo.testing.synthetic.make_set``: one reference, missing wedge, CTF, SNR 1) at
current size ``--size-frac`` x box, in its own process, with ``--threads`` threads.

Cost model (float32 multiply-adds count 2 flops). With T coarse translations (19: range 3 px,
step 2 px), K classes, R coarse rotations, Mc coarse components (shells below the coarse
size, outside the missing wedge), and per significant coarse point Ct = 8 translation x
Cr = 8 rotation children at the M fine components:

    coarse cross  = 2 T (2 Mc) K R      per particle   ((B T, 2Mc) @ (2Mc, R) GEMM)
    coarse norm   = 2 Mc K R            per particle   ((B, Mc) @ (Mc, R) GEMM)
    fine cross    = 2 Ct (2 M) Cr       per significant point (batched matmul)
    fine norm     = 2 M Cr              per significant point

The achieved fraction is (those flops) / (E-step wall time) / (the machine's matmul peak),
the peak measured in the same process and thread count as the best of float32
2048^3 ``torch.matmul`` (best of five, before and after the pass). Peak memory is the
process's resident high-water mark during the pass minus its resident size before it
(Linux ``/proc/self/clear_refs``), so the simulated data do not count; torch.profiler's own
memory counts unless ``--no-profile`` (use that for memory figures). The time is split by ``torch.profiler`` into: reading + FFT of the
particles, projection of references (coarse, children, noise sums), phase ramps, the coarse
and fine GEMMs and their CTF/noise products, significant-point selection, the fine
posterior, and back-projection (insertion) with the noise sums.

    python bench/bench_engine.py                       # box 64 and 96, about 4 min
    python bench/bench_engine.py --boxes 64 96 128 192  # the full set, about 20 min
    python bench/bench_engine.py --compiled             # the same with the compiled projector
    python bench/bench_engine.py --projector --boxes 64 128 192   # projection speed only, both kernels
    python bench/bench_engine.py --boxes 192 --modes global --n 192   # a full group at box 192 (peak memory)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from _common import add_json_option, write_figures

GEMM_OPS = {"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm"}
ORDER = ["read + FFT", "projection", "projector set-up", "phase ramps", "coarse GEMM", "coarse CTF products, other",
         "significant points", "fine GEMM", "fine CTF products, other", "fine posterior", "back-projection + noise",
         "other"]


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def matmul_peak_gflops(n: int = 2048, reps: int = 5, device: str = "cpu") -> float:
    """Best of ``reps`` float32 n^3 matmuls [GFLOP/s] with the current thread count (or on the GPU)."""
    if device == "cuda":
        n = 8192
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    best = math.inf
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def _instrument():
    """Wrap the engine's stages in profiler ranges named after the table's rows."""
    from subtomo.em import expectation, iteration
    from subtomo.em.components import FourierComponents
    from subtomo.em.projector3d import Projector3D

    def wrap(owner, name, label):
        fn = getattr(owner, name)

        def wrapped(*a, **k):
            with torch.profiler.record_function("cat::" + label):
                return fn(*a, **k)
        setattr(owner, name, wrapped)

    wrap(iteration, "batch_transforms", "read + FFT")
    wrap(iteration, "accumulate", "back-projection + noise")
    wrap(iteration, "precompute_stacked_refs", "projection")
    wrap(Projector3D, "project", "projection")
    wrap(Projector3D, "project_stacked", "projection")
    wrap(Projector3D, "__init__", "projector set-up")
    wrap(FourierComponents, "phase_ramps", "phase ramps")
    wrap(expectation, "_coarse_scores", "coarse")
    wrap(expectation, "_significant_points", "significant points")
    wrap(expectation, "_fine_scores", "fine")
    wrap(expectation, "_kept_poses", "fine posterior")


def _split(prof, wall_s: float) -> dict:
    """Seconds per row of ORDER: each op's self time goes to its innermost ``cat::`` range."""
    out: dict = defaultdict(float)
    for ev in prof.events():
        region, p = None, ev
        while p is not None:
            if p.name.startswith("cat::"):
                region = p.name[5:]
                break
            p = p.cpu_parent
        self_s = ev.self_cpu_time_total / 1e6
        if region in ("coarse", "fine"):
            region = f"{region} GEMM" if ev.name in GEMM_OPS else f"{region} CTF products, other"
        out[region or "other"] += self_s
    out["other"] = max(0.0, wall_s - sum(v for k, v in out.items() if k != "other"))
    return dict(out)


def worker(box: int, mode: str, n: int, size_frac: float, threads: int, profile: bool, device: str = "cpu",
           pass_memory_gb: float = 0.0) -> dict:
    """One configuration in this process on ``device``; returns its figures."""
    torch.set_num_threads(threads)
    from subtomo.em import sampling
    from subtomo.em.components import fourier_components
    from subtomo.em.expectation import EStepOptions, coarse_group_size, coarse_refs_bytes
    from subtomo.em.healpix import angular_step_deg
    from subtomo.em.iteration import (
        InMemorySource,
        PassConfig,
        PoseTable,
        coarse_size_for,
        estep_pass,
        initial_sigma2,
        reference_support_shell,
    )
    from subtomo.geometry.euler import random_rotations
    from subtomo.geometry.symmetry import axis_rotation
    from subtomo.testing.synthetic import blob_reference, make_set

    px = 4.0
    ax = torch.arange(box, dtype=torch.float32) - box // 2
    z, y, x = torch.meshgrid(ax, ax, ax, indexing="ij")
    r = (x ** 2 + y ** 2 + z ** 2).sqrt()
    mask = (0.5 + 0.5 * torch.cos(math.pi * ((r - 0.4 * box) / (0.06 * box)).clamp(0, 1)))
    del x, y, z, r
    # smooth blobs alone have no power beyond a few shells (the engine would skip those components);
    # a refined map has power up to the current resolution: add texture inside the particle
    gen = torch.Generator().manual_seed(box)
    ref = blob_reference(box, np.random.default_rng(box)) + 0.5 * torch.randn((box,) * 3, generator=gen) * (mask > 0.5)
    # at most 32 distinct particles are simulated and held; larger passes cycle through them (the E-step
    # does the same work, the data take 32 particles' memory)
    n_sim = min(n, 32)
    ds = make_set(n=n_sim, box=box, pixel_size_A=px, snr=1.0, seed=box, reference=ref)
    cyc = torch.arange(n) % n_sim
    src = InMemorySource(ds.volumes, px, ds.ctfs)
    if n > n_sim:
        src = CyclicSource(src, n)
        ds.rot = ds.rot[cyc.numpy()]
    idx = np.arange(n)
    mask = mask.to(device)
    sigma2 = initial_sigma2(src, idx, mask, device)
    size = max(16, int(box * size_frac) // 2 * 2)
    rng = np.random.default_rng(1)
    if mode == "global":
        order, rot_set = 3, sampling.global_rotations(3, rng=rng)
        start = random_rotations(n, rng)
    else:
        order, rot_set = 5, sampling.local_rotations(5, 3.75, rng=rng)
        start = np.stack([a @ axis_rotation(rng.normal(size=3), np.deg2rad(2.0)) for a in ds.rot])
    csize = coarse_size_for(angular_step_deg(order), ds.diameter_A, box, px, size)
    trans = sampling.translation_grid(3.0, 2.0, 3)
    estep = EStepOptions(pass_memory_bytes=int(pass_memory_gb * 2 ** 30)) if pass_memory_gb > 0 else EStepOptions()
    cfg = PassConfig(size, csize, mask, rot_set, mode == "local", trans, estep, batch_size=32)
    comps = fourier_components(box, size, 3, device=device)
    poses = PoseTable.new(n, start, np.zeros((n, 3)))
    peak = matmul_peak_gflops(device=device)
    if os.environ.get("SUBTOMO_COMPILE_PROJECTOR") == "1":  # compile (or load the cached kernel) outside the pass
        from subtomo.em.projector3d import Projector3D
        warm = Projector3D(ds.reference.to(device))
        warm.project_stacked(torch.eye(3, device=device)[None], comps.k[:7])
        del warm
    if profile:
        _instrument()
    import gc
    gc.collect()
    rss0 = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # restart the high-water mark here
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if profile else _null() as prof:
        t = time.perf_counter()
        _, summ = estep_pass(src, idx, poses, ds.reference[None].to(device), sigma2, comps, cfg, device)
        if device == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t
    peak_mb = (_status_kb("VmHWM") - rss0) / 1024
    peak = max(peak, matmul_peak_gflops(device=device))  # the load of a shared machine changes: the better one
    if device == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    # the components actually scored: outside every particle's missing wedge, inside the reference's support
    support = reference_support_shell(ds.reference[None])
    keep = (comps.extract(ds.ctfs.to(device)).abs() > 1e-4).any(0) & (comps.shell < support)
    shell = comps.shell[keep]
    mc, m = int((shell < csize / 2).sum()), int(keep.sum())
    n_r, n_t = rot_set.matrices.shape[0], trans.points.shape[0]
    n_ct, n_cr = trans.children.shape[1], rot_set.children.shape[1]
    coarse_flops = n * (4 * n_t * mc * n_r + 2 * mc * n_r)
    fine_flops = float(poses.n_sig.sum()) * m * n_cr * (4 * n_ct + 2)
    err = _errors(poses, ds) if mode == "local" else float("nan")
    out = {"box": box, "mode": mode, "n": n, "size": size, "coarse_size": csize, "R": n_r, "T": n_t, "Mc": mc, "M": m,
           "wall_s": wall, "s_per_particle": wall / n, "peak_MB": peak_mb, "matmul_peak_GFLOPs": peak,
           "coarse_GFLOP": coarse_flops / 1e9, "fine_GFLOP": fine_flops / 1e9,
           "fraction_of_peak": (coarse_flops + fine_flops) / wall / (peak * 1e9),
           "refs_precomputed": mode == "global" and coarse_refs_bytes(1, n_r, mc) <= cfg.estep.pass_memory_bytes,
           "refs_GB": coarse_refs_bytes(1, n_r, mc) / 1e9 if mode == "global" else 0.0,
           "pmax": summ["pmax"], "local_err_deg": err}
    out["group_size"] = coarse_group_size(cfg.estep.pass_memory_bytes, 32, 10 ** 6, n_t, 1, n_r, mc)
    out["pass_memory_GB"] = cfg.estep.pass_memory_bytes / 2 ** 30
    if profile:
        out["split_s"] = _split(prof, wall)
        out["projection_s"] = out["split_s"].get("projection", 0.0)
        # derived, not measured: a 1000-particle pass projects the coarse references once (held) or once
        # per group (groups); local searches project per particle, as measured
        rounds = 1 if out["refs_precomputed"] else math.ceil(1000 / out["group_size"])
        out["s_per_particle_1000"] = ((wall - out["projection_s"]) / n + out["projection_s"] * rounds / 1000
                                      if mode == "global" else wall / n)
        gemm = out["split_s"].get("coarse GEMM", 0) + out["split_s"].get("fine GEMM", 0)
        out["gemm_fraction_of_peak"] = (coarse_flops + fine_flops) / max(gemm, 1e-9) / (peak * 1e9)
    return out


class CyclicSource:
    """n particles that cycle through the ``src.n`` held ones."""

    def __init__(self, src, n: int) -> None:
        self.src, self.n, self.box, self.pixel_size_A = src, n, src.box, src.pixel_size_A

    def volumes(self, idx, device):
        return self.src.volumes(np.asarray(idx) % self.src.n, device)

    def ctf(self, idx, device):
        return self.src.ctf(np.asarray(idx) % self.src.n, device)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def _errors(poses, ds) -> float:
    from subtomo.geometry.euler import angular_distance_deg
    return float(np.median(angular_distance_deg(poses.rot, ds.rot)))


def projector_speed(boxes: list[int], threads: int, n_rot: int = 256, reps: int = 3) -> list[dict]:
    """ns per sample of grid_sample and of the compiled gather kernel, alternated in one process (load-fair)."""
    torch.set_num_threads(threads)
    from subtomo.em import sampling
    from subtomo.em.components import fourier_components
    from subtomo.em.projector3d import Projector3D

    rows = []
    for box in boxes:
        vol = torch.randn((box,) * 3, generator=torch.Generator().manual_seed(box))
        comps = fourier_components(box, min(box, 62), 3)  # the coarse size of a 7.5 deg search
        rot = sampling.global_rotations(3, rng=np.random.default_rng(0)).matrices[:n_rot]
        plain, comp = Projector3D(vol, compiled=False), Projector3D(vol, compiled=True)
        comp.project_stacked(rot[:2], comps.k)  # compile (or load the cached kernel)
        best = {"grid_sample": math.inf, "compiled": math.inf}
        for _ in range(reps):
            for name, proj in (("grid_sample", plain), ("compiled", comp)):
                t = time.perf_counter()
                out = proj.project_stacked(rot, comps.k)
                best[name] = min(best[name], time.perf_counter() - t)
                if name == "grid_sample":
                    a = out
        diff = float((out - a).abs().max() / a.abs().max())
        ns = {k: v / (n_rot * comps.m) * 1e9 for k, v in best.items()}
        rows.append({"box": box, "M": comps.m, **ns, "speedup": ns["grid_sample"] / ns["compiled"], "max_rel_diff": diff})
        print(f"projection box {box} (M = {comps.m}): grid_sample {ns['grid_sample']:.0f} ns/sample, compiled "
              f"{ns['compiled']:.0f} ns/sample, x{rows[-1]['speedup']:.1f}, max rel diff {diff:.1e}", flush=True)
    return rows


def run_config(box: int, mode: str, n: int, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", f"{box},{mode},{n}", "--size-frac", str(args.size_frac),
           "--threads", str(args.threads), "--pass-memory-gb", str(args.pass_memory_gb)] + (
               ["--no-profile"] if args.no_profile else [])
    env = dict(os.environ, SUBTOMO_COMPILE_PROJECTOR="1" if args.compiled else "0")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"box {box} {mode} failed:\n{(r.stdout + r.stderr)[-3000:]}")
    return json.loads(lines[-1][7:])


def report(res: list[dict]) -> None:
    print(f"\n{'box':>4} {'search':>6} {'n':>3} {'size':>4} {'Mc':>6} {'M':>7} {'s/particle':>10} {'@1000*':>7} "
          f"{'peak MB':>8} {'GFLOP/particle':>14} {'GFLOP/s':>8} {'peak GFLOP/s':>12} {'of peak':>7} {'refs':>14}")
    for r in res:
        gf = (r["coarse_GFLOP"] + r["fine_GFLOP"]) / r["n"]
        refs = "per particle"
        if r["mode"] == "global":
            refs = ("held" if r["refs_precomputed"] else "groups") + f" {r['refs_GB']:.1f} GB"
        print(f"{r['box']:>4} {r['mode']:>6} {r['n']:>3} {r['size']:>4} {r['Mc']:>6} {r['M']:>7} {r['s_per_particle']:>10.2f} "
              f"{r.get('s_per_particle_1000', math.nan):>7.2f} "
              f"{r['peak_MB']:>8.0f} {gf:>14.1f} {gf * r['n'] / r['wall_s']:>8.1f} {r['matmul_peak_GFLOPs']:>12.1f} "
              f"{100 * r['fraction_of_peak']:>6.1f}% {refs:>14}")
    print("* derived: s/particle of a 1000-particle pass (coarse projections shared by all particles when held, "
          "by each group otherwise)")
    prof = [r for r in res if "split_s" in r]
    if prof:
        print("\nwhere the time goes [% of the pass] (torch.profiler, self time of each op in its stage)")
        print(f"{'stage':<28}" + "".join(f"{str(r['box']) + ' ' + r['mode']:>13}" for r in prof))
        for row in ORDER:
            print(f"{row:<28}" + "".join(f"{100 * r['split_s'].get(row, 0) / r['wall_s']:>12.1f}%" for r in prof))
        print(f"{'GEMM at % of matmul peak':<28}" + "".join(f"{100 * r['gemm_fraction_of_peak']:>12.1f}%" for r in prof))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--boxes", type=int, nargs="+", default=[64, 96])
    ap.add_argument("--modes", nargs="+", default=["global", "local"], choices=["global", "local"])
    ap.add_argument("--n", type=int, default=None, help="particles per configuration (default 16, 8 from box 128)")
    ap.add_argument("--size-frac", type=float, default=0.5, help="current image size as a fraction of the box")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pass-memory-gb", type=float, default=0.0,
                    help="EStepOptions.pass_memory_bytes in GiB (default: its default, 3 GiB)")
    ap.add_argument("--no-profile", action="store_true", help="no torch.profiler split (its overhead is small)")
    ap.add_argument("--compiled", action="store_true",
                    help="the torch.compile'd projector (SUBTOMO_COMPILE_PROJECTOR=1; compiled before the pass)")
    ap.add_argument("--projector", action="store_true",
                    help="only the projection speed: grid_sample against the compiled kernel, per box")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    add_json_option(ap)
    args = ap.parse_args()
    if args.projector:
        projector_speed(args.boxes, args.threads)
        return
    if args.worker:
        box, mode, n = args.worker.split(",")
        res = worker(int(box), mode, int(n), args.size_frac, args.threads, not args.no_profile,
                     pass_memory_gb=args.pass_memory_gb)
        print("RESULT " + json.dumps(res), flush=True)
        return
    res, figs = [], {}
    for box in args.boxes:
        for mode in args.modes:
            n = args.n or (16 if box < 128 else 8)
            t = time.time()
            r = run_config(box, mode, n, args)
            res.append(r)
            print(f"box {box} {mode}: {r['s_per_particle']:.2f} s/particle, peak {r['peak_MB']:.0f} MB, "
                  f"{100 * r['fraction_of_peak']:.1f}% of {r['matmul_peak_GFLOPs']:.0f} GFLOP/s "
                  f"(config wall {time.time() - t:.0f} s)", flush=True)
            key = f"engine.box{box}.{mode}."
            figs.update({key + "s_per_particle": r["s_per_particle"], key + "peak_MB": r["peak_MB"],
                         key + "fraction_of_peak": r["fraction_of_peak"]})
    report(res)
    write_figures(args.json, figs)


if __name__ == "__main__":
    main()
