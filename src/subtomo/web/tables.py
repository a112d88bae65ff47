"""STAR files as data for sortable, filterable tables in the page."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from subtomo.io.star import read_star, table_of

MAX_ROWS = 20000  # more rows than a person scrolls through; the page says how many were left out


def _cell(value: Any) -> Any:
    """A JSON-safe cell: numbers stay numbers (so they sort as numbers), NaN becomes None."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value if isinstance(value, (int, float, str)) or value is None else str(value)


def star_tables(path: Path) -> list[dict[str, Any]]:
    """Every block of a STAR file as ``{"name", "columns", "rows", "total"}`` (rows capped at MAX_ROWS)."""
    tables = []
    for name, block in read_star(path).items():
        table = table_of(block)
        shown = table.head(MAX_ROWS)
        rows = [[_cell(v) for v in row] for row in shown.itertuples(index=False, name=None)]
        tables.append({"name": name, "columns": [str(c) for c in table.columns], "rows": rows, "total": len(table)})
    return tables
