"""A whole `hardprobe run`: each stage's share of the wall time, next to a plain loop and the
forward-only roof measured in the same process (issue 16).

    python benchmarks/bench_run.py                       # resnet50 @ 224, 5,000 train + 1,000 test
    python benchmarks/bench_run.py --quick               # cifar_resnet20 @ 32, 500 + 200 (a smoke run)

Images: CIFAR-10 JPEGs from ../shared (stratified by class) when present, else generated noise.
Speed does not depend on the weights, so the model is random-init (`--random-init`, never a
silent fallback: the run records it). Rows, all in one process, one after another:
  plain loop  PIL Resize + ToTensor + Normalize, fp32 NCHW, no_grad, over train + test
              (bench_extract.baseline): what a researcher writes first;
  roof        the model's forward alone on ready tensors (bench_extract.roof), train + test
              images' worth;
  run         pipeline.run(cfg) with each stage timed (extract, classify, similarity, explain,
              diagnose, report, explore), the feature cache in a fresh temporary folder.
Prints the machine (lscpu model and its avx2 / avx512_bf16 / amx_bf16 flags), the table, and
the share of the run outside extraction (target <= 1/4); writes
benchmarks/results/bench_run_<model>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench_extract import baseline, roof
from hardprobe import pipeline
from hardprobe.config import build_config
from hardprobe.core.device import default_num_workers

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
OUT = Path(__file__).resolve().parent / "results"


def machine() -> str:
    """'<lscpu model name>; flags: avx2 avx512_bf16 ...' (the ones that change the figures)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown CPU (no lscpu)"
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines()
                  if ln.startswith("Model name")), "unknown CPU")
    flags = set(text.split())
    have = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8") if f in flags]
    return f"{model}; {os.cpu_count()} cores; flags: {' '.join(have) or 'none of avx2/avx512/amx'}"


def make_split(root: Path, split: str, n: int) -> Path:
    """n images of `split` as <root>/<split>/<class>/*.jpg: the shared JPEGs (n/10 per class)
    when present, else 32x32 noise in 10 classes."""
    tar = SHARED / "data" / "cifar10-jpeg" / f"{split}.tar"
    if tar.exists():
        with tarfile.open(tar) as t:
            by_class: dict[str, list] = {}
            for m in t.getmembers():
                if m.isfile():
                    by_class.setdefault(m.name.split("/")[1], []).append(m)
            per = -(-n // len(by_class))
            keep = [m for c in sorted(by_class) for m in by_class[c][:per]][:n]
            t.extractall(root, members=keep, filter="data")
        return root / split
    rng = np.random.default_rng(0 if split == "train" else 1)
    for i in range(n):
        d = root / split / f"c{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.jpg")
    return root / split


def timed_run(cfg) -> dict[str, float]:
    """pipeline.run(cfg) with the seconds of each stage: the module's stage calls are wrapped
    for the duration of this call only."""
    secs: dict[str, float] = {}

    def wrap(name, fn):
        def inner(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                label = a[1] if name == "_step" else name
                secs[label] = secs.get(label, 0.0) + time.perf_counter() - t0
        return inner

    saved = {n: getattr(pipeline, n) for n in ("extract", "classify_if_changed", "_step",
                                               "_diagnose")}
    labels = {"extract": "extract", "classify_if_changed": "classify", "_step": "_step",
              "_diagnose": "diagnose"}
    try:
        for n, fn in saved.items():
            setattr(pipeline, n, wrap(labels[n], fn))
        t0 = time.perf_counter()
        pipeline.run(cfg, progress=False)
        secs["total"] = time.perf_counter() - t0
    finally:
        for n, fn in saved.items():
            setattr(pipeline, n, fn)
    return secs


def report(args, n_images: int, loop: float, roof_v: float, secs: dict) -> dict:
    total = secs["total"]
    run_ips = n_images / total
    outside = total - secs.get("extract", 0.0)
    print(f"\n{machine()}; torch {torch.__version__}")
    print(f"{args.model}, {args.train:,} train + {args.test:,} test images, batch "
          f"{args.batch_size}, precision {args.precision}, {default_num_workers()} workers\n")
    print(f"{'row':<34} {'seconds':>8} {'img/s':>8} {'share':>7}")
    print(f"{'plain loop (PIL, fp32 NCHW)':<34} {n_images / loop:8.1f} {loop:8.1f}")
    print(f"{'roof (forward only)':<34} {n_images / roof_v:8.1f} {roof_v:8.1f}")
    for stage, s in secs.items():
        if stage != "total":
            print(f"{'  run: ' + stage:<34} {s:8.1f} {'':>8} {s / total:7.1%}")
    print(f"{'whole run':<34} {total:8.1f} {run_ips:8.1f} {1:7.0%}")
    print(f"\nwhole run / plain loop = {run_ips / loop:.2f} (higher = faster); whole run / roof = "
          f"{run_ips / roof_v:.2f}; outside extraction: {outside / total:.1%} of the run "
          f"(target <= 25%)")
    return {"machine": machine(), "model": args.model, "train": args.train, "test": args.test,
            "batch_size": args.batch_size, "precision": args.precision,
            "plain_loop_img_s": loop, "roof_img_s": roof_v, "run_img_s": run_ips,
            "stage_seconds": secs, "outside_extraction_share": outside / total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--train", type=int, default=5000)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--quick", action="store_true", help="cifar_resnet20, 500 + 200 images")
    args = ap.parse_args()
    if args.quick:
        args.model, args.train, args.test = "cifar_resnet20", 500, 200
    tmp = Path(tempfile.mkdtemp(prefix="bench_run_"))
    try:
        train, test = make_split(tmp, "train", args.train), make_split(tmp, "test", args.test)
        n = args.train + args.test
        workers = default_num_workers()
        loop = n / sum(k / baseline(args.model, folder, args.batch_size, workers)
                       for folder, k in ((train, args.train), (test, args.test)))  # img/s
        roof_v = roof(args.model, n, args.batch_size, args.precision)
        cfg = build_config(model=args.model, random_init=True, data="imagefolder",
                           train=str(train), test=str(test), out=str(tmp / "run"),
                           cache_dir=str(tmp / "cache"), batch_size=args.batch_size,
                           precision=args.precision)
        result = report(args, n, loop, roof_v, timed_run(cfg))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    OUT.mkdir(exist_ok=True)
    (OUT / f"bench_run_{args.model.replace(':', '_')}.json").write_text(
        json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
