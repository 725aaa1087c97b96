"""One self-contained HTML page about a run: `write_report(run_dir)` -> RUN_DIR/report.html.

Every picture is an embedded base64 PNG, the CSS is inline, there is no script and no
request to anything outside the file, so the page can be mailed or archived as it is.
The optional stages (RUN_DIR/explain/, RUN_DIR/similarity/) are shown when present and
named, with the command that makes them, when absent; the fine-tuning section only appears
when RUN_DIR/finetune/ exists. At any run size the page stays
bounded: grids show the top N, tables at most `max_rows` rows with a "showing N of M" note.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.io import atomic_write_text
from ..errors import ConfigError
from ..rundir.layout import HEAD_ORDER, require
from ..rundir.run import Run, load_run
from . import plots, sections
from .caveats import upper_bound, upper_bound_text
from .template import esc, fmt, img, kv_table, messages, page, pct, table, truncation_note

SECTIONS = [("why", "Why"), ("summary", "Summary"), ("accuracy", "Accuracy"),
            ("confusion", "Confusion"),
            ("reliability", "Reliability"), ("hardness", "Hardness"), ("hardest", "Hardest"),
            ("pairs", "Confused pairs"), ("map", "Map"), ("per-class", "Per class"),
            ("label-issues", "Label-issue candidates"), ("robustness", "Robustness"),
            ("duplicates", "Duplicates"), ("finetune", "Fine-tuning")]
OPTIONAL = {"finetune": "finetune"}  # section id -> the run folder it needs to be shown at all
OPTIONAL_COLUMNS = {"duplicates": "duplicate_group"}  # section id -> the column it needs
THUMB = sections.THUMB  # display size (px) of example thumbnails


def write_report(run_dir, *, top: int = 24, max_rows: int = 200, out=None) -> Path:
    """Write one self-contained HTML report of a run; returns its path.

    top: hardest examples shown as a grid; max_rows: rows per table at most.
    out: the file to write (a directory gets report.html inside); default RUN_DIR/report.html.
    """
    if top < 0 or max_rows < 1:
        raise ConfigError(f"top must be >= 0 and max_rows >= 1, got top={top}, max_rows={max_rows}")
    ctx = Context(load_run(run_dir), top=top, max_rows=max_rows)
    shown = [(s, b) for s, b in zip(SECTIONS, BUILDERS)
             if (s[0] not in OPTIONAL or (ctx.run.path / OPTIONAL[s[0]]).is_dir())
             and (s[0] not in OPTIONAL_COLUMNS or OPTIONAL_COLUMNS[s[0]] in ctx.ex.columns)]
    # the summary last: it lists the problems met while building the other sections
    parts = {sid: build(ctx) for (sid, _), build in reversed(shown)}
    nav = [s for s, _ in shown]
    body = "\n".join(f'<section id="{sid}"><h2>{esc(title)}</h2>\n{parts[sid]}</section>'
                     for sid, title in nav)
    prov = ctx.prov
    title = (f"hardprobe report — {prov.get('backbone', {}).get('name', '?')} on "
             f"{prov.get('dataset', {}).get('name', '?')}")
    html = page(title, f"run {ctx.run.path} · created {prov.get('created', '?')}", nav, body,
                pages=(("explorer.html", "Explorer: every example"),))  # hardprobe explore
    path = Path(out) if out is not None else ctx.run.path / "report.html"
    if path.is_dir():
        path = path / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, html)
    return path


class Context:
    """What the sections share: the run's tables, the optional stages, decoded images."""

    def __init__(self, run: Run, *, top: int, max_rows: int):
        self.run, self.top, self.max_rows = run, top, max_rows
        self.ex = run.examples
        self.metrics = run.metrics
        require(self.ex.columns if self.metrics.get("heads") else (), "report")
        self.prov = run.provenance
        self.names = [str(c) for c in run.class_names]
        hm = self.metrics["heads"]
        self.heads = [h for h in HEAD_ORDER if h in hm] + [h for h in hm if h not in HEAD_ORDER]
        self.primary = self.heads[0]
        splits = list(dict.fromkeys(self.ex["split"]))
        self.split = "test" if "test" in splits else next((s for s in splits if s != "train"),
                                                           splits[0])
        self.splits = splits
        self.eval = self.ex[self.ex["split"] == self.split]
        self.hardest = self.eval.sort_values("hardness", ascending=False, kind="stable").head(top)
        self.problems: list[str] = []
        self.explain = self._optional("explain", _load_explain)
        self.sim = self._optional("similarity", _load_similarity)
        self._images: dict[str, np.ndarray | None] = {}
        self._dataset_ok: bool | None = None

    def _optional(self, stage: str, loader):
        d = self.run.path / stage
        if not d.is_dir():
            return None
        try:
            return loader(d)
        except Exception as e:  # a broken optional stage must not sink the whole report
            msg = f"{stage}/ could not be read ({type(e).__name__}: {e}); shown as not computed"
            warnings.warn(msg, stacklevel=3)
            self.problems.append(msg)
            return None

    def name(self, k) -> str:
        k = int(k)
        return self.names[k] if 0 <= k < len(self.names) else str(k)

    def head_metrics(self, head: str, split: str | None = None) -> dict:
        return self.metrics["heads"].get(head, {}).get(split or self.split, {})

    def image(self, ex_id: str) -> np.ndarray | None:
        """(H, W, 3) uint8 of an example, from its dataset; else the explain view; else None."""
        if ex_id not in self._images:
            self._images[ex_id] = self._decode(ex_id)
        return self._images[ex_id]

    def _decode(self, ex_id: str):
        if self._dataset_ok is None:
            try:
                self.run.dataset()
                self._dataset_ok = True
            except Exception as e:
                self._dataset_ok = False
                self.problems.append(f"the dataset's images could not be opened ({e}); "
                                     "thumbnails come from explain/ where it has them")
        if self._dataset_ok:
            try:
                return plots.to_hwc(self.run.images([ex_id])[0])
            except Exception:
                pass
        if self.explain is not None and ex_id in self.explain["index"]:
            return self.explain["images"][self.explain["index"][ex_id]]
        return None

    def thumb(self, ex_id: str, size: int = THUMB, alt: str = "") -> str:
        a = self.image(ex_id)
        return img(None if a is None else plots.thumbnail(a, size), alt or ex_id, cls="px",
                   width=size if a is None else None)


