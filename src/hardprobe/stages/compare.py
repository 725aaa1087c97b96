"""Two runs on the same images, side by side: `hardprobe compare RUN_A RUN_B`.

compare_runs(run_a, run_b) computes and writes OUT (default RUN_A/compare_<name of RUN_B>/):
    summary.json     the numbers below and notes
    overlap.parquet  id, label, hardness_a, hardness_b, group (both | only_a | only_b |
                     neither), pred_a, pred_b (primary heads), label_issue_a, label_issue_b
The page OUT/compare.html is the report's: `hardprobe.report.compare.write_compare_html(OUT)`
renders it from these two files (and the runs' images, perturb/ and depth/ summaries).

Definitions, on one split (default "test"); examples are matched by id and both runs must hold
the same ids:
  * rank agreement of hardness: Spearman's rho and Kendall's tau-b (scipy), with p-values.
  * hard set of a run: its ceil(quantile * N) hardest examples (quantile 0.1 = the top 10 %).
    Examples tied at the cut-off (kNN hardness is often exactly 1) are taken in a seeded random
    order drawn independently for each run (`tie_seed`: from the run's classify stamp), never
    by row order, which would put the same tied rows in both sets; summary.json's
    groups.tied_at_cutoff says how many examples tie there, and a note says so when a tie
    straddles the cut-off ("both" among tied examples is then chance). both = in both hard
    sets, only_a / only_b = in one; if the runs were unrelated, |both| would be about
    n_top^2 / N (`expected_both`).
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

from ..core.cache import key_digest
from ..core.io import atomic_write, read_json, write_json
from ..core.stats import rank_correlation, spearman
from ..errors import ConfigError
from ..rundir.layout import primary_head, require
from ..rundir.run import Run, load_run

GROUPS = ("both", "only_a", "only_b", "neither")

__all__ = ["compare_runs", "align", "hard_groups", "tie_seed", "cohen_kappa", "jaccard"]


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


def hard_groups(h_a, h_b, quantile: float = 0.1, seeds=(0, 1)) -> tuple[np.ndarray, int]:
    """(group per example (N,) object array of GROUPS, n_top): the ceil(quantile * N) hardest of
    each run (higher hardness = harder; NaN never hard). Ties at the cut-off are broken by a
    random order drawn with seeds[0] for run A and seeds[1] for run B, so tied rows are not
    chosen alike in both runs merely because they come first in both tables."""
    h_a, h_b = np.asarray(h_a, float), np.asarray(h_b, float)
    if not 0 < quantile <= 1:
        raise ConfigError(f"quantile must be in (0, 1], got {quantile}")
    n_top = min(len(h_a), math.ceil(quantile * len(h_a) - 1e-9))

    def top(h, seed):
        m = np.zeros(len(h), bool)
        tiebreak = np.random.default_rng(seed).permutation(len(h))  # (N,) random ranks
        order = np.lexsort((tiebreak, -np.nan_to_num(h, nan=-np.inf)))  # hardness, then tiebreak
        m[order[:n_top]] = True
        return m
    a, b = top(h_a, seeds[0]), top(h_b, seeds[1])
    g = np.select([a & b, a, b], ["both", "only_a", "only_b"], "neither").astype(object)
    return g, n_top


def tied_at_cutoff(h, n_top: int) -> int:
    """How many examples share the hardness of the n_top-th hardest (0 when n_top is 0 or
    nothing ties there): those the tie-break chose among."""
    h = np.nan_to_num(np.asarray(h, float), nan=-np.inf)
    if n_top == 0 or n_top >= len(h):
        return 0
    cut = np.sort(h)[::-1][n_top - 1]
    tied = int((h == cut).sum())
    return tied if tied > 1 and (h > cut).sum() + tied > n_top else 0


def tie_seed(run: Run) -> int:
    """The run's tie-break seed: the first 8 hex digits of sha256 of its classify stamp
    (stages.json), else of its resolved path. Two runs with other heads or features get
    independent orders; the same run always the same one."""
    basis = run.stamps().get("classify") or str(Path(run.path).resolve())
    return int(key_digest({"compare_tie_break": basis})[:8], 16)


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
def compare_runs(run_a, run_b, *, out=None, split: str = "test",
                 quantile: float = 0.1) -> Path:
    """Compare two runs of the same images; writes OUT/summary.json and OUT/overlap.parquet
    (see the module docstring) and returns OUT. The page: report.compare.write_compare_html."""
    a = run_a if isinstance(run_a, Run) else load_run(run_a)
    b = run_b if isinstance(run_b, Run) else load_run(run_b)
    ea, eb = align(a, b, split)
    for r, e in ((a, ea), (b, eb)):
        require(e.columns, f"compare ({r.path})")
    out = Path(out) if out is not None else a.path / f"compare_{b.path.resolve().name}"
    notes: list[str] = []
    seeds = (tie_seed(a), tie_seed(b))
    group, n_top = hard_groups(ea["hardness"], eb["hardness"], quantile, seeds)
    head_a, head_b = primary_head(ea.columns), primary_head(eb.columns)
    ov = pd.DataFrame({"id": ea["id"], "label": ea["label"], "hardness_a": ea["hardness"],
                       "hardness_b": eb["hardness"].to_numpy(), "group": group,
                       "pred_a": ea[f"pred_{head_a}"], "pred_b": eb[f"pred_{head_b}"].to_numpy()})
    if (ea["label"].to_numpy() != eb["label"].to_numpy()).any():
        notes.append(f"{int((ea['label'].to_numpy() != eb['label'].to_numpy()).sum())} examples "
                     "have different labels in the two runs; labels and accuracies are run A's")
    s = {"run_a": str(a.path), "run_b": str(b.path), "model_a": _model(a), "model_b": _model(b),
         "split": split, "n": len(ov), "quantile": quantile, "n_top": n_top,
         "hardness": {"spearman": spearman(ov["hardness_a"], ov["hardness_b"]),
                      "kendall": _kendall(ov["hardness_a"], ov["hardness_b"])},
         "groups": _group_summary(ov, group, n_top, seeds, notes)}
    s["predictions"] = _predictions(ov, head_a, head_b)
    if "label_issue" in ea.columns and "label_issue" in eb.columns:
        ia = ea["label_issue"].fillna(False).astype(bool).to_numpy()
        ib = eb["label_issue"].fillna(False).astype(bool).to_numpy()
        ov["label_issue_a"], ov["label_issue_b"] = ia, ib
        s["label_issues"] = {"n_a": int(ia.sum()), "n_b": int(ib.sum()),
                             "both": int((ia & ib).sum()),
                             "agreement": float(np.mean(ia == ib)) if len(ov) else None,
                             "cohen_kappa": cohen_kappa(ia, ib), "jaccard": jaccard(ia, ib)}
    else:
        notes.append("label issues: not compared (a run has no label_issue column)")
    try:
        from .similarity import cka_runs
        s["cka"] = cka_runs(a, b, split)
    except Exception as e:  # missing features, constant features: the rest still stands
        s["cka"] = None
        notes.append(f"linear CKA not computed: {e}")
    s["robustness"] = _robustness(a, b, notes)
    s["depth"] = _depth(a, b, ov["id"], notes)
    s["notes"] = notes
    atomic_write(out / "overlap.parquet", lambda f: ov.to_parquet(f, index=False))
    write_json(out / "summary.json", s)
    return out


def _group_summary(ov: pd.DataFrame, group: np.ndarray, n_top: int, seeds, notes) -> dict:
    n = len(ov)
    tied = {r: tied_at_cutoff(ov[f"hardness_{r}"], n_top) for r in ("a", "b")}
    for r, t in tied.items():
        if t:
            notes.append(f"run {r.upper()}: {t} examples tie at the hard-set cut-off; the hard "
                         "set takes a seeded random share of them (tie_seed), so whether a tied "
                         "example is hard for both is chance")
    return {**{g: int((group == g).sum()) for g in GROUPS},
            "expected_both": n_top ** 2 / n if n else None,
            "jaccard": jaccard(np.isin(group, ["both", "only_a"]),
                               np.isin(group, ["both", "only_b"])),
            "tied_at_cutoff": tied,
            # the hardness of the easiest example in each hard set (None: empty hard set)
            **{f"cutoff_{r}": (float(ov.loc[np.isin(group, ["both", f"only_{r}"]),
                                            f"hardness_{r}"].min()) if n_top else None)
               for r in ("a", "b")},
            "tie_break": {"how": "seeded random order per run", "seed_a": int(seeds[0]),
                          "seed_b": int(seeds[1])}}


def _predictions(ov: pd.DataFrame, head_a: str, head_b: str) -> dict:
    n, y = len(ov), ov["label"].to_numpy()
    pa, pb = ov["pred_a"].to_numpy(), ov["pred_b"].to_numpy()
    return {"head_a": head_a, "head_b": head_b,
            "agreement": float(np.mean(pa == pb)) if n else None,
            "cohen_kappa": cohen_kappa(pa, pb),
            "accuracy_a": float(np.mean(pa == y)) if n else None,
            "accuracy_b": float(np.mean(pb == y)) if n else None,
            "both_wrong": int(((pa != y) & (pb != y)).sum())}


def _model(r: Run) -> str:
    try:
        return str(r.provenance.get("backbone", {}).get("name", "?"))
    except Exception:
        return "?"


def _robustness(a: Run, b: Run, notes: list) -> dict:
    """Which runs have perturb/ (the report draws both runs' curves from their summaries)."""
    have = [r.path.name for r in (a, b) if (r.path / "perturb").is_dir()]
    if len(have) < 2:
        notes.append((f"robustness curves: only {have[0]} has perturb/" if have else
                      "robustness curves: neither run has perturb/") + "; run `hardprobe perturb`")
    return {"available": len(have) == 2, "runs_with_perturb": have}


def _depth(a: Run, b: Run, ids: pd.Series, notes: list) -> dict:
    """Prediction depth of both runs on the examples both cover, and their kNN-accuracy-per-layer
    curves (the report draws them)."""
    if not all((r.path / "depth" / "depth.parquet").exists() for r in (a, b)):
        notes.append("prediction depth: not computed for both runs; run `hardprobe depth` on "
                     "each")
        return {"shown": False}
    da, db = (pd.read_parquet(r.path / "depth" / "depth.parquet",
                              columns=["id", "prediction_depth"]).set_index("id")
              ["prediction_depth"] for r in (a, b))
    sa, sb = (read_json(r.path / "depth" / "summary.json") for r in (a, b))
    common = ids[ids.isin(da.index) & ids.isin(db.index)]
    x, y = da.loc[common].to_numpy(float), db.loc[common].to_numpy(float)
    La, Lb = sa["n_layers"], sb["n_layers"]
    split = next((s for s in ("test", "train") if s in sa["knn_accuracy"] and
                  s in sb["knn_accuracy"]), None)
    return {"shown": True, "n": len(common), "n_layers_a": La, "n_layers_b": Lb,
            "spearman": spearman(x, y),
            "mean_relative_depth_a": float(np.mean(x / La)) if len(x) else None,
            "mean_relative_depth_b": float(np.mean(y / Lb)) if len(y) else None,
            "knn_accuracy_split": split,
            "knn_accuracy": None if split is None else {"A": sa["knn_accuracy"][split],
                                                        "B": sb["knn_accuracy"][split]}}
