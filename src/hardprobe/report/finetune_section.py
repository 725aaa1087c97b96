"""The report's fine-tuning section, from RUN_DIR/finetune/ (`hardprobe finetune RUN_DIR`).

Shown only when that folder exists: accuracy before (the frozen heads) and after fine-tuning,
the dataset-cartography plot (confidence against variability, coloured by correctness), the
AUM distribution, the comparison of frozen-feature hardness with training-dynamics hardness
(Spearman, flag overlap, planted-noise catch rates, all read from finetune/summary.json), and
the hardest train examples by training dynamics.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from . import plots
from .sections import TINY
from .template import esc, fmt, img, kv_table, messages, pct, table, truncation_note

OUT_DIR = "finetune"
REGION_COLORS = {"easy-to-learn": "#1a7f37", "ambiguous": "#9a6700", "hard-to-learn": "#cf222e"}


# ---------------------------------------------------------------- figures
@plots._figure
def cartography_plot(variability, confidence, correctness, *, noisy=None, rule=None,
                     title: str = "") -> Figure:
    """Swayamdipta et al.'s map: variability (x) against confidence (y), colour = correctness;
    planted label flips ringed; the region boundaries of `rule` dashed."""
    x, y = np.asarray(variability, float), np.asarray(confidence, float)
    c = np.asarray(correctness, float)
    fig = Figure(figsize=(6.4, 5.0))
    ax = fig.add_subplot()
    s = float(np.clip(5000.0 / max(len(x), 1), 2.0, 30.0))
    order = np.random.default_rng(0).permutation(len(x))
    m = ax.scatter(x[order], y[order], c=c[order], s=s, cmap="coolwarm_r", vmin=0, vmax=1,
                   alpha=0.75, linewidths=0, rasterized=True)
    if noisy is not None and np.any(noisy):
        noisy = np.asarray(noisy, bool)
        ax.scatter(x[noisy], y[noisy], s=max(3 * s, 25), facecolors="none", edgecolors="black",
                   linewidths=0.8, label=f"planted label flip ({int(noisy.sum()):,})")
        ax.legend(loc="upper right", fontsize=8, frameon=False)
    if rule and rule.get("variability_cut") is not None:
        cut, thr = rule["variability_cut"], rule.get("confidence_threshold", 0.5)
        ax.axvline(cut, ls="--", lw=0.9, color="#59636e")
        ax.plot([0, cut], [thr, thr], ls="--", lw=0.9, color="#59636e")
        for text, xy, color in (("easy-to-learn", (0.01, 0.97), "easy-to-learn"),
                                ("hard-to-learn", (0.01, 0.02), "hard-to-learn"),
                                ("ambiguous", (0.99, 0.5), "ambiguous")):
            ax.text(*xy, text, transform=ax.transAxes, fontsize=8, color=REGION_COLORS[color],
                    ha="right" if xy[0] > 0.5 else "left", va="top" if xy[1] > 0.9 else "bottom")
    ax.set_xlim(0, max(0.5, float(np.nanmax(x)) * 1.05 if len(x) else 0.5))
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("variability (std of p(given label) over epochs)")
    ax.set_ylabel("confidence (mean p(given label))")
    ax.set_title(title)
    fig.colorbar(m, ax=ax, fraction=0.046, pad=0.03, label="correctness (share of epochs)")
    return fig


@plots._figure
def aum_histogram(aum, flagged, thresholds, *, noisy=None) -> Figure:
    """AUM per train example; the per-run thresholds dashed; planted flips apart when known."""
    a = np.asarray(aum, float)
    fig = Figure(figsize=(6.0, 3.2))
    ax = fig.add_subplot()
    bins = np.linspace(np.nanmin(a), np.nanmax(a), 41) if len(a) and np.ptp(a) > 0 else 20
    groups = ([("clean label", ~np.asarray(noisy, bool), "#1f77b4"),
               ("planted flip", np.asarray(noisy, bool), "#d62728")] if noisy is not None
              else [("not flagged", ~np.asarray(flagged, bool), "#1f77b4"),
                    ("flagged", np.asarray(flagged, bool), "#d62728")])
    for label, sel, color in groups:
        if sel.any():
            ax.hist(a[sel], bins=bins, histtype="stepfilled", alpha=0.35, color=color,
                    label=f"{label} ({int(sel.sum()):,})")
    for k, t in enumerate(t for t in thresholds if t is not None):
        ax.axvline(t, ls="--", lw=1, color="black", label="threshold" if k == 0 else None)
    ax.set_xlabel("area under the margin (lower = more likely mislabelled)")
    ax.set_ylabel("examples")
    ax.legend(fontsize=8, frameon=False)
    return fig


# ---------------------------------------------------------------- section
def finetune_section(ctx) -> str:
    """HTML of the fine-tuning section (the caller shows it only when finetune/ exists)."""
    d = ctx.run.path / OUT_DIR
    try:
        s = json.loads((d / "summary.json").read_text())
    except Exception as e:  # interrupted or broken: say so, do not sink the report
        return (f'<p class="note off">finetune/summary.json could not be read '
                f"({esc(type(e).__name__)}: {esc(e)}): the fine-tune did not finish; rerun "
                f"<code>hardprobe finetune {esc(str(ctx.run.path))} --resume</code></p>")
    ex = ctx.ex
    tr = ex[(ex["split"] == "train") & ex.get("ft_confidence", pd.Series(np.nan, ex.index)).notna()]
    out = _overview(s) + _accuracy(s)
    if len(tr):
        noisy = tr["planted_noise"].fillna(False).to_numpy(bool) if "planted_noise" in tr else None
        o = s.get("options", {})
        out += ("<h3>Dataset cartography</h3>"
                + img(cartography_plot(tr["ft_variability"], tr["ft_confidence"],
                                       tr["ft_correctness"], noisy=noisy,
                                       rule=s.get("region_rule"),
                                       title=f"{len(tr):,} train examples, {o.get('epochs')} "
                                             f"epochs ({o.get('mode')})"),
                      "dataset cartography", cls="plot")
                + '<p class="caption">Each point is a train example: the mean (confidence) and '
                  "standard deviation (variability) over epochs of the probability its training "
                  "forward pass gave the given label; colour: share of epochs it was right. "
                  "Regions: " + esc(_regions_text(s)) + ".</p>")
        if tr["ft_aum"].notna().any():
            aum = tr[tr["ft_aum"].notna()]
            out += ("<h3>Area under the margin</h3>"
                    + img(aum_histogram(aum["ft_aum"], aum["ft_aum_flag"].fillna(False)
                                        .to_numpy(bool), s.get("aum", {}).get("thresholds", []),
                                        noisy=None if noisy is None else
                                        aum["planted_noise"].fillna(False).to_numpy(bool)),
                          "AUM histogram", cls="plot"))
    out += _comparison(s) + _noise(s) + _hardest(ctx, tr)
    return out


def _overview(s: dict) -> str:
    o = s.get("options", {})
    jobs = s.get("jobs", {})
    per = [f"{esc(k)} {fmt(v.get('seconds'), 1)} s" for k, v in jobs.items()]
    pairs = [
        ("mode", f"<b>{esc(o.get('mode'))}</b> · head: {esc(s.get('head'))} · "
                 f"{fmt(o.get('epochs'))} epochs · {esc(o.get('optimizer'))} lr "
                 f"{fmt(o.get('lr'), 4)} · batch {fmt(o.get('batch_size'))} · "
                 f"{esc(o.get('precision'))}"),
        ("train examples", f"{fmt(s.get('n_train'))} of {fmt(s.get('n_train_split'))}"
                           + (f" (stratified subset, seed {fmt(o.get('seed'))})"
                              if o.get("subset") else "")),
        ("train predictions", "in-sample" if s.get("train_in_sample") else
         f"out-of-fold ({fmt(o.get('folds'))} folds)"),
        ("jobs", esc(", ".join(jobs)) + f" · {' · '.join(per)} · total "
                                        f"{fmt(s.get('seconds'), 1)} s"),
    ]
    return kv_table(pairs) + (f"<h3>Notes</h3>{messages(s['notes'])}" if s.get("notes") else "")


def _accuracy(s: dict) -> str:
    before, after = s.get("accuracy_before", {}), s.get("accuracy_after", {})
    rows = [[esc(h), pct(v.get("test")), pct(v.get("train"))] for h, v in before.items()]
    rows.append([f"<b>fine-tuned ({esc(s.get('options', {}).get('mode'))})</b>",
                 f"<b>{pct(after.get('test'))}</b>", pct(after.get("train"))])
    return ("<h3>Accuracy before and after</h3>"
            + table(["model", "test accuracy", "train accuracy"], rows, num_cols=(1, 2))
            + '<p class="caption">Frozen-feature heads of the run (before) and the fine-tuned '
              "model (after); train accuracy against the given labels, "
              + ("in-sample" if s.get("train_in_sample") else "out-of-fold")
              + " for the fine-tuned model" + _no_prediction(s) + ".</p>")


def _no_prediction(s: dict) -> str:
    """Train examples left out of the fine-tuned train accuracy (AUM threshold samples in
    every run: no model trained them under their given label)."""
    n = s.get("train_without_prediction") or 0
    return (f"; {fmt(n)} train examples were threshold samples (fake label) in every AUM run: "
            "no prediction (NaN), left out of its train accuracy" if n else "")


def _regions_text(s: dict) -> str:
    r, rule = s.get("regions", {}), s.get("region_rule", {})
    counts = ", ".join(f"{k} {v:,}" for k, v in r.items())
    return (f"{counts}; ambiguous = variability at or above its "
            f"{100 * rule.get('variability_quantile', 2 / 3):.0f}th percentile "
            f"({fmt(rule.get('variability_cut'))}), otherwise easy-to-learn when confidence "
            f"≥ {fmt(rule.get('confidence_threshold'), 2)}, else hard-to-learn")


def _rho(r) -> str:
    if not isinstance(r, dict) or r.get("rho") is None:
        return "—"
    return f"{r['rho']:.3f} <span class=muted>(n {r.get('n', 0):,})</span>"


def _comparison(s: dict) -> str:
    c = s.get("comparison") or {}
    if "train" not in c:
        return ""
    t = c["train"]
    rows = [["1 − confidence (train)", _rho(t.get("hardness_vs_1_minus_confidence"))],
            ["−AUM (train)", _rho(t.get("hardness_vs_neg_aum"))],
            ["fine-tuned hardness (train)", _rho(t.get("hardness_vs_ft_hardness"))]]
    if "test" in c:
        rows.append(["fine-tuned hardness (test)", _rho(c["test"].get("hardness_vs_ft_hardness"))])
    out = ("<h3>Frozen-feature against training-dynamics hardness</h3>"
           + table(["frozen hardness vs", "Spearman ρ"], rows, num_cols=(1,)))
    ov = c.get("flag_overlap")
    if ov:
        out += table(["examples with an AUM verdict", "both flagged", "AUM only",
                      "label_issue only", "neither"],
                     [[fmt(ov["n"]), fmt(ov["both"]), fmt(ov["aum_only"]),
                       fmt(ov["label_issue_only"]), fmt(ov["neither"])]], num_cols=range(5))
    return out + ('<p class="caption">Positive ρ = the two agree on which examples are hard. '
                  "label_issue: the frozen heads' confident-learning flag; AUM: flagged below "
                  "its threshold.</p>")


def _noise(s: dict) -> str:
    p = s.get("planted_noise")
    if not p:
        return ""

    def row(name, r):
        return [esc(name), fmt(r.get("flagged")), fmt(r.get("caught")), pct(r.get("recall")),
                pct(r.get("precision"))]
    rows = [row("AUM", p["aum"])]
    if "label_issue" in p:
        rows.append(row("frozen label_issue", p["label_issue"]))
    m = p.get("matched", {})
    if "label_quality" in m.get("at_aum_count", {}):
        rows.append(row(f"frozen label_quality, lowest {m['at_aum_count']['k']:,}",
                        m["at_aum_count"]["label_quality"]))
    if "aum" in m.get("at_label_issue_count", {}):
        rows.append(row(f"AUM, lowest {m['at_label_issue_count']['k']:,}",
                        m["at_label_issue_count"]["aum"]))
    return ("<h3>Planted label flips</h3>"
            f'<p class="caption">{fmt(p["planted"])} of {fmt(p["n"])} train examples have a '
            f"label flipped on purpose (base rate {pct(p['base_rate'])}). Recall = share of "
            "flips caught; precision = share of flags that are flips; the last rows compare "
            "the two at the same number of flags.</p>"
            + table(["detector", "flagged", "flips caught", "recall", "precision"], rows,
                    num_cols=range(1, 5)))


def _hardest(ctx, tr: pd.DataFrame) -> str:
    if not len(tr) or not tr["ft_aum"].notna().any():
        return ""
    n = max(1, min(ctx.top or 24, ctx.max_rows))
    order = tr.assign(_nl=tr["ft_never_learned"].fillna(False).astype(bool))
    order = order.sort_values(["_nl", "ft_aum"], ascending=[False, True], kind="stable")
    shown = order.head(n)
    cols = ["image", "id", "given", "fine-tuned pred", "AUM", "flag", "confidence",
            "variability", "region", "forgetting", "frozen hardness", "label-issue candidate"]
    noisy = "planted_noise" in tr
    if noisy:
        cols.append("planted flip")
    rows = []
    for r in shown.to_dict("records"):
        row = [ctx.thumb(str(r["id"]), TINY), esc(r["id"]), esc(r["label_name"]),
               esc(ctx.name(r["ft_pred"])) if pd.notna(r["ft_pred"]) else "—",
               fmt(r["ft_aum"]), fmt(_b(r.get("ft_aum_flag"))), fmt(r["ft_confidence"]),
               fmt(r["ft_variability"]), esc(r["ft_region"]),
               "never learned" if _b(r.get("ft_never_learned")) else fmt(r["ft_forgetting"]),
               fmt(r.get("hardness")), fmt(_b(r.get("label_issue")))]
        if noisy:
            row.append(fmt(_b(r.get("planted_noise"))))
        rows.append(row)
    return ("<h3>Hardest by training dynamics</h3>"
            '<p class="caption">Train examples never learned first, then by lowest AUM.</p>'
            + truncation_note(len(shown), len(tr), "train examples")
            + table(cols, rows, num_cols=(4, 6, 7, 9, 10)))


def _b(v):
    return None if v is None or pd.isna(v) else bool(v)


__all__ = ["finetune_section", "cartography_plot", "aum_histogram"]
