"""Pictures of maps: orthogonal central slices of one map or of several classes (FSC curves: :mod:`subtomo.plot.post`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from subtomo.plot import new_figure, save_figure


def _slices(vol: np.ndarray) -> list[np.ndarray]:
    n = vol.shape
    return [vol[n[0] // 2], vol[:, n[1] // 2, :], vol[:, :, n[2] // 2]]


def plot_slices(vol: np.ndarray, path: str | Path, title: str = "") -> Path:
    """Central XY, XZ and YZ slices of one map, one grey scale for all three."""
    s = _slices(np.asarray(vol, dtype=np.float32))
    lo, hi = float(min(x.min() for x in s)), float(max(x.max() for x in s))
    fig, axes = new_figure(1, 3, figsize=(9, 3.3))
    for ax, img, name in zip(axes, s, ("XY (z = N/2)", "XZ (y = N/2)", "YZ (x = N/2)")):
        ax.imshow(img, cmap="gray", origin="lower", vmin=lo, vmax=hi)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def plot_class_slices(vols: list[np.ndarray], path: str | Path, labels: list[str] | None = None) -> Path:
    """Central slices (rows: classes; columns: XY, XZ, YZ) of several maps."""
    k = len(vols)
    fig, axes = new_figure(k, 3, figsize=(7, 2.4 * k), squeeze=False)
    for i, vol in enumerate(vols):
        s = _slices(np.asarray(vol, dtype=np.float32))
        lo, hi = float(min(x.min() for x in s)), float(max(x.max() for x in s))
        for j, img in enumerate(s):
            axes[i][j].imshow(img, cmap="gray", origin="lower", vmin=lo, vmax=hi)
            axes[i][j].axis("off")
        axes[i][0].set_title(labels[i] if labels else f"class {i + 1}", fontsize=9, loc="left")
    return save_figure(fig, path)
