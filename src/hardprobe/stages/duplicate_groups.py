"""classify's duplicate step: near-copies found in pixel space, so that no example is scored
by a head that saw its twin.

    duplicate_table(run)   (N,) rows of run.examples: id, duplicate_group (-1 = no copy),
                           train_duplicate (NA on train; True = a near-copy is in train)
    fit_groups(dups, run)  (N_train,) int64 groups in run.split_examples("train") order, or
                           None without a train group: kNN leave-one-out leaves out the
                           whole group, and the linear probe's folds keep a group in one fold

The rule and its threshold are scoring.duplicates' (measured there); the thumbnails are
decoded once per run and cached in RUN_DIR/duplicates/ (data.descriptors.run_thumbnails).
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from ..data.descriptors import run_thumbnails
from ..errors import DataError
from ..rundir.layout import FIT_SPLIT
from ..scoring.duplicates import (
    THRESHOLD,
    duplicate_metrics,
    find_duplicates,
    shared_groups,
)

log = logging.getLogger(__name__)

DESCRIPTOR = "shift-tolerant correlation of 32x32 grey thumbnails (scoring.duplicates)"
NOTE = ("duplicates: an example's near-copies (duplicate_group) are left out of its kNN vote "
        "and kept in its linear-probe fold; test accuracy is also given without the test "
        "images that have a near-copy in train (train_duplicate)")


def duplicate_table(run, *, progress: bool = True) -> pd.DataFrame:
    """id, duplicate_group, train_duplicate for every row of run.examples (same order)."""
    try:
        grey = run_thumbnails(run, progress=progress)
    except DataError as e:
        raise DataError(f"{e}; or skip duplicate detection with `--no-duplicates`") from e
    found = find_duplicates(grey, run.examples["split"].to_numpy(), fit_split=FIT_SPLIT,
                            progress=progress)
    found.insert(0, "id", run.examples["id"].to_numpy())
    n = int((found["duplicate_group"] >= 0).sum())
    log.info("duplicates: %d examples in %d groups", n, found.loc[
        found["duplicate_group"] >= 0, "duplicate_group"].nunique())
    return found


def fit_groups(dups: pd.DataFrame, run) -> np.ndarray | None:
    """(N_train,) int64 duplicate groups of the fit split, in run.split_examples order, or
    None when no two train examples share a group (the heads then run exactly as without)."""
    ids = run.split_examples(FIT_SPLIT)["id"]
    return shared_groups(dups.set_index("id").loc[ids, "duplicate_group"].to_numpy(np.int64))


def metrics_entry(table: pd.DataFrame, heads) -> dict:
    """metrics.json's "duplicates": scoring.duplicates.duplicate_metrics plus the rule."""
    return duplicate_metrics(table, heads, fit_split=FIT_SPLIT) | {
        "threshold": THRESHOLD, "descriptor": DESCRIPTOR}
