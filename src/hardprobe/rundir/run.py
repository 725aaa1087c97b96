"""The run directory: the contract between stages.

    RUN_DIR/
      config.yaml              resolved configuration
      provenance.json          versions, backbone and dataset fingerprints, cache entries
      examples.parquet (.csv)  one row per example of every split (see README for columns)
      metrics.json             accuracy per head and split, confusion matrices, confused pairs
      features/<split>.embedding.npy, <split>.logits.npy   in the row order of the table

Each stage reads what earlier stages wrote and adds its part; `load_run` opens it from a
notebook.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from filelock import FileLock

from ..core.io import (
    atomic_save_npy,
    atomic_write,
    atomic_write_text,
    read_json,
    write_json,
)
from ..errors import RunDirError
from . import layout


class Run:
    """Read access to a run directory. `examples` and `metrics` are read on first use."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not (self.path / "examples.parquet").exists():
            raise RunDirError(f"{self.path} is not a hardprobe run directory (no examples.parquet); "
                              "create one with `hardprobe run` or `hardprobe extract`")
        self._examples = None
        self._metrics = None
        self._dataset = None
        self._rows = None

    @property
    def examples(self) -> pd.DataFrame:
        if self._examples is None:
            self._examples = pd.read_parquet(self.path / "examples.parquet")
        return self._examples

    @property
    def metrics(self) -> dict:
        if self._metrics is None:
            p = self.path / "metrics.json"
            self._metrics = json.loads(p.read_text()) if p.exists() else {}
        return self._metrics

    @property
    def provenance(self) -> dict:
        return read_json(self.path / "provenance.json")

    @property
    def class_names(self) -> list[str]:
        return list(self.provenance["dataset"]["class_names"])

    @property
    def splits(self) -> list[str]:
        return list(dict.fromkeys(self.examples["split"]))

    def features(self, split: str, *, mmap: bool = False) -> np.ndarray:
        """(N_split, D) float32 embeddings in the row order of `examples[split == split]`."""
        return self._array(split, "embedding", mmap)

    def logits(self, split: str) -> np.ndarray | None:
        """(N_split, C) logits of the model's own classifier, or None when it has none."""
        p = feature_path(self.path, split, "logits")
        return np.load(p) if p.exists() else None

    def head_probs(self, split: str, head: str) -> np.ndarray | None:
        """(N_split, C) float32 probabilities classify scored `head` with on `split` (rows in
        split_examples order; out-of-sample on train for knn and linear), or None when the
        run has none stored (a run classified before they were stored: re-classify)."""
        from .heads import probs_path
        p = probs_path(self.path, split, head)
        return np.load(p) if p.exists() else None

    def knn_neighbors(self, split: str) -> np.ndarray | None:
        """(N_split, k) int32 rows of the train split that classify's kNN voted with on
        `split` (leave-one-out on train, duplicate groups left out), or None when the run
        has none stored."""
        from .heads import neighbors_path
        p = neighbors_path(self.path, split)
        return np.load(p) if p.exists() else None

    def split_examples(self, split: str) -> pd.DataFrame:
        return self.examples[self.examples["split"] == split].reset_index(drop=True)

    @property
    def config(self):
        """The resolved RunConfig the run was made with."""
        from ..config import load_config
        return load_config(self.path / "config.yaml")

    def dataset(self):
        """The run's ImageSet, reopened from its config; refuses images changed since the run."""
        if self._dataset is None:
            from ..data.datasets import load_dataset
            cfg = self.config
            ds = load_dataset(cfg.data, data_root=cfg.data_root, train=cfg.train, test=cfg.test,
                              download=False)
            recorded = self.provenance["dataset"]["splits"]
            for name, split in ds.splits.items():
                if name in recorded and recorded[name]["manifest"] != split.manifest_digest:
                    raise RunDirError(f"the images of split {name!r} ({split.root}) changed since "
                                      f"this run was made; rerun `hardprobe run`")
            self._dataset = ds
        return self._dataset

    def backbone(self):
        """The run's backbone, rebuilt from its config (same weights, same preprocessing)."""
        from ..backbones import create_backbone
        cfg = self.config
        bb = create_backbone(cfg.model, weights=cfg.weights, weights_tag=cfg.weights_tag,
                             random_init=cfg.random_init, image_size=cfg.image_size,
                             trust_weights=cfg.trust_weights)
        want = self.provenance["backbone"]["weights"]
        if bb.weights_id != want:
            raise RunDirError(f"the weights now found ({bb.weights_id}) are not the run's ({want})")
        return bb

    def images(self, ids) -> list:
        """uint8 (3, H, W) tensors of the examples with these ids, decoded from the dataset."""
        ds = self.dataset()
        rows = self._rows_by_id()
        out = []
        for i in ids:
            split, row = rows[i]
            out.append(ds.splits[split].decode(row))
        return out

    def _rows_by_id(self) -> dict:
        # Rows of the dataset, not of the table: skipped (undecodable) images leave gaps.
        if self._rows is None:
            self._rows = {i: (name, row) for name, split in self.dataset().splits.items()
                          for row, i in enumerate(split.examples["id"])}
        return self._rows

    def _array(self, split: str, name: str, mmap: bool) -> np.ndarray:
        p = feature_path(self.path, split, name)
        if not p.exists():
            raise RunDirError(f"{p} is missing; rerun `hardprobe extract` for this run")
        return np.load(p, mmap_mode="r" if mmap else None)

    # ---- writing: the one way a stage adds its columns and its stamp
    def lock(self) -> FileLock:
        """The run's write lock: one stage at a time changes the table or the stamps."""
        return FileLock(str(self.path / ".run.lock"))

    def join(self, stage: str, table: pd.DataFrame) -> pd.DataFrame:
        """Replace `stage`'s columns in examples.parquet by those of `table` (joined by id;
        rows it lacks get NaN). The current table is re-read under the lock, so columns that
        another stage wrote meanwhile survive. `table` may hold only columns the stage owns
        (layout.STAGES), besides id and split. Returns the table as written."""
        spec = layout.STAGES[stage]
        cols = [c for c in table.columns if c not in ("id", "split")]
        foreign = [c for c in cols if not spec.owns(c)]
        if foreign:  # a bug in a stage, not a user error
            raise AssertionError(f"stage {stage!r} writes columns it does not own: {foreign}")
        with self.lock():
            full = pd.read_parquet(self.path / layout.TABLE)
            full = full.drop(columns=[c for c in full.columns if spec.owns(c)])
            full = full.merge(table[["id", *cols]], on="id", how="left", sort=False)
            write_examples(self.path, full)
        self._examples = full
        return full

    def stamps(self) -> dict:
        """{stage: digest of the inputs its output was computed from} (stages.json)."""
        p = self.path / layout.STAMPS
        return read_json(p) if p.exists() else {}

    def stamp(self, stage: str, key: str) -> None:
        """Record that `stage`'s output now comes from inputs with digest `key`. When the key
        changed, the stages that depend on it are stale: their columns leave the table and
        their stamps go, so the next `hardprobe run` recomputes them."""
        with self.lock():
            stamps = self.stamps()
            if stamps.get(stage) not in (None, key):
                stale = layout.dependents(stage)
                for s in stale:
                    stamps.pop(s, None)
                full = pd.read_parquet(self.path / layout.TABLE)
                drop = [c for c in full.columns if any(layout.STAGES[s].owns(c) for s in stale)]
                if drop:
                    write_examples(self.path, full.drop(columns=drop))
                    self._examples = None
            stamps[stage] = key
            write_json(self.path / layout.STAMPS, stamps)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"


def load_run(path: str | os.PathLike) -> Run:
    """Open a run directory written by `hardprobe run` (or `extract` + `classify`)."""
    return Run(path)


# ------------------------------------------------------------------ writers
def feature_path(run_dir: Path, split: str, name: str) -> Path:
    return Path(run_dir) / "features" / f"{split}.{name}.npy"


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link a cached array into the run (no second copy on disk), else copy it."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def write_examples(run_dir: Path, df: pd.DataFrame) -> None:
    atomic_write(Path(run_dir) / "examples.parquet", lambda f: df.to_parquet(f, index=False))
    atomic_write_text(Path(run_dir) / "examples.csv", df.to_csv(index=False))


def save_array(run_dir: Path, split: str, name: str, arr: np.ndarray) -> None:
    atomic_save_npy(feature_path(run_dir, split, name), arr)


