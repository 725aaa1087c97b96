"""One short device check: extraction, kNN and Grad-CAM throughput on the device it finds.

    python3 benchmarks/gpu_check.py [--quick] [--device auto|cuda|cpu] [--out FILE.json]
                                    [--images DIR]

Meant to be run once on a lent GPU (see benchmarks/gpu_check.sh, the wrapper); under 5 minutes
there, under about a minute on a 2-core CPU (--quick, the default off CUDA). Random-init
weights only (nothing is downloaded: speed does not depend on the weights) and synthetic
inputs, so it runs offline. Each phase is timed after a warm-up and fails on its own: an
error prints one line and the other phases still run.
  extraction  random uint8 CIFAR-sized (32x32) images, already in memory (no JPEG decoding),
              uploaded at their source size, resized and normalised on the device by the
              backbone's Preprocess (extract's resize_on=device), then the forward
              (channels_last, no grad): img/s in fp32, bf16 autocast (where the device has
              bf16 units) and fp16 autocast (CUDA); the projected seconds for 60,000 images
              (CIFAR-10 train + test) against the 60 s target. Higher img/s is better.
              preprocess_images_per_s: the two resize_on paths of extract without the
              forward, img/s of upload + resize/crop + normalise: device (the source uint8
              uploaded, resized there) and workers (each image resized on the CPU, here in
              this one process, as one DataLoader worker does; runs spread it over
              num_workers processes). 32x32 sources are upsampled, so the workers path
              uploads more bytes here than it does for photos larger than the model input.
  knn         KNNClassifier(k=20).kneighbors on random unit vectors (fit excluded) against one
              torch.mm of the same shape and precision: seconds and ours / matmul (1.0 is
              the roof; higher is slower).
  gradcam     hardprobe's fast Grad-CAM path and pytorch-grad-cam on the same batch
              (stages.explain.cams.throughput): img/s of both and the largest map difference.
  end_to_end  only with --images DIR (a folder holding train.tar[.gz] and test.tar[.gz], an
              ImageFolder tree each, e.g. CIFAR-10 as JPEGs): `python -m hardprobe extract`
              on both splits in a child process, wall clock from its start to its exit
              (imports, model build, JPEG decoding in workers, upload, resize on the device,
              forward, cache write), the issue's target: 60,000 images in under 60 s. The
              tars are unpacked before the clock starts; the precision is the CLI's default
              (auto) and what it resolved to is read back from provenance.json.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from hardprobe.backbones import create_backbone
from hardprobe.core.device import cpu_has_bf16_units, resolve_device
from hardprobe.heads import KNNClassifier
from hardprobe.stages.explain.cams import throughput
from hardprobe.stages.extract.engines import AUTOCAST_DTYPES

TARGET_IMAGES, TARGET_SECONDS = 60_000, 60.0

# per mode: model, input size, batch, images per precision / queries x train x dims / CAM batch
PLANS = {
    "full": {"model": "resnet50", "size": 224, "batch": 256, "n": 256 * 12,
             "knn": (10_000, 50_000, 2_048), "cam_batch": 64, "cam_repeats": 3},
    "quick": {"model": "resnet50", "size": 64, "batch": 32, "n": 96,
              "knn": (500, 5_000, 256), "cam_batch": 8, "cam_repeats": 2},
}


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def precisions(dev: torch.device) -> list[str]:
    """fp32 always; bf16 where the device has bf16 units; fp16 on CUDA."""
    if dev.type == "cuda":
        return ["fp32"] + (["bf16"] if torch.cuda.is_bf16_supported() else []) + ["fp16"]
    return ["fp32"] + (["bf16"] if dev.type == "cpu" and cpu_has_bf16_units() else [])


def autocast(dev: torch.device, precision: str):
    """The autocast the extract stage's torch engine uses for this precision."""
    dtype = AUTOCAST_DTYPES.get(precision)
    return contextlib.nullcontext() if dtype is None else torch.autocast(dev.type, dtype=dtype)


def extraction_rate(bb, images: torch.Tensor, batch: int, dev, precision: str) -> float:
    """img/s of uint8 (N, 3, 32, 32) -> Preprocess on the device -> forward, one warm-up batch."""
    def run(chunk):
        with autocast(dev, precision):
            return bb(bb.preprocess(chunk.to(dev, non_blocking=True))
                      .contiguous(memory_format=torch.channels_last))
    return timed_rate(run, images, batch, dev)


def timed_rate(run, images: torch.Tensor, batch: int, dev) -> float:
    """img/s of run(chunk) over images in batches, after one warm-up batch (cuDNN / oneDNN
    choose their kernels), the device synchronised around the clock."""
    with torch.inference_mode():
        run(images[:batch])
        sync(dev)
        t0 = time.perf_counter()
        for i in range(0, len(images), batch):
            run(images[i:i + batch])
        sync(dev)
    return len(images) / (time.perf_counter() - t0)


