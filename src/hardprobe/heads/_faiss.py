"""FAISS index behind KNNClassifier (heads/knn.py): `FaissIndex`, an `_index.Index`.

The index is built chunk by chunk from the training array, which may be a read-only memory
map (a normalised float32 copy of one chunk at a time, never of the whole array): exact
IndexFlatIP, or IVF trained on a seeded sample; it is placed on the GPU when asked and
available. Queries are read the same way, and an IVF query whose probed lists hold fewer than
k rows is searched again with more lists. Ties at the k-th neighbour are broken by lowest
training index (`_index.ordered_top`), as in the torch index. The faiss package is imported
only when a FaissIndex is built; what the options do is documented on KNNClassifier.
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
    _check_nonzero_rows,
    _release_pages,
)
from ._index import Index, ordered_top

_NLIST_CAP = 65536  # default nlist = 4 sqrt(N), at most this and at most N / 39 (see _nlist)
_TRAIN_PER_LIST = 40  # IVF quantizer training sample: 40 rows per list (faiss warns below 39)


class FaissIndex(Index):
    """kind "flat" | "ivf" | "ivf_fp16" over the rows of X, read chunk_size rows at a time
    (None: _arrays.stream_rows()). After build: index (the faiss index), nlist_ (None for
    flat), and the training array kept by reference (Q=None reads it again, no copy)."""

    def __init__(self, *, kind="flat", nlist=None, nprobe=16, seed=0, chunk_size=None,
                 device="cpu"):
        self.kind, self.nlist, self.nprobe, self.seed = kind, nlist, nprobe, seed
        self.chunk_size, self.device = chunk_size, device
        self.index = self.nlist_ = self._fit_X = None

    def chunk_rows(self, d):
        """Rows read per chunk: chunk_size, or stream_rows() of the feature width d."""
        return int(self.chunk_size or _arrays.stream_rows(d))

    def build(self, X):
        """Build the index from X (N, D), checking finiteness and zero rows chunk by chunk."""
        faiss = _import_faiss()
        n, d = X.shape
        self.nlist_ = None if self.kind == "flat" else _nlist(self.nlist, n)
        if self.nlist_ is None:
            index = faiss.IndexFlatIP(d)  # inner product of unit rows = cosine
        else:
            storage = "Flat" if self.kind == "ivf" else "SQfp16"
            index = faiss.index_factory(d, f"IVF{self.nlist_},{storage}",
                                        faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = self.seed  # k-means' own sampling and initialisation
        index = self._on_device(faiss, index)
        if not index.is_trained:
            index.train(self.training_sample(X))
        elif hasattr(index, "codes"):  # CPU flat: reserve the storage once, so adding chunk
            index.codes.resize(n * index.code_size)  # by chunk never reallocates it (a vector
            index.codes.resize(0)  # that doubles holds two copies while it copies)
        for _, chunk in _normalised_chunks(X, self.chunk_rows(d), "X"):
            index.add(chunk)
        self.index, self._fit_X, self.ntotal = index, X, n
        return self

    def training_sample(self, X):
        """(m, D) float32 unit rows drawn without replacement with seed, in file order:
        m = min(N, 40 nlist), at most block_budget() bytes (but at least nlist rows)."""
        n, d = X.shape
        m = min(n, _TRAIN_PER_LIST * self.nlist_,
                max(self.nlist_, _arrays.block_budget() // (4 * d)))
        rows = np.sort(np.random.default_rng(self.seed).choice(n, m, replace=False))
        sample = np.empty((m, d), np.float32)
        step = self.chunk_rows(d)
        for a in range(0, m, step):
            r = rows[a:a + step]
            sample[a:a + len(r)] = X[r]
            _release_pages(X[r[0]:r[-1] + 1])
        if not np.isfinite(sample).all():
            _check_finite(X, "X", step)  # raises, counting over all of X
        if not sample.any(1).all():
            _check_nonzero_rows(X, "X", step)  # raises, naming the rows over all of X
        return _normalise_inplace(sample)

    def _on_device(self, faiss, index):
        """The index on the GPU when device is cuda and this FAISS has GPU support."""
        device = torch.device(self.device)
        if device.type != "cuda":
            return index
        if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
            warnings.warn(f"device={self.device!r}, but this FAISS has no GPU support or sees "
                          "no GPU: searching on the CPU (pip install faiss-gpu for GPU search)",
                          stacklevel=5)
            return index
        self._gpu_resources = faiss.StandardGpuResources()  # must outlive the index
        return faiss.index_cpu_to_gpu(self._gpu_resources, device.index or 0, index)

    def _top(self, Q, k):
        """The k most similar rows for the rows of Q (None: the training array), read chunk
        by chunk; torch tensors on the CPU."""
        source = self._fit_X if Q is None else Q
        sims = np.empty((len(source), k), np.float32)
        ids = np.empty((len(source), k), np.int64)
        for a, chunk in _normalised_chunks(source, self.chunk_rows(source.shape[1]), "X"):
            def search(rows, K, chunk=chunk):
                part = chunk if rows is None else np.ascontiguousarray(chunk[rows.numpy()])
                return tuple(map(torch.from_numpy, self._search_chunk(part, K)))
            s, i = ordered_top(search, k, self.ntotal)
            sims[a:a + len(chunk)], ids[a:a + len(chunk)] = s.numpy(), i.numpy()
        return torch.from_numpy(sims), torch.from_numpy(ids)

    def _search_chunk(self, chunk, k):
        """(sims, ids) of one chunk. IVF: a query whose nprobe lists hold fewer than k rows
        (FAISS pads with id -1) is searched again with nprobe doubled until it has k."""
        index = self.index
        if self.nlist_ is None:
            return index.search(chunk, k)
        nprobe = min(int(self.nprobe), self.nlist_)
        index.nprobe = nprobe
        sims, ids = index.search(chunk, k)
        short = (ids < 0).any(1)
        while short.any() and nprobe < self.nlist_:  # nprobe = nlist scans every row
            nprobe = index.nprobe = min(2 * nprobe, self.nlist_)
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
    _index.normalise_checked (one row never depends on the others)."""
    t = torch.from_numpy(buf)
    F.normalize(t, dim=1, out=t)
    return buf


def _normalised_chunks(X, rows, name):
    """Yield (start, (n, D) float32 unit rows of X[start:start + n]), reading `rows` rows at
    a time (a fresh float32 copy per chunk). A non-finite value raises the HeadError of
    _check_finite, an all-zero row that of _check_nonzero_rows, counted over all of X."""
    for start in range(0, len(X), rows):
        part = X[start:start + rows]
        buf = np.array(part, dtype=np.float32, order="C")  # the chunk is read here
        _release_pages(part)
        if not np.isfinite(buf).all():
            _check_finite(X, name, rows)
        if not buf.any(1).all():
            _check_nonzero_rows(X, name, rows)
        yield start, _normalise_inplace(buf)
