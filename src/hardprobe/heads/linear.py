"""Linear probe: multinomial logistic regression on frozen features, in torch.

Minimises scikit-learn's LogisticRegression(C=C) objective (l2 penalty, lbfgs):

    0.5 * ||W||^2 + C * sum_i CE_i        (bias unpenalised)

divided by C * N so the numbers stay O(1) whatever N is (same minimiser):

    mean_i CE_i + ||W||^2 / (2 * C * N)

With two classes sklearn fits one weight vector w (sigmoid) instead of two softmax rows;
at the optimum W = [-w/2, w/2], so ||W||^2 = ||w||^2 / 2 and we double the penalty to
keep the same minimiser. Full-batch L-BFGS with strong-Wolfe line search, float64,
preconditioned by the features' top directions (heads/_lbfgs.py: same minimiser, 12x fewer
iterations on random-init ResNet-50 features).

Speed (the probe is memory-bound: each evaluation streams the (N, D) features twice): the
loss and its gradient are written out by hand, the backward as (P - Y)^T @ Z, which reads Z
row-major (twice as fast as autograd's Z^T @ G on a 5,000 x 2,048 float64 matrix), with
no graph kept, and its small L-BFGS vector ops run on one thread (threads=1), so
cross_val_predict_proba fits folds side by side, one per core (n_jobs). Warm starts
across folds were measured and dropped: from the full-data fit a fold took 88 L-BFGS
iterations against 91 from zero (2,000 x 512 CNN-like features), and the answer moved by
1e-3 in probability, since the gradient tolerance leaves that much play on flat problems.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from sklearn.utils.validation import check_is_fitted

from ..errors import HeadError
from ._lbfgs import fit_multinomial
from ._arrays import (
    _check_features,
    _check_labels,
    _check_n_features,
    _resolve_n_classes,
)


class LinearProbe(ClassifierMixin, BaseEstimator):
    """Multinomial logistic regression with sklearn's objective, fitted by torch L-BFGS.

    C: inverse l2 strength, as in sklearn (larger C = weaker penalty). max_iter: L-BFGS
    iterations. tol: stop when max |gradient| of the mean-form objective is below it.
    precondition: rank of the preconditioner built from the features' top directions (0 =
    plain L-BFGS); it changes the path, not the minimiser (heads/_lbfgs.py: 9x faster on
    random-init ResNet-50 features, 2x on low-rank synthetic ones).
    standardize: StandardScaler semantics (train mean/std, zero-variance features keep
    scale 1). device: torch device. seed: stored for API symmetry; the fit is deterministic
    (zero init, full batch), so it does not change the result. threads: torch CPU threads
    during the fit (None = torch's setting). 1 by default: the fit is a memory-bound skinny
    matmul plus hundreds of small L-BFGS vector ops per iteration, whose thread
    synchronisation dominated on a busy 2-core machine (benchmarks/bench_linear.py).

    Fitted attributes: coef_ (n_classes, D) and intercept_ (n_classes,) act on the
    standardised features (X - mean_) / scale_; mean_, scale_ (D,) (0 and 1 when
    standardize=False); n_iter_; n_classes_; classes_; n_features_in_. A class absent from
    the train set gets coef 0 and intercept -inf: probability 0, decision -inf.
    """

    def __init__(self, *, C=1.0, max_iter=1000, tol=1e-6, standardize=True, device="cpu", seed=0,
                 threads=1, precondition=64):
        self.C, self.max_iter, self.tol = C, max_iter, tol  # the solver's stopping rule
        self.precondition = precondition  # rank of the preconditioner (heads/_lbfgs.py)
        self.threads = threads
        self.standardize = standardize
        self.device = device
        self.seed = seed

    def fit(self, X, y, n_classes=None):
        """Fit on (N, D) features and (N,) int labels. n_classes: None means max(y) + 1;
        give it so classes absent from y still get a probability column (always 0)."""
        if not self.C > 0:
            raise HeadError(f"C must be > 0, got {self.C!r}")
        X = _check_features(X, "X")
        y = _check_labels(y, len(X))
        self.n_classes_ = _resolve_n_classes(y, n_classes)
        self.classes_ = np.arange(self.n_classes_)
        self.n_features_in_ = X.shape[1]
        present = np.unique(y)  # classes seen in train; only these are fitted
        if len(present) < 2:
            raise HeadError(f"LinearProbe needs at least 2 classes in y, got only class "
                             f"{present[0]} ({len(y)} examples)")
        Z = self._standardised(X)  # (N, D) float64, the only full-size copy of X
        target = torch.as_tensor(np.searchsorted(present, y), device=Z.device)  # (N,) 0..P-1
        with _torch_threads(self.threads if str(self.device) == "cpu" else None):
            W, b = self._lbfgs(Z, target, n_present=len(present))
        self.coef_ = np.zeros((self.n_classes_, X.shape[1]))
        self.intercept_ = np.full(self.n_classes_, -np.inf)
        self.coef_[present] = W
        self.intercept_[present] = b - b.mean()  # softmax ignores a shared shift; centre it
        return self

    def decision_function(self, X):
        """(N, n_classes) logits; higher = more likely. Absent classes are -inf."""
        check_is_fitted(self, "coef_")
        X = _check_n_features(_check_features(X, "X", allow_empty=True), self.n_features_in_,
                              "probe")
        return ((X - self.mean_) / self.scale_) @ self.coef_.T + self.intercept_

    def predict_proba(self, X):
        """(N, n_classes) float64 softmax probabilities, rows sum to 1."""
        logits = self.decision_function(X)
        logits -= logits.max(1, keepdims=True)  # stable softmax; max is finite (>= 2 fitted)
        p = np.exp(logits)
        return p / p.sum(1, keepdims=True)

    def predict(self, X):
        """(N,) int64 most probable class; ties go to the lowest class index."""
        return self.decision_function(X).argmax(1)

    # -- internals -------------------------------------------------------------------

    def _standardised(self, X):
        """float64 (N, D) tensor of (X - mean_) / scale_, standardised in place so that a
        60,000 x 2,048 train set costs one float64 copy, not three. Sets mean_, scale_ as
        sklearn's StandardScaler: population std, scale 1 for a constant column."""
        Z = torch.tensor(X, dtype=torch.float64, device=self.device)  # a copy: X stays as it is
        n, d = Z.shape
        if not self.standardize:
            self.mean_, self.scale_ = np.zeros(d), np.ones(d)
            return Z
        mean = Z.mean(0)
        Z.sub_(mean)
        std = torch.linalg.vector_norm(Z, dim=0) / np.sqrt(n)  # two-pass population std
        std[torch.as_tensor(np.ptp(X, axis=0) == 0, device=Z.device)] = 1.0  # avoid 0/0
        Z.div_(std)
        self.mean_, self.scale_ = mean.cpu().numpy(), std.cpu().numpy()
        return Z

    def _lbfgs(self, Z, target, n_present):
        """Minimise mean CE + pen * ||W||^2 from zero; returns (W (P, D), b (P,)) as numpy."""
        W, b, capped = self._lbfgs_from(Z, target, n_present)
        if capped:
            warnings.warn(f"LinearProbe: L-BFGS hit max_iter={self.max_iter} before the "
                          f"gradient fell below tol={self.tol}", ConvergenceWarning)
        return W.cpu().numpy(), b.cpu().numpy()

    def _lbfgs_from(self, Z, target, n_present):
        # 0.5 / (C N) is sklearn's penalty in mean form; binary doubles it (module docstring).
        pen = (1.0 if n_present == 2 else 0.5) / (self.C * len(Z))
        onehot = torch.nn.functional.one_hot(target, n_present).to(Z.dtype)  # (N, P)
        W, b, self.n_iter_, capped = fit_multinomial(Z, onehot, pen, tol=self.tol,
                                                     max_iter=self.max_iter,
                                                     rank=self.precondition)
        return W, b, capped


@contextlib.contextmanager
def _torch_threads(n):
    """torch.set_num_threads(n) inside the block (nothing when n is None)."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cross_val_predict_proba(probe, X, y, *, n_folds=5, seed=0, n_classes=None, groups=None,
                            return_estimator=False, n_jobs=1):
    """Out-of-fold probabilities (N, n_classes): row i comes from a clone of `probe`
    fitted on the folds that do not contain i. Folds: StratifiedKFold(n_folds,
    shuffle=True, random_state=seed), or StratifiedGroupKFold with the same arguments when
    groups is given: groups (N,) int, rows sharing a group stay in one fold, -1 = a group
    of its own (e.g. near-duplicates share a group so none is scored by a model that saw
    its twin). Works with any estimator whose fit accepts n_classes= (LinearProbe,
    KNNClassifier). n_classes: None means max(y) + 1.

    n_jobs: folds fitted at once, in threads (torch and numpy release the GIL; the answer is
    the same as one at a time). A LinearProbe's `threads` then applies to the whole pool, so
    each fit runs on its own core: its fit is memory-bound and single-threaded by default,
    so 2 folds at once on 2 cores take about half the time (fold_jobs picks n_jobs by cores
    and memory). return_estimator=True also fits a clone on all rows and returns
    (oof, model), in the same pool.
    """
    X = _check_features(X, "X")
    y = _check_labels(y, len(X))
    n_classes = _resolve_n_classes(y, n_classes)
    oof = np.full((len(X), n_classes), np.nan)
    tasks = list(_folds(X, y, n_folds, seed, groups))
    if return_estimator:
        tasks.append((np.arange(len(X)), None))
    fitted = _fit_all(probe, X, y, n_classes, [train for train, _ in tasks], n_jobs)
    for model, (_, test) in zip(fitted, tasks):
        if test is not None:
            oof[test] = model.predict_proba(X[test])
    return (oof, fitted[-1]) if return_estimator else oof


def _fit_all(probe, X, y, n_classes, trains, n_jobs):
    """[clone(probe) fitted on X[t], y[t] for t in trains], n_jobs at a time."""
    def fit(train, est):
        return est.fit(X[train], y[train], n_classes=n_classes)

    n_jobs = max(1, min(int(n_jobs), len(trains)))
    if n_jobs == 1:
        return [fit(t, clone(probe)) for t in trains]
    # torch's thread count is process-wide: set it once for the pool, not per fit (two fits
    # restoring each other's setting would leave it wrong)
    threads = probe.get_params().get("threads")
    est = clone(probe).set_params(threads=None) if threads is not None else clone(probe)
    with _torch_threads(threads), ThreadPoolExecutor(n_jobs) as pool:
        return list(pool.map(fit, trains, [clone(est) for _ in trains]))


def fold_jobs(n_rows, n_features, n_folds, *, cores=None, budget_bytes=1 << 30):
    """How many linear-probe folds to fit at once: one per core, as many as the budget
    holds (each fit keeps a float32 copy of its rows and their float64 standardised copy,
    12 bytes a value), and never more than the folds plus the full fit."""
    if cores is None:  # the cores this process may run on (a container's share), not the host's
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    per_fit = 12 * n_rows * n_features
    return int(max(1, min(cores or 1, n_folds + 1, budget_bytes // max(per_fit, 1))))


def _folds(X, y, n_folds, seed, groups):
    """(train, test) index pairs; see cross_val_predict_proba."""
    if groups is None:
        return StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed).split(X, y)
    groups = np.asarray(groups)
    if groups.shape != (len(X),) or not np.issubdtype(groups.dtype, np.integer):
        raise HeadError(f"groups must be ({len(X)},) integers (-1 = no group), got "
                        f"{groups.dtype} of shape {groups.shape}")
    return _group_folds(np.asarray(y), groups.astype(np.int64), n_folds, seed)


def _group_folds(y: np.ndarray, groups: np.ndarray, n_folds: int, seed: int) -> list:
    """Stratified folds that keep each group (>= 0) in one fold; -1 = a row on its own.

    StratifiedGroupKFold's greedy search costs groups x folds x classes in Python: 26 s for
    the 49,000 groups of CIFAR-10's train split (nearly all singletons). So it runs on the
    grouped rows alone, StratifiedKFold on the others, and fold k joins the k-th largest
    of one with the k-th smallest of the other (sizes stay even). Both parts are stratified,
    so their union is. Either part too small to split (fewer rows or groups than folds, or a
    class with fewer than n_folds singletons) -> StratifiedGroupKFold on everything."""
    single = groups == -1
    grouped = np.flatnonzero(~single)
    loose = np.flatnonzero(single)
    _, per_class = np.unique(y[loose], return_counts=True)
    if (len(np.unique(groups[grouped])) < n_folds or len(loose) < n_folds
            or len(per_class) < len(np.unique(y)) or per_class.min() < n_folds):
        groups = groups.copy()
        groups[single] = groups.max(initial=-1) + 1 + np.arange(single.sum())  # one group each
        sgkf = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        return list(sgkf.split(np.zeros(len(y)), y, groups))
    with warnings.catch_warnings():  # a class with few grouped rows: the singletons balance it
        warnings.simplefilter("ignore", UserWarning)
        part_g = [grouped[t] for _, t in StratifiedGroupKFold(
            n_splits=n_folds, shuffle=True, random_state=seed).split(
            grouped, y[grouped], groups[grouped])]
    part_s = [loose[t] for _, t in StratifiedKFold(
        n_splits=n_folds, shuffle=True, random_state=seed).split(loose, y[loose])]
    part_g.sort(key=len, reverse=True)
    part_s.sort(key=len)
    everything = np.arange(len(y))
    tests = [np.sort(np.concatenate(pair)) for pair in zip(part_g, part_s)]
    return [(np.setdiff1d(everything, t, assume_unique=True), t) for t in tests]
