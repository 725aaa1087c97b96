"""The report's example-level sections: hardest-example cards, confused pairs, the 2-D map,
the per-class table and the label-issue table. Each builder takes the render Context and
returns escaped HTML."""
from __future__ import annotations

import numpy as np

from . import plots
from .caveats import upper_bound
from .template import esc, fmt, img, not_computed, pct, table, truncation_note

THUMB, SMALL, TINY = 96, 64, 40  # px: example, neighbour, table-row thumbnails
N_NEIGHBORS, N_PAIRS, N_PAIR_EXAMPLES = 5, 8, 5


def _fig(inner: str, caption: str, title: str = "", cls: str = "", second: str = "") -> str:
    t = f' title="{esc(title)}"' if title else ""
    c = f' class="{esc(cls)}"' if cls else ""
    more = f"<figcaption>{esc(second)}</figcaption>" if second else ""
    return f"<figure{t}>{inner}<figcaption{c}>{esc(caption)}</figcaption>{more}</figure>"


def _flat(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _flat(v, f"{prefix}{k}.")
        elif not isinstance(v, list):
            out.append((f"{prefix}{k}", v))
    return out


def _val(v) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (float, np.floating)):
        return esc(f"{float(v):.3g}")
    return esc(v)


# ---------------------------------------------------------------- hardest
def explain_header(ctx) -> str:
    if ctx.explain is None:
        return not_computed("explain", str(ctx.run.path)).replace(
            "</p>", " · Grad-CAM overlays of the given and the predicted label appear here.</p>")
    meta = ctx.explain["meta"]
    head = " · ".join(f"{label} {_val(meta[k])}" if label else _val(meta[k])
                      for k, label in (("method", ""), ("layer", "at layer"),
                                       ("fast_path", "fast path"), ("n", "examples:"),
                                       ("images_per_s", "images/s:"), ("seconds", "seconds:"))
                      if k in meta)
    faith = meta.get("faithfulness")
    lines = [f"Grad-CAM (explain/): {head or 'no meta.json'}."]
    if isinstance(faith, dict):
        groups = {k: v for k, v in faith.items() if isinstance(v, dict)}
        top = [(k, v) for k, v in faith.items() if not isinstance(v, (dict, list))]
        if top:
            lines.append("Faithfulness: " + " · ".join(f"{esc(k)} {_val(v)}" for k, v in top))
        for g, d in groups.items():
            items = " · ".join(f"{esc(k)} {_val(v)}" for k, v in d.items()
                               if not isinstance(v, (dict, list)))
            lines.append(f"Faithfulness ({esc(g)}): {items}")
    lines.append("Overlays: red = regions that raise the class score most; “CAM given” explains "
                 "the given label, “CAM pred” the predicted one.")
    warn = "; ".join(map(str, meta.get("warnings") or []))
    if warn:
        lines.append(f"Warnings: {esc(warn)}")
    rows = [(k, _val(v)) for k, v in _flat(meta) if k != "warnings"]
    more = ("<details><summary>all explain metadata</summary>"
            + "".join(f"<div><code>{esc(k)}</code> {v}</div>" for k, v in rows) + "</details>")
    return f'<p class="caption">{"<br>".join(lines)}</p>{more}'


def similarity_header(ctx) -> str:
    if ctx.sim is None:
        return not_computed("similarity", str(ctx.run.path)).replace(
            "</p>", " · the nearest train neighbours of each example appear here.</p>")
    if ctx.sim["neighbors"] is None:
        return '<p class="note off">similarity/neighbors.parquet is missing: no neighbours</p>'
    return ('<p class="caption">Below each example: its nearest train neighbours by embedding '
            "similarity (label · similarity; a red label differs from the example's given "
            "label).</p>")


def _cam_stats(ctx) -> dict:
    e = ctx.explain
    if "stats_by" not in e:
        s = e["stats"]
        e["stats_by"] = ({} if s is None else
                         {(str(r["id"]), str(r["target"])): r for r in s.to_dict("records")})
    return e["stats_by"]