# ---------------------------------------------------------------- optional stages
def _load_explain(d: Path) -> dict:
    with np.load(d / "cams.npz", allow_pickle=False) as z:
        ids = [str(i) for i in z["ids"]]
        data = {k: z[k] for k in ("images", "given", "pred", "given_class", "pred_class")}
    data["ids"], data["index"] = ids, {i: k for k, i in enumerate(ids)}
    stats = d / "cam_stats.parquet"
    data["stats"] = pd.read_parquet(stats) if stats.exists() else None
    meta = d / "meta.json"
    data["meta"] = json.loads(meta.read_text()) if meta.exists() else {}
    return data


def _load_similarity(d: Path) -> dict:
    out = {}
    for key, name, read in [
            ("neighbors", "neighbors.parquet", pd.read_parquet),
            ("centroid", "centroid_similarity.csv", lambda p: pd.read_csv(p, index_col=0)),
            ("separation", "class_separation.csv", pd.read_csv),
            ("map", "map2d.parquet", pd.read_parquet),
            ("summary", "summary.json", lambda p: json.loads(p.read_text()))]:
        p = d / name
        out[key] = read(p) if p.exists() else None
    if all(v is None for v in out.values()):
        raise FileNotFoundError(f"none of the similarity files is in {d}")
    return out


