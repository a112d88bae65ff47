"""The specimen: particle, fiducial and junk placement in an ice slab, and their maps.

Positions are in Å relative to the tomogram centre (x, y, z), orientations are RELION
matrices A (particle(r) = reference(Aᵀ r)). Objects never overlap (bounding spheres).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from subtomo.errors import SubtomoError
from subtomo.fourier import ifft_centered, rfft_frequencies
from subtomo.geometry.euler import euler_to_matrix, matrix_to_euler, random_rotations


@dataclass
class Objects:
    """Everything in one tomogram: kind per object, template index, centre (Å), pose."""

    kind: np.ndarray  # "particle" | "fiducial" | "junk"
    template: np.ndarray  # index into the project's template list
    class_number: np.ndarray  # 1.. for particles, 0 otherwise
    centre_A: np.ndarray  # (n, 3) x, y, z relative to the tomogram centre
    angles_deg: np.ndarray  # (n, 3) rot, tilt, psi
    matrices: np.ndarray  # (n, 3, 3) A

    def __len__(self) -> int:
        return len(self.kind)


def random_poses(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Uniform random orientations as RELION angles and the matching matrices A."""
    angles = matrix_to_euler(random_rotations(n, rng)) if n else np.zeros((0, 3))
    return angles, euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2]) if n else np.zeros((0, 3, 3))


def place_spheres(radii_A: np.ndarray, extent_xy_A: tuple[float, float], thickness_A: float, z_mode: np.ndarray,
                  rng: np.random.Generator, gap_A: float = 5.0, max_tries: int = 4000) -> np.ndarray:
    """Random non-overlapping centres (n, 3) in Å for spheres of ``radii_A`` in an ice slab.

    ``z_mode`` per object: 0 = anywhere in the slab, 1 = near the top surface, -1 = near the
    bottom surface (second layer / fiducials on the interfaces). x, y keep the whole sphere
    inside the tomogram. Raises SubtomoError when the slab is too crowded.
    """
    n = len(radii_A)
    centres = np.zeros((n, 3))
    half_x, half_y, half_t = extent_xy_A[0] / 2, extent_xy_A[1] / 2, thickness_A / 2
    for i in range(n):
        r = float(radii_A[i])
        lim_z = max(half_t - r, 0.0)
        for _ in range(max_tries // 100):
            cand = np.empty((100, 3))
            cand[:, 0] = rng.uniform(-half_x + r, half_x - r, 100)
            cand[:, 1] = rng.uniform(-half_y + r, half_y - r, 100)
            if z_mode[i] == 0:
                cand[:, 2] = rng.uniform(-lim_z, lim_z, 100)
            else:
                cand[:, 2] = z_mode[i] * (lim_z - np.abs(rng.normal(0, 0.15 * r, 100)))
            if i:
                d = np.linalg.norm(cand[:, None, :] - centres[None, :i], axis=-1)
                ok = np.all(d > radii_A[None, :i] + r + gap_A, axis=1)
            else:
                ok = np.ones(100, dtype=bool)
            if ok.any():
                centres[i] = cand[int(np.argmax(ok))]
                break
        else:
            raise SubtomoError(
                f"could not place object {i + 1} of {n} (radius {r:.0f} A) without overlap in a "
                f"{extent_xy_A[0]:.0f} x {extent_xy_A[1]:.0f} x {thickness_A:.0f} A ice slab. "
                f"Fix: fewer --n-particles/--n-junk/--n-fiducials, a larger --tomo-size or a thicker --ice-thickness.")
    return centres


def gold_bead_map(diameter_A: float, contrast_V: float, box: int, pixel_size_A: float) -> torch.Tensor:
    """A uniform ball (potential ``contrast_V`` above the ice), band-limited at Nyquist (analytic FT)."""
    k = rfft_frequencies((box, box, box), dtype=torch.float64).norm(dim=-1) / pixel_size_A  # 1/Å
    radius = diameter_A / 2
    x = 2 * math.pi * k * radius
    xs = x.clamp(min=1e-6)
    shape = torch.where(x > 1e-4, 3 * (torch.sin(xs) - xs * torch.cos(xs)) / xs ** 3, torch.ones_like(x))
    volume_vox = 4 / 3 * math.pi * radius ** 3 / pixel_size_A ** 3
    f = contrast_V * volume_vox * shape * (k * pixel_size_A <= 0.5)
    return ifft_centered(f.to(torch.complex128), (box, box, box)).float()


def junk_map(rng: np.random.Generator, radius_A: float, contrast_V: float, box: int, pixel_size_A: float) -> torch.Tensor:
    """An irregular protein-like blob: a union of random Gaussian lumps inside ``radius_A``."""
    n_lumps = int(rng.integers(6, 16))
    ax = (torch.arange(box, dtype=torch.float64) - box // 2) * pixel_size_A
    z, y, x = torch.meshgrid(ax, ax, ax, indexing="ij")
    raw = torch.zeros_like(x)
    for _ in range(n_lumps):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        c = direction * rng.uniform(0, 0.5) * radius_A
        s = rng.uniform(0.12, 0.25) * radius_A  # lumps stay within ~radius_A
        raw += torch.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * s * s))
    return (contrast_V * (1 - torch.exp(-2 * raw))).float()
