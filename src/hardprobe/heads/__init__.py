"""Lightweight heads on frozen features: input (N, D) float features, int labels in [0, n_classes).

Heads know no torch models or datasets. All follow the scikit-learn estimator API and
accept fit(X, y, n_classes=None) so a class absent from train still gets a column.
"""
from .knn import KNNClassifier
from .linear import LinearProbe, cross_val_predict_proba, fold_jobs
from .mlp import MLPHead

__all__ = ["KNNClassifier", "LinearProbe", "MLPHead", "cross_val_predict_proba", "fold_jobs"]
