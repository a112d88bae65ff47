"""Shared helpers of the benchmark scripts: the ``--json`` option and peak memory.

Every ``bench_<stage>.py`` collects its headline figures in a flat dict whose keys carry the
stage and the unit (``"refine3d.gold_A"``, ``"class2d.synthetic.peak_rss_MB"``) and writes it
with :func:`write_figures` when ``--json PATH`` is given; ``bench/run_all.py`` merges them.
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
import resource
from pathlib import Path


def add_json_option(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--json", default=None, metavar="PATH",
                    help="also write the headline figures as a flat JSON dict (keys carry the unit) to PATH")


def peak_rss_MB() -> float:
    """Peak resident memory of this process so far [MB] (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_figures(path: str | None, figures: dict) -> None:
    """Write ``figures`` (name -> number) to ``path`` as JSON; nothing when ``path`` is None.

    Floats are rounded to 4 significant digits (the figures are measurements, not state) and
    non-finite values are written as null.
    """
    if not path:
        return
    out = {}
    for key, val in figures.items():
        if isinstance(val, numbers.Integral):  # also bool and numpy integers
            val = int(val)
        elif isinstance(val, numbers.Real):
            val = float(f"{float(val):.4g}") if math.isfinite(val) else None
        out[key] = val
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
