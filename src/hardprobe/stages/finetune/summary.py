"""RUN_DIR/finetune/summary.json: what the fine-tuning stage found, in numbers.

Accuracy before (the run's heads, from metrics.json) and after (the fine-tuned model's
predictions), per-job training curves, region counts, AUM thresholds, the comparison of the
frozen-feature hardness with training-dynamics hardness, and, when the run's table has a
`planted_noise` column (labels flipped on purpose), how many of those flips AUM and the frozen
`label_issue` catch, also at matched numbers of flags.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ...core.stats import rank_correlation
from ...scoring import dynamics
from ...scoring.scores import detection


def summarize(run, opts: dict, per_ex: pd.DataFrame, train: pd.DataFrame, jobs: dict,
              verdict: dict, errors: list[str], in_sample: bool, use_model_head: bool,
              seconds: float, no_home: int = 0) -> dict:
    ex = run.examples
    keep = [c for c in ("id", "label", "hardness", "label_issue", "label_quality",
                        "planted_noise", "clean_label") if c in ex.columns]
    t = per_ex.merge(ex[keep], on="id", how="left", sort=False)
    tr, te = t[t["split"] == "train"], t[t["split"] == "test"]
    dyn = tr[tr["ft_confidence"].notna()]
    notes = ["train predictions are " + ("IN-SAMPLE (each from the first AUM run that trained "
                                          "the example under its given label; pass folds=K for "
                                          "out-of-sample ones)" if in_sample else
                                          f"out-of-fold ({opts['folds']} folds)"),
             "dynamics from the training forward passes (augmented inputs in the image "
             "modes), per example from its home run: the first run in which it trained with "
             "its own label",
             "AUM threshold: the 99th percentile of the threshold samples' AUM in each run; "
             "flag = AUM below the home run's threshold"]
    if no_home:
        notes.append(f"{no_home} train examples were AUM threshold samples (trained under the "
                     "fake label) in every run: their ft_prob_true, ft_pred and ft_hardness are "
                     "NaN and accuracy_after.train leaves them out (aum_runs=2 or folds=K "
                     "predicts them)")
    if errors:
        notes.append(f"{len(errors)} image(s) could not be decoded and were left out, e.g. "
                     f"{errors[0]}")
    return {
        "options": opts, "head": "model's own classifier" if use_model_head else "new",
        "n_train": int(len(tr)), "n_test": int(len(te)),
        "n_train_split": int((ex["split"] == "train").sum()),
        "train_in_sample": bool(in_sample),
        "accuracy_before": _before(run.metrics),
        "accuracy_after": {"test": _acc(te), "train": _acc(tr)},
        "train_without_prediction": int(no_home),
        "jobs": jobs,
        "regions": {r: int((dyn["ft_region"] == r).sum()) for r in dynamics.REGIONS},
        "region_rule": {"variability_quantile": dynamics.VARIABILITY_QUANTILE,
                        "variability_cut": (float(np.quantile(dyn["ft_variability"],
                                                              dynamics.VARIABILITY_QUANTILE))
                                            if len(dyn) else None),
                        "confidence_threshold": dynamics.CONFIDENCE_THRESHOLD},
        "aum": {"percentile": dynamics.AUM_PERCENTILE,
                "thresholds": verdict["thresholds"].tolist(),
                "with_verdict": int(verdict["has_verdict"].sum()),
                "flagged": int(verdict["flag"].sum()),
                "mean_aum": _mean(dyn["ft_aum"])},
        "forgetting": {"mean": _mean(dyn["ft_forgetting"].astype(float)),
                       "never_learned": int(dyn["ft_never_learned"].fillna(False).sum()),
                       "never_forgotten": int(((dyn["ft_forgetting"] == 0)
                                               & ~dyn["ft_never_learned"]).sum())},
        "comparison": _comparison(tr, te),
        "planted_noise": planted_noise_catch(tr),
        "skipped_images": len(errors),
        "seconds": round(seconds, 2), "notes": notes,
    }


def _before(metrics: dict) -> dict:
    return {h: {s: v.get("accuracy") for s, v in per.items()}
            for h, per in metrics.get("heads", {}).items()}


def _acc(t: pd.DataFrame):
    ok = t["ft_pred"].notna()
    return float((t.loc[ok, "ft_pred"].astype(int) == t.loc[ok, "label"]).mean()) if ok.any() \
        else None


def _mean(s: pd.Series):
    s = pd.to_numeric(s, errors="coerce").dropna()
    return float(s.mean()) if len(s) else None


def _comparison(tr: pd.DataFrame, te: pd.DataFrame) -> dict:
    """Spearman of the frozen-feature hardness with dynamics hardness, and the overlap of the
    frozen label_issue flags with AUM's flags (train examples with an AUM verdict)."""
    if "hardness" not in tr:
        return {"note": "the run has no frozen hardness (run `hardprobe classify`)"}
    h = tr["hardness"].to_numpy(float)
    out = {"train": {
        "hardness_vs_1_minus_confidence": rank_correlation(h, 1 - tr["ft_confidence"]),
        "hardness_vs_neg_aum": rank_correlation(h, -tr["ft_aum"].to_numpy(float)),
        "hardness_vs_ft_hardness": rank_correlation(h, tr["ft_hardness"])}}
    if len(te) and "hardness" in te:
        out["test"] = {"hardness_vs_ft_hardness": rank_correlation(te["hardness"],
                                                                   te["ft_hardness"])}
    if "label_issue" in tr:
        v = tr[tr["ft_aum_flag"].notna()]
        a = v["ft_aum_flag"].astype(bool).to_numpy()
        li = v["label_issue"].fillna(False).astype(bool).to_numpy()
        out["flag_overlap"] = {"n": int(len(v)), "both": int((a & li).sum()),
                               "aum_only": int((a & ~li).sum()),
                               "label_issue_only": int((~a & li).sum()),
                               "neither": int((~a & ~li).sum())}
    return out


