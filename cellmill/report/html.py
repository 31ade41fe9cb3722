"""A self-contained HTML page: figures embedded as base64 PNG, tables inline, no external links."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

import numpy as np
import pandas as pd

from cellmill.io import faults

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0;
       color: #222; background: #fafafa; }
main { max-width: 1200px; margin: 0 auto; padding: 1.5em 2em 4em; background: white; }
h1 { margin-top: 0.2em; } h2 { border-bottom: 2px solid #ddd; padding-bottom: 0.2em;
     margin-top: 2em; } h3 { margin-top: 1.5em; }
nav { font-size: 0.9em; background: #f2f4f4; padding: 0.6em 1em; border-radius: 4px; }
nav a { margin-right: 1em; white-space: nowrap; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.88em; color: #444; margin-top: 0.3em; }
table { border-collapse: collapse; font-size: 0.82em; margin: 0.6em 0; }
th, td { border: 1px solid #ddd; padding: 2px 7px; text-align: right; white-space: nowrap; }
th { background: #f2f4f4; } td.text, th.text { text-align: left; white-space: normal; }
tr:nth-child(even) td { background: #fbfcfc; } tr.sig td { background: #fdebd0; }
.note { color: #8a6d3b; background: #fcf8e3; border-left: 4px solid #f0ad4e;
        padding: 0.3em 0.8em; font-size: 0.9em; }
.scroll { max-height: 32em; overflow: auto; display: inline-block; max-width: 100%; }
pre { background: #f4f6f6; padding: 0.8em; font-size: 0.8em; overflow-x: auto; }
.small { font-size: 0.85em; color: #555; }
"""

P_COLUMNS = {"p_val", "p_val_adj", "p_value", "p_adj_bh", "pval", "padj"}


def esc(text) -> str:
    return html.escape(str(text), quote=True)


def fmt(value, column: str = "") -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "NA"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}" if column not in ("cluster",) else str(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if column in P_COLUMNS or column.split(" ")[0] in P_COLUMNS:
            return f"{v:.3g}" if v >= 1e-3 or v == 0 else f"{v:.2e}"
        if v == int(v) and abs(v) < 1e15:
            return f"{int(v)}"
        return f"{v:.4g}"
    return str(value)


def table(df: pd.DataFrame, caption: str = "", highlight: pd.Series | None = None,
          max_rows: int = 500, scroll: bool = True) -> str:
    """A DataFrame as an HTML table; numbers right-aligned and formatted, text left."""
    shown = df.head(max_rows)
    text_cols = {c for c in df.columns if df[c].dtype == object}
    head = "".join(f'<th class="text">{esc(c)}</th>' if c in text_cols else f"<th>{esc(c)}</th>"
                   for c in df.columns)
    rows = []
    for i, (_, r) in enumerate(shown.iterrows()):
        cls = ' class="sig"' if highlight is not None and bool(highlight.iloc[i]) else ""
        cells = "".join(
            f'<td class="text">{esc(fmt(r[c], c))}</td>' if c in text_cols
            else f"<td>{esc(fmt(r[c], c))}</td>" for c in df.columns)
        rows.append(f"<tr{cls}>{cells}</tr>")
    more = (f'<p class="small">{len(df) - max_rows:,} more rows in the CSV.</p>'
            if len(df) > max_rows else "")
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    body = f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    if scroll and len(shown) > 25:
        body = f'<div class="scroll">{body}</div>'
    return body + more


def image(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


class Page:
    """Sections added in order; `render()` gives the whole document."""

    def __init__(self, title: str):
        self.title = title
        self.parts: list[str] = []
        self.toc: list[tuple[str, str]] = []

    def section(self, title: str) -> None:
        anchor = slug(title)
        self.toc.append((anchor, title))
        self.parts.append(f'<h2 id="{anchor}">{esc(title)}</h2>')

    def heading(self, title: str) -> None:
        self.parts.append(f"<h3>{esc(title)}</h3>")

    def html(self, fragment: str) -> None:
        self.parts.append(fragment)

    def text(self, text: str) -> None:
        self.parts.append(f"<p>{esc(text)}</p>")

    def note(self, text: str) -> None:
        self.parts.append(note(text))

    def figure(self, fig) -> None:
        """A FigureResult: the embedded image with its caption, or the note why it is absent."""
        self.heading(fig.title)
        if fig.path is None or not Path(fig.path).is_file():
            self.note(fig.note or "not available")
            return
        cap = f"<figcaption>{esc(fig.caption)} <span class=\"small\">({esc(Path(fig.path).name)})" \
              "</span></figcaption>"
        self.parts.append(f"<figure>{image(fig.path, fig.title)}{cap}</figure>")

    def table(self, title: str, df: pd.DataFrame | None, caption: str = "",
              missing: str = "", **kw) -> None:
        self.heading(title)
        if df is None:
            self.note(missing or "not available")
            return
        if caption:
            self.parts.append(f'<p class="small">{esc(caption)}</p>')
        if df.empty:
            self.note("no rows")
            return
        self.parts.append(table(df, **kw))

    def render(self, subtitle: str = "") -> str:
        nav = "".join(f'<a href="#{a}">{esc(t)}</a>' for a, t in self.toc)
        sub = f'<p class="small">{subtitle}</p>' if subtitle else ""
        return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
                f"<title>{esc(self.title)}</title><style>{CSS}</style></head><body><main>"
                f"<h1>{esc(self.title)}</h1>{sub}<nav>{nav}</nav>{''.join(self.parts)}"
                "</main></body></html>\n")


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    faults.wrote()
