"""Benchmark of ``subtomo simulate``: wall time and peak memory per preset, and the oracle.

For every preset the simulation runs in a fresh subprocess (so the peak RSS is its own).
For presets with enough particles the "oracle" is computed: subtomograms cut from the
simulated tomograms at the true centres, rotated into the reference frame with the true
poses and averaged with a Wiener-filtered 3D CTF (nearest-tilt-plane model, per-particle
defocus). Printed: FSC of two half averages (0.143) and FSC of the full average against the
true map (0.5), in Å and in pixels (Nyquist = 2 px).

    python bench/bench_simulate.py                      # tiny, demo, benchmark, 2 threads
    python bench/bench_simulate.py --presets tiny,demo --threads 2 --out bench/out/sim
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _common import add_json_option, write_figures

RUN = """
import resource, sys, time, torch
torch.set_num_threads({threads})
from subtomo.jobs.base import execute
from subtomo.jobs.simulate import SPEC, SimulateParams
t = time.time()
execute(SPEC, SimulateParams(project_dir={project!r}, preset={preset!r}, seed={seed}, threads={threads}, device='cpu'), '.', quiet=True)
print('WALL', time.time() - t)
print('MAXRSS_MIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def run_preset(preset: str, project: Path, threads: int, seed: int) -> tuple[float, float]:
    if project.exists():
        shutil.rmtree(project)
    code = RUN.format(threads=threads, project=str(project), preset=preset, seed=seed)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"simulate {preset} failed:\n{out.stderr}")
    vals = dict(line.split() for line in out.stdout.splitlines() if line.startswith(("WALL", "MAXRSS")))
    return float(vals["WALL"]), float(vals["MAXRSS_MIB"])


def particle_ctf3d(box: int, pixel_A: float, a: np.ndarray, tilts_deg: np.ndarray, defocus_A: np.ndarray,
                   dose: np.ndarray, voltage: float, cs: float, q0: float) -> torch.Tensor:
    """3D CTF (rfft layout, reference frame) of one particle: value of the nearest tilt plane, 0 in the wedge."""
    from subtomo.ctf.model import ctf_1d
    from subtomo.fourier import rfft_frequencies

    k = rfft_frequencies((box, box, box), dtype=torch.float64)  # reference frame, (x, y, z)
    kt = k @ torch.as_tensor(a.T)  # tomogram-frame k_t = A k (rows)
    kx, kz = kt[..., 0], kt[..., 2]
    kx_pos = torch.where(kx < 0, -kx, kx)
    kz_fold = torch.where(kx < 0, -kz, kz)  # (kx, kz) and (-kx, -kz) lie on the same plane
    ang = torch.rad2deg(torch.atan2(kz_fold, kx_pos))
    order = np.argsort(tilts_deg)
    t_sorted = torch.as_tensor(tilts_deg[order])
    idx = torch.bucketize(ang.contiguous(), (t_sorted[1:] + t_sorted[:-1]) / 2)
    near = torch.as_tensor(order)[idx]
    inside = (ang >= t_sorted[0] - 1.5) & (ang <= t_sorted[-1] + 1.5)
    s = k.norm(dim=-1) / pixel_A
    d = torch.as_tensor(defocus_A)[near]
    b = 4.0 * torch.as_tensor(dose)[near]
    return (ctf_1d(s, d, voltage, cs, q0, bfactor_A2=b) * inside).float()


