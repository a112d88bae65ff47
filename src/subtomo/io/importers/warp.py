"""Warp / WarpTools tilt-series metadata: the per-series XML and ``.tomostar``.

Conventions of Warp (Tegunov & Cramer 2019; Tegunov et al. 2021, WarpTools):

* ``<name>.xml`` (UTF-8 or UTF-16, possibly with a byte-order mark): root ``<TiltSeries>``
  with newline-separated lists, one entry per tilt in the order of ``<Angles>``:
  ``<Angles>`` (tilt [deg]), ``<Dose>`` (dose received *before* the tilt [e⁻/Å²]),
  ``<UseTilt>`` (``True``/``False``), ``<AxisAngle>`` [deg], ``<AxisOffsetX>``/
  ``<AxisOffsetY>`` [Å] and ``<MoviePath>``. ``<CTF>`` holds
  ``<Param Name=... Value=...>`` (``PixelSize`` [Å], ``Voltage`` [kV], ``Cs`` [mm],
  ``Amplitude``, ``Defocus`` and ``DefocusDelta`` [µm, positive = underfocus],
  ``DefocusAngle`` [deg]); ``<GridCTF Depth="n">`` has one ``<Node Z="i" Value=...>`` per
  tilt: that tilt's defocus [µm]; ``<GridCTFDefocusDelta>`` and ``<GridCTFDefocusAngle>``
  likewise. Defocus U/V = (defocus ± delta) × 10⁴ Å (as warp2relion converts them).
* ``<name>.tomostar``: a STAR loop with ``_wrpMovieName``, ``_wrpAngleTilt`` [deg],
  ``_wrpAxisAngle`` [deg], ``_wrpAxisOffsetX/Y`` [Å], ``_wrpDose`` [e⁻/Å², before the tilt].
"""

from __future__ import annotations

import gzip
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from subtomo.errors import SubtomoError
from subtomo.io.star import read_star, table_of

FIX = "Give the tilt-series XML that Warp/WarpTools wrote (beside the .tomostar)."


@dataclass(frozen=True)
class WarpTiltSeries:
    """One Warp tilt series, per tilt in ``<Angles>`` order.

    Attributes
    ----------
    tilts_deg, pre_exposure, axis_angle_deg : numpy.ndarray
        Tilt [deg], dose before the tilt [e⁻/Å²], tilt-axis angle [deg]; shape (n,).
    use : numpy.ndarray
        Whether Warp uses the tilt, shape (n,) bool.
    axis_offset_A : numpy.ndarray
        (x, y) offsets [Å], shape (n, 2).
    defocus_u_A, defocus_v_A, defocus_angle_deg : numpy.ndarray or None
        Per-tilt defocus [Å] and astigmatism angle [deg] from the grids; None without ``<GridCTF>``.
    movies : list of str
        ``<MoviePath>`` of each tilt.
    ctf : dict of str to str
        The ``<CTF>`` parameters as written.
    """

    tilts_deg: np.ndarray
    pre_exposure: np.ndarray
    axis_angle_deg: np.ndarray
    use: np.ndarray
    axis_offset_A: np.ndarray
    defocus_u_A: np.ndarray | None
    defocus_v_A: np.ndarray | None
    defocus_angle_deg: np.ndarray | None
    movies: list[str]
    ctf: dict[str, str]

    @property
    def pixel_size_A(self) -> float | None:
        """``PixelSize`` of ``<CTF>`` [Å] (the movies' pixel size), or None."""
        value = self.ctf.get("PixelSize")
        return float(value) if value else None


def _root(path: Path) -> ET.Element:
    if not path.is_file():
        raise SubtomoError(f"{path}: file not found. {FIX}")
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raw = raw.decode("utf-16").encode("utf-8")
        raw = raw.replace(b'encoding="utf-16"', b'encoding="utf-8"')
    try:
        return ET.fromstring(raw)
    except ET.ParseError as exc:
        raise SubtomoError(f"{path}: not readable XML ({exc}). {FIX}") from None


def _numbers(root: ET.Element, tag: str, path: Path) -> np.ndarray | None:
    node = root.find(tag)
    if node is None or not (node.text or "").strip():
        return None
    text = node.text or ""
    try:
        return np.array([float(v) for v in text.replace("|", " ").split()])
    except ValueError:
        raise SubtomoError(f"{path}: <{tag}> holds a value that is not a number. {FIX}") from None


