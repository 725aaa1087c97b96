"""kNN at scale: FAISS flat and IVF (recall@k against exact search) on memory-mapped features.

    python benchmarks/bench_faiss.py [--n-train 50000] [--n-query 10000] [--dim 2048] [--k 20]
                                     [--nprobe 1 4 16 64] [--threads 2] [--real RUN_DIR]

Synthetic features with the structure of real ones, written to .npy files and read back
memory-mapped: 10 classes, each a mixture of 8 gaussian sub-clusters in a 64-dimensional
subspace with a decaying spectrum, plus isotropic noise in all dimensions (float32). Measured
side by side in one run, all through hardprobe's KNNClassifier, against our exact torch kNN:
  - search time of the torch exact kNN, FAISS flat (exact), IVF and IVF with float16 storage at
    each nprobe (one index per kind, built once), as a ratio to FAISS flat;
  - recall@k of each against the exact neighbours (share of the k exact ones found), and the
    kNN accuracy on the queries' labels;
  - peak RSS of fit + search in a fresh process per variant: features loaded into RAM vs
    read memory-mapped (resource.getrusage; the queries in these processes are the first
    2,000, as the output size is not what is measured).
--real RUN_DIR (default /tmp/runs/r56full when present) repeats the IVF sweep on a hardprobe
run's features/{train,test}.embedding.npy. Writes benchmarks/results/bench_faiss.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from bench_knn import agreement, timed  # same folder: the script's own path is on sys.path

OUT = Path(__file__).resolve().parent / "results"
DEFAULT_REAL = Path("/tmp/runs/r56full")
RSS_QUERIES = 2000


def set_threads(n: int) -> None:
    import faiss
    import torch
    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)


def write_features(path: Path, n: int, dim: int, mix_seed: int, chunk: int = 5000):
    """Write (n, dim) float32 features to path (.npy) chunk by chunk; return the labels.
    The class structure comes from seed 0 (shared by train and queries), the draws from
    mix_seed."""
    n_classes, rank, n_sub = 10, 64, 8
    g = np.random.default_rng(0)
    basis = np.linalg.qr(g.normal(size=(dim, rank)))[0].astype(np.float32)  # (dim, rank)
    spectrum = (1 / np.sqrt(1 + np.arange(rank))).astype(np.float32)
    means = g.normal(size=(n_classes, rank)).astype(np.float32) * 0.7 * spectrum
    subs = means[:, None] + 0.7 * spectrum * g.normal(size=(n_classes, n_sub, rank)).astype(
        np.float32)  # (classes, sub-clusters, rank)
    rng = np.random.default_rng(mix_seed)
    y, sub = rng.integers(0, n_classes, n), rng.integers(0, n_sub, n)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        z = subs[y[a:b], sub[a:b]] + spectrum * rng.normal(size=(b - a, rank)).astype(np.float32)
        out[a:b] = z @ basis.T + 0.1 * rng.normal(size=(b - a, dim)).astype(np.float32)
    out.flush()
    del out
    return y


def synthetic(args) -> dict:
    root = Path(args.data_dir)
    root.mkdir(parents=True, exist_ok=True)
    tag, qtag = f"{args.n_train}x{args.dim}_v1", f"{args.n_query}x{args.dim}_v1"  # v: generator
    files = {"train": root / f"train_{tag}.npy", "query": root / f"query_{qtag}.npy",
             "y_train": root / f"ytrain_{tag}.npy", "y_query": root / f"yquery_{qtag}.npy"}
    if not all(f.exists() for f in files.values()):
        np.save(files["y_train"], write_features(files["train"], args.n_train, args.dim, 1))
        np.save(files["y_query"], write_features(files["query"], args.n_query, args.dim, 2))
    return {k: str(v) for k, v in files.items()}


def real(run_dir: Path, data_dir: str) -> dict | None:
    feats = run_dir / "features"
    if not (feats / "train.embedding.npy").exists():
        return None
    import hardprobe
    run = hardprobe.load_run(run_dir)
    tmp = Path(data_dir) / "real_labels"
    tmp.mkdir(parents=True, exist_ok=True)
    np.save(tmp / "y_train.npy", run.split_examples("train")["label"].to_numpy())
    np.save(tmp / "y_query.npy", run.split_examples("test")["label"].to_numpy())
    return {"train": str(feats / "train.embedding.npy"), "query": str(feats / "test.embedding.npy"),
            "y_train": str(tmp / "y_train.npy"), "y_query": str(tmp / "y_query.npy")}


def index_bytes(knn) -> int:
    ix = knn.index_
    if knn.nlist_ is None:
        return ix.ntotal * ix.code_size
    # codes, ids, centroids
    return ix.ntotal * (ix.code_size + 8) + knn.nlist_ * knn.n_features_in_ * 4


def sweep(files: dict, k: int, nprobes: list[int]) -> list[dict]:
    """Every method on the same memory-mapped features, in this process."""
    from hardprobe.heads import KNNClassifier
    X = np.load(files["train"], mmap_mode="r")
    Q = np.load(files["query"], mmap_mode="r")
    y, yq = np.load(files["y_train"]), np.load(files["y_query"])
    rows = []

    def row(name, knn, build, **extra):
        (proba, _, idx), sec = timed(lambda: knn.predict_proba_and_neighbors(Q))
        rows.append({"method": name, "build_s": build, "search_s": sec, "idx": idx,
                     "accuracy": float((proba.argmax(1) == yq).mean()), **extra})
        print(f"  {name:<26} build {build:6.1f} s  search {sec:6.2f} s", flush=True)

    exact, build = timed(lambda: KNNClassifier(k=k).fit(X, y))  # a normalised copy in RAM
    row("torch exact", exact, build)
    del exact
    flat, build = timed(lambda: KNNClassifier(k=k, backend="faiss").fit(X, y))
    row("faiss flat (memmap)", flat, build, index_mb=index_bytes(flat) / 1e6)
    del flat
    for kind in ("ivf", "ivf_fp16"):
        knn, build = timed(lambda: KNNClassifier(k=k, backend="faiss", index=kind).fit(X, y))
        for nprobe in nprobes:
            knn.set_params(nprobe=nprobe)
            row(f"{kind} nlist={knn.nlist_} nprobe={nprobe}", knn, build,
                index_mb=index_bytes(knn) / 1e6, nprobe=nprobe, nlist=knn.nlist_)
            build = 0.0  # built once per kind
        del knn
    ref, flat_s = rows[0]["idx"], rows[1]["search_s"]
    for r in rows:
        r["recall"] = agreement(r.pop("idx"), ref)  # recall@k: k exact neighbours each
        r["search_vs_faiss_flat"] = r["search_s"] / flat_s
    return rows


def peak_rss() -> int:
    """This process's peak resident set in bytes: VmHWM, which starts afresh at exec. (On
    Linux ru_maxrss keeps the high-water mark of the forked parent's memory across exec, so
    a child of a big parent would report the parent's size.)"""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def rss_child(variant: str, files: dict, k: int, out: str) -> None:
    """Fit + search one variant in this (fresh) process; write its peak RSS."""
    import faiss  # noqa: F401  (imported before the baseline: it is part of every variant)

    from hardprobe.heads import KNNClassifier
    base = peak_rss()
    where, backend, index = variant.split(":")
    mode = "r" if where == "memmap" else None
    X, y = np.load(files["train"], mmap_mode=mode), np.load(files["y_train"])
    Q = np.load(files["query"], mmap_mode=mode)[:RSS_QUERIES]
    kw = {} if backend == "torch" else {"backend": "faiss", "index": index}
    KNNClassifier(k=k, **kw).fit(X, y).kneighbors(Q)
    peak = peak_rss()
    Path(out).write_text(json.dumps({"baseline": base, "peak": peak}))


