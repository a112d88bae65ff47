"""Position-dependent defocus of a particle in each tilt image (docs/conventions.md).

A tilt image's defocus ``D_θ`` is the defocus at the tomogram centre. A particle at
tomogram coordinate ``c`` (pixels) sits at ``r_t = (c − size/2)·p`` (Å) from the centre
(``size/2`` as a float), and in the image at tilt θ (rotation about y) at

    x_img = x_t cos θ + z_t sin θ,     h = −x_t sin θ + z_t cos θ,

``h`` being its coordinate along the beam (the beam travels towards +h). Models:

* ``exact`` (default): ``D_θ − h`` — points up-beam (h < 0) are more underfocused; at
  positive tilt the right side of the image (x_t > 0) is more underfocused.
* ``relion``: ``D_θ + x_img sin θ``, the first-order formula of
  ``relion_prepare_subtomograms.py`` (no height term, x-gradient too small by cos θ);
  kept for file-compatibility with Bharat's pipeline.

Defocus is in Å, positive = underfocus. Both U and V of an astigmatic fit are shifted by
the same offset (the astigmatism angle is kept).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from subtomo.errors import SubtomoError

DefocusModel = Literal["exact", "relion"]
DEFOCUS_MODELS: tuple[str, ...] = ("exact", "relion")


def particle_offsets_A(coords_px: np.ndarray, tomo_size_xyz: tuple[int, int, int] | np.ndarray,
                       pixel_size_A: float) -> np.ndarray:
    """(P, 3) positions (x, y, z) in Å relative to the tomogram centre (``size/2`` as float)."""
    coords = np.atleast_2d(np.asarray(coords_px, dtype=np.float64))
    size = np.asarray(tomo_size_xyz, dtype=np.float64).reshape(1, 3)
    return (coords - size / 2.0) * float(pixel_size_A)


def beam_height_A(offsets_A: np.ndarray, tilt_deg: np.ndarray) -> np.ndarray:
    """Height ``h = −x_t sin θ + z_t cos θ`` (Å) along the beam: (P, 3) × (T,) or (P, T) -> (P, T)."""
    off = np.atleast_2d(np.asarray(offsets_A, dtype=np.float64))
    th = np.deg2rad(np.asarray(tilt_deg, dtype=np.float64))
    th = np.broadcast_to(th, (off.shape[0], th.shape[-1])) if th.ndim else np.full((off.shape[0], 1), th)
    return -off[:, :1] * np.sin(th) + off[:, 2:3] * np.cos(th)


def image_x_A(offsets_A: np.ndarray, tilt_deg: np.ndarray) -> np.ndarray:
    """Distance from the tilt axis in the image, ``x_img = x_t cos θ + z_t sin θ`` (Å), (P, T)."""
    off = np.atleast_2d(np.asarray(offsets_A, dtype=np.float64))
    th = np.deg2rad(np.asarray(tilt_deg, dtype=np.float64))
    th = np.broadcast_to(th, (off.shape[0], th.shape[-1])) if th.ndim else np.full((off.shape[0], 1), th)
    return off[:, :1] * np.cos(th) + off[:, 2:3] * np.sin(th)


def defocus_offset_A(offsets_A: np.ndarray, tilt_deg: np.ndarray, model: str = "exact") -> np.ndarray:
    """Per-particle, per-tilt defocus change (Å) to add to the image defocus: (P, T)."""
    if model == "exact":
        return -beam_height_A(offsets_A, tilt_deg)
    if model == "relion":
        th = np.deg2rad(np.asarray(tilt_deg, dtype=np.float64))
        return image_x_A(offsets_A, tilt_deg) * np.sin(th)
    raise SubtomoError(f"--defocus-model {model!r}: unknown model. Use one of: {', '.join(DEFOCUS_MODELS)}.")


def particle_defocus_A(image_defocus_A: np.ndarray, tilt_deg: np.ndarray, coords_px: np.ndarray,
                       tomo_size_xyz, pixel_size_A: float, model: str = "exact") -> np.ndarray:
    """Defocus (Å) of each particle in each tilt image: image defocus (T,) or (P, T) + offset -> (P, T)."""
    offsets = particle_offsets_A(coords_px, tomo_size_xyz, pixel_size_A)
    delta = defocus_offset_A(offsets, tilt_deg, model)
    return np.asarray(image_defocus_A, dtype=np.float64) + delta
