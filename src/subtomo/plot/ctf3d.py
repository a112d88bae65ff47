"""Central slices of one particle's 3D CTF model (like Fig. 2a,b of the protocol paper).

Top row: the model without dose and tilt weighting (B = 0, scale 1); bottom row: the
weighted model actually used. Columns: the XZ slice (ky = 0: tilt planes and missing
wedge), the YZ slice (kx = 0) and the XY slice (kz = 0). Inputs are centred cubes
(DC at N/2, :func:`subtomo.tomo.ctf3d.to_relion_cube`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from subtomo.plot import new_figure, save_figure


def plot_ctf3d_slices(unweighted: np.ndarray, weighted: np.ndarray, path: str | Path, pixel_size_A: float,
                      title: str = "") -> Path:
    """Write a 2×3 PNG of central slices of two centred N³ CTF cubes."""
    unweighted = np.asarray(unweighted, dtype=np.float32)
    weighted = np.asarray(weighted, dtype=np.float32)
    n = unweighted.shape[-1]
    c = n // 2
    nyq = 1.0 / (2 * pixel_size_A)
    extent = [-nyq, nyq * (n - 2) / n, -nyq, nyq * (n - 2) / n]
    fig, axes = new_figure(2, 3, figsize=(11, 7.4))
    for row, (vol, label) in enumerate(((unweighted, "unweighted (no dose/tilt scale)"), (weighted, "dose- and tilt-weighted"))):
        lim = float(np.abs(vol).max()) or 1.0
        slices = ((vol[:, c, :], "XZ (ky = 0)", "kx [1/Å]", "kz [1/Å]"),
                  (vol[:, :, c], "YZ (kx = 0)", "ky [1/Å]", "kz [1/Å]"),
                  (vol[c, :, :], "XY (kz = 0)", "kx [1/Å]", "ky [1/Å]"))
        for col, (img, name, xl, yl) in enumerate(slices):
            ax = axes[row, col]
            im = ax.imshow(img, origin="lower", cmap="RdBu_r", vmin=-lim, vmax=lim, extent=extent)
            ax.set_title(f"{label}\n{name}", fontsize=9)
            ax.set_xlabel(xl)
            ax.set_ylabel(yl)
        fig.colorbar(im, ax=axes[row, :].tolist(), shrink=0.8, label="CTF")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)