def preprocess_rate(pre, images: torch.Tensor, batch: int, dev, resize_on: str) -> float:
    """img/s of extract's preprocessing alone: uint8 (N, 3, 32, 32) -> normalised float on
    the device, resized there (resize_on="device") or per image on the CPU ("workers")."""
    def run(chunk):
        if resize_on == "workers":
            x = torch.stack([pre.geometric(im) for im in chunk]).to(dev, non_blocking=True)
        else:
            x = pre.geometric_batch(chunk.to(dev, non_blocking=True))
        return pre.normalize(x)
    return timed_rate(run, images, batch, dev)


def phase_extraction(plan: dict, dev: torch.device) -> dict:
    bb = create_backbone(plan["model"], random_init=True, image_size=plan["size"])
    bb.model.to(dev).to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (plan["n"], 3, 32, 32), dtype=torch.uint8, generator=g)
    if dev.type == "cuda":
        images = images.pin_memory()
    rates = {p: extraction_rate(bb, images, plan["batch"], dev, p) for p in precisions(dev)}
    projected = {p: TARGET_IMAGES / r for p, r in rates.items()}
    pre = {r: preprocess_rate(bb.preprocess, images, plan["batch"], dev, r)
           for r in ("device", "workers")}
    return {"model": plan["model"], "input": plan["size"], "batch": plan["batch"],
            "n": plan["n"], "inputs": "synthetic random uint8 32x32, in memory (no JPEG decoding)",
            "images_per_s": rates, "projected_s_60000": projected,
            "under_60s": {p: s < TARGET_SECONDS for p, s in projected.items()},
            "preprocess_images_per_s": pre}


