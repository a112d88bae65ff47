"""SerialEM ``.mdoc`` files (the autodoc beside a tilt-series stack).

Conventions of SerialEM (Mastronarde 2005; "SerialEM autodoc files" in its help):

* ``key = value`` lines; global keys first (``PixelSpacing`` [Å], ``Voltage`` [kV],
  ``ImageFile``), then one section ``[ZValue = k]`` per image of the stack, ``k`` = the
  image's index in the stack (0-based) in the order the images were written.
* Per image: ``TiltAngle`` [deg] (the stage tilt), ``ExposureDose`` [e⁻/Å²] (the image's
  own dose; 0 when the camera was not dose-calibrated), ``PriorRecordDose`` [e⁻/Å²] (the
  dose of the earlier Record images of this series, written by newer versions),
  ``DateTime`` (``dd-Mon-yy  HH:MM:SS``), ``SubFramePath`` (the movie), ``Defocus`` [µm,
  the stage/target estimate, not a CTF fit].
* The acquisition order is the order of ``DateTime`` (ties broken by ``ZValue``); the dose
  an image received before it was taken is ``PriorRecordDose`` when present, else the sum
  of ``ExposureDose`` of the images taken before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from subtomo.errors import SubtomoError

FIX = "Give the .mdoc SerialEM wrote beside the tilt-series stack."


@dataclass(frozen=True)
class Mdoc:
    """One tilt series' SerialEM metadata, in ZValue (stack) order.

    Attributes
    ----------
    tilts_deg : numpy.ndarray
        Stage tilt of each image [deg], shape (n,).
    exposure_dose : numpy.ndarray
        Dose of each image [e⁻/Å²], shape (n,).
    pre_exposure : numpy.ndarray
        Dose received before each image [e⁻/Å²], shape (n,).
    order : numpy.ndarray
        Acquisition rank of each image (0 = first taken), shape (n,).
    pixel_size_A : float or None
        ``PixelSpacing`` [Å].
    voltage_kV : float or None
        ``Voltage`` [kV].
    movies : list of str
        ``SubFramePath`` of each image ('' when absent).
    """

    tilts_deg: np.ndarray
    exposure_dose: np.ndarray
    pre_exposure: np.ndarray
    order: np.ndarray
    pixel_size_A: float | None
    voltage_kV: float | None
    movies: list[str]


def _sections(path: Path) -> tuple[dict[str, str], list[dict[str, str]]]:
    header: dict[str, str] = {}
    sections: list[dict[str, str]] = []
    current = header
    for line in path.read_text(errors="replace").splitlines():
        text = line.strip()
        if text.startswith("[ZValue"):
            current = {"ZValue": text.strip("[]").split("=", 1)[1].strip()}
            sections.append(current)
        elif "=" in text and not text.startswith("["):
            key, value = text.split("=", 1)
            current[key.strip()] = value.strip()
    return header, sections


def read_mdoc(path: str | Path) -> Mdoc:
    """Read a SerialEM tilt-series ``.mdoc``.

    Parameters
    ----------
    path : str or Path
        The ``.mdoc`` file.

    Returns
    -------
    Mdoc
        Tilts [deg], doses [e⁻/Å²] and acquisition order in stack (ZValue) order.
    """
    path = Path(path)
    if not path.is_file():
        raise SubtomoError(f"{path}: file not found. {FIX}")
    header, sections = _sections(path)
    if not sections:
        raise SubtomoError(f"{path}: no [ZValue = ...] sections, so no images. {FIX}")
    sections.sort(key=lambda s: int(s["ZValue"]))
    try:
        tilts = np.array([float(s["TiltAngle"]) for s in sections])
    except (KeyError, ValueError):
        raise SubtomoError(f"{path}: a [ZValue] section without a readable TiltAngle. {FIX}") from None
    dose = np.array([float(s.get("ExposureDose", 0) or 0) for s in sections])
    times = [_time(s.get("DateTime", "")) for s in sections]
    if all(t is not None for t in times):
        rank_of = sorted(range(len(sections)), key=lambda i: (times[i], i))
    else:
        rank_of = list(range(len(sections)))
    order = np.empty(len(sections), dtype=int)
    order[rank_of] = np.arange(len(sections))
    if all("PriorRecordDose" in s for s in sections):
        pre = np.array([float(s["PriorRecordDose"]) for s in sections])
    else:
        taken = dose[rank_of]
        pre = np.empty(len(sections))
        pre[rank_of] = np.cumsum(taken) - taken
    px = header.get("PixelSpacing") or sections[0].get("PixelSpacing")
    kv = header.get("Voltage")
    return Mdoc(tilts_deg=tilts, exposure_dose=dose, pre_exposure=pre, order=order,
                pixel_size_A=float(px) if px else None, voltage_kV=float(kv) if kv else None,
                movies=[s.get("SubFramePath", "").replace("\\", "/").split("/")[-1] for s in sections])


def _time(text: str) -> datetime | None:
    for fmt in ("%d-%b-%y  %H:%M:%S", "%d-%b-%y %H:%M:%S", "%d-%b-%Y  %H:%M:%S", "%d-%b-%Y %H:%M:%S"):
        try:
            return datetime.strptime(text.strip(), fmt)
        except ValueError:
            continue
    return None
