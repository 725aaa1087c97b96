"""Extraction speed: the plain baseline vs hardprobe's path vs its own forward-only roof.

    python benchmarks/bench_extract.py [--model resnet50] [--n 256] [--batch-size 64]

CIFAR-10-sized images (the shared JPEGs when ../shared is present, else generated) through a
backbone at its native input size (224 for resnet50 / vit_b_16), measured side by side in one run:
  baseline  what a researcher writes first: PIL per image, Resize + ToTensor + Normalize,
            DataLoader, fp32 NCHW model under no_grad;
  ours      hardprobe.stages.extract.features.extract_split end to end (decode, cache write included);
  roof      our model forward alone on ready tensors (same precision and layout as ours).
Speed does not depend on the weights, so random-init models are used. Prints a table of
ratios and writes benchmarks/results/bench_extract_<model>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hardprobe.backbones import create_backbone
from hardprobe.core.device import default_num_workers, resolve_precision
from hardprobe.data.datasets import load_imagefolder
from hardprobe.stages.extract.engines import AUTOCAST_DTYPES
from hardprobe.stages.extract.features import extract_split

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
OUT = Path(__file__).resolve().parent / "results"


def make_images(root: Path, n: int, split: str = "test", source: Path | None = None) -> Path:
    """n CIFAR-sized JPEGs of `split` as an ImageFolder tree <root>/<split>/<class>/: the
    shared ones (n/10 per class) if present, else noise in 10 classes. source: a folder
    holding <split>.tar or <split>.tar.gz of that layout (default: ../shared's CIFAR-10)."""
    source = Path(source) if source else SHARED / "data" / "cifar10-jpeg"
    tar = next((t for t in (source / f"{split}.tar", source / f"{split}.tar.gz") if t.exists()),
               None)
    if tar is not None:
        with tarfile.open(tar) as t:  # mode "r": plain or gzip, told by the file
            by_class: dict[str, list] = {}
            for m in t.getmembers():
                if m.isfile():
                    by_class.setdefault(m.name.split("/")[1], []).append(m)
            per = -(-n // len(by_class))
            keep = [m for c in sorted(by_class) for m in by_class[c][:per]][:n]
            t.extractall(root, members=keep, filter="data")
        return root / split
    rng = np.random.default_rng(0 if split == "test" else 1)
    for i in range(n):
        d = root / split / f"c{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.jpg")
    return root / split


def baseline(model_name: str, folder: Path, batch_size: int, workers: int,
             device: str = "cpu") -> float:
    """images/s of the plain recipe: torchvision ImageFolder + PIL transforms + fp32 NCHW, each
    batch copied to `device` as it comes (on CUDA: the clock stops after a synchronise)."""
    from torchvision import datasets, transforms
    bb = create_backbone(model_name, random_init=True)
    p = bb.preprocess
    geometric = ([transforms.Resize(p.resize_size)] if p.resize_size else []) + (
        [transforms.CenterCrop(p.crop_size)] if p.crop_size else [])  # CIFAR nets: neither
    tf = transforms.Compose(geometric + [transforms.ToTensor(), transforms.Normalize(p.mean, p.std)])
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(str(folder), tf),
                                         batch_size=batch_size, num_workers=workers)
    model = bb.model.eval().to(device)
    t0 = time.perf_counter()
    n = 0
    with torch.no_grad():
        for x, _ in loader:
            model(x.to(device))
            n += len(x)
    _sync(device)
    return n / (time.perf_counter() - t0)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def ours(model_name: str, folder: Path, batch_size: int, workers: int, precision: str) -> float:
    bb = create_backbone(model_name, random_init=True)
    split = load_imagefolder(folder).splits["train"]
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        extract_split(bb, split, cache_dir=cache, device="cpu", precision=precision,
                      batch_size=batch_size, num_workers=workers, progress=False)
        return len(split) / (time.perf_counter() - t0)


def roof(model_name: str, n: int, batch_size: int, precision: str, device: str = "cpu") -> float:
    """Forward alone on ready, normalised tensors on `device`: the most extraction can reach.
    precision bf16 / fp16: the autocast that extract's torch engine uses."""
    dev = torch.device(device)
    bb = create_backbone(model_name, random_init=True)
    bb.model.to(dev, memory_format=torch.channels_last)
    size = bb.preprocess.output_size or 32  # None: the CIFAR nets take the image as it is
    x = torch.randn(batch_size, 3, size, size, device=dev).contiguous(
        memory_format=torch.channels_last)
    dtype = AUTOCAST_DTYPES.get(precision)
    ctx = _null() if dtype is None else torch.autocast(dev.type, dtype=dtype)
    with torch.inference_mode(), ctx:
        bb(x)  # warm-up: oneDNN / cuDNN pick their kernels on the first call
        _sync(dev)
        t0 = time.perf_counter()
        done = 0
        while done < n:
            bb(x)
            done += batch_size
        _sync(dev)
    return done / (time.perf_counter() - t0)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--precision", default="auto")
    args = ap.parse_args()
    precision = resolve_precision(args.precision, torch.device("cpu"))
    workers = default_num_workers()
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_images(Path(tmp), args.n)
        rows = {
            "baseline (PIL, fp32 NCHW)": baseline(args.model, folder, args.batch_size, workers),
            f"ours ({precision}, channels_last, end to end)": ours(
                args.model, folder, args.batch_size, workers, precision),
            "ours fp32 end to end": ours(args.model, folder, args.batch_size, workers, "fp32"),
            f"roof (forward only, {precision})": roof(args.model, args.n, args.batch_size, precision),
        }
    base = rows["baseline (PIL, fp32 NCHW)"]
    ours_v = rows[f"ours ({precision}, channels_last, end to end)"]
    roof_v = rows[f"roof (forward only, {precision})"]
    print(f"\n{args.model} at {create_backbone(args.model, random_init=True).preprocess.output_size}px, "
          f"{args.n} CIFAR-sized images, batch {args.batch_size}, {workers} workers, "
          f"{os.cpu_count()} cores, torch {torch.__version__}")
    print(f"{'path':<46} {'img/s':>8} {'x baseline':>11}")
    for name, v in rows.items():
        print(f"{name:<46} {v:8.1f} {v / base:11.2f}")
    print(f"ours / baseline = {ours_v / base:.2f} (target >= 4), ours / roof = {ours_v / roof_v:.2f} "
          f"(target >= 0.9)")
    OUT.mkdir(exist_ok=True)
    (OUT / f"bench_extract_{args.model.replace(':', '_')}.json").write_text(json.dumps({
        "model": args.model, "n": args.n, "batch_size": args.batch_size, "workers": workers,
        "precision": precision, "images_per_s": rows, "ours_over_baseline": ours_v / base,
        "ours_over_roof": ours_v / roof_v, "machine": platform.platform(),
        "cores": os.cpu_count(), "torch": torch.__version__}, indent=2))


if __name__ == "__main__":
    main()
