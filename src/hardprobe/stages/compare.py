"""Two runs on the same images, side by side: `hardprobe compare RUN_A RUN_B`.

compare_runs(run_a, run_b) writes OUT (default RUN_A/compare_<name of RUN_B>/):
    summary.json     the numbers below and notes
    overlap.parquet  id, label, hardness_a, hardness_b, group (both | only_a | only_b |
                     neither), pred_a, pred_b (primary heads), label_issue_a, label_issue_b
    compare.html     one self-contained page (embedded PNGs, inline CSS, no script, no request
                     outside the file): the numbers, a hardness-vs-hardness scatter, thumbnails
                     of the hard sets, robustness curves and prediction depth when both runs
                     have them

Definitions, on one split (default "test"); examples are matched by id and both runs must hold
the same ids:
  * rank agreement of hardness: Spearman's rho and Kendall's tau-b (scipy), with p-values.
  * hard set of a run: its ceil(quantile * N) hardest examples (quantile 0.1 = the top 10 %),
    ties broken by run A's row order. both = in both hard sets, only_a / only_b = in one;
    if the runs were unrelated, |both| would be about n_top^2 / N (`expected_both`).
  * predictions: each run's primary head (pred_model, else pred_linear, else pred_knn);
    agreement = share of equal predictions; Cohen's kappa = agreement corrected for chance
    (1 = same, 0 = chance level; None when undefined).
  * label issues: agreement and Cohen's kappa of the flags, Jaccard |A ∩ B| / |A ∪ B| of the
    flagged sets.
  * linear CKA of the two runs' embeddings of the split (similarity.cka_runs).
  * prediction depth (both runs have depth/): Spearman of the depths of the examples both
    cover, mean depth relative to each network's layer count, kNN accuracy per layer.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.io import atomic_write, atomic_write_text, read_json, write_json
from ..core.stats import rank_correlation, spearman
from ..errors import ConfigError
from ..report import plots
from ..report.template import (
    esc,
    fmt,
    img,
    kv_table,
    messages,
    page,
    pct,
    table,
    truncation_note,
)
from ..rundir.layout import primary_head, require
from ..rundir.run import Run, load_run

GROUPS = ("both", "only_a", "only_b", "neither")
GROUP_COLORS = {"both": "#cf222e", "only_a": "#1f77b4", "only_b": "#ff7f0e",
                "neither": "#b0b0b0"}
SECTIONS = [("summary", "Summary"), ("scatter", "Hardness A vs B"), ("both", "Hard for both"),
            ("only-a", "Only A"), ("only-b", "Only B"), ("robustness", "Robustness"),
            ("depth", "Prediction depth")]

__all__ = ["compare_runs", "align", "hard_groups", "cohen_kappa", "jaccard"]


# ------------------------------------------------------------------ pure parts
def align(run_a: Run, run_b: Run, split: str = "test") -> tuple[pd.DataFrame, pd.DataFrame]:
    """The split's rows of both runs, B's reordered to A's ids; ValueError if the ids differ."""
    for r in (run_a, run_b):
        if split not in r.splits:
            raise ConfigError(f"no split {split!r} in {r.path}; splits: {r.splits}")
    ea, eb = run_a.split_examples(split), run_b.split_examples(split)
    only_a = sorted(set(ea["id"]) - set(eb["id"]))
    only_b = sorted(set(eb["id"]) - set(ea["id"]))
    if only_a or only_b:
        raise ConfigError(f"the runs do not hold the same {split!r} images: {len(only_a)} ids only "
                         f"in {run_a.path}, {len(only_b)} only in {run_b.path} (e.g. "
                         f"{(only_a + only_b)[:3]}); compare needs two runs on the same images")
    eb = eb.set_index("id").loc[ea["id"]].reset_index()
    return ea, eb


def hard_groups(h_a, h_b, quantile: float = 0.1) -> tuple[np.ndarray, int]:
    """(group per example (N,) object array of GROUPS, n_top): the ceil(quantile * N) hardest of
    each run, ties broken by position."""
    h_a, h_b = np.asarray(h_a, float), np.asarray(h_b, float)
    if not 0 < quantile <= 1:
        raise ConfigError(f"quantile must be in (0, 1], got {quantile}")
    n_top = min(len(h_a), math.ceil(quantile * len(h_a) - 1e-9))

    def top(h):
        m = np.zeros(len(h), bool)
        m[np.argsort(-np.nan_to_num(h, nan=-np.inf), kind="stable")[:n_top]] = True
        return m
    a, b = top(h_a), top(h_b)
    g = np.select([a & b, a, b], ["both", "only_a", "only_b"], "neither").astype(object)
    return g, n_top


