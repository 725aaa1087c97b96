"""kNN search: hardprobe's chunked matmul + top-k vs FAISS flat inner product vs scikit-learn.

    python benchmarks/bench_knn.py [--n-train 50000] [--n-query 10000] [--dim 2048] [--k 20]

Random unit-norm features (the search cost does not depend on where they came from), measured
side by side in one run; every method's neighbours are checked against scikit-learn's brute
force (agreement up to exact ties). Also the effect of storing features as float16 on the
neighbours. Writes benchmarks/results/bench_knn.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from hardprobe.heads import KNNClassifier

OUT = Path(__file__).resolve().parent / "results"


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of (query, neighbour) pairs found by both, order ignored."""
    return float(np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(a, b)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=50_000)
    ap.add_argument("--n-query", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--k", type=int, default=20)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    # clustered data so that neighbours are meaningful, as real features are
    centers = rng.normal(size=(100, args.dim)).astype(np.float32)
    train = (centers[rng.integers(0, 100, args.n_train)]
             + rng.normal(size=(args.n_train, args.dim)).astype(np.float32))
    query = (centers[rng.integers(0, 100, args.n_query)]
             + rng.normal(size=(args.n_query, args.dim)).astype(np.float32))
    train /= np.linalg.norm(train, axis=1, keepdims=True)
    query /= np.linalg.norm(query, axis=1, keepdims=True)
    y = rng.integers(0, 10, args.n_train)
    k = args.k
    rows, idx = {}, {}

    from sklearn.neighbors import NearestNeighbors
    nn = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(train)
    (_, idx["sklearn"]), rows["sklearn brute (cosine)"] = timed(lambda: nn.kneighbors(query))

    knn = KNNClassifier(k=k).fit(train, y)
    (_, idx["ours"]), rows["ours fp32 (matmul + topk)"] = timed(lambda: knn.kneighbors(query))
    knn16 = KNNClassifier(k=k, precision="bf16").fit(train, y)
    (_, idx["ours_bf16"]), rows["ours bf16 + fp32 re-rank"] = timed(lambda: knn16.kneighbors(query))
    knn_h = KNNClassifier(k=k).fit(train.astype(np.float16).astype(np.float32), y)
    (_, idx["ours_f16"]), rows["ours on float16-stored features"] = timed(
        lambda: knn_h.kneighbors(query.astype(np.float16).astype(np.float32)))
    try:
        import faiss
        faiss.omp_set_num_threads(torch.get_num_threads())
        index = faiss.IndexFlatIP(args.dim)
        index.add(train)
        (_, idx["faiss"]), rows["faiss IndexFlatIP"] = timed(lambda: index.search(query, k))
    except ImportError:
        print("faiss not installed: pip install faiss-cpu")

    ref = idx["sklearn"]
    base = rows.get("faiss IndexFlatIP")
    print(f"\n{args.n_query} queries x {args.n_train} x {args.dim}, k={k}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"{'method':<34} {'seconds':>8} {'vs faiss':>9} {'same nbrs as sklearn':>21}")
    keys = dict(zip(rows, idx))
    result = {}
    for name, sec in rows.items():
        agree = agreement(idx[keys[name]], ref)
        ratio = sec / base if base else float("nan")
        print(f"{name:<34} {sec:8.2f} {ratio:9.2f} {agree:21.4f}")
        result[name] = {"seconds": sec, "time_vs_faiss": ratio, "agreement_with_sklearn": agree}
    OUT.mkdir(exist_ok=True)
    (OUT / "bench_knn.json").write_text(json.dumps({
        "n_train": args.n_train, "n_query": args.n_query, "dim": args.dim, "k": k,
        "results": result, "machine": platform.platform(), "cores": os.cpu_count(),
        "torch": torch.__version__}, indent=2))


if __name__ == "__main__":
    main()
