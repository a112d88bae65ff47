"""Class-average gallery: one PNG with every class, largest class first (protocol Step 16).

Each tile is labelled with its class number, the fraction of particles it holds and its
estimated resolution, so good classes can be chosen for ``subtomo select --classes``.
2D class averages are shown as they are; 3D maps (class3d) as their three central slices
(xy, xz, yz) side by side.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from subtomo.plot import new_figure, save_figure


def _tile(image: np.ndarray) -> np.ndarray:
    """A 2D picture of one class: the image itself, or central xy|xz|yz slices of a map."""
    if image.ndim == 2:
        return image
    n = image.shape[0]
    slices = [image[n // 2], image[:, image.shape[1] // 2, :], image[:, :, image.shape[2] // 2]]
    gap = np.full((slices[0].shape[0], max(1, n // 16)), np.nan)
    return np.concatenate([slices[0], gap, slices[1], gap, slices[2]], axis=1)


def class_order(fractions: Sequence[float]) -> list[int]:
    """Indices of the classes sorted by size, largest first (ties: lower class number first)."""
    return sorted(range(len(fractions)), key=lambda k: (-float(fractions[k]), k))


def class_gallery(images: np.ndarray, fractions: Sequence[float], path: str | Path,
                  resolutions_A: Sequence[float] | None = None, title: str | None = None,
                  class_numbers: Sequence[int] | None = None, columns: int | None = None,
                  skip_empty: bool = False, selected: Sequence[int] | None = None,
                  notes: Sequence[str] | None = None) -> Path:
    """Write a PNG gallery of ``images`` (K, N, N) or (K, N, N, N), sorted by class size.

    ``fractions`` are the class distributions (0..1), ``resolutions_A`` the estimated
    resolutions in Å (inf/NaN shown as "-"). Each tile is contrast-stretched on its own.
    Classes whose number is in ``selected`` get a green frame (the result of a selection).
    ``notes`` (one string per class, e.g. the automatic selection's score and verdict) are
    printed under the tiles, green for selected classes and red for the others.
    """
    images = np.asarray(images, dtype=np.float32)
    k_total = images.shape[0]
    numbers = list(class_numbers) if class_numbers is not None else list(range(1, k_total + 1))
    res = list(resolutions_A) if resolutions_A is not None else [float("nan")] * k_total
    order = [k for k in class_order(fractions) if not (skip_empty and fractions[k] <= 0)]
    if not order:
        order = class_order(fractions)
    n = len(order)
    tile_aspect = _tile(images[0]).shape[1] / _tile(images[0]).shape[0]
    cols = columns or max(1, min(n, int(math.ceil(math.sqrt(n * 1.3 / tile_aspect)))))
    rows = int(math.ceil(n / cols))
    row_height = 2.25 if notes is not None else 1.85
    fig, axes = new_figure(rows, cols, figsize=(1.6 * cols * tile_aspect, row_height * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for slot, k in enumerate(order):
        ax = axes.ravel()[slot]
        tile = _tile(images[k])
        finite = tile[np.isfinite(tile)]
        lo, hi = (np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0))
        if hi <= lo:
            hi = lo + 1e-6
        ax.imshow(tile, cmap="gray", vmin=lo, vmax=hi, origin="lower", interpolation="nearest")
        r = res[k]
        r_text = f"{r:.0f} Å" if r is not None and np.isfinite(r) and r < 1e4 else "-"
        chosen = selected is not None and numbers[k] in set(selected)
        ax.set_title(f"{numbers[k]}: {100 * float(fractions[k]):.1f}% {r_text}", fontsize=7, pad=2,
                     color="green" if chosen else "black", fontweight="bold" if chosen else "normal")
        if notes is not None:
            ax.text(0.5, -0.04, notes[k], transform=ax.transAxes, ha="center", va="top", fontsize=6,
                    color="green" if chosen else "firebrick")
        if chosen:
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_color("limegreen")
                spine.set_linewidth(3)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)
