"""The classify stage: fit the heads on the train split, score every example of every split
with out-of-sample probabilities, write the scores into the table and metrics.json."""
from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import RunConfig, load_config, save_config
from ..core.cache import key_digest
from ..core.device import default_num_workers, resolve_device
from ..core.io import write_json
from ..core.timing import StepTimes
from ..core.stats import softmax
from ..data.datasets import EXAMPLE_COLUMNS
from ..errors import ConfigError
from ..heads import KNNClassifier, LinearProbe, cross_val_predict_proba, fold_jobs
from ..rundir.heads import heads_current, save_heads, save_probs
from ..rundir.layout import FIT_SPLIT, STAGES
from ..rundir.run import Run, load_run
from ..scoring import scores
from . import duplicate_groups
from .extract.stage import check_fit_classes
from .extract.trained_on import UPPER_BOUND, run_flag

HEAD_KEYS = ("heads", "k", "temperature", "knn_weights", "knn_backend", "knn_index", "knn_nlist",
             "knn_nprobe", "linear_c", "folds", "issue_head", "seed", "label_noise",
             "labels", "labels_split", "duplicates")


def _classify_key(run: Run, cfg: RunConfig) -> str:
    """Everything classify's output depends on: the features (cache digests) and head config."""
    feats = {s: f["key"] for s, f in run.provenance["features"].items()}
    key = {"features": feats, "heads": {k: getattr(cfg, k) for k in HEAD_KEYS}}
    if run_flag(run.provenance):  # only when set: older runs keep their digest
        key["features_trained_on_train"] = True
    return key_digest(key)



def classify(run_dir: str | Path, cfg: RunConfig | None = None, *, progress: bool = True) -> dict:
    """Fit the heads on the train split and score every example; updates the run dir."""
    t0 = time.perf_counter()
    run = load_run(run_dir)
    cfg = cfg or load_config(run.path / "config.yaml")
    save_config(cfg, run.path / "config.yaml")
    n_classes = len(run.class_names)
    if FIT_SPLIT not in run.splits:
        raise ConfigError(f"{run.path} has no {FIT_SPLIT!r} split to fit the heads on")
    check_fit_classes(run.split_examples(FIT_SPLIT)["label"], run.class_names)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        examples, metrics, fitted, probs, neighbors = _classify(run, cfg, n_classes, progress)
    for w in caught:  # shown to the user and kept in the run, not lost in a log
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    metrics["warnings"] = sorted({str(w.message) for w in caught})
    metrics["classify_seconds"] = round(time.perf_counter() - t0, 2)
    run.join("classify", examples[["id", *[c for c in examples if STAGES["classify"].owns(c)]]])
    write_json(run.path / "metrics.json", metrics)
    key = _classify_key(run, cfg)
    save_heads(run.path, fitted, classify_key=key, n_classes=n_classes,  # explain, perturb
               train_features=run.provenance["features"][FIT_SPLIT]["key"],
               train_labels=run.split_examples(FIT_SPLIT)["label"].to_numpy())
    save_probs(run.path, probs, neighbors)  # diagnose reads them instead of refitting
    run.stamp("classify", key)
    return metrics



def classify_if_changed(run_dir: str | Path, cfg: RunConfig, *, progress: bool = True) -> bool:
    """Run classify unless the run already holds its output for these features and heads."""
    run = load_run(run_dir)
    if (run.stamps().get("classify") == _classify_key(run, cfg) and "hardness" in run.examples
            and heads_current(run)):
        return False
    classify(run.path, cfg, progress=progress)
    return True


