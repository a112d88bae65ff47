"""Coordinate checker: particle positions drawn on tilt images (catches axis/binning mix-ups)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from subtomo.geometry.tilt import project_to_tilt, specimen_coordinates_A
from subtomo.io.mrc import open_mrc_mmap
from subtomo.plot import new_figure, save_figure


def plot_coordinates_on_tilts(stack_path: Path, tilts_deg: np.ndarray, coords_px: np.ndarray,
                              tomo_size_xyz: tuple[int, int, int], pixel_size_A: float, out: Path) -> Path:
    """PNG with the particles' projected positions on the lowest-tilt and the highest-tilt image."""
    picks = [int(np.argmin(np.abs(tilts_deg))), int(np.argmax(np.abs(tilts_deg)))]
    fig, axes = new_figure(1, 2, figsize=(11, 5.5))
    r_t = specimen_coordinates_A(coords_px, tomo_size_xyz, pixel_size_A)
    with open_mrc_mmap(stack_path) as mrc:
        data = mrc.data if mrc.data.ndim == 3 else mrc.data[None]
        for ax, index in zip(axes, picks):
            image = np.asarray(data[index], dtype=np.float32)
            h, w = image.shape
            x_img, y_img, _ = project_to_tilt(r_t, tilts_deg[index])
            lo, hi = np.percentile(image, [1, 99])
            ax.imshow(image, cmap="gray", origin="lower", vmin=lo, vmax=hi)
            ax.scatter(x_img[:, 0] / pixel_size_A + w / 2, y_img[:, 0] / pixel_size_A + h / 2, s=60,
                       facecolors="none", edgecolors="yellow", linewidths=0.8)
            ax.set_title(f"image {index + 1}: tilt {tilts_deg[index]:.1f} deg, {len(coords_px)} particles")
            ax.set_axis_off()
    return save_figure(fig, out)
