"""Linear probe: multinomial logistic regression on frozen features, in torch.

Minimises scikit-learn's LogisticRegression(C=C) objective (l2 penalty, lbfgs):

    0.5 * ||W||^2 + C * sum_i CE_i        (bias unpenalised)

divided by C * N so the numbers stay O(1) whatever N is (same minimiser):

    mean_i CE_i + ||W||^2 / (2 * C * N)

With two classes sklearn fits one weight vector w (sigmoid) instead of two softmax rows;
at the optimum W = [-w/2, w/2], so ||W||^2 = ||w||^2 / 2 and we double the penalty to
keep the same minimiser. Full-batch L-BFGS with strong-Wolfe line search, float64.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import StratifiedKFold
from sklearn.utils.validation import check_is_fitted

from ..errors import HeadError
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
    standardize: StandardScaler semantics (train mean/std, zero-variance features keep
    scale 1). device: torch device. seed: stored for API symmetry; the fit is deterministic
    (zero init, full batch), so it does not change the result.

    Fitted attributes: coef_ (n_classes, D) and intercept_ (n_classes,) act on the
    standardised features (X - mean_) / scale_; mean_, scale_ (D,) (0 and 1 when
    standardize=False); n_iter_; n_classes_; classes_; n_features_in_. A class absent from
    the train set gets coef 0 and intercept -inf: probability 0, decision -inf.
    """

    def __init__(self, *, C=1.0, max_iter=1000, tol=1e-6, standardize=True, device="cpu", seed=0):
        self.C = C
        self.max_iter = max_iter
        self.tol = tol
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
        """Minimise mean CE + pen * ||W||^2; returns (W (P, D), b (P,)) as numpy."""
        n, d = Z.shape
        # 0.5 / (C N) is sklearn's penalty in mean form; binary doubles it (module docstring).
        pen = (1.0 if n_present == 2 else 0.5) / (self.C * n)
        W = torch.zeros(n_present, d, dtype=Z.dtype, device=Z.device, requires_grad=True)
        b = torch.zeros(n_present, dtype=Z.dtype, device=Z.device, requires_grad=True)
        max_eval = 5 * self.max_iter  # line-search evaluations; iterations are the budget
        opt = torch.optim.LBFGS([W, b], lr=1, max_iter=self.max_iter, max_eval=max_eval,
                                tolerance_grad=self.tol, tolerance_change=1e-12,
                                history_size=20, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            logits = Z @ W.T + b  # (N, P)
            loss = torch.nn.functional.cross_entropy(logits, target) + pen * W.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        state = opt.state[opt._params[0]]
        self.n_iter_ = int(state.get("n_iter", 0))
        if self.n_iter_ >= self.max_iter or state.get("func_evals", 0) >= max_eval:
            warnings.warn(f"LinearProbe: L-BFGS hit max_iter={self.max_iter} before the "
                          f"gradient fell below tol={self.tol}", ConvergenceWarning)
        return W.detach().cpu().numpy(), b.detach().cpu().numpy()


def cross_val_predict_proba(probe, X, y, *, n_folds=5, seed=0, n_classes=None):
    """Out-of-fold probabilities (N, n_classes): row i comes from a clone of `probe`
    fitted on the folds that do not contain i. Folds: StratifiedKFold(n_folds,
    shuffle=True, random_state=seed). Works with any estimator whose fit accepts
    n_classes= (LinearProbe, KNNClassifier). n_classes: None means max(y) + 1."""
    X = _check_features(X, "X")
    y = _check_labels(y, len(X))
    n_classes = _resolve_n_classes(y, n_classes)
    folds = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    oof = np.full((len(X), n_classes), np.nan)
    for train, test in folds.split(X, y):
        model = clone(probe).fit(X[train], y[train], n_classes=n_classes)
        oof[test] = model.predict_proba(X[test])
    return oof
