"""A self-contained HTML page of tables and pictures (PNG files embedded as base64).

One file, no external assets and no JavaScript: it opens in any browser, can be mailed or
attached to a lab notebook, and keeps working after the project's PNG files are moved.
"""

from __future__ import annotations

import base64
import html
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; line-height: 1.4; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.6em; }
.lead { color: #555; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { display: inline-block; margin: 0.5em 1em 1em 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.85em; color: #555; max-width: 640px; }
.missing { color: #a00; font-style: italic; }
"""


@dataclass
class Figure:
    """A PNG file to embed, with a caption; a missing file is shown as a note, not an error."""

    path: Path | None
    caption: str
    width_px: int | None = None


@dataclass
class Table:
    header: Sequence[str]
    rows: Sequence[Sequence[object]]


@dataclass
class Section:
    title: str
    text: str = ""
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)


def _cell(value: object, tag: str = "td") -> str:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    text = f"{value:.3g}" if isinstance(value, float) else str(value)
    css = ' class="num"' if numeric and tag == "td" else ""
    return f"<{tag}{css}>{html.escape(text)}</{tag}>"


def _table(t: Table) -> str:
    head = "".join(_cell(h, "th") for h in t.header)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in t.rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(f: Figure) -> str:
    if f.path is None or not Path(f.path).is_file():
        return f'<p class="missing">{html.escape(f.caption)}: picture not produced.</p>'
    data = base64.b64encode(Path(f.path).read_bytes()).decode("ascii")
    width = f' width="{f.width_px}"' if f.width_px else ""
    return (f'<figure><img alt="{html.escape(f.caption)}"{width} src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(f.caption)}</figcaption></figure>")


def write_html_report(path: str | Path, title: str, lead: str, sections: Sequence[Section]) -> Path:
    """Write the page atomically (temporary name, then rename) and return its path."""
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>",
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1><p class=\"lead\">{html.escape(lead)}</p>"]
    for s in sections:
        parts.append(f"<h2>{html.escape(s.title)}</h2>")
        if s.text:
            parts.append(f"<p>{html.escape(s.text)}</p>")
        parts.extend(_table(t) for t in s.tables)
        parts.extend(_figure(f) for f in s.figures)
    parts.append("</body></html>")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    os.replace(tmp, path)
    return path
