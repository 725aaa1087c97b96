"""The report's opening "Why" section: what the diagnose stage concluded (counts per cause and
class, label-error candidates against confident learning's estimate, with --soft-labels the
model-hard x human-hard 2x2, examples of each cause)
and, when RUN_DIR/slices/ exists, the slices where the model fails. It reads columns, the
"diagnose" entry of metrics.json (or diagnose/summary.json) and slices/slices.json; it
computes nothing."""
from __future__ import annotations

import json

from .template import esc, fmt, not_computed, pct, table, truncation_note

MODES = ("label_error", "low_quality", "ambiguous", "atypical", "model_error", "fragile",
         "unknown", "correct")
MEANING = {
    "label_error": "the given label is probably wrong: several out-of-sample signals name the "
                   "same other class, none the given one, and the image is an outlier of its "
                   "class but ordinary in the other",
    "low_quality": "an image-statistics outlier (dark, overexposed, low contrast, blurry, low "
                   "information, odd size) against the train split's fences",
    "ambiguous": "two classes share the probability and the neighbours",
    "atypical": "rare for its class: sparser than most of the class's train examples",
    "model_error": "the evidence supports the given label but the model predicts another: the "
                   "model's own failure",
    "fragile": "right on the clean image, wrong under the mildest corruption",
    "unknown": "wrong, and no rule explains it with the evidence at hand",
    "correct": "right, and none of the above",
}
N_EXAMPLES = 6


def _summary(ctx) -> dict | None:
    d = ctx.metrics.get("diagnose")
    if d:
        return d
    p = ctx.run.path / "diagnose" / "summary.json"
    return json.loads(p.read_text()) if p.exists() else None


def why_section(ctx) -> str:
    d = _summary(ctx)
    if d is None or "failure_mode" not in ctx.ex:
        return not_computed("diagnose", str(ctx.run.path)).replace(
            "</p>", " · a cause (label error, ambiguous, atypical, model error, …) for every "
                    "example appears here.</p>")
    return (_counts(ctx, d) + _label_errors(d) + _human_vs_model(ctx, d) + _per_class(ctx, d)
            + _examples(ctx) + slices_part(ctx))


def _counts(ctx, d: dict) -> str:
    splits = list(d.get("counts", {}))
    rows = [[f"<b>{esc(m)}</b>", esc(MEANING[m])]
            + [fmt(d["counts"][s].get(m, 0)) for s in splits] for m in MODES]
    return (f'<p class="caption">One primary cause per example (failure_mode), the first rule '
            f"that holds in the order below; the primary head is <b>{esc(d.get('primary_head'))}"
            f"</b>{_models(d)}. Thresholds: {esc(_thresholds(d))}. Each example's evidence (the "
            "numbers behind its cause) is in the <code>evidence</code> column and on the cards "
            "of the hardest grid.</p>"
            + table(["cause", "meaning"] + [f"{s} examples" for s in splits], rows,
                    num_cols=range(2, 2 + len(splits))))


def _models(d: dict) -> str:
    m = d.get("models") or []
    return "" if len(m) < 2 else f"; consensus with {esc(', '.join(map(str, m[1:])))}"


def _thresholds(d: dict) -> str:
    t = d.get("thresholds", {})
    return (f"ambiguous odds ratio {t.get('ambiguous_ratio')}, atypical below the "
            f"{t.get('atypical_quantile')} density quantile of the class's train examples "
            f"(k={t.get('density_k')}), image fences Q1/Q3 ± {t.get('quality_fence')} IQR of "
            "train")


def _label_errors(d: dict) -> str:
    le = d.get("label_errors") or {}
    if not le:
        return ""
    rows = [[esc(s), fmt(v.get("candidates")), fmt(v.get("estimated_off_diagonal")),
             fmt(v.get("estimated_off_diagonal_calibrated")), fmt(v.get("diagnosed_label_error")),
             fmt(v.get("n"))] for s, v in le.items()]
    head = d.get("label_issue_head", "?")
    return ("<h3>Label errors: candidates, estimate, diagnosis</h3>"
            f'<p class="caption"><code>label_issue</code> marks cleanlab\'s <b>candidates</b> '
            f"(from the {esc(head)} head's out-of-sample probabilities), not verdicts. Confident "
            "learning's estimate of how many labels are wrong (off-diagonal of the confident "
            "joint, raw and calibrated) is an estimate too; the diagnosis keeps a candidate "
            "as <code>label_error</code> only when the other evidence agrees.</p>"
            + table(["split", "candidates (label_issue)", "estimated (confident joint)",
                     "estimated (calibrated)", "diagnosed label_error", "examples"], rows,
                    num_cols=range(1, 6)))


