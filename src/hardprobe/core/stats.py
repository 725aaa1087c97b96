"""Statistics several stages share: softmax, rank correlation, a stratified subset (one each)."""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError


def stratified_subset(labels, n: int | None, *, seed: int = 0) -> np.ndarray:
    """Sorted positions of at most n examples, each class in proportion to its size: a seeded
    shuffle, then classes interleaved by (rank within class + 0.5) / class size."""
    labels = np.asarray(labels)
    if n is None or n >= len(labels):
        return np.arange(len(labels))
    if n < 1:
        raise ConfigError(f"subset must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    _, cls = np.unique(labels, return_inverse=True)
    perm = rng.permutation(len(labels))
    c = cls[perm]
    order = np.argsort(c, kind="stable")
    counts = np.bincount(c)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(len(c), np.int64)
    rank[order] = np.arange(len(c)) - np.repeat(starts, counts)
    key = (rank + 0.5) / counts[c]
    take = perm[np.lexsort((rng.random(len(c)), key))[:n]]
    return np.sort(take)


def spearman(a, b) -> dict:
    """Spearman's rho (scipy) over the pairs where both are finite; None when undefined."""
    return rank_correlation(a, b, method="spearman")


def rank_correlation(a, b, *, method: str = "spearman") -> dict:
    """Spearman's rho or Kendall's tau (scipy) over the pairs where both are finite:
    {"rho" | "tau": stat, "p": p-value, "n": pairs used}; None when undefined (fewer than 3
    pairs, or a constant side)."""
    from scipy.stats import kendalltau, spearmanr
    fn, key = {"spearman": (spearmanr, "rho"), "kendall": (kendalltau, "tau")}[method]
    a, b = np.asarray(a, float), np.asarray(b, float)
    m = np.isfinite(a) & np.isfinite(b)
    if m.sum() < 3 or np.ptp(a[m]) == 0 or np.ptp(b[m]) == 0:
        return {key: None, "p": None, "n": int(m.sum())}
    r = fn(a[m], b[m])
    return {key: float(r.statistic), "p": float(r.pvalue), "n": int(m.sum())}


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
