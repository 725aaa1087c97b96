"""kNN at the roof: hardprobe's exact kNN vs one plain matrix multiply vs FAISS IndexFlatIP.

    python benchmarks/bench_knn.py [--shapes 10000x50000x2048 2000x10000x512] [--k 20]
                                   [--repeats 3] [--threads N]

For each shape (queries x train x dims) and each precision the CPU runs fast (fp32 always;
bf16 when lscpu lists avx512_bf16 or amx_bf16), measured side by side in one process:
  - roof: one torch.mm of the same shape and precision into a preallocated output (the
    similarity matrix that any exact search must compute);
  - hardprobe kNN: KNNClassifier(k).kneighbors(queries) (fit excluded), exact fp32, or bf16
    candidates re-ranked exactly in fp32;
  - FAISS IndexFlatIP.search (fp32 only: FAISS flat has no bf16 search), on as many
    threads as torch.
Each time is the best of --repeats runs, the methods interleaved (the machine may be shared
with other work: the minimum is the least disturbed run); wall time, and the process's CPU
time (all its threads; on a machine shared with other work, less disturbed by waiting for a
core than wall time is, but it counts threads spinning at OpenMP barriers). Neighbours are checked against a
float64 reference on 200 queries (agreement up to exact ties). Random unit vectors in 100
clusters: the search cost does not depend on where they came from. Writes
benchmarks/results/bench_knn.json and prints the machine (lscpu model and flags).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from hardprobe.heads import KNNClassifier

OUT = Path(__file__).resolve().parent / "results"
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of (query, neighbour) pairs found by both, order ignored."""
    return float(np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(a, b)]))


def machine() -> dict:
    """lscpu model name and the SIMD flags that decide which precisions are fast."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        text = ""
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = set(fields.get("Flags", "").split())
    try:
        import faiss
        faiss_version = faiss.__version__
    except ImportError:
        faiss_version = None
    return {"model": fields.get("Model name", platform.processor()).strip(),
            "cpus": os.cpu_count(), "flags": [f for f in FLAGS if f in flags],
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "faiss": faiss_version, "load_average": os.getloadavg()[0]}


def features(n_query, n_train, dim, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((100, dim), dtype=np.float32)
    train = centers[rng.integers(0, 100, n_train)] + rng.standard_normal((n_train, dim),
                                                                         dtype=np.float32)
    query = centers[rng.integers(0, 100, n_query)] + rng.standard_normal((n_query, dim),
                                                                        dtype=np.float32)
    train /= np.linalg.norm(train, axis=1, keepdims=True)
    query /= np.linalg.norm(query, axis=1, keepdims=True)
    return train, query


def reference(train, query, k, n=200):
    """Exact float64 neighbours of the first n queries."""
    sims = query[:n].astype(np.float64) @ train.T.astype(np.float64)
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def methods(train, query, k, precision):
    """name -> (callable returning neighbour ids or None, kind)."""
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    q, t = torch.from_numpy(query).to(dtype), torch.from_numpy(train).to(dtype)
    out = torch.empty(len(q), len(t), dtype=dtype)
    knn = KNNClassifier(k=k, precision=precision).fit(train, np.zeros(len(train), int))
    found = {f"matmul roof {precision}": lambda: (torch.mm(q, t.T, out=out), None)[1],
             f"hardprobe kNN {precision}": lambda: knn.kneighbors(query)[1]}
    if precision == "fp32":
        try:
            import faiss
        except ImportError:
            print("faiss not installed: pip install faiss-cpu")
        else:
            faiss.omp_set_num_threads(torch.get_num_threads())
            index = faiss.IndexFlatIP(train.shape[1])
            index.add(train)
            found["faiss IndexFlatIP fp32"] = lambda: index.search(query, k)[1]
    return found


def bench_shape(n_query, n_train, dim, k, repeats, precisions):
    """name -> {seconds, cpu_seconds, vs_roof, vs_faiss_fp32, cpu_vs_roof, cpu_vs_faiss_fp32,
    agreement}: the best (least) wall and process CPU time of each method over `repeats`."""
    train, query = features(n_query, n_train, dim)
    ref = reference(train, query, k)
    rows = {}
    for precision in precisions:
        found = methods(train, query, k, precision)
        rows.update({name: {"seconds": float("inf"), "cpu_seconds": float("inf")}
                     for name in found})  # printed in this order: roof first
        for _ in range(repeats):  # interleaved: a disturbance hits one run, not one method
            for name, fn in found.items():
                cpu0 = time.process_time()
                ids, sec = timed(fn)
                r = rows[name]
                r["seconds"] = min(r["seconds"], sec)
                r["cpu_seconds"] = min(r["cpu_seconds"], time.process_time() - cpu0)
                if ids is not None:
                    r["agreement"] = agreement(ids[:len(ref)], ref)
        for clock, prefix in (("seconds", ""), ("cpu_seconds", "cpu_")):
            roof = rows[f"matmul roof {precision}"][clock]
            faiss_s = rows.get("faiss IndexFlatIP fp32", {}).get(clock)
            for name in found:
                sec = rows[name][clock]
                rows[name][prefix + "vs_roof"] = sec / roof
                rows[name][prefix + "vs_faiss_fp32"] = sec / faiss_s if faiss_s else None
        del found
    return rows


def print_rows(rows) -> None:
    """One line per method: wall seconds and ratios, then the same from process CPU time."""
    print(f"{'method':<26} {'seconds':>8} {'vs roof':>8} {'vs faiss':>9} {'cpu s':>7} "
          f"{'vs roof':>8} {'vs faiss':>9} {'agreement':>10}")
    for name, r in rows.items():
        cells = [f"{r['seconds']:8.2f}", f"{r['vs_roof']:8.3f}"]
        cells.append(f"{r['vs_faiss_fp32']:9.3f}" if r["vs_faiss_fp32"] else f"{'-':>9}")
        cells += [f"{r['cpu_seconds']:7.2f}", f"{r['cpu_vs_roof']:8.3f}"]
        cells.append(f"{r['cpu_vs_faiss_fp32']:9.3f}" if r["cpu_vs_faiss_fp32"] else f"{'-':>9}")
        cells.append(f"{r['agreement']:10.4f}" if "agreement" in r else f"{'-':>10}")
        print(f"{name:<26} " + " ".join(cells))
    print("(vs roof: / the matmul of the same precision; vs faiss: / FAISS IndexFlatIP fp32; "
          "first wall time, then process CPU time, all threads)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["10000x50000x2048", "2000x10000x512"],
                    help="queries x train x dims")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch (and FAISS) threads; default torch's own")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine()
    precisions = ["fp32"] + (["bf16"] if {"avx512_bf16", "amx_bf16"} & set(info["flags"])
                             else [])
    print(f"machine: {info['model']}, {info['cpus']} CPUs, flags {' '.join(info['flags'])}, "
          f"torch {info['torch']} on {info['torch_threads']} threads, faiss {info['faiss']}; "
          f"load average {info['load_average']:.1f}; best of {args.repeats}")
    results = {}
    for shape in args.shapes:
        nq, nt, d = (int(v) for v in shape.split("x"))
        rows = bench_shape(nq, nt, d, args.k, args.repeats, precisions)
        results[shape] = rows
        print(f"\n{nq:,} queries x {nt:,} train x {d:,} dims, k = {args.k}")
        print_rows(rows)
    OUT.mkdir(exist_ok=True)
    (OUT / "bench_knn.json").write_text(json.dumps(
        {"k": args.k, "repeats": args.repeats, "machine": info, "results": results}, indent=2))


if __name__ == "__main__":
    main()
