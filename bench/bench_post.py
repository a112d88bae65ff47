"""Benchmark of postprocessing and local resolution (prints timings and accuracy).

    python bench/bench_post.py [--device cpu|cuda] [--sizes 64,128] [--threads 1]

Synthetic half maps: a particle (white noise in a soft sphere of radius N/4) blurred by
B = 300 Å² plus independent noise; the left half of the box carries full-band signal,
the right half signal low-passed to 3x the pixel size's Nyquist, so local resolution has
something to find. Reported: wall time of the FSC/correction step, sharpening, the
directional FSC and local resolution; the fitted B vs the truth; local-resolution medians
left/right; and how localres cost scales with the number of windows and the cube size.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _common import add_json_option, write_figures

from subtomo.fourier import fft_centered, ifft_centered, lowpass, rfft_frequencies, soft_sphere_mask
from subtomo.post.fsc import directional_fsc, masked_corrected_fsc
from subtomo.post.localres import local_resolution, window_geometry
from subtomo.post.masks import automask
from subtomo.post.sharpen import sharpen


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, dev):
    _sync(dev)
    t = time.perf_counter()
    out = fn()
    _sync(dev)
    return out, time.perf_counter() - t


def make_halves(n: int, px: float, dev: torch.device, b_true: float = 300.0, sigma: float = 0.3):
    g = torch.Generator().manual_seed(n)
    shape = (n,) * 3
    full = torch.randn(shape, generator=g)
    low = lowpass(torch.randn(shape, generator=g), 6 * px, px) * 3
    x = torch.arange(n)
    sig = torch.where(x[None, None, :] < n // 2, full, low) * soft_sphere_mask(shape, n / 4, 4)
    sig = sig / sig.std()
    s2 = (rfft_frequencies(shape).norm(dim=-1) / px) ** 2
    blurred = ifft_centered(fft_centered(sig, 3) * torch.exp(-b_true * s2 / 4), shape)
    h1 = blurred + sigma * torch.randn(shape, generator=g)
    h2 = blurred + sigma * torch.randn(shape, generator=g)
    return h1.to(dev), h2.to(dev)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", default="64,128")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--window-px", type=float, default=16.0)
    ap.add_argument("--step-px", type=int, default=4)
    ap.add_argument("--no-scaling", action="store_true", help="skip the localres cost-scaling sweep")
    add_json_option(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    px = 2.0
    print(f"device {dev}, threads {torch.get_num_threads()}, torch {torch.__version__}")
    figs = {}
    for n in [int(s) for s in args.sizes.split(",")]:
        h1, h2 = make_halves(n, px, dev)
        (mask, thr), t_mask = _timed(lambda: automask((h1 + h2) / 2, px, None, 3, 6, 10.0), dev)
        (res, tr), t_fsc = _timed(lambda: masked_corrected_fsc(h1, h2, mask, px), dev)
        dfsc, t_dir = _timed(lambda tr=tr: directional_fsc(tr, n, px, 25.0, randomize_from=res.randomize_from), dev)
        del tr
        sh, t_sharp = _timed(lambda: sharpen((h1 + h2) / 2, res.final, res.resolution_A, px), dev)
        k = f"post.{n}cube_{dev.type}."
        figs.update({k + "automask_s": t_mask, k + "fsc_s": t_fsc, k + "directional_fsc_s": t_dir, k + "sharpen_s": t_sharp,
                     k + "resolution_A": res.resolution_A, k + "fitted_bfactor_A2": sh.bfactor_A2})
        print(f"\n{n}^3 at {px} A/px: automask {t_mask:.2f} s, FSC (unmasked+masked+randomised) {t_fsc:.2f} s, "
              f"directional (7 cones) {t_dir:.2f} s, sharpen {t_sharp:.2f} s; total {t_mask + t_fsc + t_dir + t_sharp:.2f} s")
        print(f"  resolution {res.resolution_A:.2f} A (randomised from shell {res.randomize_from}); B used "
              f"{sh.bfactor_A2:.0f} A^2 ({sh.bfactor_source}; blur applied: 300; FSC weighting flattens the fit), directional spread "
              f"{min(dfsc.resolutions_A):.1f}-{max(dfsc.resolutions_A):.1f} A")
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        lr, t_lr = _timed(lambda: local_resolution(h1, h2, mask, px, args.window_px, args.step_px), dev)
        c = lr.centres_zyx
        left = np.median(lr.values_A[c[:, 2] < n // 2 - args.window_px / 2])
        right = np.median(lr.values_A[c[:, 2] > n // 2 + args.window_px / 2])
        cube, _ = window_geometry(args.window_px)
        figs.update({k + "localres_s": t_lr, k + "localres_ms_per_window": 1e3 * t_lr / len(lr.values_A),
                     k + "localres_median_left_A": left, k + "localres_median_right_A": right})
        mem = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB" if dev.type == "cuda" else ""
        print(f"  localres: {len(lr.values_A)} windows of {cube}^3 (sphere {args.window_px:g} px, step {args.step_px}) "
              f"in {t_lr:.2f} s = {1e3 * t_lr / len(lr.values_A):.2f} ms/window{mem}; median left {left:.2f} A, "
              f"right {right:.2f} A (truth: left full band to Nyquist {2 * px:.1f} A, right low-passed at {6 * px:.0f} A)")
    if not args.no_scaling:
        # cost scaling of localres on the last size: windows (step) and cube size (window diameter)
        print("\nlocalres cost scaling (last size):")
        for w, step in [(12, 4), (16, 4), (24, 4), (16, 2), (16, 8)]:
            lr, t = _timed(lambda: local_resolution(h1, h2, mask, px, w, step), dev)
            cube, _ = window_geometry(w)
            nw = len(lr.values_A)
            figs[f"post.{n}cube_{dev.type}.localres_window{w}_step{step}_s"] = t
            print(f"  window {w:>2} px (cube {cube:>2}), step {step}: {nw:>6} windows, {t:6.2f} s, "
                  f"{1e9 * t / (nw * cube ** 3 * np.log2(cube ** 3)):.2f} ns per window-voxel-log2")
    write_figures(args.json, figs)


if __name__ == "__main__":
    main()
