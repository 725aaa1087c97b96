"""Content-addressed feature cache with resumable shards.

An entry lives at <cache>/features/<key digest>/ where the digest is the sha256 of a JSON
key naming everything that produced the arrays (backbone, weights digest, preprocessing,
precision, dataset manifest, split, code version). Work is written as numbered shards,
each an atomic write with its sha256 in a sidecar, so an interrupted extraction resumes at
the first missing shard. `finalize` joins the shards into one .npy per array and writes
manifest.json (shapes, dtypes, checksums); only then is the entry complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
from filelock import FileLock

from ..errors import CacheCorruptError
from .io import atomic_save_npy, atomic_write, atomic_write_text

MANIFEST = "manifest.json"


def default_cache_dir() -> Path:
    env = os.environ.get("HARDPROBE_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hardprobe"


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def sha256_bytes_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()



class CacheEntry:
    def __init__(self, root: str | os.PathLike, key: dict):
        self.key = key
        self.digest = key_digest(key)
        self.dir = Path(root) / "features" / self.digest

    # ---- shards
    def shard_path(self, i: int) -> Path:
        return self.dir / f"shard_{i:05d}.npz"

    def has_shard(self, i: int) -> bool:
        # The sidecar is written after the shard's rename: its presence marks the shard finished.
        return self.shard_path(i).with_suffix(".sha256").exists() and self.shard_path(i).exists()

    def write_shard(self, i: int, **arrays: np.ndarray) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write_key()
        path = self.shard_path(i)
        atomic_write(path, lambda f: np.savez(f, **arrays))
        atomic_write_text(path.with_suffix(".sha256"), sha256_bytes_of(path))

    def read_shard(self, i: int) -> dict[str, np.ndarray]:
        path = self.shard_path(i)
        want = path.with_suffix(".sha256").read_text().strip()
        if sha256_bytes_of(path) != want:
            raise CacheCorruptError(f"cache shard {path} fails its checksum; delete it and rerun")
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def drop_bad_shards(self, n_shards: int) -> list[int]:
        """Delete shards whose checksum fails (e.g. a disk error) so they are recomputed."""
        bad = []
        for i in range(n_shards):
            if self.has_shard(i):
                try:
                    self.read_shard(i)
                except (CacheCorruptError, OSError, ValueError):
                    self.shard_path(i).unlink(missing_ok=True)
                    self.shard_path(i).with_suffix(".sha256").unlink(missing_ok=True)
                    bad.append(i)
        return bad

    # ---- final arrays
    @property
    def complete(self) -> bool:
        return (self.dir / MANIFEST).exists()

    def finalize(self, n_shards: int, meta: dict | None = None) -> dict:
        """Join shards 0..n-1 into <name>.npy arrays, write the manifest, drop the shards."""
        parts = [self.read_shard(i) for i in range(n_shards)]
        arrays = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
        n = (meta or {}).get("n")
        if "index" in arrays and n is not None and not np.array_equal(arrays["index"], np.arange(n)):
            raise CacheCorruptError(f"shards in {self.dir} do not cover rows 0..{n - 1} in order; "
                                    "delete the folder and rerun")
        files = {}
        for name, arr in arrays.items():
            path = self.dir / f"{name}.npy"
            atomic_save_npy(path, arr)
            files[name] = {"file": path.name, "shape": list(arr.shape), "dtype": str(arr.dtype),
                           "sha256": sha256_bytes_of(path)}
        manifest = {"key": self.key, "digest": self.digest, "arrays": files, "meta": meta or {}}
        atomic_write_text(self.dir / MANIFEST, json.dumps(manifest, indent=2, default=str))
        for i in range(n_shards):
            self.shard_path(i).unlink(missing_ok=True)
            self.shard_path(i).with_suffix(".sha256").unlink(missing_ok=True)
        return manifest

    def manifest(self) -> dict:
        return json.loads((self.dir / MANIFEST).read_text())

    def load(self, *, verify: bool = True, mmap: bool = False) -> dict[str, np.ndarray]:
        out = {}
        for name, info in self.manifest()["arrays"].items():
            path = self.dir / info["file"]
            if verify and sha256_bytes_of(path) != info["sha256"]:
                raise CacheCorruptError(f"cached array {path} fails its checksum; "
                                        f"delete {self.dir} and rerun to recompute it")
            out[name] = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        return out

    def lock(self, timeout: float = -1) -> FileLock:
        """Process lock for this entry: two runs never write the same shards at once."""
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.dir) + ".lock", timeout=timeout)

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def _write_key(self) -> None:
        if not (self.dir / "key.json").exists():
            atomic_write_text(self.dir / "key.json", json.dumps(self.key, indent=2, default=str))
