"""Interruptions: kill -9 during extraction, explain and perturb; concurrent writers. Nothing lost."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from conftest import make_folder

from hardprobe.backbones import create_backbone
from hardprobe.data.datasets import load_imagefolder
from hardprobe.stages.extract.features import extract_split


def _cmd(train, cache, out):
    return [sys.executable, "-m", "hardprobe", "extract", "--model", "cifar_resnet20",
            "--random-init", "--data", "imagefolder", "--train", str(train), "--cache-dir",
            str(cache), "--shard-size", "4", "--batch-size", "1", "--num-workers", "0",
            "--no-progress", "--out", str(out)]


def _finished_shards(cache):
    return sorted(p.name for p in cache.rglob("shard_*.sha256"))


def _kill_when(cmd, reached) -> bool:
    """Start cmd, SIGKILL it as soon as reached() holds; False when it finished first."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and not reached():
        time.sleep(0.005)
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return killed


def test_kill_9_at_random_points_then_resume_is_identical(tmp_path, monkeypatch):
    train = make_folder(tmp_path / "train", 30, 0)  # 90 images -> 23 shards of 4
    cache = tmp_path / "cache"
    rng = random.Random(0)
    kills = sum(_kill_when(_cmd(train, cache, tmp_path / "out"),
                           lambda t=t: len(_finished_shards(cache)) >= t)
                for t in sorted(rng.sample(range(1, 20), 4)))
    assert kills >= 2, "the extraction finished before it could be killed"
    done_before = {int(n[6:11]) for n in _finished_shards(cache)}
    assert done_before, "no shard finished before the kills"

    import hardprobe.stages.extract.features as F
    computed = []
    real = F._forward_indices
    monkeypatch.setattr(F, "_forward_indices",
                        lambda bb, sp, idx, *a: (computed.append(int(idx[0]) // 4), real(bb, sp, idx, *a))[1])
    bb = create_backbone("cifar_resnet20", random_init=True)
    split = load_imagefolder(train).splits["train"]
    # with_logits=False as in the CLI run: its 3 classes are not the model's CIFAR-10 classes
    resumed, entry = extract_split(bb, split, cache_dir=cache, device="cpu", batch_size=1,
                                   num_workers=0, shard_size=4, with_logits=False, progress=False)
    assert not set(computed) & done_before  # finished shards were not recomputed
    assert set(computed) | done_before == set(range(23))
    monkeypatch.setattr(F, "_forward_indices", real)
    fresh, _ = extract_split(bb, split, cache_dir=tmp_path / "fresh", device="cpu", batch_size=1,
                             num_workers=0, shard_size=4, with_logits=False, progress=False)
    np.testing.assert_array_equal(resumed["embedding"], fresh["embedding"])
    leftovers = [p.name for p in entry.dir.iterdir() if p.name.endswith(".tmp")]
    assert not list(entry.dir.glob("shard_*")), "shards are joined and removed once complete"
    assert all(p.startswith(".") for p in leftovers)  # a killed write leaves only a hidden temp


def test_two_runs_writing_one_cache_at_once(tmp_path):
    train = make_folder(tmp_path / "train", 20, 1)
    cache = tmp_path / "cache"
    procs = [subprocess.Popen(_cmd(train, cache, tmp_path / f"out{i}"), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE) for i in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    a = np.load(tmp_path / "out0" / "features" / "train.embedding.npy")
    b = np.load(tmp_path / "out1" / "features" / "train.embedding.npy")
    np.testing.assert_array_equal(a, b)
    assert len(list((cache / "features").glob("*/manifest.json"))) == 1


def test_kill_9_during_explain_then_rerun_is_identical(tmp_path, tiny_folder):
    """CAM outputs are written atomically at the end: a killed explain leaves no half file, and
    the rerun gives the same maps as an uninterrupted one."""
    from hardprobe import pipeline
    from hardprobe.config import build_config
    train, test = tiny_folder
    cfg = build_config(model="cifar_resnet20", random_init=True, data="imagefolder",
                       train=str(train), test=str(test), out=str(tmp_path / "run"),
                       cache_dir=str(tmp_path / "c"), k=5, num_workers=0, similarity=False,
                       top=0, report=False)
    out = pipeline.run(cfg, progress=False)
    cmd = [sys.executable, "-m", "hardprobe", "explain", str(out), "--top", "8", "--device", "cpu",
           "--batch-size", "2"]
    subprocess.run(cmd, check=True, capture_output=True)
    ref = dict(np.load(out / "explain" / "cams.npz"))
    rng = random.Random(1)
    for _ in range(3):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(1.0, 4.0))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not [p for p in (out / "explain").iterdir() if not p.name.startswith(".")
                    and p.suffix not in (".npz", ".parquet", ".json")]
    subprocess.run(cmd, check=True, capture_output=True)
    again = dict(np.load(out / "explain" / "cams.npz"))
    assert set(again) == set(ref)
    for k in ref:
        np.testing.assert_array_equal(again[k], ref[k])


def test_kill_9_during_perturb_then_rerun_is_identical(tmp_path, tiny_folder):
    """Each corruption x severity forward is a cache entry written atomically: a killed perturb
    run keeps the finished ones, and the rerun computes only the rest and gives the results of
    an uninterrupted run."""
    import json
    import shutil

    import pandas as pd

    from hardprobe import pipeline
    from hardprobe.config import build_config
    from hardprobe.stages.perturb import perturb_run
    train, test = tiny_folder
    cache = tmp_path / "c"
    cfg = build_config(model="cifar_resnet20", random_init=True, data="imagefolder",
                       train=str(train), test=str(test), out=str(tmp_path / "run"),
                       cache_dir=str(cache), k=5, num_workers=0, similarity=False, top=0,
                       report=False)
    run = pipeline.run(cfg, progress=False)
    names = ["gaussian_noise", "defocus_blur", "contrast"]  # 3 x 5 severities = 15 entries
    ref = Path(shutil.copytree(run, tmp_path / "ref"))
    perturb_run(ref, subset=None, corruptions=names, occlusion=False, blend=False,
                batch_size=1, num_workers=0, cache_dir=tmp_path / "ref_cache", progress=False)

    def entries():
        return len(list(cache.glob("features/*/manifest.json")))

    n_extract = entries()
    cmd = [sys.executable, "-m", "hardprobe", "perturb", str(run), "--subset", "0",
           "--corruptions", *names, "--no-occlusion", "--no-blend", "--batch-size", "1",
           "--device", "cpu"]
    kills = sum(_kill_when(cmd, lambda t=t: entries() - n_extract >= t)
                for t in sorted(random.Random(2).sample(range(1, 14), 3)))
    assert kills >= 2, "perturb finished before it could be killed"
    done_before = entries() - n_extract
    assert 0 < done_before < 15
    subprocess.run(cmd, check=True, capture_output=True)
    summary = json.loads((run / "perturb" / "summary.json").read_text())
    assert summary["cache"] == {"computed": 15 - done_before, "cached": done_before}
    for name in ("examples.parquet",):
        pd.testing.assert_frame_equal(pd.read_parquet(run / "perturb" / name),
                                      pd.read_parquet(ref / "perturb" / name))
    pd.testing.assert_frame_equal(pd.read_csv(run / "perturb" / "accuracy.csv"),
                                  pd.read_csv(ref / "perturb" / "accuracy.csv"))
    pd.testing.assert_frame_equal(pd.read_parquet(run / "examples.parquet"),
                                  pd.read_parquet(ref / "examples.parquet"))
