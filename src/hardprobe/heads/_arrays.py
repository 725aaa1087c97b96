"""Checks and memory budgets that the heads share (the kNN search indexes in _index.py and
_faiss.py, linear.py, mlp.py). A leaf: they import it, it imports none of them."""
from __future__ import annotations

import ctypes
import mmap
import os
import sys

import numpy as np

from ..errors import HeadError, ZeroFeatureRowsError


def block_budget() -> int:
    """Bytes for one similarity block: an eighth of the memory available now, 64 MB to 1 GB."""
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not on this platform
        avail = 2**31
    return int(min(max(avail // 8, 64 * 2**20), 2**30))


def stream_rows(n_features: int) -> int:
    """Rows per chunk when features are streamed (faiss backend, finiteness checks):
    block_budget() / 16, i.e. 4 to 64 MB, of float32 rows. Bigger chunks are no faster:
    FAISS blocks its own work, and the chunk only has to amortise per-call overhead."""
    return max(1, block_budget() // 16 // (4 * max(1, n_features)))


_libc = None
_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)


def _release_pages(part):
    """Drop the pages of `part`, a slice of a read-only np.memmap, from this process's
    resident set (madvise MADV_DONTNEED: the file's pages stay in the OS page cache and a
    later access maps them again). Reading a large memmap chunk by chunk then keeps one chunk
    resident, not the whole file. A no-op for anything else, and off Linux."""
    global _libc
    if (_MADV_DONTNEED is None or not sys.platform.startswith("linux")
            or not isinstance(part, np.memmap) or part.mode != "r"  # "r": shared, read-only
            or not part.flags.c_contiguous or part.nbytes == 0):
        return
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    start = part.ctypes.data // mmap.PAGESIZE * mmap.PAGESIZE
    _libc.madvise(start, part.ctypes.data + part.nbytes - start, _MADV_DONTNEED)  # best effort


def _is_int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _check_features(X, name="X", *, allow_empty=False):
    """Float (N, D) array with only finite values; raises ValueError otherwise."""
    X = _check_shape(np.asarray(X), name, allow_empty=allow_empty)  # a memmap: a plain view
    _check_finite(X, name)
    return X


def _check_n_features(X, n_features: int, fitted: str = "classifier"):
    """X unchanged when it has the n_features columns the estimator was fitted with."""
    if X.shape[1] != n_features:
        raise HeadError(f"X has {X.shape[1]} features, but the {fitted} was fitted with "
                         f"{n_features}")
    return X


def _check_shape(X, name="X", *, allow_empty=False):
    """X as a numpy (N, D) array of numbers, without reading its values (a np.memmap stays
    one)."""
    X = X if isinstance(X, np.ndarray) else np.asarray(X)
    if X.ndim != 2:
        raise HeadError(f"{name} must be a 2-D (N, D) feature array, got shape {X.shape}")
    if not (np.issubdtype(X.dtype, np.floating) or np.issubdtype(X.dtype, np.integer)):
        raise HeadError(f"{name} must hold numbers, got dtype {X.dtype}")
    if len(X) == 0 and not allow_empty:
        raise HeadError(f"{name} is empty (0 rows)")
    return X


def _check_finite(X, name="X", rows=None):
    """Raise ValueError naming the count and first rows of NaN/Inf values; X is read `rows`
    rows at a time (None: stream_rows()), so a memory map is never read whole."""
    rows = rows or stream_rows(X.shape[1])
    n_bad, bad_rows = 0, []
    for start in range(0, len(X), rows):
        part = X[start:start + rows]
        bad = ~np.isfinite(part)
        _release_pages(part)
        if bad.any():
            n_bad += int(bad.sum())
            bad_rows.append(start + np.flatnonzero(bad.any(1)))
    if n_bad:
        bad_rows = np.concatenate(bad_rows)
        raise HeadError(f"{name} contains {n_bad} NaN/Inf values in {len(bad_rows)} rows; "
                         f"first rows: {bad_rows[:10].tolist()}")


def _check_nonzero_rows(X, name="X", rows=None):
    """Raise ZeroFeatureRowsError naming the count and first all-zero rows of X (cosine
    similarity is undefined for them: 0 / 0), read `rows` rows at a time like _check_finite."""
    rows = rows or stream_rows(X.shape[1])
    zero = []
    for start in range(0, len(X), rows):
        part = X[start:start + rows]
        zero.append(start + np.flatnonzero(~np.asarray(part).any(1)))
        _release_pages(part)
    zero = np.concatenate(zero) if zero else np.empty(0, np.int64)
    if len(zero):
        raise ZeroFeatureRowsError(
            f"{name} has {len(zero)} all-zero feature rows; first rows: {zero[:10].tolist()}. "
            "Cosine kNN cannot rank neighbours for them (their similarity to everything is "
            "0 / 0, so any neighbours would be arbitrary). Drop those rows, or look at why the "
            "backbone gives them no signal (blank images, a dead feature layer).")


def _check_labels(y, n_rows):
    """(N,) int64 labels >= 0 matching the feature rows."""
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n_rows:
        raise HeadError(f"y must be 1-D with one label per row of X ({n_rows}), "
                         f"got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise HeadError(f"y must hold integer class labels in [0, n_classes), got dtype {y.dtype}")
    if (y < 0).any():
        i = int(np.flatnonzero(y < 0)[0])
        raise HeadError(f"y must be in [0, n_classes); found label {y[i]} at row {i}")
    return y.astype(np.int64)


def _resolve_n_classes(y, n_classes):
    """n_classes if given (checked against y), else max(y) + 1."""
    top = int(y.max()) + 1 if len(y) else 0
    if n_classes is None:
        return top
    if top > n_classes:
        i = int(np.flatnonzero(y >= n_classes)[0])
        raise HeadError(f"label {y[i]} at row {i} is out of range for n_classes={n_classes} "
                         f"(labels must be in [0, {n_classes}))")
    return int(n_classes)