# ---------------------------------------------------------------- sections
def summary(ctx: Context) -> str:
    p, m = ctx.prov, ctx.metrics
    bb, ds = p.get("backbone", {}), p.get("dataset", {})
    sizes = ", ".join(f"{esc(s)} {fmt(int((ctx.ex['split'] == s).sum()))}" for s in ctx.splits)
    times = [_seconds("extract", p.get("extract_seconds")),
             _seconds("classify", m.get("classify_seconds"))]
    if ctx.explain:
        times.append(_seconds("explain", ctx.explain["meta"].get("seconds")))
    if ctx.sim and ctx.sim["summary"]:  # {"neighbors": .., "map": .., "total": ..}
        times.append(_seconds("similarity", ctx.sim["summary"].get("seconds")))
    pairs = [
        ("model", f"<b>{esc(bb.get('name', '?'))}</b> · embedding {fmt(bb.get('embed_dim'))}-d"
                  f" · CAM layer <code>{esc(p.get('cam_layer'))}</code>"),
        ("weights", f"<code>{esc(bb.get('weights', '?'))}</code>"),
        ("dataset", f"{esc(ds.get('name', '?'))} · {len(ctx.names)} classes: "
                    f"{esc(', '.join(ctx.names[:30]))}{' …' if len(ctx.names) > 30 else ''}"),
        ("split sizes", sizes),
        ("skipped images", _skipped(ctx.run.path)),
        ("dataset digests", "<br>".join(f"{esc(s)}: <code>{esc(str(v.get('manifest', ''))[:16])}"
                                        f"</code> ({esc(v.get('root', ''))})"
                                        for s, v in ds.get("splits", {}).items())),
        ("heads", f"{esc(', '.join(ctx.heads))} · primary <b>{esc(ctx.primary)}</b> · label "
                  f"issues from <b>{esc(m.get('label_issue_head', '?'))}</b>"),
        ("device", esc(p.get("device", "?"))),
        ("versions", esc(f"hardprobe {p.get('hardprobe')} · python {p.get('python')} · torch "
                         f"{p.get('torch')} · {p.get('platform')}")),
        ("created", esc(p.get("created", "?"))),
        ("times", esc(" · ".join(times))),
        ("explain", "computed" if ctx.explain else "not computed"),
        ("similarity", "computed" if ctx.sim else "not computed"),
    ]
    if m.get("planted_noise"):
        labels = ctx.run.config.labels  # --labels FILE: another label set, not planted flips
        pairs.insert(5, ("labels from " + esc(Path(labels).name) if labels
                         else "planted label noise",
                         _planted(m["planted_noise"], labels) + upper_bound(m)))
    if upper_bound_text(m):
        pairs.insert(5, ("features trained on train", esc(m["features_trained_on_train"].get(
            "reason", "")) + upper_bound(m)))
    warns = list(m.get("warnings", [])) + ctx.problems
    if ctx.explain:
        warns += [f"explain: {w}" for w in ctx.explain["meta"].get("warnings", [])]
    notes = list(m.get("notes", []))
    if ctx.sim and ctx.sim["summary"]:
        notes += [f"similarity: {n}" for n in ctx.sim["summary"].get("notes", [])]
    out = kv_table(pairs)
    if warns:
        out += f'<h3>Warnings</h3><div class="note">{messages(warns)}</div>'
    if notes:
        out += f"<h3>Notes</h3>{messages(notes)}"
    cfg = ctx.run.path / "config.yaml"
    if cfg.exists():
        out += (f"<details><summary>configuration (config.yaml)</summary><pre>"
                f"{esc(cfg.read_text())}</pre></details>")
    return out


def accuracy(ctx: Context) -> str:
    header = ["head"] + [f"{s} {w}" for s in ctx.splits for w in ("accuracy", "ECE")]
    caveat = upper_bound_text(ctx.metrics)
    rows = []
    for h in ctx.heads:
        cells = [esc(h) + (" <span class=muted>(primary)</span>" if h == ctx.primary else "")]
        for s in ctx.splits:
            hm = ctx.head_metrics(h, s)
            cells += [pct(hm.get("accuracy")), fmt(hm.get("ece"))]
        rows.append(cells)
    if caveat:  # the figures themselves: train accuracy and ECE are upper bounds
        header = [f"{h} ({caveat})" if h.startswith("train ") else h for h in header]
    return (table(header, rows, num_cols=range(1, len(header))) +
            '<p class="caption">ECE: expected calibration error over 15 equal-width confidence '
            "bins (lower = better calibrated). Train scores are out-of-sample for knn and linear"
            " (see notes)" + (f"{upper_bound(ctx.metrics)}: the backbone was trained on the "
                              "train split's labels, so holding out only the head leaves them "
                              "optimistic" if caveat else "") + ".</p>")


def confusion(ctx: Context) -> str:
    cm = ctx.head_metrics(ctx.primary).get("confusion_matrix")
    if not cm:
        return '<p class="note off">no confusion matrix in metrics.json</p>'
    png = plots.confusion_heatmap(cm, ctx.names, title=f"{ctx.primary} head on {ctx.split}")
    note = ("" if len(ctx.names) <= plots.ANNOTATE_CLASSES else
            " Counts are not written in the cells above 20 classes"
            + (", nor class names on the axes above 40." if len(ctx.names) > 40 else "."))
    return (img(png, "confusion matrix", cls="plot") +
            f'<p class="caption">Primary head <b>{esc(ctx.primary)}</b> (model, else linear, '
            f"else knn) on the {esc(ctx.split)} split. Rows: given label; columns: prediction; "
            f"colour: share of the row; numbers: counts.{note}</p>")


def reliability(ctx: Context) -> str:
    tables = {h: ctx.head_metrics(h)["reliability"] for h in ctx.heads
              if ctx.head_metrics(h).get("reliability")}
    if not tables:
        return '<p class="note off">no reliability bins in metrics.json</p>'
    eces = {h: ctx.head_metrics(h).get("ece") for h in tables}
    ece_txt = ", ".join(f"{esc(h)} {fmt(e)}" for h, e in eces.items())
    return (img(plots.reliability_diagram(tables, eces), "reliability diagram", cls="plot") +
            f'<p class="caption">Heads on the {esc(ctx.split)} split; points below the diagonal '
            f"are over-confident. ECE: {ece_txt}. Lower panel: share of examples per bin.</p>")


