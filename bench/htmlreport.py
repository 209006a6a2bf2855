"""The report as one self-contained HTML file: inline CSS, plots embedded as base64 data URIs,
no scripts and no external resources, so it opens offline and can be mailed or archived as is.
Content comes from ``bench.report.build`` (tables, recommendation, plots, provenance)."""

from __future__ import annotations

import base64
from datetime import datetime, timezone
from html import escape

from .results import formatted

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2em auto; max-width: 1300px;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { font-size: 1.3em; border-bottom: 1px solid #ccc; padding-bottom: .2em; }
h3 { font-size: 1.1em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .88em; }
th, td { border: 1px solid #d0d0d0; padding: .25em .55em; }
th { background: #f2f2f2; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.pick td { background: #eaf6ea; font-weight: 600; }
.header { color: #555; font-style: italic; }
.pick-box { background: #eaf6ea; border-left: 4px solid #2ca02c; padding: .6em 1em; margin: 1em 0; }
code, pre { background: #f6f6f6; padding: .1em .3em; border-radius: 3px; font-size: .9em; }
pre { padding: .6em; overflow-x: auto; white-space: pre-wrap; }
img { max-width: 100%; border: 1px solid #e0e0e0; margin: .5em 0; }
ul.notes { color: #444; font-size: .9em; }
table.prov td:first-child { white-space: nowrap; font-weight: 600; }
"""


def _data_uri(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _numeric(value: str) -> bool:
    shown = str(value).rstrip("x").replace("–", "", 1)
    try:
        float(shown)
        return True
    except ValueError:
        return False


def _table(table, pick: str) -> str:
    shown = formatted(table)
    head = "".join(f"<th>{escape(str(c))}</th>" for c in shown.columns)
    body = []
    for _, row in shown.iterrows():
        cls = ' class="pick"' if pick and row.iloc[0] == pick else ""
        cells = "".join(f'<td class="num">{escape(str(v))}</td>' if _numeric(v) else f"<td>{escape(str(v))}</td>"
                        for v in row)
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _group(r, level: int) -> list[str]:
    h = f"h{level}"
    out = []
    for p in r.picks:
        cmd = f"<p>Reproduce with:</p><pre>{escape(p.command)}</pre>" if p.command else ""
        out.append(f'<div class="pick-box"><p><strong>Recommended on {escape(p.device)}: '
                   f"{escape(p.name or 'n/a')}</strong>. {escape(p.text)}</p>{cmd}</div>")
    picks = {p.device: p.name for p in r.picks}
    for device, table in r.tables.items():
        out.append(f"<{h}>Results on {escape(device)}</{h}>")
        out.append(f'<p class="header">{escape(table.attrs.get("header", device))}</p>')
        out.append(_table(table, picks.get(device, "")))
        notes = table.attrs.get("notes", [])
        if notes:
            out.append('<ul class="notes">' + "".join(f"<li>{escape(n)}</li>" for n in notes) + "</ul>")
    if r.plots:
        out.append(f"<{h}>Plots</{h}>")
        for plot in r.plots:
            out.append(f'<figure><img src="{_data_uri(plot)}" alt="{escape(plot.stem)}"></figure>')
    if r.provenance:
        out.append(f"<{h}>Provenance</{h}>")
        rows = "".join(f"<tr><td>{escape(k)}</td><td>{escape(str(v))}</td></tr>" for k, v in r.provenance)
        out.append(f'<table class="prov"><tbody>{rows}</tbody></table>')
    return out


def render(reports: list, title: str = "Benchmark results", merged: list[str] | None = None) -> str:
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{escape(title)}</title><style>{CSS}</style></head><body>", f"<h1>{escape(title)}</h1>",
             f"<p class=\"header\">Written {escape(now)} by bench report. Units: accuracy %, times s, throughput "
             "img/s, memory MB. Medians over the repeats that finished (the <em>ok</em> column), spread min–max; "
             "n/a where a value does not exist.</p>"]
    if merged and len(merged) > 1:
        parts.append("<p>Merged files:</p><ul>" + "".join(f"<li>{escape(m)}</li>" for m in merged) + "</ul>")
    for r in reports:
        if len(reports) > 1:
            parts.append(f"<h2>{escape(r.label)}</h2>")
            parts += _group(r, 3)
        else:
            parts += _group(r, 2)
    parts.append("</body></html>")
    return "\n".join(parts)
