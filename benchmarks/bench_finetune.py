"""Fine-tuning throughput: fp32 against bf16 autocast, side by side on the same run.

    python benchmarks/bench_finetune.py [--n-train 4000] [--epochs 2] [--mode all]

Makes a run of cifar_resnet20 (the shared checkpoint) on the first --n-train train and 1,000
test images of the shared JPEG CIFAR-10 (random-init weights on generated images when
../shared is absent), then fine-tunes it with `hardprobe.stages.finetune.finetune_run` once per
precision, one plain run each (aum_runs=0), and reports training images/s from the stage's
own per-epoch timing, the wall time and the test accuracy after. bf16 only pays where the CPU
has bf16 units (AMX or AVX512-BF16; see `hardprobe doctor`). Writes
benchmarks/results/bench_finetune.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
OUT = Path(__file__).resolve().parent / "results"
WEIGHTS = SHARED / "models" / "cifar-resnet" / "resnet20-12fca82f.th"


def folder(root: Path, split: str, n: int) -> Path:
    """An ImageFolder with the first n images of a shared split (class-balanced)."""
    tar = SHARED / "data" / "cifar10-jpeg" / f"{split}.tar"
    dst = root / split
    if not tar.exists():
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from conftest import make_folder
        return make_folder(dst, max(1, n // 3), 0 if split == "train" else 1)
    with tarfile.open(tar) as tf:
        tf.extractall(root / f"x_{split}", filter="data")
    src = next(p for p in (root / f"x_{split}").rglob(split) if p.is_dir())
    classes = sorted(d for d in src.iterdir() if d.is_dir())
    for d in classes:
        (dst / d.name).mkdir(parents=True)
        for f in sorted(d.iterdir())[:n // len(classes)]:
            shutil.copy(f, dst / d.name / f.name)
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--mode", default="all", choices=["last", "all"])
    a = ap.parse_args()
    from hardprobe import pipeline
    from hardprobe.config import build_config
    from hardprobe.core.device import cpu_has_bf16_units
    from hardprobe.stages.finetune.stage import finetune_run
    res = {"mode": a.mode, "epochs": a.epochs, "bf16_units": cpu_has_bf16_units(), "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train, test = folder(tmp, "train", a.n_train), folder(tmp, "test", 1000)
        real = WEIGHTS.exists() and (SHARED / "data").exists()
        cfg = build_config(model="cifar_resnet20", weights=str(WEIGHTS) if real else None,
                           random_init=not real, data="imagefolder", train=str(train),
                           test=str(test), out=str(tmp / "run"), cache_dir=str(tmp / "cache"),
                           similarity=False, top=0, report=False)
        run = pipeline.run(cfg, progress=False)
        res["images"] = {"train": a.n_train, "test": 1000, "real": real}
        for precision in ("fp32", "bf16"):
            t0 = time.perf_counter()
            out = finetune_run(run, mode=a.mode, epochs=a.epochs, aum_runs=0,
                               precision=precision, device="cpu", progress=False)
            wall = time.perf_counter() - t0
            s = json.loads((out / "summary.json").read_text())
            (job,) = s["jobs"].values()
            hist = job["history"]
            res["runs"][precision] = {
                "wall_s": wall,
                "train_img_per_s": [h["images_per_s"] for h in hist],
                "test_accuracy": s["accuracy_after"]["test"],
                "final_train_loss": hist[-1]["loss"]}
    f, b = res["runs"]["fp32"], res["runs"]["bf16"]
    # the last epoch's speed: the first pays one-off costs (oneDNN kernel selection)
    res["bf16_vs_fp32_speed"] = b["train_img_per_s"][-1] / f["train_img_per_s"][-1]
    OUT.mkdir(exist_ok=True)
    (OUT / "bench_finetune.json").write_text(json.dumps(res, indent=2))
    print(f"cifar_resnet20 fine-tune ({a.mode}), {a.n_train} train images, {a.epochs} epochs, "
          f"bf16 units: {res['bf16_units']}")
    for p, r in res["runs"].items():
        print(f"  {p}: {r['train_img_per_s'][-1]:6.0f} img/s (last epoch), wall {r['wall_s']:5.1f} s,"
              f" test accuracy {r['test_accuracy']:.4f}, final loss {r['final_train_loss']:.4f}")
    print(f"  bf16 / fp32 training speed: {res['bf16_vs_fp32_speed']:.2f}x")


if __name__ == "__main__":
    main()