def best_seconds(fn, dev, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        best = min(best, time.perf_counter() - t0)
    return best


def knn_row(train, query, k: int, precision: str, dev, repeats: int) -> dict:
    """Best-of-`repeats` seconds of kneighbors (after one warm-up) and of one matmul."""
    knn = KNNClassifier(k=k, precision=precision, device=str(dev)).fit(
        train, np.zeros(len(train), dtype=int), n_classes=1)
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    q, t = torch.from_numpy(query).to(dev, dtype), torch.from_numpy(train).to(dev, dtype)
    out = torch.empty(len(q), len(t), dtype=dtype, device=dev)

    def mm():
        torch.mm(q, t.T, out=out)

    def ours():
        knn.kneighbors(query)

    ours(), mm()  # warm-up
    s_ours, s_mm = best_seconds(ours, dev, repeats), best_seconds(mm, dev, repeats)
    return {"seconds": s_ours, "matmul_seconds": s_mm, "ratio": s_ours / s_mm}


def phase_knn(plan: dict, dev: torch.device, k: int = 20, repeats: int = 2) -> dict:
    """kNN vs matmul on random unit vectors, per precision (fp32; bf16 where fast)."""
    nq, nt, d = plan["knn"]
    g = torch.Generator().manual_seed(0)
    train = torch.nn.functional.normalize(torch.randn(nt, d, generator=g), dim=1).numpy()
    query = torch.nn.functional.normalize(torch.randn(nq, d, generator=g), dim=1).numpy()
    rows = {p: knn_row(train, query, k, p, dev, repeats)
            for p in precisions(dev) if p != "fp16"}
    return {"queries": nq, "train": nt, "dims": d, "k": k, "best_of": repeats, "rows": rows}


def phase_gradcam(plan: dict, dev: torch.device) -> dict:
    bb = create_backbone(plan["model"], random_init=True, image_size=plan["size"])
    g = torch.Generator().manual_seed(0)
    size = bb.preprocess.output_size or 32
    x = torch.randn(plan["cam_batch"], 3, size, size, generator=g)
    targets = torch.randint(0, bb.num_classes, (len(x),), generator=g).tolist()
    throughput(bb, x[:2], targets[:2], device=str(dev))  # warm-up of both paths
    runs = [throughput(bb, x, targets, device=str(dev)) for _ in range(plan["cam_repeats"])]
    return {"model": plan["model"], "input": size, "batch": len(x), "best_of": len(runs),
            "fast_images_per_s": max(r["fast_images_per_s"] for r in runs),
            "library_images_per_s": max(r["library_images_per_s"] for r in runs),
            "max_abs_diff": max(r["max_abs_diff"] for r in runs)}


def phase_end_to_end(plan: dict, dev: torch.device, images: Path) -> dict:
    """`hardprobe extract` of images/{train,test}.tar[.gz] in a child process, timed whole."""
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        root = Path(tmp)
        for split in ("train", "test"):
            tar = next(images.glob(f"{split}.tar*"))
            with tarfile.open(tar) as t:
                t.extractall(root / "images", filter="data")
        n = sum(1 for f in (root / "images").rglob("*") if f.is_file())
        cmd = [sys.executable, "-m", "hardprobe", "extract", "--model", plan["model"],
               "--random-init", "--data", "imagefolder", "--train", str(root / "images/train"),
               "--test", str(root / "images/test"), "--out", str(root / "run"), "--cache-dir",
               str(root / "cache"), "--device", str(dev), "--batch-size", str(plan["batch"]),
               "--image-size", str(plan["size"]), "--no-progress"]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        seconds = time.perf_counter() - t0
        prov = json.loads((root / "run" / "provenance.json").read_text())
    return {"model": plan["model"], "input": plan["size"], "images": n, "seconds": seconds,
            "images_per_s": n / seconds,
            "command": " ".join(cmd[1:]), "under_60s_for_60000": seconds * 60_000 / n < 60,
            "provenance_features": prov.get("features")}


def line_end_to_end(r: dict) -> str:
    return (f"end_to_end hardprobe extract {r['model']}@{r['input']}, {r['images']:,} JPEGs: "
            f"{r['seconds']:.1f} s wall ({r['images_per_s']:,.0f} img/s) -> "
            f"{'under' if r['under_60s_for_60000'] else 'OVER'} 60 s for 60,000")


def line_extraction(r: dict) -> str:
    parts = [f"{p} {v:,.0f} img/s -> {r['projected_s_60000'][p]:.1f} s for 60,000 "
             f"({'under' if r['under_60s'][p] else 'OVER'} 60 s)"
             for p, v in r["images_per_s"].items()]
    pre = r["preprocess_images_per_s"]
    return (f"extraction {r['model']}@{r['input']}, batch {r['batch']}, {r['n']} synthetic uint8 "
            f"32x32 images/precision: " + "; ".join(parts) + f"; preprocessing alone: resize "
            f"on the device {pre['device']:,.0f} img/s, on the CPU (one worker) "
            f"{pre['workers']:,.0f} img/s")


def line_knn(r: dict) -> str:
    parts = [f"{p} {v['seconds']:.3f} s vs matmul {v['matmul_seconds']:.3f} s (ratio "
             f"{v['ratio']:.2f})" for p, v in r["rows"].items()]
    return (f"knn {r['queries']:,} x {r['train']:,} x {r['dims']:,}, k {r['k']}, best of "
            f"{r['best_of']}: " + "; ".join(parts))


def line_gradcam(r: dict) -> str:
    return (f"gradcam {r['model']}@{r['input']}, batch {r['batch']}, best of {r['best_of']}: "
            f"fast {r['fast_images_per_s']:,.1f} img/s, library {r['library_images_per_s']:,.1f} "
            f"img/s, max |diff| {r['max_abs_diff']:.2e}")


def describe_device(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(dev)})"
    return f"{dev.type} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def write(path, result: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (always on without CUDA)")
    ap.add_argument("--device", default="auto",
                    help="auto (cuda if available, else cpu), cuda, cpu")
    ap.add_argument("--out", help="write every figure to this JSON file")
    ap.add_argument("--images", type=Path, help="folder holding train.tar[.gz] and "
                    "test.tar[.gz] (ImageFolder trees): adds the end_to_end phase")
    args = ap.parse_args(argv)
    dev = resolve_device(args.device)
    dev = torch.device("cpu") if dev.type == "mps" else dev
    quick = args.quick or dev.type != "cuda"
    plan = PLANS["quick" if quick else "full"]
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    print(f"device: {describe_device(dev)}; mode {'quick' if quick else 'full'}; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; python "
          f"{platform.python_version()}", flush=True)
    result = {"device": str(dev), "device_name": describe_device(dev), "quick": quick,
              "torch": torch.__version__, "python": platform.python_version(),
              "machine": platform.platform(), "cores": os.cpu_count(), "errors": {}}
    t_all = time.perf_counter()
    phases = [("extraction", phase_extraction, line_extraction), ("knn", phase_knn, line_knn),
              ("gradcam", phase_gradcam, line_gradcam)]
    if args.images:
        phases.insert(0, ("end_to_end", lambda p, d: phase_end_to_end(p, d, args.images),
                          line_end_to_end))
    for name, phase, line in phases:
        t0 = time.perf_counter()
        try:
            result[name] = phase(plan, dev)
            print(f"{line(result[name])}  [{time.perf_counter() - t0:.1f} s]", flush=True)
        except Exception as e:  # noqa: BLE001 - one failing phase must not hide the others
            result["errors"][name] = f"{type(e).__name__}: {e}"
            print(f"{name} FAILED: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc(limit=3, file=sys.stderr)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        result["wall_s"] = time.perf_counter() - t_all
        write(args.out, result)  # after every phase: a run cut short keeps what it measured
    print(f"total {result['wall_s']:.1f} s; {len(result['errors'])} phase(s) failed", flush=True)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
