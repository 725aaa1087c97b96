"""Linear probe vs scikit-learn, side by side in one process: out-of-fold probabilities
(5 folds) plus the full-data fit, as `hardprobe classify` does, on synthetic ReLU features
(N x D, K classes, low-rank like a CNN's). Prints seconds, the ratio to the plain solver (before), the full fit's
L-BFGS iterations, and the largest probability difference to the plain solver's (the same
minimiser; both stop at max |gradient| < 1e-6), with scikit-learn LogisticRegression(lbfgs) at its
default tolerance for scale.

    PYTHONPATH=src python3 benchmarks/bench_linear.py [--n 5000 --d 2048 --k 10 --repeat 1]
    ... --features X.npy --labels y.npy   (e.g. a run's features/train arrays)
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from bench_knn import machine
from hardprobe.heads import LinearProbe, cross_val_predict_proba, fold_jobs


def features(n, d, k, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    lat = rng.normal(size=(n, 64))
    lat[np.arange(n), y % 64] += 2.0
    x = np.maximum(lat @ rng.normal(size=(64, d)) + 0.5 * rng.normal(size=(n, d)), 0)
    return x.astype(np.float32), y


def ours(x, y, k, folds, precondition, n_jobs):
    """(out-of-fold probabilities, iterations of the full-data fit)."""
    oof, full = cross_val_predict_proba(LinearProbe(precondition=precondition), x, y,
                                        n_folds=folds, n_classes=k, return_estimator=True,
                                        n_jobs=n_jobs)
    return oof, full.n_iter_


def sklearn(x, y, k, folds, tol):
    oof = np.zeros((len(x), k))
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=0).split(x, y):
        m = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, tol=tol))
        oof[test] = m.fit(x[train], y[train]).predict_proba(x[test])
    make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, tol=tol)).fit(x, y)
    return oof


def best_of(fn, repeat):
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def load(a):
    """(x, y, description): --features/--labels .npy files, else synthetic."""
    if a.features:
        x, y = np.load(a.features).astype(np.float32), np.load(a.labels)
        return x[:a.n], y[:a.n], f"{a.features} (first {min(a.n, len(x))} rows)"
    return (*features(a.n, a.d, a.k), "synthetic CNN-like ReLU features (rank-64 latent)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--features", help="(N, D) .npy features instead of synthetic ones")
    ap.add_argument("--labels", help="(N,) .npy labels for --features")
    ap.add_argument("--no-sklearn", action="store_true", help="skip the sklearn row")
    a = ap.parse_args()
    m = machine()
    print(f"{m['model']}; {m['cpus']} cores; flags: {' '.join(m['flags']) or 'none'}")
    x, y, what = load(a)
    k = int(y.max()) + 1
    jobs = fold_jobs(len(x) * (a.folds - 1) // a.folds, x.shape[1], a.folds)
    rows = {}
    rows["plain L-BFGS, folds one at a time (before)"] = best_of(
        lambda: ours(x, y, k, a.folds, 0, 1), a.repeat)
    rows["preconditioned, one at a time"] = best_of(
        lambda: ours(x, y, k, a.folds, 64, 1), a.repeat)
    rows[f"preconditioned, {jobs} folds at once (default)"] = best_of(
        lambda: ours(x, y, k, a.folds, 64, jobs), a.repeat)
    if not a.no_sklearn:
        rows["sklearn lbfgs tol=1e-4 (its default)"] = best_of(
            lambda: (sklearn(x, y, k, a.folds, 1e-4), None), a.repeat)
    print(f"{what}: {len(x)} x {x.shape[1]}, {k} classes, {a.folds} folds + the full fit, "
          f"best of {a.repeat}")
    base_s, (base_p, _) = rows["plain L-BFGS, folds one at a time (before)"]
    for name, (sec, (p, iters)) in rows.items():
        it = "" if iters is None else f"{iters:5d} it (full fit)"
        print(f"{name:46s} {sec:8.1f} s  {base_s / sec:5.2f}x before  {it:19s} "
              f"max |p - p_before| {np.abs(p - base_p).max():.1e}")


if __name__ == "__main__":
    main()