HARD_CELLS = {"both": ("yes", "yes"), "model_only": ("yes", "no"),  # (model-hard, human-hard);
              "people_only": ("no", "yes"), "neither": ("no", "no")}  # definitions: the entry's


def _human_vs_model(ctx, d: dict) -> str:
    """diagnose's human_vs_model entry (--soft-labels): the 2x2 of model-hard by human-hard
    with the stored example ids as thumbnails; '' without it."""
    from .sections import TINY
    h = d.get("human_vs_model")
    if not h:
        return ""
    rows = []
    for cell, (model, people) in HARD_CELLS.items():
        ids = (h.get("examples") or {}).get(cell, [])
        thumbs = "".join(ctx.thumb(str(i), TINY, alt=str(i)) for i in ids)
        rows.append([f"<b>{esc(cell)}</b>", esc(model), esc(people),
                     fmt(h.get("counts", {}).get(cell, 0)),
                     f'<div class="thumbs">{thumbs}</div>' if thumbs else ""])
    return ("<h3>Hard for the model, hard for people</h3>"
            f'<p class="caption">The {esc(h.get("split"))} examples the --soft-labels file '
            f"describes ({fmt(h.get('n'))}). Model-hard: {esc(h.get('model_hard'))}. "
            f"Human-hard: {esc(h.get('human_hard'))}. Hardest examples first.</p>"
            + table(["cell", "model-hard", "human-hard", "examples",
                     "e.g."], rows, num_cols=(3,)))


def _per_class(ctx, d: dict) -> str:
    pc = d.get("per_class", {}).get(ctx.split) or {}
    if not pc:
        return ""
    names = [n for n in ctx.names if n in pc][: ctx.max_rows]
    rows = [[esc(n)] + [fmt(pc[n].get(m, 0)) for m in MODES] for n in names]
    return (f"<h3>Per class ({esc(ctx.split)})</h3>" + truncation_note(len(names), len(pc),
                                                                     "classes")
            + table(["class", *MODES], rows, num_cols=range(1, len(MODES) + 1)))


def _examples(ctx) -> str:
    from .sections import TINY, _fig
    ev = ctx.eval
    out = f"<h3>Examples of each cause ({esc(ctx.split)}, hardest first)</h3>"
    for m in MODES[:-1]:
        sel = ev[ev["failure_mode"] == m].sort_values("hardness", ascending=False, kind="stable")
        if sel.empty:
            continue
        shown = sel.head(N_EXAMPLES)
        figs = "".join(_fig(ctx.thumb(str(r["id"]), TINY * 2, alt=str(r["id"])),
                            str(r["label_name"]), title=f"{r['id']}: {r['evidence']}")
                       for r in shown.to_dict("records"))
        out += (f'<div class="muted"><b>{esc(m)}</b>: {fmt(len(sel))} examples · '
                f'e.g. {esc(shown["evidence"].iloc[0])}</div><div class="thumbs">{figs}</div>')
    return out


def slices_part(ctx) -> str:
    """The slices of RUN_DIR/slices/slices.json (the slices stage's format), if present."""
    p = ctx.run.path / "slices" / "slices.json"
    if not p.exists():
        return ""
    try:
        slices = json.loads(p.read_text())
    except ValueError as e:
        ctx.problems.append(f"slices/slices.json could not be read ({e})")
        return ""
    if isinstance(slices, dict):
        slices = slices.get("slices", [])
    shown = slices[: ctx.max_rows]
    rows = [[esc(s.get("slice_id")), fmt(s.get("n")), pct(s.get("error_rate")),
             f"{pct(s.get('ci_low'))} – {pct(s.get('ci_high'))}", pct(s.get("class_error_rate")),
             esc(s.get("description", "")) + _slice_thumbs(ctx, s.get("slice_id"))]
            for s in shown]
    return ("<h3>Slices: where the model fails</h3>"
            '<p class="caption">Groups of examples whose held-out error rate (with its '
            "bootstrap interval) is clearly above their class's.</p>"
            + truncation_note(len(shown), len(slices), "slices")
            + table(["slice", "examples", "held-out error", "95% interval", "class error",
                     "description"], rows, num_cols=(1, 2, 4)))


def _slice_thumbs(ctx, slice_id) -> str:
    from .sections import TINY
    if "slice_id" not in ctx.eval or slice_id is None:
        return ""
    sel = ctx.eval[ctx.eval["slice_id"].astype(str) == str(slice_id)]
    sel = sel.sort_values("hardness", ascending=False, kind="stable").head(N_EXAMPLES)
    thumbs = "".join(ctx.thumb(str(i), TINY, alt=str(i)) for i in sel["id"])
    return f'<div class="thumbs">{thumbs}</div>' if thumbs else ""
