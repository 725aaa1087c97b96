"""Per-example hardness scores, label-issue detection and calibration metrics.

Pure functions: numpy in, numpy/pandas out (no torch, no models).  Public
functions validate their inputs and then call a private ``_core`` function.

Conventions
-----------
``probs``  : (N, C) float array, rows are probability vectors (finite, in
             [0, 1], each row sums to 1 within 1e-4), C >= 2.
``labels`` : (N,) integer array with values in [0, C).
Every docstring states which way its score points.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from ..errors import HeadError

ROW_SUM_TOL = 1e-4
FILTER_BY = ("prune_by_noise_rate", "prune_by_class", "both", "confident_learning",
             "predicted_neq_given", "low_normalized_margin", "low_self_confidence")

__all__ = ["prob_true", "margin", "entropy", "predicted", "knn_disagreement", "hardness",
           "label_issues", "label_quality", "confusion_matrix", "confused_pairs", "accuracy",
           "expected_calibration_error", "reliability_table"]


# --------------------------------------------------------------------------- validation
def _rows_msg(name: str, bad: np.ndarray, what: str) -> str:
    n_bad, first = int(bad.sum()), int(np.flatnonzero(bad)[0])
    return f"{name}: {n_bad} of {bad.size} rows {what} (first bad row: {first})"


def _check_probs(probs, name: str = "probs") -> np.ndarray:
    p = np.asarray(probs)
    if p.ndim != 2:
        raise HeadError(f"{name} must be a 2-D (N, C) array, got shape {p.shape}")
    if p.shape[0] < 1 or p.shape[1] < 2:
        raise HeadError(f"{name} needs at least 1 row and 2 columns (classes), got shape {p.shape}")
    if not (np.issubdtype(p.dtype, np.floating) or np.issubdtype(p.dtype, np.integer)) \
            or p.dtype == bool:
        raise HeadError(f"{name} must be a float array, got dtype {p.dtype}")
    p = p.astype(np.float64, copy=False)
    bad = ~np.isfinite(p).all(axis=1)
    if bad.any():
        raise HeadError(_rows_msg(name, bad, "contain NaN or inf"))
    bad = ((p < 0) | (p > 1)).any(axis=1)
    if bad.any():
        raise HeadError(_rows_msg(name, bad, "have values outside [0, 1]"))
    bad = np.abs(p.sum(axis=1) - 1.0) > ROW_SUM_TOL
    if bad.any():
        raise HeadError(_rows_msg(name, bad, f"do not sum to 1 (tolerance {ROW_SUM_TOL:g})"))
    return p


def _check_int_vector(x, name: str, n: int | None = None, n_classes: int | None = None) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise HeadError(f"{name} must be a 1-D array, got shape {a.shape}")
    if a.size and (not np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
        raise HeadError(f"{name} must hold integers, got dtype {a.dtype}")
    a = a.astype(np.int64, copy=False)
    if n is not None and a.shape[0] != n:
        raise HeadError(f"{name} has {a.shape[0]} entries but {n} were expected (one per row)")
    if n_classes is not None:
        bad = (a < 0) | (a >= n_classes)
        if bad.any():
            raise HeadError(f"{name}: {int(bad.sum())} of {a.size} values outside [0, {n_classes}) "
                             f"(e.g. {int(a[bad][0])} at index {int(np.flatnonzero(bad)[0])})")
    return a


def _check_probs_labels(probs, labels) -> tuple[np.ndarray, np.ndarray]:
    p = _check_probs(probs)
    return p, _check_int_vector(labels, "labels", p.shape[0], p.shape[1])


def _check_unit_vector(x, name: str, n: int | None = None) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1 or (n is not None and a.shape[0] != n):
        raise HeadError(f"{name} must be 1-D with {n if n is not None else 'N'} entries, got shape {a.shape}")
    bad = ~np.isfinite(a) | (a < 0) | (a > 1)
    if bad.any():
        raise HeadError(f"{name}: {int(bad.sum())} of {a.size} values are not finite numbers in [0, 1]")
    return a


# --------------------------------------------------------------------------- per-example scores
def prob_true(probs, labels) -> np.ndarray:
    """Probability the model gives to the given label, shape (N,), in [0, 1].

    Lower = harder (the model doubts the given label).
    """
    return _prob_true(*_check_probs_labels(probs, labels))


def _prob_true(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    return p[np.arange(len(y)), y]


def margin(probs, labels) -> np.ndarray:
    """Given-label probability minus the largest other-class probability, (N,), in [-1, 1].

    Lower = harder; negative = misclassified (another class has more probability).
    """
    return _margin(*_check_probs_labels(probs, labels))


def _margin(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    rows = np.arange(len(y))
    others = p.copy()
    others[rows, y] = -np.inf
    return p[rows, y] - others.max(axis=1)


def entropy(probs, *, normalize: bool = True) -> np.ndarray:
    """Shannon entropy of each row (natural log, 0 * log 0 = 0), shape (N,).

    With ``normalize`` it is divided by log(C), so it lies in [0, 1] (0 = one-hot,
    1 = uniform); otherwise it lies in [0, log C].  Higher = more uncertain (harder).
    """
    return _entropy(_check_probs(probs), normalize=normalize)


def _entropy(p: np.ndarray, *, normalize: bool) -> np.ndarray:
    logp = np.log(p, out=np.zeros_like(p), where=p > 0)
    h = -(p * logp).sum(axis=1)
    hmax = np.log(p.shape[1])
    return np.clip(h / hmax, 0.0, 1.0) if normalize else np.clip(h, 0.0, hmax)


def predicted(probs) -> np.ndarray:
    """Predicted class = argmax of each row, shape (N,) int; ties go to the lowest index."""
    return np.argmax(_check_probs(probs), axis=1)


def knn_disagreement(neighbor_labels, labels) -> np.ndarray:
    """Share of an example's k neighbours whose label differs from its own, (N,), in [0, 1].

    ``neighbor_labels`` is (N, k) int (the example itself excluded).  Higher = harder
    (the example sits among other classes in feature space).
    """
    nb = np.asarray(neighbor_labels)
    if nb.ndim != 2 or nb.shape[1] < 1:
        raise HeadError(f"neighbor_labels must be 2-D (N, k) with k >= 1, got shape {nb.shape}")
    if not np.issubdtype(nb.dtype, np.integer) or nb.dtype == bool:
        raise HeadError(f"neighbor_labels must hold integers, got dtype {nb.dtype}")
    return _knn_disagreement(nb, _check_int_vector(labels, "labels", nb.shape[0]))


def _knn_disagreement(nb: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (nb != y[:, None]).mean(axis=1)


def hardness(prob_true_by_head: Mapping[str, np.ndarray], knn_disagreement=None) -> np.ndarray:
    """Combined hardness in [0, 1], shape (N,).  Higher = harder.

    With heads h = 1..H giving prob_true p_h (each (N,), in [0, 1]) and optional kNN
    disagreement d (in [0, 1])::

        head_term = 1 - (1/H) * sum_h p_h
        hardness  = (head_term + d) / 2      if d is given
        hardness  = head_term                otherwise

    i.e. the equally-weighted mean of the available terms (the head term counts once,
    however many heads there are).
    """
    if not isinstance(prob_true_by_head, Mapping) or len(prob_true_by_head) == 0:
        raise HeadError("prob_true_by_head must be a non-empty dict {head name: prob_true array}")
    heads, n = [], None
    for name, v in prob_true_by_head.items():
        a = _check_unit_vector(v, f"prob_true_by_head[{name!r}]", n)
        n = a.shape[0]
        heads.append(a)
    d = None if knn_disagreement is None else _check_unit_vector(knn_disagreement, "knn_disagreement", n)
    return _hardness(np.stack(heads), d)


def _hardness(pt: np.ndarray, d: np.ndarray | None) -> np.ndarray:
    terms = [1.0 - pt.mean(axis=0)] + ([] if d is None else [d])
    return np.clip(np.mean(terms, axis=0), 0.0, 1.0)


# --------------------------------------------------------------------------- label issues (cleanlab)
def label_issues(probs, labels, *, filter_by: str = "prune_by_noise_rate",
                 min_n_per_class: int = 5, n_jobs: int = 1) -> np.ndarray:
    """Boolean mask (N,) of likely label errors by confident learning.  True = suspect label.

    Calls ``cleanlab.filter.find_label_issues(labels, probs, filter_by=...)``.  ``probs`` must
    be out-of-sample (e.g. cross-validated) for the result to mean anything.
    Degenerate inputs return all-False with a ``UserWarning`` instead of calling cleanlab:
    fewer than 2 distinct classes in ``labels``, or N < ``min_n_per_class`` x (classes
    present).  Classes absent from ``labels`` (e.g. a test split) keep their probability
    columns: cleanlab gives them an unreachable threshold, so nothing is confidently assigned
    to them; a warning lists them.  ``n_jobs=1`` avoids cleanlab's multiprocessing (fork).
    """
    if filter_by not in FILTER_BY:
        raise HeadError(f"filter_by must be one of {FILTER_BY}, got {filter_by!r}")
    p, y = _check_probs_labels(probs, labels)
    return _label_issues(p, y, filter_by=filter_by, min_n_per_class=min_n_per_class, n_jobs=n_jobs)


def _label_issues(p, y, *, filter_by, min_n_per_class, n_jobs) -> np.ndarray:
    n, c = p.shape
    present = np.unique(y)
    none = np.zeros(n, dtype=bool)
    if present.size < 2:
        warnings.warn(f"label_issues: only {present.size} distinct class in labels (need >= 2); "
                      "confident learning is undefined, returning no label issues", stacklevel=3)
        return none
    if n < min_n_per_class * present.size:
        warnings.warn(f"label_issues: too few examples (N={n} < {min_n_per_class} x "
                      f"{present.size} classes present); per-class thresholds would be noise, "
                      "returning no label issues", stacklevel=3)
        return none
    absent = np.setdiff1d(np.arange(c), present)
    if absent.size:
        warnings.warn(f"label_issues: {absent.size} of {c} classes never appear in labels "
                      f"({absent[:10].tolist()}{'...' if absent.size > 10 else ''}); their probability "
                      "columns are kept, but no example can be re-assigned to them", stacklevel=3)
    from cleanlab.filter import find_label_issues  # lazy: importing cleanlab takes ~2 s

    with warnings.catch_warnings():
        if absent.size:  # cleanlab complains that absent classes have "too few examples"
            alt = "|".join(str(k) for k in absent)
            warnings.filterwarnings("ignore", message=rf"May not flag all label issues in class: ({alt}),")
        mask = find_label_issues(y.copy(), p.copy(), filter_by=filter_by, n_jobs=n_jobs)
    return np.asarray(mask, dtype=bool)


def label_quality(probs, labels, *, method: str = "self_confidence") -> np.ndarray:
    """Label-quality score per example, (N,), in [0, 1], via ``cleanlab.rank.get_label_quality_scores``.

    Default method self-confidence equals ``prob_true``.  Lower = more likely mislabeled.
    """
    p, y = _check_probs_labels(probs, labels)
    from cleanlab.rank import get_label_quality_scores

    return np.asarray(get_label_quality_scores(y.copy(), p.copy(), method=method), dtype=np.float64)


# --------------------------------------------------------------------------- confusion and accuracy
def _check_pair(labels, preds) -> tuple[np.ndarray, np.ndarray]:
    y = _check_int_vector(labels, "labels")
    if y.size == 0:
        raise HeadError("labels is empty")
    return y, _check_int_vector(preds, "preds", y.shape[0])


def accuracy(labels, preds) -> float:
    """Share of examples with preds == labels, in [0, 1].  Higher = better."""
    y, yhat = _check_pair(labels, preds)
    return float(np.mean(y == yhat))


def confusion_matrix(labels, preds, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) int64 counts; rows = true label, columns = predicted label."""
    if int(n_classes) < 1:
        raise HeadError(f"n_classes must be >= 1, got {n_classes}")
    y = _check_int_vector(labels, "labels", None, n_classes)
    yhat = _check_int_vector(preds, "preds", y.shape[0], n_classes)
    return _confusion_matrix(y, yhat, int(n_classes))