def _classify(run: Run, cfg: RunConfig, n_classes: int, progress: bool):
    """-> (table of classify's columns, metrics, fitted heads, {head: {split: probs}},
    {split: (N, k) train rows of the kNN vote})."""
    fitted: dict = {}  # the fitted heads, stored in RUN_DIR/heads/
    times = StepTimes()  # metrics.json: classify_seconds_by_step
    workers = default_num_workers() if cfg.num_workers is None else cfg.num_workers
    with times("duplicates"):
        dups = (duplicate_groups.duplicate_table(run, num_workers=workers, progress=progress)
                if cfg.duplicates else None)
        groups = None if dups is None else duplicate_groups.fit_groups(dups, run)
    probs, neighbors = _head_probabilities(run, cfg, n_classes, fitted, groups, times)
    fit_y = run.split_examples(FIT_SPLIT)["label"].to_numpy()
    neighbor_labels = {s: fit_y[rows] for s, rows in neighbors.items()}
    frames, metrics = [], {"heads": {}, "splits": run.splits, "n_classes": n_classes,
                           "class_names": run.class_names}
    issue_head = _issue_head(cfg, probs)
    for split in run.splits:
        df = run.split_examples(split)[EXAMPLE_COLUMNS].copy()
        labels = df["label"].to_numpy()
        split_probs = {h: p[split] for h, p in probs.items()}
        _score_columns(df, split_probs, labels, neighbor_labels.get(split))
        issue_probs = split_probs[issue_head]
        df["label_quality"] = scores.label_quality(issue_probs, labels)
        df["label_issue"] = scores.label_issues(issue_probs, labels)
        frames.append(df)
        for head, p in split_probs.items():
            metrics["heads"].setdefault(head, {})[split] = _head_metrics(
                p, labels, run.class_names)
    metrics["label_issue_head"] = issue_head
    metrics["label_issue_in_sample"] = issue_head == "model"
    metrics["summary"] = {df["split"].iat[0]: split_summary(df, run.class_names)
                          for df in frames if len(df)}
    if "knn" in probs:
        metrics["knn_search"] = {"backend": cfg.knn_backend, "index": cfg.knn_index,
                                 "exact": cfg.knn_index == "flat"}
        if cfg.knn_index != "flat":
            metrics["knn_search"].update(nlist=cfg.knn_nlist, nprobe=cfg.knn_nprobe)
    metrics["notes"] = _notes(probs)
    out = pd.concat(frames, ignore_index=True)
    if dups is not None:
        out = out.merge(dups, on="id", how="left", sort=False)
        metrics["duplicates"] = duplicate_groups.metrics_entry(out, probs)
        metrics["notes"].append(duplicate_groups.NOTE)
    if "planted_noise" in run.examples:
        fit = out[out["split"] == FIT_SPLIT]
        planted = run.examples.set_index("id").loc[fit["id"], "planted_noise"].to_numpy(bool)
        metrics["planted_noise"] = scores.detection(planted, fit["label_issue"].to_numpy(bool),
                                                    -fit["label_quality"].to_numpy(float))
    _mark_upper_bounds(metrics, run_flag(run.provenance))
    metrics["classify_seconds_by_step"] = dict(times)  # the rest of classify_seconds: scoring
    return out, metrics, fitted, probs, neighbors


def _mark_upper_bounds(metrics: dict, flag: dict | None) -> None:
    """When the features were trained on the train labels (provenance.json), say so next to
    every train figure: each head's train metrics, label issues on train, planted noise."""
    if flag is None:
        return
    metrics["features_trained_on_train"] = flag
    for per_split in metrics["heads"].values():
        if FIT_SPLIT in per_split:
            per_split[FIT_SPLIT]["caveat"] = UPPER_BOUND
    metrics["label_issue_caveat"] = {FIT_SPLIT: UPPER_BOUND}
    if metrics.get("planted_noise") is not None:
        metrics["planted_noise"]["caveat"] = UPPER_BOUND
    metrics["notes"].append(f"{FIT_SPLIT} figures: {UPPER_BOUND} ({flag['reason']})")


