"""Grad-CAM: hardprobe's fast path (gradient only at the target layer) vs pytorch-grad-cam.

    python benchmarks/bench_cam.py [--models resnet50 vit_b_16] [--batch 16] [--repeats 3]

Same inputs, same targets, measured side by side in one run (after one warm-up of each);
reports images/s of both, the speed-up, and the largest difference between their maps.
Speed does not depend on the weights, so random-init models are used (the ViT's zero-init
head is re-initialised so that its maps are not blank). Writes benchmarks/results/bench_cam.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch

from hardprobe.backbones import create_backbone
from hardprobe.stages.explain.stage import throughput

OUT = Path(__file__).resolve().parent / "results"


def bench(name: str, batch: int, repeats: int) -> dict:
    bb = create_backbone(name, random_init=True)
    for m in bb.model.modules():  # torchvision's ViT head starts at zero: every map blank
        if isinstance(m, torch.nn.Linear) and not m.weight.any():
            torch.nn.init.normal_(m.weight, std=0.02)
    size = bb.preprocess.output_size or 32  # CIFAR ResNets take the image as it is
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g)
    targets = torch.randint(0, bb.num_classes, (batch,), generator=g).tolist()
    throughput(bb, x[:2], targets[:2])  # warm-up of both paths
    runs = [throughput(bb, x, targets) for _ in range(repeats)]
    best = max(runs, key=lambda r: r["speedup"])
    return {"model": name, "input": size, "batch": batch,
            "fast_images_per_s": max(r["fast_images_per_s"] for r in runs),
            "library_images_per_s": max(r["library_images_per_s"] for r in runs),
            "speedup_median": sorted(r["speedup"] for r in runs)[len(runs) // 2],
            "max_abs_diff": max(r["max_abs_diff"] for r in runs), "best": best}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet50", "vit_b_16", "cifar_resnet56"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rows = [bench(m, args.batch, args.repeats) for m in args.models]
    print(f"\nGrad-CAM, batch {args.batch}, best of {args.repeats}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}")
    print(f"{'model':<16} {'fast img/s':>11} {'library img/s':>14} {'speed-up':>9} {'max |diff|':>11}")
    for r in rows:
        print(f"{r['model']:<16} {r['fast_images_per_s']:11.1f} {r['library_images_per_s']:14.1f} "
              f"{r['speedup_median']:9.2f} {r['max_abs_diff']:11.2e}")
    OUT.mkdir(exist_ok=True)
    (OUT / "bench_cam.json").write_text(json.dumps({"rows": rows, "machine": platform.platform(),
                                                    "cores": os.cpu_count(),
                                                    "torch": torch.__version__}, indent=2))


if __name__ == "__main__":
    main()