def _confusion_matrix(y, yhat, k: int) -> np.ndarray:
    return np.bincount(y * k + yhat, minlength=k * k).reshape(k, k).astype(np.int64)


def confused_pairs(cm, class_names: Sequence[str], *, top: int | None = 10) -> pd.DataFrame:
    """Most confused unordered class pairs from a confusion matrix (rows true, cols predicted).

    Columns: class_a, class_b (a before b in class order), a_as_b (true a predicted b),
    b_as_a, total = a_as_b + b_as_a, share = total / all off-diagonal errors.  Sorted by
    total descending (ties keep class order), zero-total pairs dropped, at most ``top``
    rows (all when None).  Higher total = more confused.
    """
    m = np.asarray(cm)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise HeadError(f"cm must be a square 2-D matrix, got shape {m.shape}")
    if not np.isfinite(m).all() or (m < 0).any():
        raise HeadError("cm must hold finite non-negative counts")
    names = [str(s) for s in class_names]
    if len(names) != m.shape[0]:
        raise HeadError(f"class_names has {len(names)} names but cm has {m.shape[0]} classes")
    if top is not None and top < 0:
        raise HeadError(f"top must be >= 0 or None, got {top}")
    return _confused_pairs(m, names, top)


def _confused_pairs(m, names, top) -> pd.DataFrame:
    i, j = np.triu_indices(m.shape[0], k=1)
    a_as_b, b_as_a = m[i, j], m[j, i]
    errors = m.sum() - np.trace(m)
    df = pd.DataFrame({"class_a": [names[k] for k in i], "class_b": [names[k] for k in j],
                       "a_as_b": a_as_b, "b_as_a": b_as_a, "total": a_as_b + b_as_a})
    df["share"] = df["total"] / errors if errors > 0 else 0.0
    df = df[df["total"] > 0].sort_values("total", ascending=False, kind="stable")
    return (df if top is None else df.head(top)).reset_index(drop=True)


