"""`hardprobe why RUN_DIR ID`: one example's diagnosis as terminal text."""
from __future__ import annotations

import numpy as np

from ...errors import StageOrderError, UnknownExampleError
from ...heads import KNNClassifier
from ...rundir.layout import FIT_SPLIT, HEAD_ORDER, primary_head
from ...rundir.run import load_run

N_NEIGHBOURS = 8


def why(run_dir, example_id: str, *, neighbours: int = N_NEIGHBOURS) -> str:
    """Scores, cause, evidence, nearest train neighbours (label, cosine similarity; higher =
    closer) and slice of one example. Raises UnknownExampleError for an id not in the run."""
    run = load_run(run_dir)
    ex = run.examples
    if "failure_mode" not in ex:
        raise StageOrderError(f"{run.path} has no diagnosis; run `hardprobe diagnose "
                              f"{run.path}` first")
    hit = ex.index[ex["id"] == example_id]
    if not len(hit):
        close = [i for i in ex["id"] if str(example_id) in str(i)][:3]
        raise UnknownExampleError(f"no example {example_id!r} in {run.path}"
                                  + (f"; did you mean {', '.join(close)}?" if close else
                                     "; ids are the `id` column of examples.parquet"))
    r = ex.loc[hit[0]]
    names = run.class_names
    primary = primary_head(ex.columns)
    lines = [f"{r['id']}  ({r['split']})  given {r['label_name']}",
             f"cause: {r['failure_mode']}", f"evidence: {r['evidence']}", "scores:"]
    for h in HEAD_ORDER:
        if f"pred_{h}" in r:
            mark = " (primary)" if h == primary else ""
            lines.append(f"  {h:<7} predicts {names[int(r[f'pred_{h}'])]:<12} p(given) "
                         f"{r[f'prob_true_{h}']:.3f}  margin {r[f'margin_{h}']:+.3f}{mark}")
    extra = [f"{c} {r[c]:.3f}" if isinstance(r[c], float) else f"{c} {r[c]}"
             for c in ("hardness", "label_quality", "label_issue", "knn_disagreement",
                       "n_models_wrong", "n_models_agree_wrong", "hardness_rank_mean",
                       "human_p_given", "human_majority", "flip_severity", "prediction_depth")
             if c in r.index and r[c] == r[c]]
    lines.append("  " + " · ".join(extra))
    flags = [c.removeprefix("cause_") for c in ex.columns if c.startswith("cause_") and r[c]]
    lines.append(f"causes that hold: {', '.join(flags) or 'none'}")
    if "slice_id" in r.index and r["slice_id"] == r["slice_id"]:
        lines.append(f"slice: {r['slice_id']}")
    lines.append("nearest train neighbours (label · cosine similarity):")
    lines += _neighbour_lines(run, r, neighbours)
    return "\n".join(lines)


def _neighbour_lines(run, r, k: int) -> list[str]:
    tr = run.split_examples(FIT_SPLIT)
    rows = run.examples.index[run.examples["split"] == r["split"]]
    pos = int(np.flatnonzero(rows == r.name)[0])  # row within its split = feature row
    q = run.features(r["split"], mmap=True)[pos:pos + 1]
    self_row = pos if r["split"] == FIT_SPLIT else -1
    knn = KNNClassifier(k=min(k + 1, len(tr))).fit(run.features(FIT_SPLIT), tr["label"].to_numpy(),
                                                   n_classes=len(run.class_names))
    sims, idx = knn.kneighbors(np.array(q))  # a copy: the memory map is read-only
    out = []
    for s, j in zip(sims[0], idx[0]):
        if j == self_row or len(out) == k:
            continue
        n = tr.iloc[int(j)]
        mark = "" if n["label"] == r["label"] else "  (other label)"
        out.append(f"  {n['id']:<40} {n['label_name']:<12} {s:.3f}{mark}")
    return out