def _head_probabilities(run: Run, cfg: RunConfig, n_classes: int, fitted: dict, groups=None,
                        times: StepTimes | None = None):
    """-> ({head: {split: (N, C) out-of-sample probs}}, {split: (N, k) neighbour train rows});
    fills fitted = {"knn": KNNClassifier, "linear": LinearProbe} (the heads it fitted).
    groups: (N_train,) duplicate groups (-1 = none) or None: a train example's group is left
    out of its kNN vote and kept inside its linear-probe fold. times: gets the seconds of
    "knn" and "linear"."""
    times = StepTimes() if times is None else times
    fit_x, fit_y = run.features(FIT_SPLIT), run.split_examples(FIT_SPLIT)["label"].to_numpy()
    probs, neighbors = {}, {}
    if "knn" in cfg.heads:
        with times("knn"):
            probs["knn"], neighbors, fitted["knn"] = _knn_head(run, cfg, fit_x, fit_y,
                                                               n_classes, groups)
    if "linear" in cfg.heads:
        with times("linear"):
            probs["linear"], fitted["linear"] = _linear_head(run, cfg, fit_x, fit_y,
                                                             n_classes, groups)
    if "model" in cfg.heads and run.logits(FIT_SPLIT) is not None:
        probs["model"] = {s: softmax(run.logits(s)) for s in run.splits}
    if not probs:
        raise ConfigError(f"no head could run: heads={cfg.heads} and the model's own classifier "
                         "does not apply to this dataset; add knn or linear")
    return probs, neighbors


def _knn_head(run: Run, cfg: RunConfig, fit_x, fit_y, n_classes: int, groups):
    """-> ({split: probs}, {split: (N, k) train rows}, the fitted head's parameter shell)."""
    k = min(cfg.k, len(fit_x) - 1)
    if k < cfg.k:
        warnings.warn(f"k={cfg.k} but the train split has {len(fit_x)} examples: kNN uses "
                      f"k={k} (each train example is left out of its own vote)")
    knn = KNNClassifier(k=k, temperature=cfg.temperature, weights=cfg.knn_weights,
                        device=_head_device(cfg), backend=cfg.knn_backend,
                        index=cfg.knn_index, nlist=cfg.knn_nlist, nprobe=cfg.knn_nprobe,
                        seed=cfg.seed)
    # FAISS reads the features memory-mapped, chunk by chunk: no copy of train in RAM
    mmap = cfg.knn_backend == "faiss"
    knn.fit(run.features(FIT_SPLIT, mmap=True) if mmap else fit_x, fit_y, n_classes=n_classes)
    probs, rows = {}, {}
    for s in run.splits:  # train: leave-one-out; other splits: against all of train
        x = None if s == FIT_SPLIT else run.features(s, mmap=mmap)
        probs[s], _, rows[s] = knn.predict_proba_and_neighbors(
            x, exclude_self=x is None, exclude_groups=groups if x is None else None)
    # its parameters are what heads/ stores (the state is the train features + labels):
    # a shell of the same parameters, so the normalised copy is freed before the probe fits
    return probs, rows, KNNClassifier(**knn.get_params())


def _linear_head(run: Run, cfg: RunConfig, fit_x, fit_y, n_classes: int, groups):
    """-> ({split: probs}: out-of-fold on train, the full fit's elsewhere; the full fit)."""
    dev = _head_device(cfg)  # float64 L-BFGS: on the GPU when the run has one
    jobs = 1 if dev != "cpu" else fold_jobs(len(fit_x), fit_x.shape[1], cfg.folds)
    oof, probe = cross_val_predict_proba(
        LinearProbe(C=cfg.linear_c, seed=cfg.seed, device=dev), fit_x, fit_y,
        n_folds=cfg.folds, seed=cfg.seed, n_classes=n_classes, groups=groups,
        return_estimator=True, n_jobs=jobs)  # the folds and the full fit, `jobs` at once
    probs = {FIT_SPLIT: oof}
    for s in run.splits:
        if s != FIT_SPLIT:
            probs[s] = probe.predict_proba(run.features(s))
    return probs, probe


