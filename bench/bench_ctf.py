"""Benchmark of CTF estimation (``subtomo ctf``): speed and accuracy against known defocus.

Part 1 (always): a 41-image tilt series (-60..60 deg, 3 deg steps) of synthetic 1024²
images at 2 Å/px (random-phase object x CTF with the tilted-plane defocus gradient,
astigmatism, B envelope, noise; ``subtomo.ctf.synthetic.synthetic_tilt_images``), fitted
with the job's defaults on ``--threads`` CPU threads. Prints the time per series (fit
only and with the diagnostic PNGs) and |error| statistics of the mean defocus, the
astigmatism and its angle.

Part 2 (when ``subtomo.simulate`` is installed): simulates a project for each ``--preset``
(default benchmark and demo), runs ``subtomo import`` and ``subtomo ctf`` and compares with
``GroundTruth/tilts.star``: median and 90th-percentile |defocus error| for |tilt| <= 30
and > 30 deg, failed fits, time per tilt series. ``--project DIR`` reuses a simulated one
(or simulates the first preset there and keeps it).

    python bench/bench_ctf.py [--threads 2] [--snr 0.05] [--preset benchmark,demo] [--per-tilt] [--skip-sim]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import add_json_option, peak_rss_MB, write_figures


def _stats(err: np.ndarray, figs: dict | None = None, key: str = "") -> str:
    """Median / p90 / max of |err| as text; with ``figs``, also stored as ``key``_median_A and ``key``_p90_A."""
    err = np.abs(np.asarray(err, float))
    if len(err) == 0:
        return "n=0"
    med, p90 = np.median(err), np.percentile(err, 90)
    if figs is not None:
        figs.update({f"{key}_median_A": med, f"{key}_p90_A": p90})
    return f"n={len(err):3d} median {med:7.0f} A  p90 {p90:7.0f} A  max {err.max():7.0f} A"


def synthetic_series(args, figs: dict) -> None:
    from subtomo.ctf.estimate import CtfSearchParams, Optics, estimate_ctf
    from subtomo.ctf.series import concat_fits
    from subtomo.ctf.synthetic import synthetic_tilt_images

    optics = Optics(300.0, 2.7, 0.07, 2.0)
    rng = np.random.default_rng(args.seed)
    tilts = np.arange(-60.0, 60.1, 3.0)
    n = len(tilts)
    d = 30000.0 + rng.normal(0, 1500, n)
    astig = rng.uniform(600, 1500, n)
    angle = np.full(n, rng.uniform(-90, 90)) + rng.normal(0, 3, n)
    # thicker ice at high tilt: signal falls as cos(tilt)
    t0 = time.time()
    imgs = torch.cat([synthetic_tilt_images(d[i:i + 1] + astig[i:i + 1] / 2, d[i:i + 1] - astig[i:i + 1] / 2, angle[i:i + 1],
                                            tilts[i:i + 1], optics, size=args.size, snr=args.snr * np.cos(np.radians(tilts[i])),
                                            seed=args.seed + i) for i in range(n)])
    print(f"synthetic series: {n} images {args.size}x{args.size} at {optics.pixel_size_A} A/px, snr {args.snr} "
          f"(x cos tilt), simulated in {time.time() - t0:.1f} s")
    params = CtfSearchParams()
    for with_plots in (False, True):
        t0 = time.time()
        c0 = time.process_time()
        fits = [estimate_ctf(imgs[i:i + 8], tilts[i:i + 8], optics, params, diagnostics=with_plots) for i in range(0, n, 8)]
        fit = concat_fits(fits)
        if with_plots:
            from subtomo.ctf.series import results_table
            from subtomo.plot.ctf import plot_image_fit, plot_series_summary

            out = Path(tempfile.mkdtemp(prefix="bench_ctf_"))
            for i, dg in enumerate(fit.diagnostics):
                plot_image_fit(dg, f"image {i + 1}", out / f"img{i + 1:03d}.png")
            plot_series_summary(results_table([f"{i + 1}@x" for i in range(n)], tilts, np.zeros(n), fit, "fit"), "bench",
                                out / "summary.png")
            shutil.rmtree(out)
        wall = time.time() - t0
        figs[f"ctf.synthetic.{'fit_png' if with_plots else 'fit'}_s"] = wall
        print(f"  {'fit + PNGs' if with_plots else 'fit only  '}: {wall:6.2f} s wall, {time.process_time() - c0:6.2f} s CPU "
              f"for {n} images ({torch.get_num_threads()} threads)")
    err = fit.defocus_mean_A - d
    ast_err = (fit.defocus_u_A - fit.defocus_v_A) - astig
    ang_err = (fit.defocus_angle_deg - angle + 90) % 180 - 90
    low = np.abs(tilts) <= 30
    print(f"  mean defocus |err| |tilt|<=30: {_stats(err[low], figs, 'ctf.synthetic.defocus_err_low_tilt')}")
    print(f"  mean defocus |err| |tilt|> 30: {_stats(err[~low], figs, 'ctf.synthetic.defocus_err_high_tilt')}")
    print(f"  astigmatism  |err| (all)     : {_stats(ast_err, figs, 'ctf.synthetic.astigmatism_err')}")
    print(f"  angle |err| (astig 600-1500 A): median {np.median(np.abs(ang_err)):.1f} deg, p90 "
          f"{np.percentile(np.abs(ang_err), 90):.1f} deg")
    print(f"  failed fits: {int(fit.failed.sum())}, median fit resolution {np.median(fit.max_resolution_A):.1f} A")
    figs.update({"ctf.synthetic.angle_err_median_deg": np.median(np.abs(ang_err)),
                 "ctf.synthetic.failed_fits": int(fit.failed.sum()),
                 "ctf.synthetic.fit_resolution_median_A": np.median(fit.max_resolution_A)})
    # the tilt model: same data without the defocus-gradient strips
    from dataclasses import replace

    fit0 = concat_fits([estimate_ctf(imgs[i:i + 8], tilts[i:i + 8], optics, replace(params, tilt_gradient=False))
                        for i in range(0, n, 8)])
    err0 = fit0.defocus_mean_A - d
    text0 = _stats(err0[~low], figs, "ctf.synthetic.no_tilt_model_defocus_err_high_tilt")
    print(f"  without tilted-plane model, |tilt|> 30: {text0}; mean significance "
          f"{fit0.significance[~low].mean():.1f} vs {fit.significance[~low].mean():.1f} with it")


def _report_far_off(fit_err: np.ndarray, used_err: np.ndarray, flagged: np.ndarray, n_series: int, figs: dict,
                    key: str) -> None:
    """Fractions of images more than 1,000 A off, flagged and unflagged: of their own fit, and of the value used."""
    n = len(fit_err)
    fl = flagged > 0
    far_fit, far_used = np.abs(fit_err) > 1000, np.abs(used_err) > 1000
    print(f"  images > 1000 A off (own fit): {far_fit.sum()}/{n} = {far_fit.mean():.1%}: flagged {int((far_fit & fl).sum())} "
          f"({(far_fit & fl).sum() / n:.1%} of all), unflagged {int((far_fit & ~fl).sum())} ({(far_fit & ~fl).sum() / n:.1%})")
    print(f"  images > 1000 A off (value used downstream): {far_used.sum()}/{n} = {far_used.mean():.1%}: flagged "
          f"{int((far_used & fl).sum())}, unflagged {int((far_used & ~fl).sum())}; flagged images' |err| median "
          f"{np.median(np.abs(used_err[fl])) if fl.any() else float('nan'):.0f} A (own fit "
          f"{np.median(np.abs(fit_err[fl])) if fl.any() else float('nan'):.0f} A)")
    figs.update({f"{key}.far_off_fraction": float(far_fit.mean()),
                 f"{key}.far_off_flagged_fraction": float((far_fit & fl).sum() / n),
                 f"{key}.far_off_unflagged_fraction": float((far_fit & ~fl).sum() / n),
                 f"{key}.far_off_used_fraction": float(far_used.mean())})


def simulated_project(args, preset: str, figs: dict) -> None:
    try:
        from subtomo.jobs import simulate as sim_job
    except ImportError:
        print("subtomo.simulate not available: skipping the simulated-project part")
        return
    from subtomo.io.star import read_star_table
    from subtomo.jobs import ctf as ctf_job
    from subtomo.jobs import import_tomograms
    from subtomo.jobs.base import execute

    root = Path(args.project).resolve() if args.project else Path(tempfile.mkdtemp(prefix="bench_ctf_sim_")) / "proj"
    if not (root / "GroundTruth").exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        execute(sim_job.SPEC, sim_job.SimulateParams(project_dir=str(root), preset=preset, seed=args.seed,
                                                     threads=args.threads), root.parent, quiet=True)
        print(f"simulated preset {preset} (seed {args.seed}) in {time.time() - t0:.1f} s: {root}")
    if not any(root.glob("Import/job*/all_tomograms.star")):
        execute(import_tomograms.SPEC, import_tomograms.ImportParams(), root, quiet=True)
    truth = read_star_table(root / "GroundTruth" / "tilts.star")
    for label, kw in (("fit", {}), ("trials", {"use_trials": True})):
        if label == "trials" and not any(root.glob("Tomograms/*/*.trial")):
            continue
        t0 = time.time()
        ctx = execute(ctf_job.SPEC, ctf_job.CtfParams(plots=False, threads=args.threads, device="cpu", **kw), root, quiet=True)
        wall = time.time() - t0
        tomos = read_star_table(ctx.path("ctf_tomograms.star"))
        errs, fit_errs, tilts, failed = [], [], [], []
        for _, row in tomos.iterrows():
            res = read_star_table(root / row["subtomoCtfResultsStar"])
            gt = truth[truth["rlnTomoName"] == row["rlnTomoName"]].reset_index(drop=True)
            est = (res["rlnDefocusU"] + res["rlnDefocusV"]).to_numpy() / 2
            ref = (gt["rlnDefocusU"] + gt["rlnDefocusV"]).to_numpy() / 2
            if label == "trials" and "subtomoTrialDefocus1" in gt.columns:
                ref_tr = (gt["subtomoTrialDefocus1"] + gt["subtomoTrialDefocus2"]).to_numpy() / 2
                print(f"  ({row['rlnTomoName']}: mean |trial - exposure defocus| {np.abs(ref_tr - ref).mean():.0f} A)")
            errs.append(est - ref)
            fitted = res["subtomoCtfFittedDefocus"].to_numpy() if "subtomoCtfFittedDefocus" in res.columns else est
            fit_errs.append(fitted - ref)
            tilts.append(res["rlnTomoNominalStageTiltAngle"].to_numpy())
            failed.append(res["subtomoCtfFitFailed"].to_numpy())
        err, tilt, fl = np.concatenate(errs), np.concatenate(tilts), np.concatenate(failed)
        fit_err = np.concatenate(fit_errs)
        low = np.abs(tilt) <= 30
        key = f"ctf.{preset}.{label}"
        print(f"simulated project ({label}): {len(tomos)} tilt series, {wall / len(tomos):.1f} s per series "
              f"({args.threads} threads)")
        print(f"  |defocus err| |tilt|<=30: {_stats(err[low], figs, f'{key}.defocus_err_low_tilt')}")
        print(f"  |defocus err| |tilt|> 30: {_stats(err[~low], figs, f'{key}.defocus_err_high_tilt')}")
        ok = fl == 0
        figs.update({f"{key}.s_per_series": wall / len(tomos), f"{key}.flagged_failed": int((~ok).sum()),
                     f"{key}.images": len(fl), f"{key}.wrong_unflagged": int((ok & (np.abs(err) > 1000)).sum())})
        print(f"  flagged failed: {int((~ok).sum())}/{len(fl)} (|tilt|<=30: {int((~ok & low).sum())}, "
              f"|tilt|>30: {int((~ok & ~low).sum())})")
        print(f"  not flagged |tilt|<=30: {_stats(err[low & ok])}")
        print(f"  not flagged |tilt|> 30: {_stats(err[~low & ok])}")
        print(f"  wrong (|err| > 1000 A) but not flagged: {int((ok & low & (np.abs(err) > 1000)).sum())} with |tilt|<=30, "
              f"{int((ok & ~low & (np.abs(err) > 1000)).sum())} with |tilt|>30")
        _report_far_off(fit_err, err, fl, len(tomos), figs, key)
        if "subtomoCtfReplacedByTrend" in tomos.columns:
            print("  replaced by the series' trend: " + ", ".join(
                f"{r['rlnTomoName']} {int(r['subtomoCtfReplacedByTrend'])}" + (" (CTF unknown)" if int(r.get("subtomoCtfUnknown", 0)) else "")
                for _, r in tomos.iterrows()))
        if args.per_tilt:
            for t, e, e_fit, f in sorted(zip(tilt, err, fit_err, fl)):
                print(f"    tilt {t:6.1f}  err {e:7.0f} A (own fit {e_fit:7.0f} A){'  flagged' if f else ''}")
    if not args.project:
        shutil.rmtree(root.parent, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--snr", type=float, default=0.05, help="signal/noise variance of the synthetic images at 0 deg")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", default="benchmark,demo", help="simulator preset(s), comma-separated")
    ap.add_argument("--per-tilt", action="store_true", help="print every tilt's error")
    ap.add_argument("--project", default=None, help="simulated project directory (reused if it exists, else simulated and kept)")
    ap.add_argument("--skip-sim", action="store_true")
    ap.add_argument("--skip-synthetic", action="store_true")
    add_json_option(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    figs = {}
    if not args.skip_synthetic:
        synthetic_series(args, figs)
    if not args.skip_sim:
        presets = [args.preset.split(",")[0]] if args.project else args.preset.split(",")
        for preset in presets:
            simulated_project(args, preset, figs)
    figs["ctf.peak_rss_MB"] = peak_rss_MB()
    print(f"peak RSS {figs['ctf.peak_rss_MB']:.0f} MiB")
    write_figures(args.json, figs)


if __name__ == "__main__":
    main()
