"""classify's duplicate step: near-copies found in pixel space, so that no example is scored
by a head that saw its twin.

    duplicate_table(run)   (N,) rows of run.examples: id, duplicate_group (-1 = no copy),
                           train_duplicate (NA on train; True = a near-copy is in train)
    fit_groups(dups, run)  (N_train,) int64 groups in run.split_examples("train") order, or
                           None without a train group: kNN leave-one-out leaves out the
                           whole group, and the linear probe's folds keep a group in one fold

The rule and its threshold are scoring.duplicates' (measured there); the thumbnails are
decoded once per run and cached in RUN_DIR/duplicates/ (data.descriptors.run_thumbnails),
and so is the table: the pair search (about 80 s on 60,000 images, 2 cores) depends only on
the thumbnails, the split of each row and the rule, so a classify rerun for other heads
(k, C, folds) reads RUN_DIR/duplicates/table.parquet instead of searching again.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.cache import key_digest
from ..core.io import atomic_write, atomic_write_text
from ..data.descriptors import CACHE_DIR, run_thumbnails
from ..errors import DataError
from ..rundir.layout import FIT_SPLIT
from ..scoring.duplicates import (
    CANDIDATES,
    THRESHOLD,
    THUMB_SIZE,
    duplicate_metrics,
    find_duplicates,
    shared_groups,
)

log = logging.getLogger(__name__)

DESCRIPTOR = "shift-tolerant correlation of 32x32 grey thumbnails (scoring.duplicates)"
NOTE = ("duplicates: an example's near-copies (duplicate_group) are left out of its kNN vote "
        "and kept in its linear-probe fold; test accuracy is also given without the test "
        "images that have a near-copy in train (train_duplicate)")


# Bump when scoring.duplicates' search changes its answer for the same thumbnails.
SEARCH_VERSION = 1
TABLE_FILE, TABLE_KEY = "table.parquet", "table_key.json"


def duplicate_table(run, *, num_workers: int = 0, progress: bool = True) -> pd.DataFrame:
    """id, duplicate_group, train_duplicate for every row of run.examples (same order);
    read from RUN_DIR/duplicates/ when its key (thumbnails, splits, rule) is unchanged.
    num_workers: DataLoader workers decoding the thumbnails (0: this process)."""
    try:
        grey = run_thumbnails(run, num_workers=num_workers, progress=progress)
    except DataError as e:
        raise DataError(f"{e}; or skip duplicate detection with `--no-duplicates`") from e
    splits = run.examples["split"].to_numpy().astype(str)
    key = search_key(grey, splits)
    found = _cached_table(Path(run.path), key, run.examples["id"])
    if found is None:
        found = find_duplicates(grey, splits, fit_split=FIT_SPLIT, progress=progress)
        found.insert(0, "id", run.examples["id"].to_numpy())
        _save_table(Path(run.path), key, found)
    n = int((found["duplicate_group"] >= 0).sum())
    log.info("duplicates: %d examples in %d groups", n, found.loc[
        found["duplicate_group"] >= 0, "duplicate_group"].nunique())
    return found


def search_key(grey: np.ndarray, splits: np.ndarray) -> str:
    """Digest of everything the pair search reads: the (N, 32, 32) thumbnails' bytes, each
    row's split, and the rule's constants."""
    h = hashlib.sha256(np.ascontiguousarray(grey).tobytes())
    h.update("\0".join(splits).encode())
    return key_digest({"thumbnails_and_splits": h.hexdigest(), "threshold": THRESHOLD,
                       "thumb_size": THUMB_SIZE, "candidates": CANDIDATES,
                       "fit_split": FIT_SPLIT, "version": SEARCH_VERSION})


def _cached_table(run_dir: Path, key: str, ids: pd.Series) -> pd.DataFrame | None:
    """The stored table when its key matches and its ids are the run's, in order."""
    folder = run_dir / CACHE_DIR
    try:
        if json.loads((folder / TABLE_KEY).read_text())["key"] != key:
            return None
        table = pd.read_parquet(folder / TABLE_FILE)
    except (OSError, ValueError, KeyError):  # absent or half-written: search again
        return None
    if not table["id"].astype(str).equals(ids.astype(str).reset_index(drop=True)):
        return None
    log.info("duplicates: the stored pair search is current (%s)", folder / TABLE_FILE)
    return table


def _save_table(run_dir: Path, key: str, table: pd.DataFrame) -> None:
    folder = run_dir / CACHE_DIR
    atomic_write(folder / TABLE_FILE, lambda f: table.to_parquet(f, index=False))
    atomic_write_text(folder / TABLE_KEY, json.dumps({"key": key}))


def fit_groups(dups: pd.DataFrame, run) -> np.ndarray | None:
    """(N_train,) int64 duplicate groups of the fit split, in run.split_examples order, or
    None when no two train examples share a group (the heads then run exactly as without)."""
    ids = run.split_examples(FIT_SPLIT)["id"]
    return shared_groups(dups.set_index("id").loc[ids, "duplicate_group"].to_numpy(np.int64))


def metrics_entry(table: pd.DataFrame, heads) -> dict:
    """metrics.json's "duplicates": scoring.duplicates.duplicate_metrics plus the rule."""
    return duplicate_metrics(table, heads, fit_split=FIT_SPLIT) | {
        "threshold": THRESHOLD, "descriptor": DESCRIPTOR}
