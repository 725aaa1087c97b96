"""The page of `hardprobe compare`: OUT/compare.html from what stages/compare.py wrote.

`write_compare_html(out)` reads OUT/summary.json and OUT/overlap.parquet (and, for the
pictures, run A's images and both runs' perturb/ and depth/ summaries) and writes one
self-contained page (embedded PNGs, inline CSS, no script, no request outside the file): the
numbers, a hardness-vs-hardness scatter, thumbnails of the hard sets, robustness curves and
prediction depth when both runs have them. It computes no figure: every number shown is one
the compare stage stored.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..core.io import atomic_write_text, read_json
from ..rundir.run import Run, load_run
from . import plots
from .template import esc, fmt, img, kv_table, messages, page, pct, table, truncation_note

GROUP_COLORS = {"both": "#cf222e", "only_a": "#1f77b4", "only_b": "#ff7f0e",
                "neither": "#b0b0b0"}
SECTIONS = [("summary", "Summary"), ("scatter", "Hardness A vs B"), ("both", "Hard for both"),
            ("only-a", "Only A"), ("only-b", "Only B"), ("robustness", "Robustness"),
            ("depth", "Prediction depth")]

__all__ = ["write_compare_html"]


def write_compare_html(out, *, top: int = 12) -> Path:
    """Render OUT/compare.html from OUT/summary.json and OUT/overlap.parquet (written by
    `hardprobe.stages.compare.compare_runs`); returns the page's path. top: thumbnails shown
    per hard set."""
    from ..errors import ConfigError
    if top < 0:
        raise ConfigError(f"top must be >= 0, got {top}")
    out = Path(out)
    s = read_json(out / "summary.json")
    ov = pd.read_parquet(out / "overlap.parquet")
    a, b = load_run(s["run_a"]), load_run(s["run_b"])
    notes = list(s["notes"])  # the stage's, then what could not be drawn
    robust = _robustness(a, b, s["robustness"], notes)
    depth = _depth(s["depth"])
    shown = {g: _hardest(ov, g, top) for g in ("both", "only_a", "only_b")}
    images = _images(a, [i for d in shown.values() for i in d["id"]], notes)
    grids = {g: _grid(a, ov, g, shown[g], images) for g in shown}
    path = out / "compare.html"
    atomic_write_text(path, _page(a, b, ov, {**s, "notes": notes}, grids, robust, depth))
    return path


def _robustness(a: Run, b: Run, r: dict, notes: list) -> str:
    if not r.get("available"):
        return f'<p class="note off">{esc(_last(notes, "robustness curves"))}</p>'
    try:
        from .perturb_section import robustness_curve_figure
        fig = robustness_curve_figure([a, b])
        if not isinstance(fig, (bytes, bytearray)):
            raise TypeError(f"robustness_curve_figure returned {type(fig).__name__}, not PNG")
    except Exception as e:  # one missing picture must not sink the page
        msg = f"robustness curves could not be drawn ({type(e).__name__}: {e})"
        notes.append(msg)
        return f'<p class="note off">{esc(msg)}</p>'
    return (img(bytes(fig), "robustness curves of both runs", cls="plot")
            + '<p class="caption">Robustness curves of run A and run B (perturb/).</p>')


def _last(notes: list, prefix: str) -> str:
    return next((n for n in reversed(notes) if n.startswith(prefix)), prefix + ": not shown")


def _depth(d: dict) -> str:
    if not d.get("shown"):
        return ('<p class="note off">prediction depth: not computed for both runs; run '
                "<code>hardprobe depth</code> on each</p>")
    out = kv_table([("examples covered by both", fmt(d["n"])),
                    ("Spearman of the depths", fmt(d["spearman"]["rho"])),
                    ("mean depth / layers, A", fmt(d["mean_relative_depth_a"])),
                    ("mean depth / layers, B", fmt(d["mean_relative_depth_b"]))])
    if d.get("knn_accuracy"):
        out += img(_depth_png(d["knn_accuracy"], d["knn_accuracy_split"]),
                   "kNN accuracy per layer", cls="plot")
    return out + ('<p class="caption">Depth = first layer from which every kNN probe agrees '
                  "with the model's prediction (relative: divided by the number of probed "
                  "layers, which never settle at 1).</p>")


# ------------------------------------------------------------------ plots
@plots._figure
def _scatter_png(ov: pd.DataFrame, thresholds) -> "plots.Figure":
    fig = plots.Figure(figsize=(5.6, 5.2))
    ax = fig.add_subplot()
    for g in ("neither", "only_a", "only_b", "both"):
        m = ov["group"] == g
        ax.scatter(ov.loc[m, "hardness_a"], ov.loc[m, "hardness_b"], s=14, alpha=0.75,
                   color=GROUP_COLORS[g], linewidths=0, label=f"{g} ({int(m.sum()):,})")
    ta, tb = thresholds
    if ta is not None:
        ax.axvline(ta, color="#555555", lw=0.8, ls="--")
        ax.axhline(tb, color="#555555", lw=0.8, ls="--")
    ax.plot([0, 1], [0, 1], color="#999999", lw=0.8)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("hardness, run A")
    ax.set_ylabel("hardness, run B")
    ax.legend(fontsize=8, frameon=False, loc="upper left")
    return fig


@plots._figure
def _depth_png(curves: dict, split: str) -> "plots.Figure":
    fig = plots.Figure(figsize=(5.6, 3.4))
    ax = fig.add_subplot()
    for k, (name, acc) in enumerate(curves.items()):
        acc = np.asarray(acc, dtype=float)
        x = (np.arange(len(acc)) + 1) / max(len(acc), 1)
        ax.plot(x, acc, marker="o", ms=3, color=("#1f77b4", "#ff7f0e")[k % 2],
                label=f"run {name} ({len(acc)} layers)")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("relative depth of the layer")
    ax.set_ylabel(f"kNN accuracy ({split})")
    ax.legend(fontsize=8, frameon=False)
    return fig


# ------------------------------------------------------------------ page
def _page(a: Run, b: Run, ov: pd.DataFrame, s: dict, grids: dict, robust: str,
          depth: str) -> str:
    h, p, g = s["hardness"], s["predictions"], s["groups"]
    li = s.get("label_issues")
    runs = kv_table([("run A", f"<code>{esc(a.path)}</code> · {esc(s['model_a'])}"),
                     ("run B", f"<code>{esc(b.path)}</code> · {esc(s['model_b'])}"),
                     ("split", f"{esc(s['split'])} · {fmt(s['n'])} examples"),
                     ("hard set", f"top {pct(s['quantile'])} of each run = "
                                  f"{fmt(s['n_top'])} examples")])
    rows = [["Spearman rho of hardness", fmt(h["spearman"]["rho"])],
            ["Kendall tau of hardness", fmt(h["kendall"]["tau"])],
            ["hard for both", fmt(g["both"])],
            ["… expected if unrelated", fmt(g["expected_both"])],
            ["hard only for A / only for B", f"{fmt(g['only_a'])} / {fmt(g['only_b'])}"],
            ["Jaccard of the hard sets", fmt(g["jaccard"])],
            ["tied at the cut-off, A / B (broken at random)",
             f"{fmt(g['tied_at_cutoff']['a'])} / {fmt(g['tied_at_cutoff']['b'])}"],
            [f"prediction agreement ({p['head_a']} vs {p['head_b']})", pct(p["agreement"])],
            ["Cohen's kappa of predictions", fmt(p["cohen_kappa"])],
            ["accuracy A / B", f"{pct(p['accuracy_a'])} / {pct(p['accuracy_b'])}"],
            ["linear CKA of the embeddings", fmt(s["cka"])]]
    if li:
        rows += [["label issues A / B / both", f"{fmt(li['n_a'])} / {fmt(li['n_b'])} / "
                                               f"{fmt(li['both'])}"],
                 ["label-issue agreement · kappa", f"{pct(li['agreement'])} · "
                                                   f"{fmt(li['cohen_kappa'])}"],
                 ["Jaccard of the flagged sets", fmt(li["jaccard"])]]
    rows = [[esc(k), v] for k, v in rows]
    summary = runs + table(["measure", "value"], rows, num_cols=(1,))
    if s["notes"]:
        summary += f"<h3>Notes</h3>{messages(s['notes'])}"
    thr = (g.get("cutoff_a"), g.get("cutoff_b"))
    scatter = (img(_scatter_png(ov, thr), "hardness of run A against run B", cls="plot") +
               '<p class="caption">Each point is an example; dashed lines: the hard-set '
               "thresholds of each run; grey diagonal: equal hardness.</p>")
    parts = {"summary": summary, "scatter": scatter, "both": grids["both"],
             "only-a": grids["only_a"], "only-b": grids["only_b"], "robustness": robust,
             "depth": depth}
    body = "\n".join(f'<section id="{sid}"><h2>{esc(t)}</h2>\n{parts[sid]}</section>'
                     for sid, t in SECTIONS)
    return page(f"hardprobe compare — {s['model_a']} vs {s['model_b']}",
                f"A: {a.path} · B: {b.path}", SECTIONS, body)


def _hardest(ov: pd.DataFrame, group: str, top: int) -> pd.DataFrame:
    sel = ov[ov["group"] == group]
    key = {"both": sel["hardness_a"] + sel["hardness_b"], "only_a": sel["hardness_a"],
           "only_b": sel["hardness_b"]}[group]
    return sel.loc[key.sort_values(ascending=False, kind="stable").index].head(top)


def _images(a: Run, ids: list, notes: list) -> dict:
    """{id: uint8 image} of run A's dataset; {} and a note when it cannot be opened."""
    if not ids:
        return {}
    try:
        return dict(zip(ids, a.images(ids)))
    except Exception as e:
        notes.append(f"thumbnails unavailable: the images of run A could not be opened ({e})")
        return {}


