"""The report's robustness section, from RUN_DIR/perturb/ (`hardprobe perturb RUN_DIR`).

`perturb_section(run)` returns the section's HTML (to be wrapped in <section><h2> like the
other builders): a summary table, accuracy-against-severity curves per corruption and their
mean, the accuracy table, the classes that break first, and strips of examples, clean next to
each corruption at the severity perturb stored them at (perturb/strips.npz; and their
occlusion map). It only reads: the images and every parameter shown are perturb's. `robustness_curve_figure(runs)` draws
the mean accuracy against severity of several runs on one axes (for `hardprobe compare`).
"""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..rundir.run import Run, load_run
from . import plots
from .template import (
    esc,
    fmt,
    img,
    kv_table,
    messages,
    not_computed,
    pct,
    table,
    truncation_note,
)

OUT_DIR = "perturb"
THUMB = 64
PANEL_COLS = 4


def _as_run(run) -> Run:
    return run if isinstance(run, Run) else load_run(run)


def load_perturb(run) -> dict | None:
    """perturb/'s files as {"summary", "accuracy", "examples", "occlusion", "strips"} (the last
    four may be None); None when the run has no perturb/summary.json. strips: {"ids",
    "severity", "corruptions", "images": {id: {"clean": image, corruption: image}}}."""
    d = _as_run(run).path / OUT_DIR
    if not (d / "summary.json").exists():
        return None
    out = {"summary": json.loads((d / "summary.json").read_text()), "accuracy": None,
           "examples": None, "occlusion": None, "strips": None}
    if (d / "accuracy.csv").exists():
        out["accuracy"] = pd.read_csv(d / "accuracy.csv")
    if (d / "examples.parquet").exists():
        out["examples"] = pd.read_parquet(d / "examples.parquet")
    if (d / "occlusion.npz").exists():
        with np.load(d / "occlusion.npz", allow_pickle=False) as z:
            ids = [str(i) for i in z["ids"]]
            out["occlusion"] = {"index": {i: k for k, i in enumerate(ids)}, "maps": z["maps"]}
    if (d / "strips.npz").exists():
        out["strips"] = _read_strips(d / "strips.npz")
    return out


