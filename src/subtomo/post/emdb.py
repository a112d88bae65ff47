"""EMDB FSC XML (the format ``relion_postprocess`` writes for deposition).

Root ``<fsc title=... xaxis="Resolution (A-1)" yaxis="Correlation Coefficient">`` with one
``<coordinate><x>s</x><y>FSC</y></coordinate>`` per shell, s in 1/Å.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np


def write_fsc_xml(path: str | Path, s_A: np.ndarray, fsc: np.ndarray,
                  title: str = "subtomo masked-corrected FSC") -> Path:
    """Write one coordinate per shell (atomic).

    Parameters
    ----------
    path
        Output file.
    s_A
        (n_shells,) spatial frequency of each shell [1/Å].
    fsc
        (n_shells,) FSC of each shell.
    title
        Title element of the XML.

    Returns
    -------
    Path
        The file written.
    """
    s_A, fsc = np.asarray(s_A, float), np.asarray(fsc, float)
    if s_A.shape != fsc.shape:
        raise ValueError("s_A and fsc must have the same length")
    root = ET.Element("fsc", {"title": title, "xaxis": "Resolution (A-1)", "yaxis": "Correlation Coefficient"})
    for x, y in zip(s_A, fsc):
        c = ET.SubElement(root, "coordinate")
        ET.SubElement(c, "x").text = f"{x:.6g}"
        ET.SubElement(c, "y").text = f"{y:.6g}"
    ET.indent(root)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    ET.ElementTree(root).write(tmp, encoding="utf-8", xml_declaration=False)
    os.replace(tmp, path)
    return path


def read_fsc_xml(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(s in 1/Å, FSC) from an EMDB FSC XML.

    Parameters
    ----------
    path
        An EMDB FSC XML file.

    Returns
    -------
    tuple of numpy.ndarray
        (n,) spatial frequency [1/Å] and (n,) FSC.
    """
    root = ET.parse(path).getroot()
    xs = [float(c.findtext("x", "nan")) for c in root.findall("coordinate")]
    ys = [float(c.findtext("y", "nan")) for c in root.findall("coordinate")]
    return np.array(xs), np.array(ys)
