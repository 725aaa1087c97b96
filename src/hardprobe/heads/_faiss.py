"""FAISS backend of KNNClassifier (heads/knn.py): imported by it only when backend="faiss".

The index is built chunk by chunk from the training array, which may be a read-only memory
map (a normalised float32 copy of one chunk at a time, never of the whole array): exact
IndexFlatIP, or IVF trained on a seeded sample; it is placed on the GPU when asked and
available. Queries are read the same way, and an IVF query whose probed lists hold fewer than
k rows is searched again with more lists. The functions take the KNNClassifier as `knn` (its
parameters, and the fitted attributes they set or read); what they do is documented there.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import HeadError
from . import _arrays
from ._arrays import (
    _check_finite,
    _check_n_features,
    _check_shape,
    _release_pages,
)

_NLIST_CAP = 65536  # default nlist = 4 sqrt(N), at most this and at most N / 39 (see _nlist)
_TRAIN_PER_LIST = 40  # IVF quantizer training sample: 40 rows per list (faiss warns below 39)


def chunk_rows(knn):
    """Rows read per chunk: chunk_size, or stream_rows() of the feature width."""
    return int(knn.chunk_size or _arrays.stream_rows(knn.n_features_in_))


def fit_index(knn, X):
    """Build knn.index_ from X, read chunk_rows(knn) rows at a time."""
    faiss = _import_faiss()
    n, d = X.shape
    knn.nlist_ = None if knn.index == "flat" else _nlist(knn.nlist, n)
    if knn.nlist_ is None:
        index = faiss.IndexFlatIP(d)  # inner product of unit rows = cosine
    else:
        storage = "Flat" if knn.index == "ivf" else "SQfp16"
        index = faiss.index_factory(d, f"IVF{knn.nlist_},{storage}",
                                    faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = knn.seed  # k-means' own sampling and initialisation
    index = on_device(knn, faiss, index)
    if not index.is_trained:
        index.train(training_sample(knn, X))
    elif hasattr(index, "codes"):  # CPU flat: reserve the storage once, so adding chunk by
        index.codes.resize(n * index.code_size)  # chunk never reallocates it (a vector
        index.codes.resize(0)  # that doubles holds two copies while it copies)
    for _, chunk in _normalised_chunks(X, chunk_rows(knn), "X"):
        index.add(chunk)
    knn.index_ = index
    knn._fit_X = X  # X=None queries read it again (a reference: no copy)


def training_sample(knn, X):
    """(m, D) float32 unit rows drawn without replacement with knn.seed, in file order:
    m = min(N, 40 nlist), at most block_budget() bytes (but at least nlist rows)."""
    n, d = X.shape
    m = min(n, _TRAIN_PER_LIST * knn.nlist_,
            max(knn.nlist_, _arrays.block_budget() // (4 * d)))
    rows = np.sort(np.random.default_rng(knn.seed).choice(n, m, replace=False))
    sample = np.empty((m, d), np.float32)
    step = chunk_rows(knn)
    for a in range(0, m, step):
        r = rows[a:a + step]
        sample[a:a + len(r)] = X[r]
        _release_pages(X[r[0]:r[-1] + 1])
    if not np.isfinite(sample).all():
        _check_finite(X, "X", step)  # raises, counting over all of X
    return _normalise_inplace(sample)


def on_device(knn, faiss, index):
    """The index on the GPU when device is cuda and this FAISS has GPU support, else as is."""
    device = torch.device(knn.device)
    if device.type != "cuda":
        return index
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        warnings.warn(f"device={knn.device!r}, but this FAISS has no GPU support or sees "
                      "no GPU: searching on the CPU (pip install faiss-gpu for GPU search)",
                      stacklevel=4)
        return index
    knn._gpu_resources = faiss.StandardGpuResources()  # must outlive the index
    return faiss.index_cpu_to_gpu(knn._gpu_resources, device.index or 0, index)


def queries(knn, X, exclude_self):
    """The array to read queries from: the training array itself for X=None."""
    if X is None:
        return knn._fit_X
    if exclude_self:
        raise HeadError("exclude_self=True needs X=None (queries must be the training set)")
    X = _check_shape(X, "X", allow_empty=True)  # finiteness: chunk by chunk
    return _check_n_features(X, knn.n_features_in_)


def search(knn, source, exclude_self):
    """Search the index with the rows of `source`, read chunk by chunk; with exclude_self
    (source is the training array) each query's own row is dropped from its list."""
    k = knn.k + (1 if exclude_self else 0)
    sims = np.empty((len(source), k), np.float32)
    idx = np.empty((len(source), k), np.int64)
    for start, chunk in _normalised_chunks(source, chunk_rows(knn), "X"):
        sims[start:start + len(chunk)], idx[start:start + len(chunk)] = (
            search_chunk(knn, chunk, k))
    if exclude_self:  # drop each query's own row; if a tie pushed it out, drop the last
        own = idx == np.arange(len(idx))[:, None]
        own[~own.any(1), -1] = True
        keep = ~own
        sims, idx = sims[keep].reshape(len(idx), -1), idx[keep].reshape(len(idx), -1)
    return torch.from_numpy(sims), torch.from_numpy(idx)


def search_chunk(knn, chunk, k):
    """(sims, ids) of one chunk. IVF: a query whose nprobe lists hold fewer than k rows
    (FAISS pads with id -1) is searched again with nprobe doubled until it has k."""
    index = knn.index_
    if knn.nlist_ is None:
        return index.search(chunk, k)
    nprobe = min(int(knn.nprobe), knn.nlist_)
    index.nprobe = nprobe
    sims, ids = index.search(chunk, k)
    short = (ids < 0).any(1)
    while short.any() and nprobe < knn.nlist_:  # nprobe = nlist scans every row
        nprobe = index.nprobe = min(2 * nprobe, knn.nlist_)
        sims[short], ids[short] = index.search(np.ascontiguousarray(chunk[short]), k)
        short = (ids < 0).any(1)
    return sims, ids


def _nlist(nlist, n):
    """IVF list count: nlist, or 4 sqrt(n) (FAISS's guideline), at most n / 39 (FAISS wants 39
    training rows per list) and _NLIST_CAP; at least 1."""
    if nlist is None:
        return max(1, min(int(4 * math.sqrt(n)), n // 39, _NLIST_CAP))
    if nlist > n:
        raise HeadError(f"nlist={nlist} is larger than the {n} training examples: every IVF "
                         "list needs at least one (lower nlist, or use index='flat')")
    return int(nlist)


def _import_faiss():
    try:
        import faiss
    except ImportError as e:
        raise ImportError("backend='faiss' needs FAISS: pip install faiss-cpu (or faiss-gpu, "
                          "or hardprobe's extra: pip install 'hardprobe[faiss]')") from e
    return faiss


def _normalise_inplace(buf):
    """Unit rows of a float32 C-contiguous numpy array, in place; the same values as
    _normalise (one row never depends on the others)."""
    t = torch.from_numpy(buf)
    F.normalize(t, dim=1, out=t)
    return buf


def _normalised_chunks(X, rows, name):
    """Yield (start, (n, D) float32 unit rows of X[start:start + n]), reading `rows` rows at
    a time (a fresh float32 copy per chunk). A non-finite value raises the ValueError of
    _check_finite, counted over all of X."""
    for start in range(0, len(X), rows):
        part = X[start:start + rows]
        buf = np.array(part, dtype=np.float32, order="C")  # the chunk is read here
        _release_pages(part)
        if not np.isfinite(buf).all():
            _check_finite(X, name, rows)
        yield start, _normalise_inplace(buf)