def _grid(root: ET.Element, tag: str, n: int) -> np.ndarray | None:
    node = root.find(tag)
    if node is None:
        return None
    values = np.full(n, np.nan)
    for child in node.findall("Node"):
        z = int(child.get("Z", "0"))
        if 0 <= z < n:
            values[z] = float(child.get("Value", "nan"))
    return values if np.isfinite(values).all() else None


def read_warp_xml(path: str | Path) -> WarpTiltSeries:
    """Read a Warp/WarpTools tilt-series XML (plain or ``.gz``).

    Parameters
    ----------
    path : str or Path
        The XML file.

    Returns
    -------
    WarpTiltSeries
    """
    path = Path(path)
    root = _root(path)
    tilts = _numbers(root, "Angles", path)
    if root.tag != "TiltSeries" or tilts is None:
        raise SubtomoError(f"{path}: no <TiltSeries> with <Angles>. {FIX}")
    n = len(tilts)
    dose = _numbers(root, "Dose", path)
    axis = _numbers(root, "AxisAngle", path)
    use_node = root.find("UseTilt")
    use = np.array([v.strip() == "True" for v in (use_node.text or "").split()]) if use_node is not None else np.ones(n, bool)
    ox, oy = _numbers(root, "AxisOffsetX", path), _numbers(root, "AxisOffsetY", path)
    movie_node = root.find("MoviePath")
    movies = (movie_node.text or "").replace("|", "\n").split() if movie_node is not None else []
    ctf_node = root.find("CTF")
    ctf = {p.get("Name", ""): p.get("Value", "") for p in ctf_node.findall("Param")} if ctf_node is not None else {}
    for name, arr in (("Dose", dose), ("AxisAngle", axis), ("UseTilt", use)):
        if arr is not None and len(arr) != n:
            raise SubtomoError(f"{path}: <{name}> has {len(arr)} entries for {n} tilts in <Angles>. {FIX}")
    defocus = _grid(root, "GridCTF", n)
    delta = _grid(root, "GridCTFDefocusDelta", n)
    angle = _grid(root, "GridCTFDefocusAngle", n)
    if defocus is not None:
        delta = delta if delta is not None else np.full(n, float(ctf.get("DefocusDelta", 0) or 0))
        angle = angle if angle is not None else np.full(n, float(ctf.get("DefocusAngle", 0) or 0))
    return WarpTiltSeries(
        tilts_deg=tilts, pre_exposure=dose if dose is not None else np.zeros(n),
        axis_angle_deg=axis if axis is not None else np.zeros(n), use=use,
        axis_offset_A=np.stack([ox if ox is not None else np.zeros(n), oy if oy is not None else np.zeros(n)], 1),
        defocus_u_A=None if defocus is None else (defocus + delta) * 1e4,
        defocus_v_A=None if defocus is None else (defocus - delta) * 1e4,
        defocus_angle_deg=angle, movies=movies, ctf=ctf)


def read_tomostar(path: str | Path) -> dict[str, np.ndarray]:
    """Read a WarpTools ``.tomostar``.

    Parameters
    ----------
    path : str or Path
        The ``.tomostar`` file.

    Returns
    -------
    dict of str to numpy.ndarray
        ``movies`` (str), ``tilts_deg`` [deg], ``axis_angle_deg`` [deg], ``pre_exposure``
        [e⁻/Å²] (zeros when ``_wrpDose`` is absent), each shape (n,), in file order.
    """
    path = Path(path)
    blocks = read_star(path)
    loops = [table_of(b) for b in blocks.values() if not isinstance(b, dict)]
    if not loops or "wrpAngleTilt" not in loops[0].columns or "wrpMovieName" not in loops[0].columns:
        raise SubtomoError(f"{path}: no loop with _wrpMovieName and _wrpAngleTilt. Give the .tomostar WarpTools wrote.")
    t = loops[0]
    n = len(t)
    return {"movies": t["wrpMovieName"].astype(str).to_numpy(),
            "tilts_deg": t["wrpAngleTilt"].to_numpy(np.float64),
            "axis_angle_deg": t["wrpAxisAngle"].to_numpy(np.float64) if "wrpAxisAngle" in t.columns else np.zeros(n),
            "pre_exposure": t["wrpDose"].to_numpy(np.float64) if "wrpDose" in t.columns else np.zeros(n)}
