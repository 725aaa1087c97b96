"""The page around the report's sections: inline CSS and small HTML helpers.

Kept as Python (not a .css/.html file) so it ships inside the package without package-data
configuration. Everything here returns escaped HTML strings; callers pass raw text.
"""
from __future__ import annotations

import base64
import html
import math
import numbers
import shlex

CSS = """
:root { --fg:#1f2328; --muted:#59636e; --line:#d1d9e0; --bg:#ffffff; --soft:#f6f8fa;
        --accent:#0969da; --bad:#cf222e; --warn:#9a6700; --good:#1a7f37; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",
       Arial,sans-serif; color:var(--fg); background:var(--bg); }
header.top { background:#24292f; color:#fff; padding:14px 24px; }
header.top h1 { margin:0; font-size:20px; font-weight:600; }
header.top .sub { color:#c9d1d9; font-size:13px; }
nav { position:sticky; top:0; z-index:5; background:var(--soft); padding:6px 24px;
      border-bottom:1px solid var(--line); font-size:13px; }
nav a { color:var(--accent); text-decoration:none; margin-right:14px; white-space:nowrap; }
nav a:hover { text-decoration:underline; }
main { max-width:1280px; margin:0 auto; padding:8px 24px 48px; }
section { border-bottom:1px solid var(--line); padding:8px 0 20px; scroll-margin-top:40px; }
h2 { font-size:18px; margin:18px 0 8px; }
h3 { font-size:15px; margin:14px 0 6px; }
p.caption, .muted { color:var(--muted); font-size:13px; }
code { background:var(--soft); padding:1px 4px; border-radius:4px; font-size:12.5px; }
.note { background:#fff8c5; border:1px solid #d4a72c66; border-radius:6px; padding:8px 12px;
        margin:8px 0; font-size:13px; }
.note.off { background:var(--soft); border-color:var(--line); color:var(--muted); }
.trunc { color:var(--warn); font-size:13px; font-weight:600; margin:4px 0; }
table { border-collapse:collapse; font-size:13px; margin:6px 0; }
th, td { border:1px solid var(--line); padding:3px 8px; text-align:left; vertical-align:middle; }
th { background:var(--soft); font-weight:600; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; }
tbody tr:nth-child(even) { background:#fbfcfd; }
table.kv th { width:190px; }
table.kv td { word-break:break-word; }
.scroll { overflow-x:auto; max-width:100%; }
img.plot { max-width:100%; height:auto; border:1px solid var(--line); border-radius:4px;
           background:#fff; }
img.px { image-rendering:pixelated; image-rendering:crisp-edges; }
td img, td .missing { display:block; }
.plots { display:flex; flex-wrap:wrap; gap:16px; align-items:flex-start; }
.grid { display:grid; grid-template-columns:repeat(auto-fill,minmax(330px,1fr)); gap:12px; }
.card { border:1px solid var(--line); border-radius:8px; padding:8px; margin:0; background:#fff; }
.card.issue { border-color:var(--bad); box-shadow:0 0 0 1px var(--bad) inset; }
.imgs { display:flex; gap:6px; align-items:flex-end; flex-wrap:wrap; }
.imgs figure, .nbrs figure, .thumbs figure { margin:0; text-align:center; }
.imgs figcaption, .nbrs figcaption, .thumbs figcaption { font-size:11px; color:var(--muted);
        max-width:104px; overflow:hidden; text-overflow:ellipsis; white-space:nowrap; }
.card .meta { font-size:12.5px; margin-top:6px; }
.card .id { font-size:11px; color:var(--muted); word-break:break-all; }
.lbl { font-weight:600; }
.wrong { color:var(--bad); }
.right { color:var(--good); }
.badge { display:inline-block; font-size:11px; font-weight:600; border-radius:10px;
         padding:0 7px; margin-left:4px; vertical-align:1px; }
.badge.issue { background:var(--bad); color:#fff; }
.badge.warn { background:#fff1c2; color:var(--warn); border:1px solid #d4a72c88; }
.nbrs { display:flex; gap:10px; flex-wrap:wrap; margin-top:6px; padding-top:6px;
        border-top:1px dashed var(--line); }
.nbrs .head { width:100%; font-size:11.5px; color:var(--muted); }
.nbrs figcaption.diff { color:var(--bad); }
.thumbs { display:flex; gap:6px; flex-wrap:wrap; margin:4px 0 10px; }
.pair { margin-bottom:14px; }
.dirs { display:flex; flex-wrap:wrap; gap:8px 36px; }
.nbrs figure { width:64px; }
.nbrs figcaption { max-width:64px; }
.missing { display:inline-flex; align-items:center; justify-content:center; background:var(--soft);
           border:1px dashed var(--line); color:var(--muted); font-size:10px; }
ul.msgs { margin:4px 0; padding-left:20px; font-size:13px; }
details summary { cursor:pointer; color:var(--accent); font-size:13px; }
pre { background:var(--soft); padding:8px; border-radius:6px; overflow-x:auto; font-size:12px; }
"""


