import numpy as np
import pytest

from hardprobe.core.cache import CacheEntry, key_digest
from hardprobe.core.io import atomic_write
from hardprobe.errors import CacheCorruptError


def test_key_digest_is_order_independent_and_sensitive():
    assert key_digest({"a": 1, "b": [1, 2]}) == key_digest({"b": [1, 2], "a": 1})
    assert key_digest({"a": 1}) != key_digest({"a": 2})


def test_shards_finalize_and_load(tmp_path):
    e = CacheEntry(tmp_path, {"x": 1})
    assert not e.complete and not e.has_shard(0)
    e.write_shard(0, embedding=np.ones((2, 3), np.float32), index=np.arange(2))
    e.write_shard(1, embedding=np.zeros((1, 3), np.float32), index=np.arange(2, 3))
    assert e.has_shard(0) and e.has_shard(1)
    m = e.finalize(2, meta={"n": 3})
    assert e.complete and m["arrays"]["embedding"]["shape"] == [3, 3]
    out = e.load()
    assert out["embedding"].dtype == np.float32 and out["embedding"][:2].sum() == 6
    assert not e.has_shard(0)  # shards are dropped once joined


def test_corrupt_shard_detected_and_dropped(tmp_path):
    e = CacheEntry(tmp_path, {"x": 2})
    e.write_shard(0, embedding=np.ones((2, 3), np.float32))
    with open(e.shard_path(0), "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\0\0\0\1")
    with pytest.raises(CacheCorruptError):
        e.read_shard(0)
    assert e.drop_bad_shards(1) == [0] and not e.has_shard(0)


def test_finalize_refuses_shards_out_of_order(tmp_path):
    e = CacheEntry(tmp_path, {"x": 3})
    e.write_shard(0, embedding=np.ones((1, 2), np.float32), index=np.array([1]))
    with pytest.raises(CacheCorruptError, match="do not cover"):
        e.finalize(1, meta={"n": 1})


def test_changed_final_array_fails_checksum(tmp_path):
    e = CacheEntry(tmp_path, {"x": 4})
    e.write_shard(0, embedding=np.ones((2, 2), np.float32))
    e.finalize(1)
    np.save(e.dir / "embedding.npy", np.zeros((2, 2), np.float32))
    with pytest.raises(CacheCorruptError, match="checksum"):
        e.load()


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.bin"

    def boom(f):
        f.write(b"partial")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_atomic_write_gives_the_usual_file_mode(tmp_path):
    """Not mkstemp's 0o600: others can read a run dir as they can any file the user writes."""

    from hardprobe.core.io import atomic_write_text
    atomic_write_text(tmp_path / "f.txt", "x")
    (tmp_path / "plain.txt").write_text("x")  # what open() gives under the same umask
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == (tmp_path / "plain.txt").stat().st_mode & 0o777