def _grid(a: Run, ov: pd.DataFrame, group: str, shown: pd.DataFrame, images: dict) -> str:
    if shown.empty:
        return '<p class="note off">no example in this group</p>'
    try:
        names = dict(enumerate(a.class_names))
    except Exception:
        names = {}
    figs = []
    for r in shown.to_dict("records"):
        im = images.get(r["id"])
        thumb = img(None if im is None else plots.thumbnail(im, 96), str(r["id"]), cls="px",
                    width=96 if im is None else None)
        lab = names.get(int(r["label"]), str(r["label"]))
        tip = (f"{r['id']} · given {lab} · A predicts {names.get(int(r['pred_a']), r['pred_a'])}"
               f" · B predicts {names.get(int(r['pred_b']), r['pred_b'])}")
        figs.append(f'<figure title="{esc(tip)}">{thumb}<figcaption>{esc(lab)}</figcaption>'
                    f"<figcaption>A {r['hardness_a']:.2f} · B {r['hardness_b']:.2f}"
                    "</figcaption></figure>")
    return (truncation_note(len(shown), int((ov["group"] == group).sum()), "examples") +
            '<p class="caption">Hardest first; under each image: given label, then the '
            "hardness in run A and in run B (hover for the predictions).</p>"
            f'<div class="thumbs">{"".join(figs)}</div>')
