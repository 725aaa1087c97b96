"""benchmarks/gpu_check.py: the one prepared device check runs offline on the CPU and reports
positive figures; one failing phase is reported without hiding the others."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"

pytest.importorskip("pytorch_grad_cam")


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def test_quick_run_on_cpu_writes_positive_figures(tmp_path):
    out = tmp_path / "tmp.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "src")] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
        "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--out", str(out)]
    proc = subprocess.run(cmd, check=False, cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "device: cpu" in proc.stdout
    r = json.loads(out.read_text())
    assert r["device"] == "cpu" and r["quick"] is True and r["errors"] == {}
    ext = r["extraction"]
    assert "fp32" in ext["images_per_s"]
    for p, rate in ext["images_per_s"].items():
        assert _positive(rate)
        assert ext["projected_s_60000"][p] == pytest.approx(60_000 / rate)
        assert ext["under_60s"][p] == (ext["projected_s_60000"][p] < 60)
    pre = ext["preprocess_images_per_s"]
    assert set(pre) == {"device", "workers"} and all(map(_positive, pre.values()))
    assert r["knn"]["rows"]["fp32"]["ratio"] > 0
    for row in r["knn"]["rows"].values():
        assert row["ratio"] == pytest.approx(row["seconds"] / row["matmul_seconds"])
    cam = r["gradcam"]
    assert _positive(cam["fast_images_per_s"]) and _positive(cam["library_images_per_s"])
    assert cam["max_abs_diff"] < 1e-3  # the fast path gives the library's maps
    for phase in ("extraction ", "knn ", "gradcam "):
        assert any(line.startswith(phase) for line in proc.stdout.splitlines())


def test_failing_phase_is_reported_and_others_still_run(tmp_path, monkeypatch, capsys):
    mod = _load()

    def broken(plan, dev):
        raise RuntimeError("no kernel image")

    knn = {"queries": 2, "train": 3, "dims": 4, "k": 1, "best_of": 1,
           "rows": {"fp32": {"seconds": 2.0, "matmul_seconds": 0.5, "ratio": 4.0}}}
    cam = {"model": "m", "input": 32, "batch": 2, "best_of": 1, "fast_images_per_s": 8.0,
           "library_images_per_s": 2.0, "max_abs_diff": 0.0}
    monkeypatch.setattr(mod, "phase_extraction", broken)
    monkeypatch.setattr(mod, "phase_knn", lambda plan, dev: knn)
    monkeypatch.setattr(mod, "phase_gradcam", lambda plan, dev: cam)
    rc = mod.main(["--device", "cpu", "--out", str(tmp_path / "r.json")])
    text = capsys.readouterr().out
    assert rc == 1
    assert "extraction FAILED: RuntimeError: no kernel image" in text
    assert "(ratio 4.00)" in text and "fast 8.0 img/s, library 2.0 img/s" in text
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["errors"] == {"extraction": "RuntimeError: no kernel image"}
    assert r["knn"] == knn and r["gradcam"] == cam and r["quick"] is True


def test_end_to_end_phase_times_the_cli_on_the_given_images(tmp_path):
    # --images DIR: train.tar.gz / test.tar.gz of ImageFolder trees, unpacked before the
    # clock starts, then `python -m hardprobe extract` of both splits in a child process
    import tarfile

    import numpy as np
    import torch
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("test", 4)):
        for i in range(n):
            d = tmp_path / "trees" / split / f"c{i % 2}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.jpg")
        with tarfile.open(tmp_path / f"{split}.tar.gz", "w:gz") as t:
            t.add(tmp_path / "trees" / split, arcname=split)
    mod = _load()
    r = mod.phase_end_to_end(mod.PLANS["quick"], torch.device("cpu"), tmp_path)
    assert r["images"] == 12 and _positive(r["seconds"])
    assert r["images_per_s"] == pytest.approx(12 / r["seconds"])
    assert r["under_60s_for_60000"] == (r["seconds"] * 5000 < 60)
    assert {s: f["key"]["n"] for s, f in r["provenance_features"].items()} == {"train": 8,
                                                                                "test": 4}
    assert mod.line_end_to_end(r).startswith("end_to_end hardprobe extract resnet50@64, 12 JPEGs")
