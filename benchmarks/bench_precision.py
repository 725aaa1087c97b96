"""bf16 against fp32 on the real data: does the faster precision change the answers?

    python benchmarks/bench_precision.py [--model cifar_resnet56] [--cache-dir DIR]

On the shared JPEG CIFAR-10 (needs ../shared): features of train and test in fp32 and in bf16
(autocast), then the top-1 agreement of the model's own classifier, its accuracy in each, and
the kNN head's test accuracy in each, with the extraction speed of both. Targets (issue 5):
agreement >= 99.5%, kNN accuracy within 0.2 point. Writes benchmarks/results/bench_precision.json.
"""
from __future__ import annotations

import argparse
import json
import tarfile
import tempfile
import time
from pathlib import Path

from hardprobe.backbones import create_backbone
from hardprobe.data.datasets import load_imagefolder
from hardprobe.heads import KNNClassifier
from hardprobe.stages.extract.features import extract_split

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
OUT = Path(__file__).resolve().parent / "results"
CKPT = {"cifar_resnet20": "resnet20-12fca82f.th", "cifar_resnet56": "resnet56-4bfd9763.th"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cifar_resnet56", choices=sorted(CKPT))
    ap.add_argument("--data", help="folder with train/ and test/ (default: extract ../shared)")
    ap.add_argument("--cache-dir", default=None, help="reuse a feature cache (e.g. of a run)")
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()
    root = Path(args.data) if args.data else Path(tmp.name)
    if not args.data:
        for s in ("train", "test"):
            with tarfile.open(SHARED / "data" / "cifar10-jpeg" / f"{s}.tar") as t:
                t.extractall(root, filter="data")
    ds = load_imagefolder(root / "train", root / "test")
    bb = create_backbone(args.model, weights=str(SHARED / "models" / "cifar-resnet" / CKPT[args.model]))
    cache = args.cache_dir or str(root / "cache")
    feats, secs = {}, {}
    for prec in ("fp32", "bf16"):
        t0 = time.perf_counter()
        feats[prec] = {s: extract_split(bb, sp, cache_dir=cache, device="cpu", precision=prec,
                                        progress=False)[0] for s, sp in ds.splits.items()}
        secs[prec] = time.perf_counter() - t0
    y = {s: sp.examples["label"].to_numpy() for s, sp in ds.splits.items()}
    res = {}
    for prec, f in feats.items():
        knn = KNNClassifier(k=20).fit(f["train"]["embedding"], y["train"], n_classes=10)
        res[prec] = {
            "model_test_accuracy": float((f["test"]["logits"].argmax(1) == y["test"]).mean()),
            "knn_test_accuracy": float((knn.predict(f["test"]["embedding"]) == y["test"]).mean()),
            "seconds (extract, or cache read)": secs[prec]}
    agree = float((feats["fp32"]["test"]["logits"].argmax(1)
                   == feats["bf16"]["test"]["logits"].argmax(1)).mean())
    dknn = 100 * (res["bf16"]["knn_test_accuracy"] - res["fp32"]["knn_test_accuracy"])
    print(f"\n{args.model} on the shared JPEG CIFAR-10 (50,000 train, 10,000 test)")
    for prec, r in res.items():
        print(f"  {prec}: model top-1 {100 * r['model_test_accuracy']:.2f}%, kNN "
              f"{100 * r['knn_test_accuracy']:.2f}%, {r['seconds (extract, or cache read)']:.0f} s")
    print(f"  top-1 agreement bf16 vs fp32: {100 * agree:.2f}% (target >= 99.5); "
          f"kNN accuracy difference {dknn:+.2f} point (target within 0.2)")
    OUT.mkdir(exist_ok=True)
    (OUT / "bench_precision.json").write_text(json.dumps(
        {"model": args.model, "results": res, "top1_agreement": agree,
         "knn_accuracy_difference_points": dknn}, indent=2))


if __name__ == "__main__":
    main()
