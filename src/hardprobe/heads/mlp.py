"""An MLP head with dropout on frozen features, trained by SGD or AdamW with a warm-up + cosine
schedule (`hardprobe.heads.training`): the non-linear alternative to the linear probe.

Input standardisation (train mean and population std, scale 1 for a constant column) is part
of the network, so `predict_proba` takes raw features. `hidden=()` gives a plain softmax
regression trained by the same recipe (the fine-tuning stage's mode="head").
"""
from __future__ import annotations

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted
from torch import nn

from ..errors import HeadError
from ._arrays import (
    _check_features,
    _check_labels,
    _check_n_features,
    _resolve_n_classes,
)
from .training import Trainer, predict_logits


class MLPNet(nn.Module):
    """(x - mean) / scale -> [Linear -> ReLU -> Dropout] x len(hidden) -> Linear(n_out)."""

    def __init__(self, n_in: int, n_out: int, *, hidden=(512,), dropout: float = 0.5,
                 mean=None, scale=None):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_in) if mean is None
                             else torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("scale", torch.ones(n_in) if scale is None
                             else torch.as_tensor(scale, dtype=torch.float32))
        layers, d = [], n_in
        for h in hidden:
            layers += [nn.Linear(d, int(h)), nn.ReLU(), nn.Dropout(dropout)]
            d = int(h)
        layers.append(nn.Linear(d, n_out))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers((x - self.mean) / self.scale)


def standardization(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale) of X's columns: StandardScaler semantics (population std, 1 if constant)."""
    X = np.asarray(X, dtype=np.float64)
    mean, std = X.mean(0), X.std(0)
    std[np.ptp(X, axis=0) == 0] = 1.0
    return mean.astype(np.float32), std.astype(np.float32)


def feature_batches(X: torch.Tensor, batch_size: int):
    """batches(order, generator) over rows of an in-memory feature tensor (no augmentation)."""
    def batches(order, _gen=None):
        for s in range(0, len(order), batch_size):
            pos = np.asarray(order[s:s + batch_size])
            yield X[torch.from_numpy(pos)], pos
    return batches


class MLPHead(ClassifierMixin, BaseEstimator):
    """MLP classifier on (N, D) features; sklearn estimator API.

    hidden: widths of the hidden layers (() = linear). dropout: after each hidden layer.
    epochs, batch_size, lr, optimizer ("adamw" | "sgd"), weight_decay, momentum (SGD, with
    Nesterov), warmup_epochs (linear warm-up, then cosine to 0), label_smoothing.
    standardize: standardise the inputs with the train statistics. device, seed: the fit is
    deterministic for a seed on the CPU.

    Fitted attributes: net_ (MLPNet), n_classes_, classes_, n_features_in_, mean_, scale_,
    history_ (one dict per epoch: loss, acc, lr, ...), dynamics_ ({"prob_given", "correct",
    "margin"}: (N, epochs) from the training forward passes, see hardprobe.scoring.dynamics).
    """

    def __init__(self, *, hidden=(512,), dropout=0.5, epochs=30, batch_size=256, lr=1e-3,
                 optimizer="adamw", weight_decay=1e-4, momentum=0.9, warmup_epochs=1.0,
                 label_smoothing=0.0, standardize=True, device="cpu", seed=0):
        self.hidden, self.dropout = hidden, dropout  # the network
        self.epochs, self.batch_size, self.lr = epochs, batch_size, lr  # the schedule
        self.optimizer, self.weight_decay, self.momentum = optimizer, weight_decay, momentum
        self.warmup_epochs, self.label_smoothing = warmup_epochs, label_smoothing
        self.standardize, self.device, self.seed = standardize, device, seed

    def fit(self, X, y, n_classes=None):
        """Fit on (N, D) features and (N,) int labels. n_classes: None means max(y) + 1."""
        if int(self.epochs) < 1 or int(self.batch_size) < 1 or not self.lr > 0:
            raise HeadError(f"epochs and batch_size must be >= 1 and lr > 0, got epochs="
                             f"{self.epochs}, batch_size={self.batch_size}, lr={self.lr}")
        if not 0 <= self.dropout < 1:
            raise HeadError(f"dropout must lie in [0, 1), got {self.dropout}")
        X = _check_features(X, "X")
        y = _check_labels(y, len(X))
        self.n_classes_ = _resolve_n_classes(y, n_classes)
        if self.n_classes_ < 2:
            raise HeadError("MLPHead needs at least 2 classes")
        self.classes_ = np.arange(self.n_classes_)
        self.n_features_in_ = X.shape[1]
        self.mean_, self.scale_ = (standardization(X) if self.standardize else
                                   (np.zeros(X.shape[1], np.float32),
                                    np.ones(X.shape[1], np.float32)))
        torch.manual_seed(self.seed)
        self.net_ = MLPNet(X.shape[1], self.n_classes_, hidden=tuple(self.hidden),
                           dropout=self.dropout, mean=self.mean_, scale=self.scale_)
        self.net_.to(self.device)
        Xt = torch.as_tensor(X, dtype=torch.float32, device=self.device)
        trainer = Trainer(self.net_, self.net_.parameters(), y, epochs=self.epochs,
                          batch_size=self.batch_size, optimizer=self.optimizer, lr=self.lr,
                          weight_decay=self.weight_decay, momentum=self.momentum,
                          warmup_epochs=self.warmup_epochs, label_smoothing=self.label_smoothing,
                          device=self.device, seed=self.seed)
        trainer.fit(feature_batches(Xt, int(self.batch_size)))
        self.history_, self.dynamics_ = trainer.history, trainer.record
        self.net_.eval()
        return self

    def decision_function(self, X):
        """(N, n_classes) logits; higher = more likely."""
        check_is_fitted(self, "net_")
        X = _check_n_features(_check_features(X, "X", allow_empty=True), self.n_features_in_,
                              "head")
        Xt = torch.as_tensor(X, dtype=torch.float32, device=self.device)
        order = np.arange(len(X))
        return predict_logits(self.net_, feature_batches(Xt, 4096)(order), len(X),
                              self.n_classes_, device=self.device).astype(np.float64)

    def predict_proba(self, X):
        """(N, n_classes) float64 softmax probabilities, rows sum to 1."""
        z = self.decision_function(X)
        z -= z.max(1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(1, keepdims=True)

    def predict(self, X):
        """(N,) int64 most probable class; ties go to the lowest class index."""
        return self.decision_function(X).argmax(1)