def _read_strips(path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        ids, names = [str(i) for i in z["ids"]], [str(c) for c in z["corruptions"]]
        images = {i: {key: z[f"{key}_{k}"] for key in ["clean", *names]}
                  for k, i in enumerate(ids)}
        return {"ids": ids, "severity": int(z["severity"]), "corruptions": names,
                "images": images}


# ---------------------------------------------------------------- figures
@plots._figure
def severity_curves(acc: pd.DataFrame, summary: dict, heads: list[str]) -> Figure:
    """One panel per corruption and one for the mean: accuracy (y) against severity (x) per head,
    the clean accuracy at severity 0. The mean panel is perturb's accuracy_by_severity."""
    clean, by_sev = summary.get("clean_accuracy", {}), summary.get("accuracy_by_severity", {})
    corruptions = list(dict.fromkeys(acc["corruption"]))
    panels = corruptions + ["mean over corruptions"]
    ncols = min(PANEL_COLS, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(2.5 * ncols + 0.4, 2.05 * nrows + 0.3), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True)
    sev = sorted(acc["severity"].unique())
    for k, name in enumerate(panels):
        ax = axes[k // ncols][k % ncols]
        rows = acc[acc["corruption"] == name]
        for j, h in enumerate(heads):
            a = (rows[rows["head"] == h].set_index("severity")["accuracy"] if name != panels[-1]
                 else pd.Series({int(s): v for s, v in by_sev.get(h, {}).items()}))
            xs, ys = [0] + sev, [clean.get(h, np.nan)] + a.reindex(sev).tolist()
            ax.plot(xs, ys, marker="o", ms=3, lw=1.6 if name == panels[-1] else 1.2,
                    color=plots.HEAD_COLORS.get(h, f"C{j + 3}"), label=h)
        ax.set_title(name.replace("_", " "), fontsize=9)
        ax.set_ylim(0, 1.02)
        ax.set_xticks([0] + sev, ["clean"] + [str(s) for s in sev], fontsize=7.5)
        ax.grid(alpha=0.25, lw=0.6)
    for k in range(len(panels), nrows * ncols):
        axes[k // ncols][k % ncols].set_visible(False)
    axes[-1][0].set_xlabel("severity")
    axes[0][0].set_ylabel("accuracy")
    axes[(len(panels) - 1) // ncols][(len(panels) - 1) % ncols].legend(fontsize=7.5,
                                                                         frameon=False)
    return fig


@plots._figure
def _curves(series: list[tuple[str, list, list]], missing: list[str]) -> Figure:
    fig = Figure(figsize=(6.0, 3.8))
    ax = fig.add_subplot()
    for k, (label, xs, ys) in enumerate(series):
        ax.plot(xs, ys, marker="o", ms=4, lw=1.6, color=f"C{k}", label=label)
    if series:
        ticks = sorted({x for _, xs, _ in series for x in xs})
        ax.set_xticks(ticks, ["clean" if t == 0 else str(t) for t in ticks])
        ax.legend(fontsize=8, frameon=False)
    else:
        ax.text(0.5, 0.5, "no run has perturb/", ha="center", va="center",
                transform=ax.transAxes, color="#59636e")
    if missing:
        ax.text(0.01, 0.01, "no perturb/: " + ", ".join(missing), transform=ax.transAxes,
                fontsize=7, color="#59636e")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("corruption severity")
    ax.set_ylabel("mean accuracy over corruptions")
    ax.set_title("robustness: accuracy against severity (primary head)")
    ax.grid(alpha=0.25, lw=0.6)
    return fig


def robustness_curve_figure(runs: list) -> bytes:
    """PNG: mean accuracy over the corruptions against severity (clean at 0), primary head,
    one line per run (Run objects or run directories); runs without perturb/ are named in a
    corner note."""
    series, missing = [], []
    for r in runs:
        r = _as_run(r)
        p = load_perturb(r)
        if p is None:
            missing.append(r.path.name)
            continue
        s = p["summary"]
        head = s["primary_head"]
        by = s["accuracy_by_severity"][head]
        sev = sorted(int(k) for k in by)
        try:
            model = r.provenance.get("backbone", {}).get("name", "?")
        except Exception:
            model = "?"
        label = f"{r.path.name} · {model} ({head}, mCA {s['mean_corruption_accuracy'][head]:.3f})"
        series.append((label, [0] + sev, [s["clean_accuracy"].get(head, np.nan)]
                       + [by[str(k)] if str(k) in by else by[k] for k in sev]))
    return _curves(series, missing)


# ---------------------------------------------------------------- section
def perturb_section(run, *, max_rows: int = 200) -> str:
    """HTML of the robustness section, or the not-computed note when perturb/ is absent."""
    run = _as_run(run)
    try:
        data = load_perturb(run)
    except Exception as e:  # a broken optional stage must not sink the whole report
        return (f'<p class="note off">perturb/ could not be read ({esc(type(e).__name__)}: '
                f"{esc(e)}); rerun <code>hardprobe perturb</code></p>")
    if data is None:
        return not_computed("perturb", str(run.path))
    s, acc = data["summary"], data["accuracy"]
    heads = list(s.get("heads", []))
    primary = s.get("primary_head", heads[0] if heads else "?")
    out = _summary_table(s)
    if acc is not None and len(acc):
        out += ("<h3>Accuracy against severity</h3>"
                + img(severity_curves(acc, s, heads),
                      "accuracy against corruption severity", cls="plot")
                + '<p class="caption">Accuracy of each head on the perturbed subset per '
                  "corruption and severity; the first point is the clean accuracy on the same "
                  "examples. Last panel: the mean over the corruptions.</p>")
        out += _accuracy_table(acc, s, heads, primary)
    out += _classes_table(s, max_rows)
    out += _strips(run, data, primary)
    return out


def _summary_table(s: dict) -> str:
    heads = s.get("heads", [])
    clean, mca = s.get("clean_accuracy", {}), s.get("mean_corruption_accuracy", {})
    rho = s.get("hardness_flip_spearman", {}) or {}
    src = ("CIFAR-10-C files at <code>" + esc(s.get("cifar10c")) + "</code>"
           if s.get("source") == "cifar10c" else
           "generated (CIFAR-10 parameters of Hendrycks &amp; Dietterich 2019)")
    fs = s.get("flip_severity", {}) or {}
    pairs = [
        ("examples", f"{fmt(s.get('n'))} of the {esc(s.get('split', 'test'))} split "
                     f"(stratified by class, seed {fmt(s.get('seed'))})"),
        ("corruptions", f"{len(s.get('corruptions', []))}: "
                        f"{esc(', '.join(s.get('corruptions', [])))} · severities "
                        f"{esc(', '.join(map(str, s.get('severities', []))))} · {src}"),
        ("heads", f"{esc(', '.join(heads))} · flips of the primary head "
                  f"<b>{esc(s.get('primary_head'))}</b>"),
        ("clean accuracy", " · ".join(f"{esc(h)} {pct(clean.get(h))}" for h in heads)),
        ("mean corruption accuracy", " · ".join(
            f"{esc(h)} <b>{pct(mca.get(h))}</b>"
            + (f" <span class=muted>(−{100 * (clean[h] - mca[h]):.1f} pts)</span>"
               if clean.get(h) is not None and mca.get(h) is not None else "")
            for h in heads)),
        ("flip severity", f"mean {fmt(fs.get('mean'), 2)} (1..5; {fmt(fs.get('never'))} = "
                          f"never) · share never flipped by any corruption "
                          f"{pct(fs.get('share_never_flipped'))}"),
        ("hardness vs flip severity", f"Spearman ρ {fmt(rho.get('rho'))} (p "
                                      f"{fmt(rho.get('p'), 4)}, n {fmt(rho.get('n'))}); "
                                      "negative = harder examples break at lower severity"),
    ]
    br = s.get("classes_break_first") or []
    if br:
        pairs.append(("classes that break first", ", ".join(
            f"{esc(c['class'])} ({fmt(c['mean_flip_severity'], 2)})" for c in br[:5])))
    if s.get("occlusion"):
        o = s["occlusion"]
        pairs.append(("occlusion", f"grey patch ({fmt(o.get('patch_fraction'), 2)} of the side, "
                                   f"{fmt(o.get('grid'))}×{fmt(o.get('grid'))} positions): mean "
                                   f"largest drop of p(label) {fmt(o.get('mean_max_drop'))}"))
    if s.get("erase"):
        e = s["erase"]
        pairs.append(("random erasing", f"flips {pct(e.get('share_flipped'))} of the examples "
                                        f"by {pct(max(e['areas']) if e.get('areas') else None)} area; "
                                        "median flip area "
                                        f"{pct(e.get('median_flip_area'))}"))
    if s.get("blend"):
        b = s["blend"]
        pairs.append(("blend", f"flips {pct(b.get('share_flipped'))} by weight "
                               f"{fmt(max(b['weights']) if b.get('weights') else None, 1)}; median flip "
                               f"weight {fmt(b.get('median_flip_weight'), 1)} · partner: "
                               f"{esc(b.get('partner', ''))}"))
    if s.get("frost"):
        pairs.append(("frost texture", esc(s["frost"].get("note", ""))))
    secs = s.get("seconds", {})
    if secs:
        pairs.append(("seconds", esc(" · ".join(f"{k} {v}" for k, v in secs.items()))))
    out = kv_table(pairs)
    if s.get("notes"):
        out += "<h3>Notes</h3>" + messages(s["notes"])
    return out


def _accuracy_table(acc: pd.DataFrame, summary: dict, heads: list[str], primary: str) -> str:
    """accuracy.csv's primary-head rows, and perturb's means (summary.json): per corruption
    over severities, per severity over corruptions, and overall."""
    sev = sorted(acc["severity"].unique())
    p = acc[acc["head"] == primary].pivot_table(index="corruption", columns="severity",
                                                values="accuracy")
    by_cor = summary.get("accuracy_by_corruption", {})
    by_sev = summary.get("accuracy_by_severity", {}).get(primary, {})
    by_sev = {int(k): v for k, v in by_sev.items()}  # JSON keys are strings
    mca = summary.get("mean_corruption_accuracy", {})
    rows = []
    for c in dict.fromkeys(acc["corruption"]):
        rows.append([esc(c)] + [pct(p.loc[c].get(s)) for s in sev]
                    + [pct(by_cor.get(h, {}).get(c)) for h in heads])
    rows.append(["<b>mean</b>"] + [pct(by_sev.get(int(s))) for s in sev]
                + [f"<b>{pct(mca.get(h))}</b>" for h in heads])
    header = (["corruption"] + [f"{primary} s{s}" for s in sev]
              + [f"mean {h}" for h in heads])
    return (table(header, rows, num_cols=range(1, len(header)))
            + f'<p class="caption">Accuracy per severity of the primary head '
              f"(<b>{esc(primary)}</b>), and the mean over severities of every head.</p>")


def _classes_table(s: dict, max_rows: int) -> str:
    br = s.get("classes_break_first") or []
    if not br:
        return ""
    shown = br[:max_rows]
    rows = [[esc(c["class"]), fmt(c["mean_flip_severity"], 2), fmt(c["n"])] for c in shown]
    return ("<h3>Classes that break first</h3>"
            '<p class="caption">Mean flip severity per class (lowest first): the mean over '
            "corruptions of the lowest severity that changes the primary head's prediction "
            f"({fmt((s.get('flip_severity') or {}).get('never'))} = never).</p>"
            + truncation_note(len(shown), len(br), "classes")
            + table(["class", "mean flip severity", "examples"], rows, num_cols=(1, 2)))


def _figure_html(inner: str, caption: str, title: str = "") -> str:
    t = f' title="{esc(title)}"' if title else ""
    return f"<figure{t}>{inner}<figcaption>{esc(caption)}</figcaption></figure>"


def _strips(run: Run, data: dict, primary: str) -> str:
    strips, ex = data["strips"], data["examples"]
    if ex is None or not len(ex):
        return ""
    if strips is None or not strips["ids"]:
        return ('<p class="note off">no example strips: this perturb/ predates '
                "perturb/strips.npz; rerun <code>hardprobe perturb</code> to store them</p>")
    level = strips["severity"]
    rows = ex.set_index("id").loc[strips["ids"]].reset_index().to_dict("records")
    head = (f"<h3>Examples that break first</h3><p class=\"caption\">The {len(rows)} probed "
            f"examples with the lowest flip severity: clean, then each corruption at severity "
            f"{level}" + (", then the occlusion map (red = the grey patch there lowers "
                          "p(label) most)" if data["occlusion"] is not None else "")
            + ". Under each corrupted image: the lowest severity that flips the "
            f"{esc(primary)} prediction (6 = never).</p>")
    return head + "".join(_strip(run, data, r, level) for r in rows)


def _strip(run: Run, data: dict, r: dict, level: int) -> str:
    strips = data["strips"]
    ex_id = str(r["id"])
    shown = strips["images"][ex_id]
    clean = shown["clean"]
    names = run.class_names
    figs = [_figure_html(img(plots.thumbnail(clean, THUMB), f"clean {ex_id}", cls="px"),
                         "clean", title=ex_id)]
    for c in strips["corruptions"]:
        fsv = r.get(f"flip_severity_{c}")
        cap = f"{c.replace('_', ' ')} · {fmt(fsv) if fsv is not None else '—'}"
        figs.append(_figure_html(img(plots.thumbnail(shown[c], THUMB), f"{c} severity {level}",
                                     cls="px"), cap, title=f"{c}, severity {level}"))
    occ = data["occlusion"]
    if occ is not None and ex_id in occ["index"]:
        m = np.asarray(occ["maps"][occ["index"][ex_id]], np.float32)
        top = float(np.nanmax(m)) if m.size else 0.0
        norm = np.clip(m / top, 0, 1) if top > 0 else np.zeros_like(m)
        figs.append(_figure_html(img(plots.cam_overlay(clean, norm, size=THUMB),
                                     "occlusion sensitivity", cls="px"),
                                 f"occlusion · {fmt(r.get('occlusion_max_drop'), 2)}",
                                 title="drop of p(label) per grey-patch position"))
    label = int(r["label"])
    pred = int(r["clean_pred"]) if "clean_pred" in r else label
    name = (lambda k: names[k] if 0 <= k < len(names) else str(k))
    extra = []
    if r.get("erase_flip_area") is not None and not pd.isna(r.get("erase_flip_area")):
        extra.append(f"erase flip area {fmt(r['erase_flip_area'], 2)}")
    if r.get("blend_flip_weight") is not None and not pd.isna(r.get("blend_flip_weight")):
        partner = r.get("blend_partner")
        extra.append(f"blend flip weight {fmt(r['blend_flip_weight'], 1)}"
                     + (f" toward {esc(name(int(partner)))}" if partner is not None else ""))
    meta = (f'<span class="lbl">{esc(name(label))}</span> → <span class="lbl '
            f'{"wrong" if pred != label else "right"}">{esc(name(pred))}</span> · flip severity '
            f"<b>{fmt(r.get('flip_severity'), 2)}</b>"
            + (" · " + " · ".join(extra) if extra else "")
            + f' <span class="id">{esc(ex_id)}</span>')
    return f'<div class="card" style="margin:8px 0"><div class="thumbs">{"".join(figs)}</div>' \
           f'<div class="meta">{meta}</div></div>'


__all__ = ["perturb_section", "robustness_curve_figure", "severity_curves", "load_perturb"]
