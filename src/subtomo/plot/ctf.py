"""Diagnostic pictures of CTF estimation (Step 10: inspect every fit, Fig. 2c-e)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from subtomo.plot import new_figure


def _save(fig, path: str | Path, dpi: int = 80) -> Path:
    """Atomic PNG save without the tight bounding box (that draws every figure twice;
    there are hundreds of these per project)."""
    import os

    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def plot_image_fit(diag: dict, title: str, path: str | Path) -> Path:
    """Left: power spectrum (left half data, right half fitted CTF²). Right: equiphase 1D
    average with the fit and the windowed correlation that sets the fit resolution."""
    fig, (ax0, ax1) = new_figure(1, 2, figsize=(9.5, 4.2), gridspec_kw={"width_ratios": [1, 1.35]})
    data = np.clip(diag["spectrum"], 0, 1)
    model = np.clip(diag["model2d"], 0, 1)
    box = data.shape[0]
    img = data.copy()
    img[:, box // 2:] = model[:, box // 2:]
    ax0.imshow(img, cmap="gray", origin="lower", interpolation="nearest")
    ax0.axvline(box // 2 - 0.5, color="y", lw=0.6)
    ax0.set_title("data | fit", fontsize=9)
    ax0.set_xticks([])
    ax0.set_yticks([])
    s = diag["s_A"]
    prof = diag["profile"]
    mod = diag["model"]
    scale = np.std(mod) / max(np.std(prof), 1e-12)
    ax1.plot(s, prof * scale, lw=0.8, color="k", label="data (equiphase average)")
    ax1.plot(s, mod, lw=0.9, color="tab:red", label="fit")
    ax1.set_xlabel("spatial frequency (1/Å)")
    ax1.set_ylabel("background-subtracted")
    band = diag["band"]
    ax1.axvspan(1 / band.res_min_A, 1 / band.res_max_A, color="tab:blue", alpha=0.06, label="fitting band")
    ax2 = ax1.twinx()
    ax2.plot(s, diag["cc"], lw=0.8, color="tab:green", label="windowed CC")
    ax2.set_ylim(-1, 1.05)
    ax2.set_ylabel("windowed CC", color="tab:green", fontsize=8)
    if "fit_res_A" in diag and diag["fit_res_A"] > 0:
        ax1.axvline(1 / diag["fit_res_A"], color="tab:green", ls="--", lw=0.8)
    ax1.legend(fontsize=7, loc="upper right")
    fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=0.02, right=0.93, bottom=0.13, top=0.88, wspace=0.12)
    return _save(fig, path)


def plot_image_fits(diagnostics: list[dict], labels: list[tuple[int, int]], name: str, tilts_deg: np.ndarray,
                    directory: Path) -> None:
    """One :func:`plot_image_fit` PNG per diagnostic: ``<name>_NNN[_trialK].png`` in ``directory``.

    ``labels`` are (0-based image, trial 1/2 or 0) of each diagnostic.
    """
    for (i, k), d in zip(labels, diagnostics):
        tag = f"{name}_{i + 1:03d}" + (f"_trial{k}" if k else "")
        title = (f"{name} image {i + 1} ({'trial ' + str(k) + ', ' if k else ''}tilt {tilts_deg[i]:.1f}°)  "
                 f"res {d['fit_res_A']:.1f} Å, t = {d['significance']:.1f}")
        plot_image_fit(d, title, directory / f"{tag}.png")


def plot_series_summary(table: pd.DataFrame, name: str, path: str | Path) -> Path:
    """Defocus (U, V) and fit resolution against tilt angle; failed fits marked."""
    fig, (ax0, ax1) = new_figure(2, 1, figsize=(6.5, 6), sharex=True)
    tilt = table["rlnTomoNominalStageTiltAngle"].to_numpy(float)
    order = np.argsort(tilt)
    u = table["rlnDefocusU"].to_numpy(float) / 1e4
    v = table["rlnDefocusV"].to_numpy(float) / 1e4
    failed = table.get("subtomoCtfFitFailed", pd.Series(np.zeros(len(table)))).to_numpy(int) == 1
    ax0.plot(tilt[order], u[order], "o-", ms=3, lw=0.8, label="DefocusU")
    ax0.plot(tilt[order], v[order], "s-", ms=3, lw=0.8, label="DefocusV")
    if failed.any():
        ax0.plot(tilt[failed], u[failed], "x", color="r", ms=8, label="fit failed / off trend")
    trend = table.get("subtomoCtfSource", pd.Series([""] * len(table))).astype(str).to_numpy() == "trend"
    if trend.any() and "subtomoCtfFittedDefocus" in table.columns:
        fitted = table["subtomoCtfFittedDefocus"].to_numpy(float) / 1e4
        ax0.plot(tilt[trend], fitted[trend], "o", mfc="none", color="r", ms=6, label="its own fit (replaced by trend)")
    ax0.set_ylabel("defocus (µm)")
    ax0.legend(fontsize=8)
    res = table["rlnCtfMaxResolution"].to_numpy(float)
    ax1.plot(tilt[order], res[order], "o-", ms=3, lw=0.8, color="tab:green")
    if failed.any():
        ax1.plot(tilt[failed], res[failed], "x", color="r", ms=8)
    ax1.set_ylabel("fit resolution (Å)")
    ax1.set_xlabel("tilt angle (°)")
    fig.suptitle(f"{name}: CTF per tilt", fontsize=10)
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.09, top=0.93, hspace=0.08)
    return _save(fig, path)


def plot_defocus_vs_truth(errors: pd.DataFrame, path: str | Path) -> Path:
    """Estimated and true mean defocus against tilt (top) and the error (bottom), per tomogram.

    ``errors`` as made by :func:`subtomo.simulate.scoring.ctf_errors`; flagged fits in red.
    """
    fig, (ax0, ax1) = new_figure(2, 1, figsize=(6.5, 6), sharex=True)
    for i, (name, t) in enumerate(errors.groupby("tomogram", sort=True)):
        t = t.sort_values("tilt_deg")
        color = f"C{i % 10}"
        ax0.plot(t["tilt_deg"], t["true_A"] / 1e4, "-", color=color, lw=1, label=f"{name} true")
        ax0.plot(t["tilt_deg"], t["estimated_A"] / 1e4, "o", color=color, ms=3, label=f"{name} estimated")
        ax1.plot(t["tilt_deg"], t["error_A"], "o-", color=color, ms=3, lw=0.6)
    flagged = errors[errors["flagged"]]
    if len(flagged):
        ax0.plot(flagged["tilt_deg"], flagged["estimated_A"] / 1e4, "x", color="r", ms=8, label="flagged")
        ax1.plot(flagged["tilt_deg"], flagged["error_A"], "x", color="r", ms=8)
    ax1.axhline(0, color="black", lw=0.5)
    ax0.set_ylabel("mean defocus (µm)")
    ax0.legend(fontsize=7, ncol=2)
    ax1.set_ylabel("estimated - true (Å)")
    ax1.set_xlabel("tilt angle (°)")
    fig.suptitle("CTF estimates against the ground truth", fontsize=10)
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.09, top=0.93, hspace=0.08)
    return _save(fig, path)
