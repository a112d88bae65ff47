"""IMOD/etomo tilt-series folders: ``.xf`` alignments and ``tilt.com``.

Conventions of IMOD (Kremer, Mastronarde & McIntosh 1996; the man pages of ``xfproduct``,
``newstack`` and ``tilt``):

* ``.xf`` (and ``.prexf``): one line per image of the raw stack, ``A11 A12 A21 A22 DX
  DY``: the 2D transform that maps raw-image positions to aligned-image positions about
  the image centre, ``x' = A11 x + A12 y + DX``, ``y' = A21 x + A22 y + DY``, shifts in
  unbinned pixels of the raw stack. After ``newstack -xform`` the aligned stack ``.ali``
  has the tilt axis along y (our convention).
* ``.tlt`` / ``.rawtlt``: one tilt angle [deg] per image, in stack order (read by
  :func:`subtomo.io.text.read_tlt`).
* ``tilt.com``: ``KEY value`` lines for the program ``tilt``; ``THICKNESS`` [unbinned px; the
  output], ``IMAGEBINNED`` (binning of the input stack relative to the raw images),
  ``XAXISTILT`` [deg], ``OFFSET`` (tilt-angle offset [deg]), ``SHIFT x z`` (output shift
  [px]), ``TILTFILE``, ``InputProjections``, ``OutputFile``, ``FULLIMAGE nx ny``; the
  bare keyword ``PERPENDICULAR`` means the output sections are perpendicular to y (etomo
  then rotates the volume with ``trimvol -rx`` so that z is the thickness).
* How ``tilt`` places the specimen in its output (tilt man page and etomo): ``OFFSET`` is
  added to every tilt angle (a positive offset turns the reconstructed slices
  counter-clockwise); ``SHIFT sx sz`` moves the reconstructed slices by ``sx`` to the right
  and ``sz`` upwards before output, in unbinned pixels when ``IMAGEBINNED`` is given (so
  ``SHIFT / IMAGEBINNED`` output pixels); ``XAXISTILT α`` rotates the reconstruction about x
  so that a section tilted by α about x becomes flat, α being that section's tilt in the
  unrotated reconstruction (IMOD's example: 500 slices in y, the section 5 px below the
  middle at the first slice and 5 px above at the last: α = asin(10/500) = 1.1°). So a
  specimen point at ``s`` from the tilt axis (our tilt geometry, ``docs/conventions.md``)
  is at voxel ``c = size/2 + Rx(α) s + (sx, 0, sz) / IMAGEBINNED`` with
  ``Rx(α): y' = y cos α + z sin α, z' = −y sin α + z cos α`` (rotation first, then the shift
  of the output slices); :func:`imod_to_tilt_geometry` inverts this.
* Pixel sizes come from the MRC headers; ``.defocus`` files of ctfplotter are read by the
  CTF importers (:mod:`subtomo.ctf.importers`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from subtomo.errors import SubtomoError
from subtomo.io.importers._text import numeric_table


def read_xf(path: str | Path) -> np.ndarray:
    """Read an IMOD ``.xf`` file.

    Parameters
    ----------
    path : str or Path
        The ``.xf`` (or ``.prexf``).

    Returns
    -------
    numpy.ndarray
        (n, 6) float64 ``A11 A12 A21 A22 DX DY`` per image (shifts [px of the raw stack]).
    """
    t = numeric_table(Path(path), 6, "an IMOD transform (A11 A12 A21 A22 DX DY)",
                      "Give the .xf that etomo's alignment wrote (one line of six numbers per image).")
    return t[:, :6]


def xf_rotation_deg(xf: np.ndarray) -> np.ndarray:
    """In-plane rotation of each ``.xf`` transform [deg, counter-clockwise], shape (n,).

    Parameters
    ----------
    xf : numpy.ndarray
        (n, 6) transforms from :func:`read_xf`.

    Returns
    -------
    numpy.ndarray
        ``atan2(A21, A11)`` [deg], shape (n,).
    """
    return np.degrees(np.arctan2(xf[:, 2], xf[:, 0]))


@dataclass(frozen=True)
class TiltCom:
    """The options of an IMOD ``tilt.com`` that matter for reading its tomogram.

    Attributes
    ----------
    thickness : int or None
        ``THICKNESS`` [unbinned px when ``IMAGEBINNED`` is given, as ``SHIFT``].
    binned : int
        ``IMAGEBINNED`` (1 when absent).
    x_axis_tilt_deg : float
        ``XAXISTILT`` [deg].
    offset_deg : float
        ``OFFSET`` [deg], added to every tilt angle.
    shift : tuple of float
        ``SHIFT`` (x, z) [px].
    perpendicular : bool
        ``PERPENDICULAR`` given (output sections perpendicular to y, before ``trimvol -rx``).
    files : dict of str to str
        ``InputProjections``, ``OutputFile``, ``TILTFILE`` as given.
    full_image : tuple of int or None
        ``FULLIMAGE`` (nx, ny) [raw px].
    ignored : tuple of str
        What subtomo's single-axis geometry cannot follow: ``LOCALFILE`` (local alignments),
        ``ZFACTORFILE``, an ``XTILTFILE`` with non-zero per-view x-tilts.
    """

    thickness: int | None
    binned: int = 1
    x_axis_tilt_deg: float = 0.0
    offset_deg: float = 0.0
    shift: tuple[float, float] = (0.0, 0.0)
    perpendicular: bool = False
    files: dict[str, str] = field(default_factory=dict)
    full_image: tuple[int, int] | None = None
    ignored: tuple[str, ...] = ()


def read_tilt_com(path: str | Path) -> TiltCom:
    """Read IMOD's ``tilt.com``.

    Parameters
    ----------
    path : str or Path
        The command file.

    Returns
    -------
    TiltCom
    """
    path = Path(path)
    if not path.is_file():
        raise SubtomoError(f"{path}: file not found. Give the tilt.com of the etomo folder.")
    keys: dict[str, list[str]] = {}
    for line in path.read_text(errors="replace").splitlines():
        text = line.strip()
        if not text or text.startswith(("#", "$")):
            continue
        parts = text.split()
        keys[parts[0].upper()] = parts[1:]

    def number(key: str, default: float, index: int = 0) -> float:
        try:
            return float(keys[key][index]) if key in keys else default
        except (IndexError, ValueError):
            raise SubtomoError(f"{path}: {key} {' '.join(keys[key])!r} is not a number. Fix that line.") from None

    ignored = tuple(f"{k} {keys[k][0]}" for k in ("LOCALFILE", "ZFACTORFILE") if keys.get(k))
    if keys.get("XTILTFILE") and (xt := path.parent / keys["XTILTFILE"][0]).is_file() and \
            np.any(numeric_table(xt, 1, "an x-axis tilt per view", "Give the .xtilt etomo wrote.") != 0):
        ignored += (f"XTILTFILE {xt.name} (per-view x-axis tilts)",)
    full = keys.get("FULLIMAGE")
    return TiltCom(
        thickness=int(number("THICKNESS", 0)) or None, binned=int(number("IMAGEBINNED", 1)),
        x_axis_tilt_deg=number("XAXISTILT", 0.0), offset_deg=number("OFFSET", 0.0),
        shift=(number("SHIFT", 0.0, 0), number("SHIFT", 0.0, 1)), perpendicular="PERPENDICULAR" in keys,
        files={k: v[0] for k, v in keys.items() if k in ("INPUTPROJECTIONS", "OUTPUTFILE", "TILTFILE") and v},
        full_image=(int(full[0]), int(full[1])) if full and len(full) >= 2 else None, ignored=ignored)


def imod_to_tilt_geometry(coords_px: np.ndarray, size_xyz: tuple[int, int, int] | np.ndarray,
                          shift_xz_px: tuple[float, float] = (0.0, 0.0), x_axis_tilt_deg: float = 0.0) -> np.ndarray:
    """Voxel positions of an IMOD tomogram → positions in our tilt geometry (same tomogram size).

    Inverts ``c = size/2 + Rx(α) s + (sx, 0, sz)`` (module docstring): the returned
    ``size/2 + s`` is where the point would be in a tomogram reconstructed about its centre
    without ``SHIFT`` and ``XAXISTILT``, which is what the tilt images see (the
    position-dependent defocus, the coordinate checker).

    Parameters
    ----------
    coords_px : numpy.ndarray
        (n, 3) voxel positions (x, y, z) in the IMOD tomogram [px].
    size_xyz : tuple of int
        Tomogram size (x, y, z) [px].
    shift_xz_px : tuple of float
        ``SHIFT`` of tilt.com in output pixels (``SHIFT / IMAGEBINNED``).
    x_axis_tilt_deg : float
        ``XAXISTILT`` [deg].

    Returns
    -------
    numpy.ndarray
        (n, 3) positions [px].
    """
    centre = np.asarray(size_xyz, np.float64) / 2.0
    r = np.asarray(coords_px, np.float64).reshape(-1, 3) - centre
    r = r - np.array([shift_xz_px[0], 0.0, shift_xz_px[1]])
    a = np.deg2rad(x_axis_tilt_deg)
    y = r[:, 1] * np.cos(a) - r[:, 2] * np.sin(a)  # Rx(α)ᵀ
    z = r[:, 1] * np.sin(a) + r[:, 2] * np.cos(a)
    return centre + np.stack([r[:, 0], y, z], axis=1)


#: tomogram-table columns that carry a tilt.com's SHIFT (output px) and XAXISTILT [deg] to prepare.
GEOMETRY_COLUMNS = ("subtomoTomogramShiftX", "subtomoTomogramShiftZ", "subtomoTomogramXAxisTilt")


def geometry_columns(com: TiltCom) -> dict[str, float]:
    """The :data:`GEOMETRY_COLUMNS` of a tilt.com (shift in output pixels, x-axis tilt in degrees).

    Parameters
    ----------
    com : TiltCom
        The command file read by :func:`read_tilt_com`.

    Returns
    -------
    dict
        Column → value.
    """
    b = max(com.binned, 1)
    return dict(zip(GEOMETRY_COLUMNS, (com.shift[0] / b, com.shift[1] / b, com.x_axis_tilt_deg)))


def tomogram_geometry(row: Mapping[str, Any] | pd.Series) -> tuple[tuple[float, float], float] | None:
    """SHIFT (output px) and XAXISTILT [deg] recorded in a tomogram-table row; None when absent or zero.

    Parameters
    ----------
    row : dict or pandas.Series
        A row of ``all_tomograms.star`` / ``ctf_tomograms.star``.

    Returns
    -------
    tuple or None
        ``((sx, sz), alpha_deg)``.
    """
    values = [float(row.get(c, 0.0) or 0.0) for c in GEOMETRY_COLUMNS]
    if not any(values):
        return None
    return (values[0], values[1]), values[2]
