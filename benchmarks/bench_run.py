"""A whole `hardprobe run`: each stage's share of the wall time, next to a plain loop and the
forward-only roof measured in the same process (issue 16).

    python benchmarks/bench_run.py                       # resnet50 @ 224, 5,000 train + 1,000 test
    python benchmarks/bench_run.py --quick               # cifar_resnet20 @ 32, 500 + 200 (a smoke run)
    python benchmarks/bench_run.py --device cuda --precision bf16 --train 50000 --test 10000 \
        --images DIR                                     # a GPU: DIR holds {train,test}.tar[.gz]

Images: CIFAR-10 JPEGs from ../shared, or --images (stratified by class), when present, else
generated noise.
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
import shutil
import tempfile
import time
from pathlib import Path

import torch

from bench_extract import baseline, make_images, roof
from bench_knn import machine as knn_machine
from hardprobe import pipeline
from hardprobe.config import build_config
from hardprobe.core.device import default_num_workers

OUT = Path(__file__).resolve().parent / "results"


def machine() -> str:
    """'<lscpu model>; N cores; flags: ...' from bench_knn.machine (the flags that matter)."""
    m = knn_machine()
    return f"{m['model']}; {m['cpus']} cores; flags: {' '.join(m['flags']) or 'none'}"


def write_result(bench: str, model: str, result: dict) -> Path:
    """benchmarks/results/<bench>_<model>.json."""
    OUT.mkdir(exist_ok=True)
    path = OUT / f"{bench}_{model.replace(':', '_')}.json"
    path.write_text(json.dumps(result, indent=2))
    return path


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
                print(f"  run: {label} {secs[label]:.1f} s", flush=True)  # a cut run keeps it
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


def device_name(device: str) -> str:
    """The CUDA card's name, or 'cpu'."""
    dev = torch.device(device)
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type


def report(args, n_images: int, loop: float, roof_v: float, secs: dict) -> dict:
    total = secs["total"]
    run_ips = n_images / total
    outside = total - secs.get("extract", 0.0)
    print(f"\n{machine()}; device {device_name(args.device)}; torch {torch.__version__}")
    print(f"{args.model}, {args.train:,} train + {args.test:,} test images, batch "
          f"{args.batch_size}, engine {args.engine}, precision {args.precision}, "
          f"{default_num_workers()} workers\n")
    print(f"{'row':<34} {'seconds':>8} {'img/s':>8} {'share':>7}")
    print(f"{'plain loop (PIL, fp32 NCHW)':<34} {n_images / loop:8.1f} {loop:8.1f}")
    print(f"{'roof (torch forward only)':<34} {n_images / roof_v:8.1f} {roof_v:8.1f}")
    for stage, s in secs.items():
        if stage != "total":
            print(f"{'  run: ' + stage:<34} {s:8.1f} {'':>8} {s / total:7.1%}")
    print(f"{'whole run':<34} {total:8.1f} {run_ips:8.1f} {1:7.0%}")
    print(f"\nwhole run / plain loop = {run_ips / loop:.2f} (higher = faster); whole run / roof = "
          f"{run_ips / roof_v:.2f}; outside extraction: {outside / total:.1%} of the run "
          f"(target <= 25%)")
    return {"machine": machine(), "device": device_name(args.device), "model": args.model,
            "train": args.train, "test": args.test, "batch_size": args.batch_size, "precision": args.precision, "engine": args.engine,
            "plain_loop_img_s": loop, "roof_img_s": roof_v, "run_img_s": run_ips,
            "stage_seconds": secs, "outside_extraction_share": outside / total}


def steps(run_dir: Path) -> dict:
    """The stages' own breakdowns, printed and returned: classify_seconds_by_step
    (metrics.json), similarity's and diagnose's seconds by step (their summary.json)."""
    found = {}
    metrics = run_dir / "metrics.json"
    if metrics.exists():
        found["classify"] = json.loads(metrics.read_text()).get("classify_seconds_by_step", {})
    for stage, key in (("similarity", "seconds"), ("diagnose", "seconds_by_step")):
        f = run_dir / stage / "summary.json"
        if f.exists():
            found[stage] = json.loads(f.read_text()).get(key, {})
    for stage, parts in found.items():
        print(f"  {stage}: " + ", ".join(f"{k} {v:.1f} s" for k, v in parts.items()))
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--train", type=int, default=5000)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--engine", default="torch", help="torch | openvino | auto (the roof and the "
                    "plain loop stay torch's)")
    ap.add_argument("--device", default="cpu", help="where the loop, the roof and the run go")
    ap.add_argument("--images", help="folder holding train.tar[.gz] and test.tar[.gz] (CIFAR-10 "
                    "JPEGs by class; default: ../shared's)")
    ap.add_argument("--quick", action="store_true", help="cifar_resnet20, 500 + 200 images")
    args = ap.parse_args()
    if args.quick:
        args.model, args.train, args.test = "cifar_resnet20", 500, 200
    tmp = Path(tempfile.mkdtemp(prefix="bench_run_"))
    try:
        train, test = (make_images(tmp, k, split, args.images)
                       for k, split in ((args.train, "train"), (args.test, "test")))
        # a source with fewer images than asked gives what it has: count them
        args.train, args.test = (sum(1 for f in d.rglob("*") if f.is_file()) for d in (train, test))
        n = args.train + args.test
        workers = default_num_workers()
        loop = n / sum(k / baseline(args.model, folder, args.batch_size, workers, args.device)
                       for folder, k in ((train, args.train), (test, args.test)))  # img/s
        print(f"plain loop: {loop:.1f} img/s", flush=True)
        roof_v = roof(args.model, n, args.batch_size, args.precision, args.device)
        print(f"roof: {roof_v:.1f} img/s", flush=True)
        cfg = build_config(model=args.model, random_init=True, data="imagefolder",
                           train=str(train), test=str(test), out=str(tmp / "run"),
                           cache_dir=str(tmp / "cache"), batch_size=args.batch_size,
                           precision=args.precision, engine=args.engine, device=args.device)
        result = report(args, n, loop, roof_v, timed_run(cfg))
        result["steps"] = steps(Path(cfg.out))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_result("bench_run", args.model, result)


if __name__ == "__main__":
    main()