def _lowest(score: np.ndarray, k: int) -> np.ndarray:
    """The k lowest scores (ties by position) as a mask."""
    m = np.zeros(len(score), bool)
    m[np.argsort(score, kind="stable")[:k]] = True
    return m


def planted_noise_catch(tr: pd.DataFrame) -> dict | None:
    """Share of planted label flips caught by AUM and by the frozen label_issue, on the train
    examples that have an AUM verdict; also at matched flag counts (the k examples of lowest
    label_quality against AUM's k flags, and the k of lowest AUM against label_issue's k).
    None when the run has no planted_noise column or no AUM verdicts."""
    if "planted_noise" not in tr:
        return None
    v = tr[tr["ft_aum_flag"].notna()]
    if not len(v):
        return None
    truth = v["planted_noise"].fillna(False).astype(bool).to_numpy()
    aum = v["ft_aum"].to_numpy(float)
    aum_flag = v["ft_aum_flag"].astype(bool).to_numpy()
    out = {"n": int(len(v)), "planted": int(truth.sum()), "base_rate": float(truth.mean()),
           "aum": detection(truth, aum_flag, -aum)}  # score: higher = more suspect
    if "label_issue" in v:
        li = v["label_issue"].fillna(False).astype(bool).to_numpy()
        quality = v["label_quality"].to_numpy(float) if "label_quality" in v else None
        out["label_issue"] = detection(truth, li, None if quality is None else -quality)
        k_aum, k_li = int(aum_flag.sum()), int(li.sum())
        matched = {"at_aum_count": {"k": k_aum, "aum": out["aum"]},
                   "at_label_issue_count": {"k": k_li, "label_issue": out["label_issue"],
                                            "aum": detection(truth, _lowest(aum, k_li))}}
        if quality is not None:
            matched["at_aum_count"]["label_quality"] = detection(truth, _lowest(quality, k_aum))
        out["matched"] = matched
    return out
