"""Synthetic 2D particle images with known class, in-plane angle and shift (2D classification tests).

Three patterns of Gaussian blobs; an image is ``ref(A^T (r - shift))`` with A = Rz(psi)
(RELION's convention) plus white noise. :func:`write_proj2d_project` writes a set as the
z-projections an Extract job would (one ``.mrcs`` stack and ``subtomo_proj2d.star``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from subtomo.io.mrc import write_mrc
from subtomo.io.star import write_star

BOX = 32
PIXEL_SIZE_A = 5.0
PATTERNS = {  # (x, y, width, amplitude) of each blob, px
    0: [(6, 0, 3.0, 1.0), (-6, 0, 3.0, 1.0), (0, 7, 2.5, 0.8)],
    1: [(0, 0, 5.0, 1.0), (8, 3, 2.0, -0.8)],
    2: [(5, 5, 2.5, 1.0), (-5, -5, 2.5, 1.0), (5, -5, 2.5, 1.0), (-3, 6, 2.0, -0.6)],
}


def pattern(kind: int, psi_deg: float = 0.0, shift_px=(0.0, 0.0), box: int = BOX) -> np.ndarray:
    """image(r) = ref(A^T (r - shift)), A = Rz(psi) (RELION): the reference rotated by psi, moved by shift."""
    yy, xx = np.meshgrid(np.arange(box) - box // 2, np.arange(box) - box // 2, indexing="ij")
    a = math.radians(psi_deg)
    c, s = math.cos(a), math.sin(a)
    x, y = xx - shift_px[0], yy - shift_px[1]
    u, v = c * x - s * y, s * x + c * y
    return sum(amp * np.exp(-((u - bx) ** 2 + (v - by) ** 2) / (2 * w * w)) for bx, by, w, amp in PATTERNS[kind])


def dataset(n_per: int = 20, noise: float = 0.5, seed: int = 0, max_shift: float = 2.0) -> tuple[torch.Tensor, np.ndarray]:
    """``n_per`` noisy images of each pattern: ((n, BOX, BOX) float32, truth (n, 4): kind, psi deg, shift x, y px)."""
    rng = np.random.default_rng(seed)
    imgs, truth = [], []
    for kind in PATTERNS:
        for _ in range(n_per):
            psi, sh = rng.uniform(0, 360), rng.uniform(-max_shift, max_shift, 2)
            imgs.append(pattern(kind, psi, sh) + noise * rng.normal(size=(BOX, BOX)))
            truth.append((kind, psi, sh[0], sh[1]))
    return torch.tensor(np.array(imgs), dtype=torch.float32), np.array(truth)


def write_proj2d_project(root: Path, imgs: torch.Tensor) -> Path:
    """Write images as an Extract job's 2D projections (stack + ``subtomo_proj2d.star``); returns the STAR path."""
    stack = root / "Extract/job001/Particles/Tomograms/TS_01/TS_01_proj2d.mrcs"
    write_mrc(stack, imgs.numpy(), PIXEL_SIZE_A, stack=True)
    n = len(imgs)
    particles = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@{stack.relative_to(root)}" for i in range(n)],
        "rlnImageOriginalName": [f"Extract/job001/Particles/Tomograms/TS_01/TS_01{i + 1:06d}.mrc" for i in range(n)],
        "rlnTomoName": ["TS_01"] * n, "rlnTomoParticleId": np.arange(1, n + 1), "rlnOpticsGroup": [1] * n})
    optics = pd.DataFrame({"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1],
                           "rlnImagePixelSize": [PIXEL_SIZE_A], "rlnImageSize": [imgs.shape[-1]],
                           "rlnImageDimensionality": [2]})
    path = root / "subtomo_proj2d.star"
    write_star(path, {"optics": optics, "particles": particles})
    return path
