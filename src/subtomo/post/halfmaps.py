"""The two unfiltered half maps of a gold-standard refinement, found and checked as a pair.

``postprocess`` and ``localres`` both start from "half map 1" (RELION's
``run_half1_class001_unfil.mrc``); its partner is found by swapping ``half1``/``half2`` in
the file name, and both must be cubic, of one even box and one pixel size. Only MRC
headers are read here, so a bad pair is refused before a job directory exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from subtomo.errors import SubtomoError
from subtomo.io.mrc import read_mrc_header


@dataclass(frozen=True)
class HalfMapPair:
    """Paths of both half maps, their common box (px) and pixel size (Å)."""

    half1: Path
    half2: Path
    box: int
    pixel_size_A: float

    @property
    def shape(self) -> tuple[int, int, int]:
        """(z, y, x) shape of each map [px]."""
        return (self.box, self.box, self.box)


def other_half(path: Path) -> tuple[Path, Path]:
    """(half1, half2) from either half's path: swaps the last 'half1'/'half2' in the file name.

    Parameters
    ----------
    path
        Either half map's path.

    Returns
    -------
    tuple of Path
        (half 1, half 2); the partner must exist.
    """
    name = path.name
    if "half1" in name:
        i = name.rfind("half1")
        other = path.with_name(name[:i] + "half2" + name[i + 5:])
        pair = (path, other)
    elif "half2" in name:
        i = name.rfind("half2")
        other = path.with_name(name[:i] + "half1" + name[i + 5:])
        pair = (other, path)
    else:
        raise SubtomoError(f"--i {path}: the file name contains neither 'half1' nor 'half2', so the other half map "
                           "cannot be found. Give the unfiltered half map 1 (e.g. run_half1_class001_unfil.mrc).")
    if not other.exists():
        raise SubtomoError(f"half map {other} not found (the partner of {path}). Both {pair[0].name} and "
                           f"{pair[1].name} must be in {path.parent}.")
    return pair


def half_map_pair(path: Path, angpix: float | None = None) -> HalfMapPair:
    """Find ``path``'s partner and check that the two maps make a usable pair.

    Parameters
    ----------
    path
        Either unfiltered half map (its name contains ``half1`` or ``half2``).
    angpix
        Pixel size [Å] overriding the MRC headers; None: from the headers, which must agree.

    Returns
    -------
    HalfMapPair
        Both paths, the box [px] and the pixel size [Å].
    """
    h1, h2 = other_half(path)
    (s1, px1), (s2, px2) = read_mrc_header(h1), read_mrc_header(h2)
    if s1 != s2:
        raise SubtomoError(f"half maps differ in size: {h1} is {s1}, {h2} is {s2}. Give the two halves of one refinement.")
    if len(set(s1)) != 1 or s1[0] % 2:
        raise SubtomoError(f"{h1}: map is {s1}; postprocessing needs a cubic map with an even box.")
    px = angpix or px1
    if not px or px <= 0:
        raise SubtomoError(f"{h1}: no pixel size in the header. Pass --angpix.")
    if angpix is None and abs(px1 - px2) > 1e-3:
        raise SubtomoError(f"half maps have different pixel sizes ({px1} and {px2} Å). Pass --angpix.")
    return HalfMapPair(h1, h2, int(s1[0]), float(px))