def esc(s) -> str:
    return html.escape(str(s), quote=True)


def fmt(x, digits: int = 3) -> str:
    """A number for a table cell; None/NaN -> an em dash."""
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    try:
        f = float(x)
    except (TypeError, ValueError):
        return esc(x)
    if math.isnan(f):
        return "—"
    if isinstance(x, numbers.Integral):
        return f"{int(x):,}"
    return f"{f:.{digits}f}"


def pct(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{100 * float(x):.1f}%"


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def img(png: bytes | None, alt: str, *, cls: str = "", width: int | None = None,
        height: int | None = None) -> str:
    """An <img> with the PNG embedded; a grey placeholder box when the image is missing."""
    if png is None:
        w, h = width or 64, height or width or 64
        return (f'<span class="missing" style="width:{w}px;height:{h}px" '
                f'title="{esc(alt)}">n/a</span>')
    size = (f' width="{width}"' if width else "") + (f' height="{height}"' if height else "")
    return f'<img class="{esc(cls)}" src="{data_uri(png)}" alt="{esc(alt)}"{size}>'


def table(header: list[str], rows: list[list[str]], *, num_cols=(), cls: str = "") -> str:
    """Cells are HTML already (escape raw text with esc/fmt); header cells are raw text."""
    num_cols = set(num_cols)
    th = "".join(f'<th{" class=num" if i in num_cols else ""}>{esc(h)}</th>'
                 for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td{" class=num" if i in num_cols else ""}>{c}</td>'
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return (f'<div class="scroll"><table class="{esc(cls)}"><thead><tr>{th}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


def kv_table(pairs: list[tuple[str, str]]) -> str:
    """Rows of (raw label, HTML value)."""
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in pairs)
    return f'<table class="kv"><tbody>{rows}</tbody></table>'


def truncation_note(shown: int, total: int, what: str = "rows") -> str:
    if shown >= total:
        return ""
    return f'<p class="trunc">showing {shown:,} of {total:,} {esc(what)}</p>'


def not_computed(stage: str, run_dir: str) -> str:
    return (f'<p class="note off">{esc(stage)}: not computed — run '
            f"<code>hardprobe {esc(stage)} {esc(shlex.quote(run_dir))}</code></p>")


def messages(items: list[str]) -> str:
    if not items:
        return ""
    return "<ul class=msgs>" + "".join(f"<li>{esc(m)}</li>" for m in items) + "</ul>"


def page(title: str, subtitle: str, nav: list[tuple[str, str]], body: str,
         pages: tuple[tuple[str, str], ...] = ()) -> str:
    """pages: (file next to the page, title) links to sibling pages, e.g. explorer.html."""
    links = "".join(f'<a href="#{esc(i)}">{esc(t)}</a>' for i, t in nav)
    links += "".join(f'<a href="{esc(f)}">{esc(t)} ↗</a>' for f, t in pages)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title>
<link rel="icon" href="data:,">
<style>{CSS}</style></head>
<body><header class="top"><h1>{esc(title)}</h1><div class="sub">{esc(subtitle)}</div></header>
<nav>{links}</nav>
<main>
{body}
</main></body></html>
"""
