"""Linear probe vs scikit-learn, side by side in one process: out-of-fold probabilities
(5 folds) plus the full-data fit, as `hardprobe classify` does, on synthetic ReLU features
(N x D, K classes, low-rank like a CNN's). Prints seconds, the ratio, and the largest
probability difference to scikit-learn LogisticRegression(lbfgs) at the same C.

    PYTHONPATH=src python3 benchmarks/bench_linear.py [--n 5000 --d 2048 --k 10 --repeat 1]
"""
from __future__ import annotations

import argparse
import subprocess
import time

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from hardprobe.heads import LinearProbe, cross_val_predict_proba


def features(n, d, k, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    lat = rng.normal(size=(n, 64))
    lat[np.arange(n), y % 64] += 2.0
    x = np.maximum(lat @ rng.normal(size=(64, d)) + 0.5 * rng.normal(size=(n, d)), 0)
    return x.astype(np.float32), y


def ours(x, y, k, folds, threads):
    oof, full = cross_val_predict_proba(LinearProbe(threads=threads), x, y, n_folds=folds,
                                        n_classes=k, return_estimator=True)
    return oof


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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=1)
    a = ap.parse_args()
    print(subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True,
                         text=True).stdout.strip(), "| flags:", " ".join(
        f for f in ("avx2", "avx512_bf16", "amx_tile") if f in open("/proc/cpuinfo").read()))
    x, y = features(a.n, a.d, a.k)
    rows = {}
    rows["ours (threads=1)"] = best_of(lambda: ours(x, y, a.k, a.folds, 1), a.repeat)
    rows["ours (threads=all)"] = best_of(lambda: ours(x, y, a.k, a.folds, None), a.repeat)
    rows["sklearn tol=1e-4 (default)"] = best_of(lambda: sklearn(x, y, a.k, a.folds, 1e-4),
                                                 a.repeat)
    ref = rows["sklearn tol=1e-4 (default)"][1]
    base = rows["sklearn tol=1e-4 (default)"][0]
    print(f"{a.n} x {a.d}, {a.k} classes, {a.folds} folds + full fit, best of {a.repeat}")
    for name, (sec, p) in rows.items():
        print(f"{name:28s} {sec:8.1f} s  {base / sec:5.2f}x sklearn  "
              f"max |p - p_sklearn| {np.abs(p - ref).max():.1e}")


if __name__ == "__main__":
    main()
