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
from subtomo.geometry.tilt import project_to_tilt, specimen_coordinates_A

DefocusModel = Literal["exact", "relion"]
DEFOCUS_MODELS: tuple[str, ...] = ("exact", "relion")


def beam_height_A(offsets_A: np.ndarray, tilt_deg: np.ndarray) -> np.ndarray:
    """Height ``h = −x_t sin θ + z_t cos θ`` of each particle along the beam in each tilt.

    Parameters
    ----------
    offsets_A : numpy.ndarray
        (P, 3) particle positions (x, y, z) from the tomogram centre [Å].
    tilt_deg : numpy.ndarray
        (T,) tilt angles [deg].

    Returns
    -------
    numpy.ndarray
        (P, T) heights [Å] (the beam travels towards +h).
    """
    return project_to_tilt(offsets_A, tilt_deg)[2]


def defocus_offset_A(offsets_A: np.ndarray, tilt_deg: np.ndarray, model: str = "exact") -> np.ndarray:
    """Per-particle, per-tilt defocus change to add to the image defocus.

    Parameters
    ----------
    offsets_A, tilt_deg
        (P, 3) particle positions from the tomogram centre [Å] and (T,) tilts [deg], as for
        :func:`beam_height_A`.
    model : str
        ``exact`` (−h) or ``relion`` (x_img sin θ), see the module docstring.

    Returns
    -------
    numpy.ndarray
        (P, T) defocus offsets [Å].
    """
    if model == "exact":
        return -beam_height_A(offsets_A, tilt_deg)
    if model == "relion":
        th = np.deg2rad(np.asarray(tilt_deg, dtype=np.float64))
        return project_to_tilt(offsets_A, tilt_deg)[0] * np.sin(th)
    raise SubtomoError(f"--defocus-model {model!r}: unknown model. Use one of: {', '.join(DEFOCUS_MODELS)}.")


def particle_defocus_A(image_defocus_A: np.ndarray, tilt_deg: np.ndarray, coords_px: np.ndarray,
                       tomo_size_xyz, pixel_size_A: float, model: str = "exact") -> np.ndarray:
    """Defocus of each particle in each tilt image: image defocus + position offset.

    Parameters
    ----------
    image_defocus_A : numpy.ndarray
        (T,) or (P, T) defocus at the tomogram centre [Å].
    tilt_deg : numpy.ndarray
        (T,) tilt angles [deg].
    coords_px : numpy.ndarray
        (P, 3) particle coordinates (x, y, z) in the tomogram [px].
    tomo_size_xyz : sequence of int
        Tomogram size (x, y, z) [px].
    pixel_size_A : float
        Tomogram pixel size [Å].
    model : str
        ``exact`` or ``relion``.

    Returns
    -------
    numpy.ndarray
        (P, T) defocus [Å].
    """
    offsets = specimen_coordinates_A(coords_px, tomo_size_xyz, pixel_size_A)
    delta = defocus_offset_A(offsets, tilt_deg, model)
    return np.asarray(image_defocus_A, dtype=np.float64) + delta
