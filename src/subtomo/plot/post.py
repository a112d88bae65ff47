"""Pictures of postprocessing: FSC curves, Guinier plot, directional FSC, masks, local resolution."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from subtomo.plot import new_figure, save_figure


def _res_ticks(ax, s_max: float) -> None:
    """Secondary x-axis labels in Å for a 1/Å axis."""
    ticks = [t for t in ax.get_xticks() if 0 < t <= s_max * 1.0001]
    sec = ax.secondary_xaxis("top")
    sec.set_xticks(ticks)
    sec.set_xticklabels([f"{1 / t:.1f}" for t in ticks])
    sec.set_xlabel("resolution (Å)")


def plot_fsc(path: str | Path, s_A: np.ndarray, curves: dict[str, np.ndarray], resolution_A: float,
             threshold: float = 0.143, other_thresholds: tuple[float, ...] = ()) -> Path:
    """FSC curves against spatial frequency with the threshold(s) and the resolution marked."""
    fig, ax = new_figure(figsize=(6.5, 4.2))
    for name, c in curves.items():
        ax.plot(s_A, np.asarray(c), label=name, lw=1.4)
    for t in (threshold, *other_thresholds):
        ax.axhline(t, color="grey", ls="--", lw=0.8)
    ax.axhline(0, color="black", lw=0.5)
    ax.axvline(1 / resolution_A, color="grey", ls=":", lw=0.8)
    ax.text(1 / resolution_A, 0.95, f" {resolution_A:.2f} Å", va="top", fontsize=8)
    ax.set_xlim(0, s_A[-1])
    ax.set_ylim(-0.1, 1.05)
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("FSC")
    ax.legend(fontsize=8, loc="lower left")
    _res_ticks(ax, s_A[-1])
    return save_figure(fig, path)


def plot_guinier(path: str | Path, x: np.ndarray, curves: dict[str, np.ndarray], fit_range_A=None,
                 bfactor_A2: float | None = None) -> Path:
    """ln|F| against 1/d² for the sharpening stages; the fitted range shaded."""
    fig, ax = new_figure(figsize=(6.5, 4.2))
    for name, y in curves.items():
        y = np.asarray(y)
        ok = y > -99
        if ok.any():
            ax.plot(x[ok], y[ok], label=name, lw=1.2, ls="--" if name == "intercept" else "-")
    if fit_range_A:
        lo, hi = fit_range_A
        ax.axvspan(1 / lo ** 2, 1 / hi ** 2, color="yellow", alpha=0.2, label="fit range")
    ax.set_xlabel("1/d² (Å⁻²)")
    ax.set_ylabel("ln(amplitude)")
    if bfactor_A2 is not None:
        ax.set_title(f"Guinier plot, B = {bfactor_A2:.0f} Å²", fontsize=10)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_directional(path: str | Path, s_A: np.ndarray, names: list[str], curves: np.ndarray,
                     resolutions_A: list[float], half_angle_deg: float, threshold: float = 0.143) -> Path:
    fig, ax = new_figure(figsize=(6.5, 4.2))
    for name, c, r in zip(names, curves, resolutions_A):
        ax.plot(s_A, c, label=f"{name}: {r:.1f} Å", lw=1.4 if name == "z" else 1.0)
    ax.axhline(threshold, color="grey", ls="--", lw=0.8)
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xlim(0, s_A[-1])
    ax.set_ylim(-0.1, 1.05)
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("FSC in cone")
    ax.set_title(f"directional FSC (cones of ±{half_angle_deg:g}°)", fontsize=10)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def _central(volume: np.ndarray) -> list[tuple[str, np.ndarray]]:
    nz, ny, nx = volume.shape
    return [("xy (z = N/2)", volume[nz // 2]), ("xz (y = N/2)", volume[:, ny // 2, :]),
            ("yz (x = N/2)", volume[:, :, nx // 2])]


def plot_central_slices(path: str | Path, volume: np.ndarray, title: str = "", overlay: np.ndarray | None = None,
                        cmap: str = "gray") -> Path:
    """Three central sections; an optional mask drawn as a contour at 0.5."""
    fig, axes = new_figure(1, 3, figsize=(10, 3.6))
    ov = _central(overlay) if overlay is not None else [None] * 3
    for ax, (name, sl), o in zip(axes, _central(volume), ov):
        ax.imshow(sl, cmap=cmap, origin="lower")
        if o is not None and np.ptp(o[1]) > 0:
            ax.contour(o[1], levels=[0.5], colors="r", linewidths=0.8)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def plot_localres(hist_path: str | Path, slices_path: str | Path, resolution_map: np.ndarray, values_A: np.ndarray,
                  density: np.ndarray | None = None) -> tuple[Path, Path]:
    """Histogram of the window resolutions, and central slices coloured by local resolution."""
    fig, ax = new_figure(figsize=(5.5, 3.8))
    ax.hist(values_A, bins=40, color="tab:blue")
    ax.axvline(np.median(values_A), color="k", ls="--", lw=0.8, label=f"median {np.median(values_A):.1f} Å")
    ax.set_xlabel("local resolution (Å)")
    ax.set_ylabel("windows")
    ax.legend(fontsize=8)
    h = save_figure(fig, hist_path)
    lo, hi = np.percentile(values_A, 2), np.percentile(values_A, 98)
    fig, axes = new_figure(1, 3, figsize=(11, 3.8))
    dens = _central(density) if density is not None else [None] * 3
    im = None
    for ax, (name, sl), d in zip(axes, _central(resolution_map), dens):
        if d is not None:
            ax.imshow(d[1], cmap="gray", origin="lower")
        shown = np.ma.masked_where(sl <= 0, sl)
        im = ax.imshow(shown, cmap="jet", origin="lower", vmin=lo, vmax=hi, alpha=0.6 if d is not None else 1.0)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.colorbar(im, ax=list(axes), shrink=0.8, label="local resolution (Å)")
    s = save_figure(fig, slices_path)
    return h, s