def cohen_kappa(a, b) -> float | None:
    """Cohen's kappa of two labelings of the same items; None when chance agreement is 1."""
    a, b = np.asarray(a), np.asarray(b)
    if len(a) == 0:
        return None
    cats, inv = np.unique(np.concatenate([a, b]), return_inverse=True)
    ia, ib = inv[: len(a)], inv[len(a):]
    po = float(np.mean(ia == ib))
    pe = float(np.sum(np.bincount(ia, minlength=len(cats)) * np.bincount(ib, minlength=len(cats)))
               / len(a) ** 2)
    return None if pe >= 1 else (po - pe) / (1 - pe)


def jaccard(a, b) -> float | None:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    union = int((a | b).sum())
    return None if union == 0 else int((a & b).sum()) / union


def _kendall(a, b) -> dict:
    return rank_correlation(a, b, method="kendall")


# ------------------------------------------------------------------ stage
def compare_runs(run_a, run_b, *, out=None, split: str = "test", quantile: float = 0.1,
                 top: int = 12) -> Path:
    """Compare two runs of the same images; writes OUT (see the module docstring), returns it.
    top: thumbnails shown per hard set."""
    if top < 0:
        raise ConfigError(f"top must be >= 0, got {top}")
    a = run_a if isinstance(run_a, Run) else load_run(run_a)
    b = run_b if isinstance(run_b, Run) else load_run(run_b)
    ea, eb = align(a, b, split)
    for r, e in ((a, ea), (b, eb)):
        require(e.columns, f"compare ({r.path})")
    out = Path(out) if out is not None else a.path / f"compare_{b.path.resolve().name}"
    notes: list[str] = []
    group, n_top = hard_groups(ea["hardness"], eb["hardness"], quantile)
    head_a, head_b = primary_head(ea.columns), primary_head(eb.columns)
    ov = pd.DataFrame({"id": ea["id"], "label": ea["label"], "hardness_a": ea["hardness"],
                       "hardness_b": eb["hardness"].to_numpy(), "group": group,
                       "pred_a": ea[f"pred_{head_a}"], "pred_b": eb[f"pred_{head_b}"].to_numpy()})
    if (ea["label"].to_numpy() != eb["label"].to_numpy()).any():
        notes.append(f"{int((ea['label'].to_numpy() != eb['label'].to_numpy()).sum())} examples "
                     "have different labels in the two runs; labels and accuracies are run A's")
    n = len(ov)
    counts = {g: int((group == g).sum()) for g in GROUPS}
    s = {"run_a": str(a.path), "run_b": str(b.path), "model_a": _model(a), "model_b": _model(b),
         "split": split, "n": n, "quantile": quantile, "n_top": n_top,
         "hardness": {"spearman": spearman(ov["hardness_a"], ov["hardness_b"]),
                      "kendall": _kendall(ov["hardness_a"], ov["hardness_b"])},
         "groups": {**counts, "expected_both": n_top ** 2 / n if n else None,
                    "jaccard": jaccard(np.isin(group, ["both", "only_a"]),
                                       np.isin(group, ["both", "only_b"]))}}
    y = ov["label"].to_numpy()
    pa, pb = ov["pred_a"].to_numpy(), ov["pred_b"].to_numpy()
    s["predictions"] = {"head_a": head_a, "head_b": head_b,
                        "agreement": float(np.mean(pa == pb)) if n else None,
                        "cohen_kappa": cohen_kappa(pa, pb),
                        "accuracy_a": float(np.mean(pa == y)) if n else None,
                        "accuracy_b": float(np.mean(pb == y)) if n else None,
                        "both_wrong": int(((pa != y) & (pb != y)).sum())}
    if "label_issue" in ea.columns and "label_issue" in eb.columns:
        ia = ea["label_issue"].fillna(False).astype(bool).to_numpy()
        ib = eb["label_issue"].fillna(False).astype(bool).to_numpy()
        ov["label_issue_a"], ov["label_issue_b"] = ia, ib
        s["label_issues"] = {"n_a": int(ia.sum()), "n_b": int(ib.sum()),
                             "both": int((ia & ib).sum()),
                             "agreement": float(np.mean(ia == ib)) if n else None,
                             "cohen_kappa": cohen_kappa(ia, ib), "jaccard": jaccard(ia, ib)}
    else:
        notes.append("label issues: not compared (a run has no label_issue column)")
    try:
        from .similarity import cka_runs
        s["cka"] = cka_runs(a, b, split)
    except Exception as e:  # missing features, constant features: the rest still stands
        s["cka"] = None
        notes.append(f"linear CKA not computed: {e}")
    robust_html, s["robustness"] = _robustness(a, b, notes)
    depth_html, s["depth"] = _depth(a, b, ov["id"], notes)
    shown = {g: _hardest(ov, g, top) for g in ("both", "only_a", "only_b")}
    images = _images(a, [i for d in shown.values() for i in d["id"]], notes)
    s["notes"] = notes
    atomic_write(out / "overlap.parquet", lambda f: ov.to_parquet(f, index=False))
    write_json(out / "summary.json", s)
    grids = {g: _grid(a, ov, g, shown[g], images) for g in shown}
    atomic_write_text(out / "compare.html", _page(a, b, ov, s, grids, robust_html, depth_html))
    return out