# --------------------------------------------------------------------------- calibration
def reliability_table(probs, labels, *, n_bins: int = 15) -> pd.DataFrame:
    """Per-bin calibration table on the max probability (confidence), one row per bin.

    Equal-width bins (lower, upper] over [0, 1] (a confidence of exactly 0 goes to bin 0).
    Columns: bin, lower, upper, confidence (mean max-prob), accuracy (share argmax ==
    label), count.  Empty bins have count 0 and NaN confidence/accuracy.  A bin is
    over-confident where confidence > accuracy.
    """
    p, y = _check_probs_labels(probs, labels)
    if int(n_bins) < 1:
        raise HeadError(f"n_bins must be >= 1, got {n_bins}")
    return _reliability(p, y, int(n_bins))


def _reliability(p, y, n_bins) -> pd.DataFrame:
    conf, correct = p.max(axis=1), (p.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    b = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(b, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(b, conf, minlength=n_bins) / count
        acc = np.bincount(b, correct, minlength=n_bins) / count
    return pd.DataFrame({"bin": np.arange(n_bins), "lower": edges[:-1], "upper": edges[1:],
                         "confidence": mean_conf, "accuracy": acc, "count": count.astype(np.int64)})


def expected_calibration_error(probs, labels, *, n_bins: int = 15) -> float:
    """Expected calibration error in [0, 1]: sum_b (n_b / N) * |accuracy_b - confidence_b|.

    Bins as in :func:`reliability_table`.  Lower = better calibrated.
    """
    p, y = _check_probs_labels(probs, labels)
    if int(n_bins) < 1:
        raise HeadError(f"n_bins must be >= 1, got {n_bins}")
    t = _reliability(p, y, int(n_bins))
    full = t["count"] > 0
    gap = (t["accuracy"][full] - t["confidence"][full]).abs()
    return float((t["count"][full] / t["count"].sum() * gap).sum())


def detection(truth, flagged, score=None) -> dict:
    """How well a finder of bad examples (label issues, AUM flags...) finds known ones.

    truth: (N,) bool, the planted answer. flagged: (N,) bool, the finder's verdict. score:
    (N,) float, optional, higher = more suspect (e.g. -label_quality); gives the ROC AUC and
    the precision among the top n_planted by score, so finders that flag different numbers of
    examples can be compared at the same count. A finder that guesses has precision equal to
    base_rate and AUC 0.5.
    """
    t = np.asarray(truth, dtype=bool)
    f = np.asarray(flagged, dtype=bool)
    if t.ndim != 1 or f.shape != t.shape:
        raise HeadError(f"truth and flagged must be (N,) of one length, got {t.shape}, {f.shape}")
    out = _detection(t, f)
    if score is not None:
        s = np.asarray(score, dtype=np.float64)
        if s.shape != t.shape or not np.isfinite(s).all():
            raise HeadError("score must be a finite (N,) array, as long as truth")
        out.update(_ranking(t, s))
    return out


def _detection(t: np.ndarray, f: np.ndarray) -> dict:
    caught = int((t & f).sum())
    return {"n": int(len(t)), "planted": int(t.sum()), "flagged": int(f.sum()), "caught": caught,
            "recall": caught / t.sum() if t.any() else None,
            "precision": caught / f.sum() if f.any() else None,
            "base_rate": float(t.mean()) if len(t) else None}


def _ranking(t: np.ndarray, s: np.ndarray) -> dict:
    from sklearn.metrics import roc_auc_score
    n = int(t.sum())
    top = np.argsort(-s, kind="stable")[:n]
    return {"auroc": float(roc_auc_score(t, s)) if 0 < n < len(t) else None,
            "precision_at_planted": float(t[top].mean()) if n else None}
