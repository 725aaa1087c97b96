"""torchrun extraction: 2 CPU processes over gloo give the single process's features bit for bit,
and a rerun after a killed rank computes only the missing shards."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import make_folder

from hardprobe.core import distributed
from hardprobe.core.device import default_num_workers

pytestmark = pytest.mark.skipif(not distributed.dist.is_gloo_available(),
                                reason="this torch build has no gloo backend")


def _extract_args(train, cache, out, *extra, shard_size=4):
    return ["-m", "hardprobe", "extract", "--model", "cifar_resnet20", "--random-init",
            "--data", "imagefolder", "--train", str(train), "--cache-dir", str(cache),
            "--shard-size", str(shard_size), "--num-workers", "0", "--no-progress", "--out",
            str(out), "--device", "cpu", *extra]


def _torchrun(n):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", str(n)]


def _env():
    # one thread per process, as torchrun sets for >1 process, so both launches compute alike
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _manifest(cache) -> dict:
    (path,) = Path(cache).glob("features/*/manifest.json")
    return json.loads(path.read_text())


def test_two_ranks_give_the_single_process_features_row_for_row(tmp_path):
    train = make_folder(tmp_path / "train", 9, 0)  # 27 images -> 7 shards of 4 (last one 3)
    one = subprocess.run([sys.executable, *_extract_args(train, tmp_path / "c1", tmp_path / "r1")],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run(_torchrun(2) + _extract_args(train, tmp_path / "c2", tmp_path / "r2"),
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("wrote") == 1  # rank 0 reports; rank 1 says nothing
    for name in ("train.embedding.npy",):
        a = np.load(tmp_path / "r1" / "features" / name)
        b = np.load(tmp_path / "r2" / "features" / name)
        assert a.shape == (27, 64) and np.isfinite(a).all()
        np.testing.assert_array_equal(a, b)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "r1" / "examples.parquet"),
                                  pd.read_parquet(tmp_path / "r2" / "examples.parquet"))
    meta = _manifest(tmp_path / "c2")["meta"]
    assert meta["world_size"] == 2 and meta["computed_shards"] == list(range(7))
    assert _manifest(tmp_path / "c1")["key"] == _manifest(tmp_path / "c2")["key"]


def _children(pid: int) -> list[int]:
    """All descendants of pid (Linux /proc)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids + [d for k in kids for d in _children(k)]


def _workers(pid: int) -> list[int]:
    out = []
    for k in _children(pid):
        try:
            cmd = Path(f"/proc/{k}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"hardprobe" in cmd and b"torch.distributed.run" not in cmd:
            out.append(k)
    return out


def _finished(cache) -> set[int]:
    return {int(p.name[6:11]) for p in Path(cache).rglob("shard_*.sha256")}


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_a_killed_rank_then_rerun_computes_only_the_missing_shards(tmp_path):
    train = make_folder(tmp_path / "train", 30, 1)  # 90 images -> 45 shards of 2
    cache = tmp_path / "cache"
    args = _extract_args(train, cache, tmp_path / "run", "--batch-size", "1", shard_size=2)
    proc = subprocess.Popen(_torchrun(2) + args, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    killed = None
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        if len(_finished(cache)) >= 6:
            workers = _workers(proc.pid)
            if workers:
                killed = workers[-1]
                os.kill(killed, signal.SIGKILL)
                break
        time.sleep(0.01)
    proc.wait(timeout=120)
    assert killed is not None, "the extraction finished before a rank could be killed"
    assert proc.returncode != 0  # torchrun saw the dead rank and stopped the job
    done_before = _finished(cache)
    assert 0 < len(done_before) < 45
    assert not list(cache.glob("features/*/manifest.json"))  # never joined while incomplete

    again = subprocess.run(_torchrun(2) + args, env=_env(), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    computed = set(_manifest(cache)["meta"]["computed_shards"])
    assert not computed & done_before  # finished shards were not recomputed
    assert computed | done_before == set(range(45))

    ref = subprocess.run([sys.executable, *_extract_args(train, tmp_path / "c1", tmp_path / "r1",
                                                         "--batch-size", "1", shard_size=2)],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "run/features/train.embedding.npy"),
                                  np.load(tmp_path / "r1/features/train.embedding.npy"))


def test_shards_are_split_disjointly_without_padding():
    shards = list(range(7))
    parts = [distributed.Context(rank=r, world_size=3).my_part(shards) for r in range(3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(sum(parts, [])) == shards  # each shard once, none repeated to even out


def test_rank_device_and_workers(monkeypatch):
    ctx = distributed.Context(rank=1, world_size=2, local_rank=1, local_world_size=2)
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: False)
    assert distributed.rank_device("auto", ctx) == "cpu"
    assert distributed.rank_device("cuda", ctx) == "cuda:1"  # this rank's GPU
    assert distributed.rank_device("cuda:0", ctx) == "cuda:0"  # an explicit device is honoured
    assert distributed.rank_device("cpu", ctx) == "cpu"
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: True)
    assert distributed.rank_device("auto", ctx) == "cuda:1"
    assert distributed.rank_device("auto", distributed.SINGLE) == "auto"
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert default_num_workers() == 8 and default_num_workers(ctx) == 7


def test_env_context(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert distributed.env_context() is distributed.SINGLE
    assert distributed.init("auto") == (distributed.SINGLE, "auto")  # no-op without torchrun
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(RuntimeError, match="torchrun"):
        distributed.env_context()
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    ctx = distributed.env_context()
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.active, ctx.main) == (2, 4, 0, True, False)
