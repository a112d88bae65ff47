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
* ``tilt.com``: ``KEY value`` lines for the program ``tilt``; ``THICKNESS`` [px of the
  output], ``IMAGEBINNED`` (binning of the input stack relative to the raw images),
  ``XAXISTILT`` [deg], ``OFFSET`` (tilt-angle offset [deg]), ``SHIFT x z`` (output shift
  [px]), ``TILTFILE``, ``InputProjections``, ``OutputFile``, ``FULLIMAGE nx ny``; the
  bare keyword ``PERPENDICULAR`` means the output sections are perpendicular to y (etomo
  then rotates the volume with ``trimvol -rx`` so that z is the thickness).
* Pixel sizes come from the MRC headers; ``.defocus`` files of ctfplotter are read by the
  CTF importers (:mod:`subtomo.ctf.importers`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

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
        ``THICKNESS`` [px of the output].
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
    """

    thickness: int | None
    binned: int = 1
    x_axis_tilt_deg: float = 0.0
    offset_deg: float = 0.0
    shift: tuple[float, float] = (0.0, 0.0)
    perpendicular: bool = False
    files: dict[str, str] = field(default_factory=dict)
    full_image: tuple[int, int] | None = None


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

    full = keys.get("FULLIMAGE")
    return TiltCom(
        thickness=int(number("THICKNESS", 0)) or None, binned=int(number("IMAGEBINNED", 1)),
        x_axis_tilt_deg=number("XAXISTILT", 0.0), offset_deg=number("OFFSET", 0.0),
        shift=(number("SHIFT", 0.0, 0), number("SHIFT", 0.0, 1)), perpendicular="PERPENDICULAR" in keys,
        files={k: v[0] for k, v in keys.items() if k in ("INPUTPROJECTIONS", "OUTPUTFILE", "TILTFILE") and v},
        full_image=(int(full[0]), int(full[1])) if full and len(full) >= 2 else None)
