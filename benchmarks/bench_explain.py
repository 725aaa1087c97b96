"""explain per example at 224: the old per-batch sequence vs the new one, side by side (issue 16).

    python benchmarks/bench_explain.py                  # resnet50 @ 224, 24 examples, batch 16
    python benchmarks/bench_explain.py --top 16         # one batch (a shorter run)
    python benchmarks/bench_explain.py --keep DIR       # make the run in DIR once, then reuse

A small run directory is made first (`hardprobe run` with --random-init, explain and the other
stages off; CIFAR-10 JPEGs from ../shared when present, else noise: speed does not depend on
the images or the weights). Then, after a 2-example warm-up, alternately (--rounds times, the
fastest of each kept: a shared machine's load drifts) in the same process, on the same examples:
  old  explain_run(benchmark=True) with the per-batch work done as before issue 16:
       compute_cams(given), faithfulness(given), compute_cams(pred), faithfulness(pred), NCHW
       (each faithfulness: one forward on x, one on the CAM-removed, one on the random-removed
       images, ROAD by the library's NoisyLinearImputer), plus throughput() on the first batch
       (fast path vs pytorch-grad-cam);
  new  explain_run() as `hardprobe run` calls it: both targets' CAMs from one forward
       (cams_given_pred), faithfulness_pair reusing its probabilities, the random-map images
       made and scored once, all perturbed images scored batched in channels_last, ROAD's
       system built straight to CSC (road_impute); no throughput.
Prints the machine, per-example seconds of each part (CPU seconds by default, --clock wall
for wall seconds; the wall total always) and their ratio, and the largest difference between
the two rows' maps and faithfulness numbers; writes
benchmarks/results/bench_explain_<model>.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from pytorch_grad_cam.metrics.road import NoisyLinearImputer

from bench_extract import make_images
from bench_run import machine, write_result
from hardprobe import pipeline
from hardprobe.config import build_config
from hardprobe.stages.explain import stage
from hardprobe.stages.explain.cams import compute_cams

PARTS = ("images", "cams", "faithfulness", "throughput", "save")


def old_batch(backbone, x, given, pred, *, seed, fraction, kw, secs) -> dict:
    """The per-batch work as explain_run did it before: two compute_cams, two faithfulness,
    every image scored in the NCHW layout."""
    out = {}
    for key, t in (("given", given), ("pred", pred)):
        t1 = stage.time.perf_counter()  # the clock explain_row chose
        maps = compute_cams(backbone, x, t, **kw)
        t2 = stage.time.perf_counter()
        out[key] = maps
        out[f"{key}_faith"] = stage.faithfulness(backbone, x, t, maps, fraction=fraction,
                                                 seed=seed, head=kw["head"], device=kw["device"],
                                                 channels_last=False)
        secs["cams"] += t2 - t1
        secs["faithfulness"] += stage.time.perf_counter() - t2
    return out


def library_road(img, keep):
    """ROAD imputation as before: pytorch-grad-cam's NoisyLinearImputer (a lil_matrix system)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return NoisyLinearImputer()(img, torch.from_numpy(keep))


class CpuClock:
    """Stands in for the `time` module in stage.py: its perf_counter is this process's CPU
    seconds (all threads), which a shared machine's other jobs inflate far less than wall
    seconds. 2 busy threads: about twice the wall seconds of a quiet machine."""
    perf_counter = staticmethod(time.process_time)


def explain_row(run_dir: Path, old: bool, top: int, batch_size: int, clock: str) -> dict:
    """explain_run's meta.json and maps, the old or the new per-batch path; its seconds (also
    seconds_by_part) in `clock` seconds, "cpu" or "wall"."""
    saved = stage._explain_batch, stage.time, stage.road_impute
    try:
        if old:
            stage._explain_batch, stage.road_impute = old_batch, library_road
        if clock == "cpu":
            stage.time = CpuClock
        t0 = time.perf_counter()
        out = stage.explain_run(run_dir, top=top, batch_size=batch_size, device="cpu",
                                progress=False, benchmark=old)
        wall = time.perf_counter() - t0
    finally:
        stage._explain_batch, stage.time, stage.road_impute = saved
    meta = json.loads((out / "meta.json").read_text())
    with np.load(out / "cams.npz") as z:
        maps = {k: z[k].astype(np.float32) for k in ("given", "pred")}
    return {"meta": meta, "maps": maps, "wall": wall}