def hardness(ctx: Context) -> str:
    """The histogram of the table's hardness column, and classify's figures per split."""
    vals = {s: ctx.ex.loc[ctx.ex["split"] == s, "hardness"].to_numpy() for s in ctx.splits}
    rows = []
    for s in ctx.splits:
        m = ctx.metrics.get("summary", {}).get(s, {})
        h, n, issues = m.get("hardness", {}), m.get("n"), m.get("label_issue")
        rows.append([esc(s), fmt(n), fmt(h.get("mean")), fmt(h.get("median")), fmt(h.get("q90")),
                     fmt(issues) + upper_bound(ctx.metrics, s),
                     pct(None if issues is None else issues / max(n, 1))])
    return (img(plots.hardness_histogram(vals), "hardness histogram", cls="plot") +
            table(["split", "examples", "mean hardness", "median", "90th pct",
                   "label-issue candidates",
                   "share flagged"], rows, num_cols=range(1, 7)) +
            '<p class="caption">hardness = mean of (1 − mean over heads of the probability of '
            "the given label) and the kNN disagreement, in [0, 1]; higher = harder.</p>")


def hardest(ctx: Context) -> str:
    n = len(ctx.eval)
    head = truncation_note(len(ctx.hardest), n, f"{ctx.split} examples")
    head += (f'<p class="caption">The hardest {esc(ctx.split)} examples first. Labels: given → '
             f"predicted by the primary head (<b>{esc(ctx.primary)}</b>); a red frame marks a "
             "label-issue candidate (cleanlab's flag, not a verdict); each card names its "
             "diagnosed cause and the evidence.</p>")
    head += sections.explain_header(ctx) + sections.similarity_header(ctx)
    cards = "".join(sections.example_card(ctx, r, k + 1) for k, (_, r) in
                    enumerate(ctx.hardest.iterrows()))
    return head + f'<div class="grid">{cards}</div>'


def robustness(ctx: "Context") -> str:
    from .perturb_section import perturb_section
    return perturb_section(ctx.run, max_rows=ctx.max_rows)


def duplicates(ctx: "Context") -> str:
    from .duplicates_section import duplicates_section
    return duplicates_section(ctx)


def finetune(ctx: "Context") -> str:
    from .finetune_section import finetune_section
    return finetune_section(ctx)


def why(ctx: "Context") -> str:
    from .why_section import why_section
    return why_section(ctx)


BUILDERS = [why, summary, accuracy, confusion, reliability, hardness, hardest, sections.pairs,
            sections.map_section, sections.per_class, sections.label_issues, robustness,
            duplicates, finetune]
__all__ = ["write_report", "Context", "SECTIONS"]


def _planted(d: dict, labels_file: str | None = None) -> str:
    """--label-noise or --labels: how many train labels differ from the originals and how many
    of them label_issue caught."""
    def pct(v):
        return "—" if v is None else f"{100 * v:.1f}%"
    how = (f"differ from the originals in {esc(labels_file)}" if labels_file
           else "flipped on purpose")
    return (f"<b>{fmt(d['planted'])}</b> of {fmt(d['n'])} train labels {how} "
            f"(<code>planted_noise</code>); <code>label_issue</code> caught {fmt(d['caught'])}: "
            f"recall {pct(d.get('recall'))}, precision {pct(d.get('precision'))} (base rate "
            f"{pct(d.get('base_rate'))}), AUROC of −label_quality {fmt(d.get('auroc'), 3)}")


def _seconds(stage: str, v) -> str:
    """'stage 12.3 s', or for a {part: seconds} dict 'stage 17.2 s (neighbors 0.4 s, map
    16.0 s)' with the total from "total" (else the sum of the parts). Plain text: escape it."""
    if not isinstance(v, dict):
        return f"{stage} {fmt(v, 1)} s"
    parts = {k: x for k, x in v.items() if k != "total" and isinstance(x, (int, float))}
    total = v.get("total", sum(parts.values()) if parts else None)
    inner = ", ".join(f"{k} {fmt(x, 1)} s" for k, x in parts.items())
    return f"{stage} {fmt(total, 1)} s" + (f" ({inner})" if inner else "")


def _skipped(run_dir: Path) -> str:
    """How many images could not be decoded (listed in skipped.csv), for the summary."""
    path = Path(run_dir) / "skipped.csv"
    if not path.exists():
        return "—"
    n = len(pd.read_csv(path))
    return "none" if n == 0 else f"<b>{n}</b> undecodable, listed in <code>skipped.csv</code>"