def rss(files: dict, k: int, threads: int) -> list[dict]:
    rows = []
    for variant in ("ram:torch:flat", "ram:faiss:flat", "memmap:faiss:flat", "memmap:faiss:ivf",
                    "memmap:faiss:ivf_fp16"):
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            subprocess.run([sys.executable, __file__, "--rss-child", variant, f.name,
                            "--threads", str(threads), "--k", str(k), "--files", json.dumps(files)],
                           check=True)
            got = json.loads(Path(f.name).read_text())
        rows.append({"variant": variant, **got})
        print(f"  {variant:<24} peak RSS {got['peak'] / 2**30:5.2f} GiB "
              f"(+{(got['peak'] - got['baseline']) / 2**30:.2f} over the imports)", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=50_000)
    ap.add_argument("--n-query", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--nprobe", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--threads", type=int, default=2, help="torch and FAISS (OpenMP) threads")
    ap.add_argument("--data-dir", help="where the synthetic .npy files are written (reused)",
                    default=os.path.join(tempfile.gettempdir(), "hardprobe_bench_faiss"))
    ap.add_argument("--real", type=Path, default=DEFAULT_REAL, help="a hardprobe run directory")
    ap.add_argument("--rss-child", nargs=2, metavar=("VARIANT", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--files", help=argparse.SUPPRESS)
    args = ap.parse_args()
    set_threads(args.threads)
    if args.rss_child:
        variant, out = args.rss_child
        return rss_child(variant, json.loads(args.files), args.k, out)

    import faiss
    import torch
    files = synthetic(args)
    load_before = os.getloadavg()
    print(f"load average before: {load_before[0]:.2f} (1 min)", flush=True)
    print(f"synthetic: {args.n_query} queries x {args.n_train} x {args.dim}, k={args.k}, "
          f"torch and FAISS at {args.threads} threads ({os.cpu_count()} cores)", flush=True)
    result = {"synthetic": {"shape": [args.n_train, args.dim], "n_query": args.n_query,
                            "rows": sweep(files, args.k, args.nprobe)}}
    print("peak RSS, fit + search, one process per variant:", flush=True)
    result["synthetic"]["rss"] = rss(files, args.k, args.threads)
    real_files = real(args.real, args.data_dir)
    if real_files:
        shape = np.load(real_files["train"], mmap_mode="r").shape
        print(f"real: {args.real} features {shape}", flush=True)
        result["real"] = {"run": str(args.real), "shape": list(shape),
                          "rows": sweep(real_files, args.k, args.nprobe)}

    for part in ("synthetic", "real"):
        if part not in result:
            continue
        print(f"\n{part} {result[part]['shape']}: recall@{args.k} against exact kNN")
        print(f"{'method':<28} {'build s':>8} {'search s':>9} {'vs flat':>8} {'recall':>7} "
              f"{'kNN acc':>8} {'index MB':>9}")
        for r in result[part]["rows"]:
            print(f"{r['method']:<28} {r['build_s']:8.1f} {r['search_s']:9.2f} "
                  f"{r['search_vs_faiss_flat']:8.2f} {r['recall']:7.4f} {r['accuracy']:8.4f} "
                  f"{r.get('index_mb', float('nan')):9.0f}")
    print(f"\npeak RSS of fit + search ({RSS_QUERIES} queries), one process each")
    print(f"{'variant':<24} {'peak GiB':>9} {'over imports':>13} {'vs RAM torch':>13}")
    rss_rows = result["synthetic"]["rss"]
    for r in rss_rows:
        r["vs_ram_torch"] = r["peak"] / rss_rows[0]["peak"]
        print(f"{r['variant']:<24} {r['peak'] / 2**30:9.2f} "
              f"{(r['peak'] - r['baseline']) / 2**30:13.2f} {r['vs_ram_torch']:13.2f}")
    load_after = os.getloadavg()
    print(f"load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    result.update({"load_before": load_before, "load_after": load_after,
                   "k": args.k, "threads": args.threads, "machine": platform.platform(),
                   "cores": os.cpu_count(), "torch": torch.__version__, "faiss": faiss.__version__})
    OUT.mkdir(exist_ok=True)
    (OUT / "bench_faiss.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
