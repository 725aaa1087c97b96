"""Extraction under torchrun: 1 process vs N processes on the same images, side by side.

    python benchmarks/bench_distributed.py [--model cifar_resnet56] [--n 10000] [--procs 2]

Runs `hardprobe extract` on the shared JPEG CIFAR-10 test set (or its first --n images;
generated images when ../shared is absent) three ways, each in a fresh cache:
  single   python -m hardprobe extract, torch's default threads (all cores)
  single1  the same with OMP_NUM_THREADS=1 (one core's worth: the per-rank budget of 2 ranks
           on 2 cores, so single1 / torchrun shows the scaling across processes alone)
  torchrun torchrun --standalone --nproc_per_node N -m hardprobe extract (gloo on CPU)
and checks that the three give the same features bit for bit. The speed-up of N processes is
bounded by the machine's cores: on a 2-core machine 2 ranks share the cores one thread each.
Writes benchmarks/results/bench_distributed.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
OUT = Path(__file__).resolve().parent / "results"


def test_images(root: Path, n: int) -> Path:
    """An ImageFolder of the first n test images per class order (shared data), else generated."""
    tar = SHARED / "data" / "cifar10-jpeg" / "test.tar"
    folder = root / "test"
    if tar.exists():
        with tarfile.open(tar) as tf:
            tf.extractall(root / "x", filter="data")
        src = next(p for p in (root / "x").rglob("*") if p.is_dir() and p.name == "test")
        classes = sorted(d for d in src.iterdir() if d.is_dir())
        per = n // len(classes)
        for d in classes:
            (folder / d.name).mkdir(parents=True)
            for f in sorted(d.iterdir())[:per]:
                shutil.copy(f, folder / d.name / f.name)
        return folder
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import make_folder
    return make_folder(folder, n // 3, 0)


def extract(launcher: list[str], folder: Path, cache: Path, out: Path, model: str, weights,
            env: dict, batch: int) -> float:
    cmd = launcher + ["-m", "hardprobe", "extract", "--model", model, "--data", "imagefolder",
                      "--train", str(folder), "--cache-dir", str(cache), "--out", str(out),
                      "--device", "cpu", "--batch-size", str(batch), "--no-progress",
                      "--shard-size", "1000"]
    cmd += ["--weights", str(weights)] if weights else ["--random-init"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="cifar_resnet56")
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    a = ap.parse_args()
    ckpt = {"cifar_resnet56": "resnet56-4bfd9763.th", "cifar_resnet20": "resnet20-12fca82f.th"}
    weights = SHARED / "models" / "cifar-resnet" / ckpt.get(a.model, "-")
    weights = weights if weights.exists() else None
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = test_images(tmp, a.n)
        n = sum(1 for _ in folder.rglob("*.*"))
        base = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        one = {**base, "OMP_NUM_THREADS": "1"}
        py = [sys.executable]
        run = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(a.procs)]
        # warm the page cache and imports once, so the first timed run pays no extra
        extract(py, folder, tmp / "warm", tmp / "warm_run", a.model, weights, base, a.batch_size)
        secs = {"single": extract(py, folder, tmp / "c0", tmp / "r0", a.model, weights, base,
                                  a.batch_size),
                "single1": extract(py, folder, tmp / "c1", tmp / "r1", a.model, weights, one,
                                   a.batch_size),
                "torchrun": extract(run, folder, tmp / "c2", tmp / "r2", a.model, weights, one,
                                    a.batch_size)}
        feats = [np.load(tmp / r / "features" / "train.embedding.npy") for r in ("r0", "r1", "r2")]
        identical = all(np.array_equal(feats[0], f) for f in feats[1:])
    res = {"model": a.model, "weights": str(weights) if weights else "random init",
           "images": n, "procs": a.procs, "cores": os.cpu_count(), "seconds": secs,
           "img_per_s": {k: n / v for k, v in secs.items()},
           "speedup_vs_single": secs["single"] / secs["torchrun"],
           "speedup_vs_single1": secs["single1"] / secs["torchrun"],
           "features_identical": identical}
    OUT.mkdir(exist_ok=True)
    (OUT / "bench_distributed.json").write_text(json.dumps(res, indent=2))
    print(f"{a.model}, {n} images, {os.cpu_count()} cores (wall time includes start-up)")
    for k, v in secs.items():
        print(f"  {k:<9} {v:7.1f} s  {n / v:7.1f} img/s")
    print(f"  torchrun x{a.procs} vs single: {res['speedup_vs_single']:.2f}x, "
          f"vs single at 1 thread: {res['speedup_vs_single1']:.2f}x; "
          f"features identical: {identical}")


if __name__ == "__main__":
    main()
