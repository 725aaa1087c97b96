"""Cache: a rerun of `hardprobe run` on cached features vs the first run; peak memory.

    python benchmarks/bench_cache.py [--model cifar_resnet20] [--n-train 50000] [--dim 2048]

Part 1 runs `hardprobe run` twice on the same images (the shared JPEG CIFAR-10 when ../shared
is present, else generated images) in a fresh cache: the first run extracts and fits, the
rerun should only look things up. Part 2 measures the peak RSS of `hardprobe classify` on a
run of 60,000 x 2,048 synthetic features (ResNet-50-sized). Each measured command runs in its
own process, so peak RSS is that command's alone. Writes benchmarks/results/bench_cache.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
OUT = Path(__file__).resolve().parent / "results"


def child(argv: list[str], rss_file: str) -> None:
    """Run the CLI in this process, then record this process's peak RSS (bytes)."""
    from hardprobe.cli import main
    rc = main(argv)
    Path(rss_file).write_text(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))
    raise SystemExit(rc)


def measured(argv: list[str]) -> tuple[float, int]:
    with tempfile.NamedTemporaryFile(suffix=".rss") as f:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--child", f.name, "--"] + argv, check=True,
                       stdout=subprocess.DEVNULL)
        return time.perf_counter() - t0, int(Path(f.name).read_text())


def images(root: Path) -> tuple[Path, Path]:
    tars = [SHARED / "data" / "cifar10-jpeg" / f"{s}.tar" for s in ("train", "test")]
    if all(t.exists() for t in tars):
        for t in tars:
            with tarfile.open(t) as tf:
                tf.extractall(root, filter="data")
    else:
        from PIL import Image
        rng = np.random.default_rng(0)
        for split, n in (("train", 2000), ("test", 500)):
            for i in range(n):
                d = root / split / f"c{i % 10}"
                d.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(d / f"{i}.jpg")
    return root / "train", root / "test"


def synthetic_run(root: Path, n_train: int, n_test: int, dim: int) -> Path:
    """A run dir holding only extracted features, as `hardprobe extract` leaves it."""
    import pandas as pd

    from hardprobe.config import build_config, save_config
    from hardprobe.core.io import write_json
    from hardprobe.rundir.run import save_array, write_examples
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(10, dim)).astype(np.float32)
    frames = []
    for split, n in (("train", n_train), ("test", n_test)):
        y = rng.integers(0, 10, n)
        x = np.maximum(centers[y] + 2 * rng.normal(size=(n, dim)).astype(np.float32), 0)
        save_array(root, split, "embedding", x)
        frames.append(pd.DataFrame({"id": [f"{split}/{i}" for i in range(n)], "split": split,
                                    "path": [str(i) for i in range(n)], "label": y,
                                    "label_name": [f"c{v}" for v in y]}))
    write_examples(root, pd.concat(frames, ignore_index=True))
    names = [f"c{i}" for i in range(10)]
    write_json(root / "provenance.json", {"dataset": {"class_names": names}, "features": {
        s: {"key": {"synthetic": s}} for s in ("train", "test")}})
    save_config(build_config(out=str(root)), root / "config.yaml")
    return root


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[4:], sys.argv[2])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cifar_resnet56")
    ap.add_argument("--n-train", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=2048)
    args = ap.parse_args()
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train, test = images(tmp / "data")
        files = {"cifar_resnet20": "resnet20-12fca82f.th", "cifar_resnet56": "resnet56-4bfd9763.th"}
        ckpt = SHARED / "models" / "cifar-resnet" / files.get(args.model, "-")
        weights = ["--weights", str(ckpt)] if ckpt.exists() else ["--random-init"]
        cmd = ["run", "--model", args.model, *weights, "--data", "imagefolder", "--train",
               str(train), "--test", str(test), "--out", str(tmp / "run"), "--cache-dir",
               str(tmp / "cache"), "--no-progress"]
        res["first_run"] = dict(zip(("seconds", "peak_rss"), measured(cmd)))
        res["rerun"] = dict(zip(("seconds", "peak_rss"), measured(cmd)))
        run = synthetic_run(tmp / "synthetic", args.n_train, 10_000, args.dim)
        res["classify_60k_x_2048"] = dict(zip(("seconds", "peak_rss"), measured(
            ["classify", str(run), "--heads", "knn", "linear"])))
    ratio = res["rerun"]["seconds"] / res["first_run"]["seconds"]
    print(f"\n{'command':<34} {'seconds':>8} {'peak RSS GB':>12}")
    for name, r in res.items():
        print(f"{name:<34} {r['seconds']:8.1f} {r['peak_rss'] / 1e9:12.2f}")
    print(f"rerun / first run = {ratio:.3f} (target <= 0.05); classify peak RSS on "
          f"{args.n_train + 10_000} x {args.dim} = {res['classify_60k_x_2048']['peak_rss'] / 1e9:.2f} GB "
          f"(target <= 3)")
    OUT.mkdir(exist_ok=True)
    (OUT / "bench_cache.json").write_text(json.dumps({"model": args.model, "results": res,
                                                      "rerun_over_first": ratio,
                                                      "cores": os.cpu_count()}, indent=2))


if __name__ == "__main__":
    main()
