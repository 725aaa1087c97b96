"""Extract engines x precisions vs torch fp32, side by side in one process: images/s ratio and
agreement (model-head top-1, kNN predictions, kNN accuracy) on shared CIFAR-10 JPEGs.

    PYTHONPATH=src python3 benchmarks/bench_engines.py --model cifar_resnet56 \
        --weights /work/shared/models/cifar-resnet/resnet56-4bfd9763.th --train 2000 --test 1000
    PYTHONPATH=src python3 benchmarks/bench_engines.py --model resnet50 --random-init \
        --image-size 224 --train 256 --test 128

'train s' is extract_split over the train split, OpenVINO's conversion and int8's calibration
(once per process: the test split reuses the int8 model) included, as a user's run pays them;
'run img/s' is extract_split over the test split; 'steady img/s' is the engine's forward alone
on ready normalised batches after a warm-up batch ('setup': conversion and the first batch).
kNN: cosine, k=20 majority vote.
"""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hardprobe.backbones import create_backbone
from hardprobe.data.datasets import load_imagefolder
from hardprobe.stages.extract.engines import make_engine
from hardprobe.stages.extract.features import (INT8_CALIBRATION, INT8_CHECK,
                                               calibration_batches, extract_split)

COMBOS = [("torch", "fp32"), ("openvino", "fp32"), ("torch", "bf16"), ("openvino", "bf16"),
          ("openvino", "int8")]


def machine() -> str:
    model = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True,
                           text=True).stdout.split(":", 1)[-1].strip()
    flags = open("/proc/cpuinfo").read()
    have = [f for f in ("avx2", "avx512_bf16", "amx_tile") if f in flags]
    return f"{model}, {os.cpu_count()} cores, flags: {' '.join(have)}"


def subset_tree(src: Path, dst: Path, n: int) -> Path:
    """n images (equal per class, first by name) of an ImageFolder tree, as symlinks."""
    classes = sorted(p for p in src.iterdir() if p.is_dir())
    for c in classes:
        (dst / c.name).mkdir(parents=True)
        for f in sorted(c.iterdir())[: n // len(classes)]:
            (dst / c.name / f.name).symlink_to(f)
    return dst


def knn_predict(train_e, train_y, q, k=20):
    t = train_e / np.linalg.norm(train_e, axis=1, keepdims=True)
    s = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ t.T
    nn = np.argpartition(-s, k, axis=1)[:, :k]
    votes = np.zeros((len(q), train_y.max() + 1))
    np.add.at(votes, (np.arange(len(q))[:, None], train_y[nn]), 1)
    return votes.argmax(1)


def run_combo(bb, data, engine, precision, cache, batch):
    out, secs = {}, {}
    for name in ("train", "test"):
        t = time.perf_counter()
        out[name], entry = extract_split(bb, data.splits[name], cache_dir=cache, device="cpu",
                                     engine=engine, precision=precision, batch_size=batch,
                                     num_workers=1, progress=False,
                                     calibration=data.splits["train"])
        secs[name] = time.perf_counter() - t
        if "int8_check" in entry.manifest()["meta"]:
            check = entry.manifest()["meta"]["int8_check"]
            print(f"{engine} {precision} {name}: int8_check {check}")
    return out, secs


def steady(bb, engine, precision, batches, calib, check):
    """-> (setup seconds: conversion / calibration and the first batch, steady images/s)."""
    t = time.perf_counter()
    run = make_engine(bb, torch.device("cpu"), engine=engine, precision=precision,
                      calibration=calib, validation=check)
    run(batches[0])
    setup, t = time.perf_counter() - t, time.perf_counter()
    for b in batches[1:]:
        run(b)
    return setup, sum(len(b) for b in batches[1:]) / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="cifar_resnet56")
    ap.add_argument("--weights")
    ap.add_argument("--random-init", action="store_true")
    ap.add_argument("--image-size", type=int)
    ap.add_argument("--data", default="/tmp/cifar")
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steady", type=int, default=256, help="images timed for the steady rate")
    ap.add_argument("--combos", nargs="+", default=[f"{e}:{p}" for e, p in COMBOS],
                    help="engine:precision pairs (torch:fp32, the reference, always runs)")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(machine())
    bb = create_backbone(a.model, weights=a.weights, random_init=a.random_init,
                         image_size=a.image_size, trust_weights=True)
    tmp = Path(tempfile.mkdtemp())
    data = load_imagefolder(subset_tree(Path(a.data) / "train", tmp / "train", a.train),
                            subset_tree(Path(a.data) / "test", tmp / "test", a.test))
    y_tr = data.splits["train"].examples["label"].to_numpy()
    y_te = data.splits["test"].examples["label"].to_numpy()
    combos = [("torch", "fp32")] + [tuple(c.split(":")) for c in a.combos if c != "torch:fp32"]
    res = {c: run_combo(bb, data, *c, tmp / f"cache-{c[0]}-{c[1]}", a.batch) for c in combos}
    ready = calibration_batches(bb, data.splits["test"], a.batch, n=a.steady + a.batch)
    calib = calibration_batches(bb, data.splits["train"], a.batch)  # as extract_split's
    check = calibration_batches(bb, data.splits["train"], a.batch, n=INT8_CHECK,
                                start=INT8_CALIBRATION)
    rates = {c: steady(bb, *c, ready, calib, check) for c in combos}
    ref, ref_s = res["torch", "fp32"]
    ref_knn = knn_predict(ref["train"]["embedding"], y_tr, ref["test"]["embedding"])
    print(f"{a.model} @ {a.image_size or 'native'}: {a.train} train + {a.test} test images")
    print("engine    precision  train s  run img/s  x torch-fp32  setup s  steady img/s"
          "  x torch-fp32"
          "  top-1 agree  kNN agree  kNN acc")
    for (eng, prec), (o, s) in res.items():
        setup, rate = rates[eng, prec]
        knn = knn_predict(o["train"]["embedding"], y_tr, o["test"]["embedding"])
        top1 = (np.mean(o["test"]["logits"].argmax(1) == ref["test"]["logits"].argmax(1))
                if "logits" in o["test"] else float("nan"))
        print(f"{eng:9s} {prec:9s} {s['train']:7.1f}  {a.test / s['test']:9.1f}"
              f"  {ref_s['test'] / s['test']:11.2f}"
              f"  {setup:7.1f}  {rate:12.1f}  {rate / rates['torch', 'fp32'][1]:11.2f}"
              f"  {100 * top1:10.2f}%  {100 * np.mean(knn == ref_knn):8.2f}%"
              f"  {100 * np.mean(knn == y_te):6.2f}%")


if __name__ == "__main__":
    main()