def make_run(tmp: Path, model: str, n_train: int, n_test: int) -> Path:
    """tmp/run: a run of `model` on n_train + n_test images, made unless it exists (--keep)."""
    if (tmp / "run" / "examples.parquet").exists():
        return tmp / "run"
    train, test = make_images(tmp, n_train, "train"), make_images(tmp, n_test, "test")
    cfg = build_config(model=model, random_init=True, data="imagefolder", train=str(train),
                       test=str(test), out=str(tmp / "run"), cache_dir=str(tmp / "cache"),
                       top=0, similarity=False, diagnose=False, report=False, explorer=False,
                       device="cpu")
    return pipeline.run(cfg, progress=False)


def differences(old: dict, new: dict) -> dict:
    """Largest |old - new| of the maps (stored float16) and of the faithfulness numbers."""
    maps = max(float(np.abs(old["maps"][k] - new["maps"][k]).max()) for k in ("given", "pred"))
    fo, fn = old["meta"]["faithfulness"], new["meta"]["faithfulness"]
    out = {"maps_max_abs_diff": maps}
    for k in ("prob", "drop_cam_each", "drop_random_each", "drop_cam", "drop_random"):
        out[f"{k}_max_abs_diff"] = max(float(np.abs(np.subtract(fo[t][k], fn[t][k])).max())
                                       for t in fo)
    return out


def report(args, rows: dict, diff: dict) -> dict:
    n = rows["new"]["meta"]["n"]
    per = {name: {p: r["meta"]["seconds_by_part"][p] / n for p in PARTS}
           | {"total": r["meta"]["seconds"] / n, "wall total": r["wall"] / n}
           for name, r in rows.items()}
    print(f"\n{machine()}")
    print(f"{args.model} random-init @ {rows['new']['meta']['image_size']}, {n} examples, "
          f"batch {args.batch_size}, fp32, device cpu, fastest of {args.rounds} rounds, "
          f"{args.clock} seconds\n")
    print(f"{'part (' + args.clock + ' s / example)':<26} {'old':>8} {'new':>8} {'old/new':>8}")
    for p in (*PARTS, "total", "wall total"):
        o, w = per["old"][p], per["new"][p]
        print(f"{p:<26} {o:8.3f} {w:8.3f} {o / w if w > 0 else float('inf'):8.2f}")
    print("\nmax |old - new|: " + ", ".join(f"{k.removesuffix('_max_abs_diff')} {v:.1e}"
                                           for k, v in diff.items()) + " (maps: float16 files)")
    return {"machine": machine(), "model": args.model, "n": n, "batch_size": args.batch_size,
            "clock": args.clock, "rounds": args.rounds, "per_example_seconds": per, **diff}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--top", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--train", type=int, default=50,
                    help="train images (the linear probe: 5 folds of 10 classes)")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="cpu: this process's CPU seconds (steadier on a shared machine)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="old and new alternately this many times; the fastest of each kept")
    ap.add_argument("--keep", type=Path, default=None,
                    help="make the run directory in this folder and keep it, or reuse it there "
                         "(its test split must hold >= --top images)")
    args = ap.parse_args()
    tmp = args.keep or Path(tempfile.mkdtemp(prefix="bench_explain_"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            run_dir = make_run(tmp, args.model, args.train, args.top)
            print(f"run directory made in {time.perf_counter() - t0:.0f} s", flush=True)
            explain_row(run_dir, False, 2, 2, "wall")  # warm-up (weights, threads, allocator)
            rows = {"new": [], "old": []}
            for _ in range(args.rounds):  # interleaved: a shared machine's load drifts
                for name in rows:
                    rows[name].append(explain_row(run_dir, name == "old", args.top,
                                                  args.batch_size, args.clock))
            rows = {name: min(r, key=lambda row: row["meta"]["seconds"])
                    for name, r in rows.items()}
        result = report(args, rows, differences(rows["old"], rows["new"]))
    finally:
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)
    write_result("bench_explain", args.model, result)


if __name__ == "__main__":
    main()