def _issue_head(cfg: RunConfig, probs: dict) -> str:
    """The head whose probabilities feed label_issue: cfg.issue_head when it ran, else linear,
    else knn (both out-of-sample on train). `model` is in-sample on the data it was trained on:
    allowed, with a warning that the run keeps (metrics.json, report)."""
    for head in (cfg.issue_head, "linear", "knn"):
        if head in probs:
            if head == "model":
                warnings.warn("issue_head: model: label_issue uses the backbone's own "
                              "classifier, whose train probabilities are in-sample if it was "
                              "trained on these images: the flags are then optimistic")
            return head
    return next(iter(probs))


def _head_device(cfg: RunConfig) -> str:
    return str(resolve_device(cfg.device))


def _score_columns(df: pd.DataFrame, probs: dict[str, np.ndarray], labels: np.ndarray,
                   neighbor_labels: np.ndarray | None) -> None:
    for head, p in probs.items():
        df[f"pred_{head}"] = scores.predicted(p)
        df[f"prob_true_{head}"] = scores.prob_true(p, labels)
        df[f"margin_{head}"] = scores.margin(p, labels)
        df[f"entropy_{head}"] = scores.entropy(p)
        df[f"correct_{head}"] = df[f"pred_{head}"].to_numpy() == labels
    knn_dis = None
    if neighbor_labels is not None:
        knn_dis = scores.knn_disagreement(neighbor_labels, labels)
        df["knn_disagreement"] = knn_dis
    df["hardness"] = scores.hardness({h: df[f"prob_true_{h}"].to_numpy() for h in probs}, knn_dis)
    if len(probs) > 1:  # heads that disagree on the prediction mark an ambiguous example
        preds = np.stack([df[f"pred_{h}"].to_numpy() for h in probs], axis=1)
        df["heads_disagree"] = (preds != preds[:, :1]).any(axis=1)


def _head_metrics(probs: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict:
    preds = scores.predicted(probs)
    cm = scores.confusion_matrix(labels, preds, len(class_names))
    support = cm.sum(axis=1)
    per_class = np.divide(np.diag(cm), support, out=np.full(len(support), np.nan),
                          where=support > 0)
    return {
        "accuracy": float(scores.accuracy(labels, preds)),
        "ece": float(scores.expected_calibration_error(probs, labels)),
        "confusion_matrix": cm.tolist(),
        "confused_pairs": scores.confused_pairs(cm, class_names, top=10).to_dict("records"),
        "per_class_accuracy": {c: (None if np.isnan(a) else float(a))
                               for c, a in zip(class_names, per_class)},
        "reliability": scores.reliability_table(probs, labels).to_dict("records"),
    }


def split_summary(df: pd.DataFrame, class_names: list[str]) -> dict:
    """What the report's hardness and per-class tables show, for one split's rows:
    {"n", "hardness": {"mean", "median", "q90"} (higher = harder), "label_issue": candidates,
     "per_class": {class: {"n", "mean_hardness", "label_issue"}}}."""
    h = df["hardness"].astype(float)
    by = df.groupby("label")
    n_k, mean_k, issue_k = by.size(), by["hardness"].mean(), by["label_issue"].sum()
    return {"n": len(df),
            "hardness": {"mean": _num(h.mean()), "median": _num(h.median()),
                         "q90": _num(h.quantile(0.9))},
            "label_issue": int(df["label_issue"].sum()),
            "per_class": {name: {"n": int(n_k.get(k, 0)), "mean_hardness": _num(mean_k.get(k)),
                                 "label_issue": int(issue_k.get(k, 0))}
                          for k, name in enumerate(class_names)}}


def _num(x) -> float | None:
    """A figure for metrics.json, which has no NaN."""
    return None if pd.isna(x) else float(x)


def _notes(probs: dict) -> list[str]:
    notes = ["knn (train): leave-one-out; linear (train): out-of-fold"]
    if "model" in probs:
        notes.append("model (train): the backbone's own classifier saw these images in training "
                     "if it was trained on them: train probabilities are in-sample")
    return notes