def _model(r: Run) -> str:
    try:
        return str(r.provenance.get("backbone", {}).get("name", "?"))
    except Exception:
        return "?"


def _robustness(a: Run, b: Run, notes: list) -> tuple[str, dict]:
    have = [r.path.name for r in (a, b) if (r.path / "perturb").is_dir()]
    if len(have) < 2:
        msg = (f"robustness curves: only {have[0]} has perturb/" if have else
               "robustness curves: neither run has perturb/") + "; run `hardprobe perturb`"
        notes.append(msg)
        return f'<p class="note off">{esc(msg)}</p>', {"shown": False}
    try:
        from ..report.perturb_section import robustness_curve_figure
    except ImportError:
        msg = "robustness curves: this hardprobe has no perturb report helper; skipped"
        notes.append(msg)
        return f'<p class="note off">{esc(msg)}</p>', {"shown": False}
    try:
        fig = robustness_curve_figure([a, b])
        if hasattr(fig, "savefig"):  # a matplotlib Figure rather than PNG bytes
            import io

            from matplotlib.backends.backend_agg import FigureCanvasAgg
            FigureCanvasAgg(fig)
            buf = io.BytesIO()
            fig.savefig(buf, format="png", bbox_inches="tight", facecolor="white")
            fig = buf.getvalue()
        if not isinstance(fig, (bytes, bytearray)):
            raise ConfigError(f"robustness_curve_figure returned {type(fig).__name__}, not PNG bytes")
    except Exception as e:
        msg = f"robustness curves could not be drawn ({type(e).__name__}: {e})"
        notes.append(msg)
        return f'<p class="note off">{esc(msg)}</p>', {"shown": False}
    return (img(bytes(fig), "robustness curves of both runs", cls="plot")
            + '<p class="caption">Robustness curves of run A and run B (perturb/).</p>',
            {"shown": True})


def _depth(a: Run, b: Run, ids: pd.Series, notes: list) -> tuple[str, dict]:
    if not all((r.path / "depth" / "depth.parquet").exists() for r in (a, b)):
        msg = "prediction depth: not computed for both runs; run `hardprobe depth` on each"
        notes.append(msg)
        return f'<p class="note off">{esc(msg)}</p>', {"shown": False}
    da, db = (pd.read_parquet(r.path / "depth" / "depth.parquet",
                              columns=["id", "prediction_depth"]).set_index("id")
              ["prediction_depth"] for r in (a, b))
    sa, sb = (read_json(r.path / "depth" / "summary.json") for r in (a, b))
    common = ids[ids.isin(da.index) & ids.isin(db.index)]
    x, y = da.loc[common].to_numpy(float), db.loc[common].to_numpy(float)
    La, Lb = sa["n_layers"], sb["n_layers"]
    d = {"shown": True, "n": len(common), "n_layers_a": La, "n_layers_b": Lb,
         "spearman": spearman(x, y),
         "mean_relative_depth_a": float(np.mean(x / La)) if len(x) else None,
         "mean_relative_depth_b": float(np.mean(y / Lb)) if len(y) else None}
    split = next((s for s in ("test", "train") if s in sa["knn_accuracy"] and
                  s in sb["knn_accuracy"]), None)
    out = kv_table([("examples covered by both", fmt(len(common))),
                    ("Spearman of the depths", fmt(d["spearman"]["rho"])),
                    ("mean depth / layers, A", fmt(d["mean_relative_depth_a"])),
                    ("mean depth / layers, B", fmt(d["mean_relative_depth_b"]))])
    if split is not None:
        out += img(_depth_png({"A": sa["knn_accuracy"][split], "B": sb["knn_accuracy"][split]},
                              split), "kNN accuracy per layer", cls="plot")
    return out + ('<p class="caption">Depth = first layer from which every kNN probe agrees '
                  "with the model's prediction (relative: divided by the number of probed "
                  "layers, which never settle at 1).</p>"), d


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
    thr = [ov.loc[ov["group"].isin([*gs, "both"]), c].min() if s["n_top"] else None
           for gs, c in ((["only_a"], "hardness_a"), (["only_b"], "hardness_b"))]
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