def oracle(project: Path, max_particles: int = 400) -> dict:
    """Half-set and truth FSC of the CTF-corrected average made with the true poses (class 1)."""
    from scipy.ndimage import affine_transform

    from subtomo.fourier import fft_centered, fsc_maps, ifft_centered, phase_shift, resolution_at_threshold, soft_sphere_mask
    from subtomo.geometry.euler import euler_to_matrix
    from subtomo.io.mrc import open_mrc_mmap, read_mrc
    from subtomo.io.star import read_star_table

    info = json.loads((project / "GroundTruth" / "simulation.json").read_text())
    cfg = info["parameters"]
    ref, px = read_mrc(project / "GroundTruth" / "class001.mrc")
    n = ref.shape[0]
    picks = read_star_table(project / "GroundTruth" / "picks.star")
    picks = picks[(picks.subtomoKind == "particle") & (picks.rlnClassNumber == 1)].head(max_particles)
    tilts = read_star_table(project / "GroundTruth" / "tilts.star")
    perm = np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]])
    num = [torch.zeros(n, n, n // 2 + 1, dtype=torch.complex64) for _ in range(2)]
    den = [torch.zeros(n, n, n // 2 + 1) for _ in range(2)]
    used = 0
    for tomo_name, group in picks.groupby("rlnTomoName"):
        tt = tilts[tilts.rlnTomoName == tomo_name]
        tilt_deg = tt["rlnTomoNominalStageTiltAngle"].to_numpy(dtype=float, copy=True)
        dfc = ((tt["rlnDefocusU"] + tt["rlnDefocusV"]) / 2).to_numpy(dtype=float, copy=True)
        dose = tt["rlnMicrographPreExposure"].to_numpy(dtype=float, copy=True)
        with open_mrc_mmap(project / "Tomograms" / tomo_name / f"{tomo_name}.mrc") as mrc:
            vol = mrc.data
            size = np.array(vol.shape[::-1], dtype=float)  # x, y, z
            for _, row in group.iterrows():
                c = np.array([row.rlnCoordinateX, row.rlnCoordinateY, row.rlnCoordinateZ])
                lo = np.floor(c).astype(int) - n // 2
                if np.any(lo < 0) or np.any(lo + n > size):
                    continue
                sub = -np.asarray(vol[lo[2]:lo[2] + n, lo[1]:lo[1] + n, lo[0]:lo[0] + n], dtype=np.float32)
                sub = (sub - sub.mean()) / (sub.std() + 1e-9)
                frac = torch.as_tensor(-(c - np.floor(c)), dtype=torch.float32)
                sub = ifft_centered(phase_shift(fft_centered(torch.as_tensor(sub), 3), frac, (n, n, n)), (n, n, n)).numpy()
                a = euler_to_matrix(row.rlnAngleRot, row.rlnAngleTilt, row.rlnAnglePsi)
                m = perm @ a @ perm  # reference(s) = particle(A s)
                centre = np.full(3, n // 2)
                unrot = affine_transform(sub, m, offset=centre - m @ centre, order=3)
                r_t = (c - size / 2) * px  # Å from the tomogram centre
                th = np.deg2rad(tilt_deg)
                h = -r_t[0] * np.sin(th) + r_t[2] * np.cos(th)
                ctf = particle_ctf3d(n, px, a, tilt_deg, dfc - h, dose, cfg["voltage"], cfg["cs"], cfg["amplitude_contrast"])
                half = used % 2
                num[half] += ctf * fft_centered(torch.as_tensor(unrot), 3)
                den[half] += ctf ** 2
                used += 1
    if used < 4:
        return {"particles": used}
    eps = 0.05 * float(torch.stack(den).sum(0).mean())
    mask = soft_sphere_mask((n, n, n), 0.45 * n, 3)
    halves = [ifft_centered(num[i] / (den[i] + eps / 2), (n, n, n)) * mask for i in range(2)]
    full = ifft_centered((num[0] + num[1]) / (den[0] + den[1] + eps), (n, n, n)) * mask
    fsc_half = fsc_maps(halves[0], halves[1])
    fsc_true = fsc_maps(full, torch.as_tensor(ref) * mask)
    res_half = resolution_at_threshold(fsc_half, n, px, 0.143)
    res_true = resolution_at_threshold(fsc_true, n, px, 0.5)
    return {"particles": used, "box": n, "pixel_A": px, "half_fsc_0.143_A": round(res_half, 1),
            "half_fsc_0.143_px": round(res_half / px, 2), "truth_fsc_0.5_A": round(res_true, 1),
            "truth_fsc_0.5_px": round(res_true / px, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny,demo,benchmark")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/out/simulate")
    ap.add_argument("--no-oracle", action="store_true")
    add_json_option(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"{'preset':10s} {'wall_s':>8s} {'peak_MiB':>9s}  oracle (true poses, CTF-corrected average, class 1)")
    figs = {}
    for preset in args.presets.split(","):
        project = out / preset
        wall, rss = run_preset(preset, project, args.threads, args.seed)
        figs.update({f"simulate.{preset}.wall_s": wall, f"simulate.{preset}.peak_rss_MB": rss})
        line = f"{preset:10s} {wall:8.1f} {rss:9.0f}"
        if not args.no_oracle and preset != "tiny":
            t = time.time()
            o = oracle(project)
            line += (f"  {o['particles']} particles, box {o.get('box')}: half-FSC 0.143 {o.get('half_fsc_0.143_A')} A "
                     f"({o.get('half_fsc_0.143_px')} px), FSC vs truth 0.5 {o.get('truth_fsc_0.5_A')} A "
                     f"({o.get('truth_fsc_0.5_px')} px) [{time.time() - t:.0f} s]")
            figs.update({f"simulate.{preset}.oracle_particles": o["particles"],
                         f"simulate.{preset}.oracle_half_fsc0143_A": o.get("half_fsc_0.143_A"),
                         f"simulate.{preset}.oracle_half_fsc0143_px": o.get("half_fsc_0.143_px"),
                         f"simulate.{preset}.oracle_truth_fsc05_A": o.get("truth_fsc_0.5_A"),
                         f"simulate.{preset}.oracle_truth_fsc05_px": o.get("truth_fsc_0.5_px"),
                         f"simulate.{preset}.oracle_s": time.time() - t})
        print(line, flush=True)
    write_figures(args.json, figs)


if __name__ == "__main__":
    main()