def _cams(ctx, ex_id: str) -> tuple[list[str], list[str]]:
    e = ctx.explain
    k = e["index"].get(ex_id)
    if k is None:
        return ['<span class="missing" style="width:96px;height:96px">no Grad-CAM</span>'], []
    figs, warns = [], []
    for target in ("given", "pred"):
        cls = ctx.name(e[f"{target}_class"][k])
        st = _cam_stats(ctx).get((ex_id, target), {})
        tip = ", ".join(f"{key} {_plain(st.get(key))}" for key in
                        ("peak_y", "peak_x", "top10_mass", "entropy") if key in st)
        w = st.get("warning")
        if isinstance(w, str) and w:
            warns.append(f"{target}: {w}")
        png = plots.cam_overlay(e["images"][k], e[target][k], size=THUMB)
        figs.append(_fig(img(png, f"Grad-CAM {target} ({cls})", cls="px"),
                         f"CAM {target}", title=tip, second=cls))
    return figs, warns


def _sig(v) -> str:
    """3 significant digits: label qualities near 0 stay distinguishable."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "—"
    return "—" if np.isnan(f) else f"{f:#.3g}"


def _plain(v) -> str:
    try:
        return f"{float(v):.3g}"
    except (TypeError, ValueError):
        return str(v)


def _neighbours(ctx, ex_id: str, label: int) -> str:
    sim = ctx.sim
    if sim is None or sim["neighbors"] is None:
        return ""
    if "by_query" not in sim:
        nb = sim["neighbors"]
        wanted = set(map(str, ctx.hardest["id"]))
        nb = nb[nb["query_id"].astype(str).isin(wanted)].sort_values(["query_id", "rank"])
        sim["by_query"] = {str(q): g.head(N_NEIGHBORS) for q, g in nb.groupby("query_id")}
    g = sim["by_query"].get(ex_id)
    if g is None or g.empty:
        return '<div class="nbrs"><span class="head">no neighbours stored</span></div>'
    figs = []
    for r in g.to_dict("records"):
        name = str(r.get("neighbor_label_name", ctx.name(r["neighbor_label"])))
        diff = int(r["neighbor_label"]) != label
        figs.append(_fig(ctx.thumb(str(r["neighbor_id"]), SMALL, alt=f"neighbour {name}"),
                         name, title=f"{r['neighbor_id']} ({name}, similarity "
                                     f"{float(r['similarity']):.3f})",
                         cls="diff" if diff else "", second=f"{float(r['similarity']):.2f}"))
    return ('<div class="nbrs"><span class="head">nearest train neighbours</span>'
            + "".join(figs) + "</div>")


def example_card(ctx, r, rank: int) -> str:
    ex_id, label = str(r["id"]), int(r["label"])
    pred = int(r[f"pred_{ctx.primary}"])
    issue = bool(r.get("label_issue", False))
    figs = [_fig(ctx.thumb(ex_id, THUMB, alt=f"example {r['label_name']}"), "image",
                 second=str(r["label_name"]))]
    cam_warns: list[str] = []
    if ctx.explain is not None:
        cams, cam_warns = _cams(ctx, ex_id)
        figs += cams
    badge = (' <span class="badge issue" title="cleanlab\'s flag: a candidate, not a verdict">'
             "label-issue candidate</span>" if issue else "")
    others = [f"{h} → {esc(ctx.name(r[f'pred_{h}']))}" for h in ctx.heads[1:]
              if f"pred_{h}" in r and int(r[f"pred_{h}"]) != pred]
    lines = [f'<span class="lbl">{esc(r["label_name"])}</span> → <span class="lbl '
             f'{"wrong" if pred != label else "right"}">{esc(ctx.name(pred))}</span>{badge}',
             f"hardness <b>{fmt(r['hardness'])}</b> · p(given) "
             f"{_sig(r.get(f'prob_true_{ctx.primary}'))}"
             + (f" · label quality {_sig(r['label_quality'])}" if "label_quality" in r else "")]
    if others:
        lines.append('<span class="muted">other heads: ' + ", ".join(others) + "</span>")
    if "failure_mode" in r and isinstance(r["failure_mode"], str):
        lines.append(f'cause <b>{esc(r["failure_mode"])}</b> · <span class="muted">'
                     f'{esc(r.get("evidence", ""))}</span>')
    for w in cam_warns:
        lines.append(f'<span class="badge warn">CAM</span> <span class="muted">{esc(w)}</span>')
    lines.append(f'<span class="id">#{rank} · {esc(ex_id)}</span>')
    return (f'<figure class="card{" issue" if issue else ""}"><div class="imgs">{"".join(figs)}'
            f'</div><div class="meta">{"<br>".join(lines)}</div>'
            f"{_neighbours(ctx, ex_id, label)}</figure>")


# ---------------------------------------------------------------- confused pairs
def pairs(ctx) -> str:
    cps = ctx.head_metrics(ctx.primary).get("confused_pairs") or []
    if not cps:
        return (f'<p class="note off">no confused pairs: the {esc(ctx.primary)} head makes no '
                f"error on the {esc(ctx.split)} split.</p>")
    index = {n: i for i, n in enumerate(ctx.names)}
    pred_col = f"pred_{ctx.primary}"
    rows = [[esc(c["class_a"]), esc(c["class_b"]), fmt(c["a_as_b"]), fmt(c["b_as_a"]),
             fmt(c["total"]), pct(c["share"])] for c in cps]
    out = (f'<p class="caption">The most confused class pairs of the {esc(ctx.primary)} head on '
           f"the {esc(ctx.split)} split (share = of all its errors), with the hardest examples "
           "of each direction.</p>"
           + table(["class a", "class b", "a as b", "b as a", "total", "share"], rows,
                   num_cols=range(2, 6)))
    out += truncation_note(min(N_PAIRS, len(cps)), len(cps), "pairs")
    for c in cps[:N_PAIRS]:
        a, b = index.get(str(c["class_a"])), index.get(str(c["class_b"]))
        out += (f'<div class="pair"><h3>{esc(c["class_a"])} ↔ {esc(c["class_b"])}: '
                f"{fmt(c['total'])} errors ({pct(c['share'])})</h3><div class=dirs>")
        for x, y, n in ((a, b, c["a_as_b"]), (b, a, c["b_as_a"])):
            if x is None or y is None:
                continue
            sel = ctx.eval[(ctx.eval["label"] == x) & (ctx.eval[pred_col] == y)]
            sel = sel.sort_values("hardness", ascending=False, kind="stable")
            shown = sel.head(N_PAIR_EXAMPLES)
            figs = "".join(_fig(ctx.thumb(str(r["id"]), THUMB, alt=str(r["id"])),
                                f"hardness {float(r['hardness']):.2f}", title=str(r["id"]))
                           for r in shown.to_dict("records"))
            more = f" (showing {len(shown)} of {len(sel)})" if len(sel) > len(shown) else ""
            out += (f'<div class="dir"><div class="muted">given <b>{esc(ctx.name(x))}</b>, '
                    f"predicted <b>{esc(ctx.name(y))}</b>: {fmt(n)}{more}</div>"
                    f'<div class="thumbs">{figs or "<span class=muted>none</span>"}</div></div>')
        out += "</div></div>"
    return out


# ---------------------------------------------------------------- map
def map_section(ctx) -> str:
    sim = ctx.sim
    if sim is None:
        return not_computed("similarity", str(ctx.run.path))
    out, summ = "", sim["summary"] or {}
    m = sim["map"]
    if m is None:
        out += '<p class="note off">similarity/map2d.parquet is missing: no 2-D map</p>'
    else:
        ids = m["id"].astype(str)
        hard = ids.isin(set(map(str, ctx.hardest["id"]))).to_numpy()
        if not hard.any() and "hardness" in m and len(m):
            hard = m["hardness"].rank(ascending=False, method="first").le(ctx.top).to_numpy()
        issue = (m["label_issue"].fillna(False).astype(bool).to_numpy() if "label_issue" in m
                 else None)
        method = summ.get("map method", summ.get("map_method", summ.get("method", "2-D")))
        png = plots.map_scatter(m["x"], m["y"], m["label"], ctx.names, hard=hard, issue=issue,
                                title=f"{method} map of {len(m):,} examples")
        out += img(png, "2-D map of the embeddings", cls="plot")
        out += (f'<p class="caption">Each point is an example, coloured by its given label; black '
                f"rings: the hardest {esc(ctx.split)} examples shown above; black ×: label-issue candidates. "
                f"Silhouette (embedding space, by given label): "
                f"{fmt(summ.get('silhouette'))}.</p>")
    if sim["centroid"] is not None:
        c = sim["centroid"]
        png = plots.similarity_heatmap(c.to_numpy(dtype=float), [str(i) for i in c.index],
                                       title="cosine similarity of class centroids")
        out += ("<h3>Class centroids</h3>" + img(png, "centroid similarity", cls="plot") +
                '<p class="caption">Cosine similarity of the class mean embeddings; the '
                "diagonal (a class with itself) is left blank so that it does not set the "
                "colour scale.</p>")
    sep = sim["separation"]
    if sep is not None and len(sep):
        sep = sep.sort_values("margin", kind="stable") if "margin" in sep else sep
        shown = sep.head(ctx.max_rows)
        rows = [[esc(r.get("class")), fmt(r.get("intra_mean")), esc(r.get("nearest_class")),
                 fmt(r.get("nearest_sim")), fmt(r.get("margin"))]
                for r in shown.to_dict("records")]
        out += ("<h3>Class separation</h3><p class=caption>Least separated first: margin = mean "
                "similarity within the class minus similarity to the nearest other class.</p>"
                + truncation_note(len(shown), len(sep), "classes")
                + table(["class", "intra mean", "nearest class", "nearest sim", "margin"], rows,
                        num_cols=(1, 3, 4)))
    return out


# ---------------------------------------------------------------- tables
def per_class(ctx) -> str:
    summary = ctx.metrics.get("summary", {})  # classify's per-class figures per split
    per = {s: summary.get(s, {}).get("per_class", {}) for s in ctx.splits}
    sep = None
    if ctx.sim is not None and ctx.sim["separation"] is not None:
        sep = {str(r["class"]): r for r in ctx.sim["separation"].to_dict("records")}
    acc = {h: ctx.head_metrics(h).get("per_class_accuracy", {}) for h in ctx.heads}
    records = []
    for k, name in enumerate(ctx.names):
        a = acc[ctx.primary].get(name)
        records.append((np.inf if a is None else a, k, name))
    records.sort()
    shown = records[: ctx.max_rows]
    header = (["class", f"support ({ctx.split})"] + [f"acc {h}" for h in ctx.heads]
              + ["mean hardness"] + [f"candidates {s}" for s in ctx.splits])
    if sep is not None:
        header += ["intra sim", "nearest class", "nearest sim"]
    rows = []
    for _, _k, name in shown:
        row = [esc(name), fmt(per[ctx.split].get(name, {}).get("n"))]
        row += [pct(acc[h].get(name)) for h in ctx.heads]
        row += [fmt(per[ctx.split].get(name, {}).get("mean_hardness"))]
        row += [fmt(per[s].get(name, {}).get("label_issue")) for s in ctx.splits]
        if sep is not None:
            r = sep.get(name, {})
            row += [fmt(r.get("intra_mean")), esc(r.get("nearest_class", "—")),
                    fmt(r.get("nearest_sim"))]
        rows.append(row)
    num = [i for i, h in enumerate(header) if h not in ("class", "nearest class")]
    return (f'<p class="caption">Per class on the {esc(ctx.split)} split, lowest '
            f"{esc(ctx.primary)} accuracy first; label-issue candidates per split.</p>"
            + truncation_note(len(shown), len(records), "classes") + table(header, rows,
                                                                           num_cols=num))


def label_issues(ctx) -> str:
    ex = ctx.ex
    if "label_issue" not in ex:
        return '<p class="note off">no label_issue column: run `hardprobe classify`</p>'
    flagged = ex[ex["label_issue"].fillna(False).astype(bool)]
    head = ctx.metrics.get("label_issue_head", ctx.primary)
    if flagged.empty:
        return (f'<p class="note off">no example is a label-issue candidate (by the '
                f"{esc(head)} head; see the warnings in the summary).</p>")
    flagged = flagged.sort_values("label_quality", kind="stable")
    shown = flagged.head(ctx.max_rows)
    pred_col = f"pred_{head}" if f"pred_{head}" in ex else f"pred_{ctx.primary}"
    rows = [[ctx.thumb(str(r["id"]), TINY), esc(r["id"]), esc(r["split"]),
             esc(r["label_name"]), esc(ctx.name(r[pred_col])), _sig(r["label_quality"]),
             fmt(r["hardness"])] for r in shown.to_dict("records")]
    kind = ("in-sample (the backbone's own classifier: optimistic on the images it was "
            "trained on)" if head == "model" else "out-of-sample")
    return (f'<p class="caption">Examples whose given label the {esc(head)} head\'s {kind} '
            "probabilities contradict (confident learning), lowest label quality first: "
            f"{len(flagged):,} candidates of {len(ex):,}. A candidate is not a verdict: the "
            "Why section says which are diagnosed label errors and which the model's own "
            "failures."
            + (f" Train flags:{upper_bound(ctx.metrics)}" if upper_bound(ctx.metrics) else "")
            + "</p>"
            + truncation_note(len(shown), len(flagged), "candidates")
            + table(["image", "id", "split", "given", f"predicted ({head})", "label quality",
                     "hardness"], rows, num_cols=(5, 6)))
