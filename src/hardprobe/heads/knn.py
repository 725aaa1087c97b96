"""Weighted k-nearest-neighbour classifier on frozen features (DINO's eval_knn).

Features are L2-normalised, so similarity is cosine in [-1, 1] (higher = closer).
Each query's k most similar training examples vote for their label with weight
exp(sim / T) ("exp", as in DINO) or 1 ("uniform", as sklearn's KNeighborsClassifier);
class probabilities are the per-class vote sums divided by the total vote.

Two search backends, each an index object behind one interface (`_index.Index`:
build(X), search(Q, k, exclude=...) -> (sims, ids)) held by KNNClassifier: `TorchIndex`
(`_index.py`: exact, chunked matmul + top-k on a normalised copy held in memory) and
`FaissIndex` (`_faiss.py`: an index built chunk by chunk from the training array, which may be
a read-only memory map: exact IndexFlatIP, or IVF for speed at a measured recall; the faiss
package itself is imported only when it is used). Both break ties at the k-th neighbour by
lowest training index, so they agree on duplicated data, and both read features through
`_arrays.py` (block_budget, stream_rows, _release_pages and the input validation shared with
`linear.py` and `mlp.py`).
"""
from __future__ import annotations

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from ..errors import HeadError
from ._arrays import (
    _check_features,
    _check_labels,
    _check_n_features,
    _check_shape,
    _is_int,
    _resolve_n_classes,
)
from ._faiss import FaissIndex
from ._index import TorchIndex, exclusion_groups

_WEIGHTS = ("exp", "uniform")
_INDEXES = ("flat", "ivf", "ivf_fp16")


class KNNClassifier(ClassifierMixin, BaseEstimator):
    """Cosine-similarity kNN with exp(sim / temperature) or uniform votes.

    k: neighbours per query. temperature: T in exp(sim / T); smaller T lets the closest
    neighbours dominate (only used with weights="exp"). precision: "bf16" searches candidates
    in bf16 and re-ranks k + rerank of them exactly in fp32 (torch backend only).
    device: torch device for the search ("cpu", "cuda", ...). Outputs are always numpy.

    backend="torch": fit keeps an L2-normalised float32 copy of X on `device`; the search is a
    chunked matmul + top-k. chunk_size: queries per matmul; None derives it from the memory
    available (_arrays.block_budget(): an eighth of it, 64 MB to 1 GB, for the (chunk, n_train) block).
    On the CPU that block is kept after a search and reused by the next one (no page faults
    of a fresh block: ~6% of the matmul's time at 2,048 dims), so a fitted classifier holds up
    to that much more memory until it is refitted or deleted; it is not pickled.

    backend="faiss" (needs `pip install faiss-cpu`, or the hardprobe[faiss] extra; faiss-gpu
    is used when it is installed, sees a GPU and device is cuda): fit reads X chunk_size rows
    at a time (None: _arrays.stream_rows(), 4 to 64 MB of float32 rows), normalises each chunk and
    adds it to a FAISS index; X may be a np.memmap or np.load(..., mmap_mode="r") array and
    no full float32 copy of it is ever made. Queries are read the same way, and X=None
    re-reads the training array given to fit (kept by reference, not copied). index:
      "flat"      IndexFlatIP, exact: same neighbours as the torch backend. Holds N x D float32.
      "ivf"       IndexIVFFlat: nlist k-means lists (None: 4 sqrt(N), at most N / 39 and
                  65536); a query scans the nprobe lists nearest to it. Same storage as flat
                  plus the centroids; nprobe >= nlist is exact.
      "ivf_fp16"  IVF storing float16 residuals to the centroids (IndexIVFScalarQuantizer
                  QT_fp16): half the memory of "ivf"; similarities exact to ~1e-3. Training
                  holds FAISS's residual copy of the sample too (2x the sample, briefly).
    The IVF quantizer is trained (spherical k-means, faiss's 10 iterations) on
    min(N, 40 nlist) rows drawn with `seed` (also k-means' seed), at most _arrays.block_budget()
    bytes of them, so refits with the same seed give the same index. A query whose nprobe
    lists hold fewer than k (+1 when leaving itself out) rows is searched again with nprobe
    doubled until it has k neighbours, so every row of the output is filled.
    Peak memory beyond the index: two float32 chunks (the one being added or searched and the
    next being read), the IVF training sample while training, and the (N_q, k) outputs. A
    read-only memory map's pages are released from this process after each chunk is read
    (the OS keeps them in its page cache), so they do not accumulate in the resident set.
    FAISS runs on its own OpenMP threads (faiss.omp_set_num_threads, apart from torch's); in
    our check k-means centroids and neighbours were identical on 1 and 2 threads, but BLAS
    may round differently on other thread counts or machines, which can reorder near-ties.

    Neighbours are ordered by similarity, equal similarities by training index (lowest first)
    in every backend and precision, so exact torch and FAISS flat agree on duplicated data.
    Leave-one-out (X=None, exclude_self=True) may also leave out each query's duplicate group
    (exclude_groups: (N_train,) int ids, -1 = none): the top k + (largest group) are searched
    and the own group filtered out. An all-zero feature row (train or query) raises
    ZeroFeatureRowsError naming it: it has no direction, so its neighbours would be arbitrary.

    Fitted attributes: n_classes_, classes_ (0..n_classes_-1), n_features_in_,
    n_samples_fit_, y_fit_ (N_train,) int64; with backend="faiss" also index_ (the FAISS
    index; not picklable, refit instead) and nlist_ (None for "flat").
    """

    def __init__(self, *, k=20, temperature=0.07, weights="exp", chunk_size=None, device="cpu",
                 precision="fp32", rerank=32, backend="torch", index="flat", nlist=None,
                 nprobe=16, seed=0):
        self.k = k
        self.temperature = temperature
        self.weights = weights
        self.chunk_size = chunk_size
        self.device = device
        self.precision = precision  # "bf16": candidate search in bf16, exact fp32 re-rank
        self.rerank = rerank  # extra bf16 candidates re-scored exactly per query
        self.backend = backend  # "torch" (chunked matmul) or "faiss" (an index, see `index`)
        self.index = index  # faiss: "flat" (exact) | "ivf" | "ivf_fp16"
        self.nlist = nlist  # IVF lists; None: 4 sqrt(N), capped
        self.nprobe = nprobe  # IVF lists scanned per query
        self.seed = seed  # IVF: training sample and k-means seed

    def fit(self, X, y, n_classes=None):
        """Store L2-normalised training features (backend="torch") or add them to a FAISS
        index chunk by chunk (backend="faiss"; X may be memory-mapped). n_classes: number of
        classes; None means max(y) + 1. Give it explicitly so a class absent from y still gets
        a (zero) column. An all-zero row raises ZeroFeatureRowsError (no direction to rank)."""
        self._check_params()
        faiss_backend = self.backend == "faiss"
        # faiss: shape and dtype now; finiteness chunk by chunk while the index is built
        X = _check_shape(X, "X") if faiss_backend else _check_features(X, "X")
        y = _check_labels(y, len(X))
        self.n_classes_ = _resolve_n_classes(y, n_classes)
        self.classes_ = np.arange(self.n_classes_)
        self.n_features_in_ = X.shape[1]
        self.n_samples_fit_ = len(X)
        self.y_fit_ = y
        self._index = None  # drop a previous fit's data before building the next
        if faiss_backend:
            self._index = FaissIndex(kind=self.index, nlist=self.nlist, nprobe=self.nprobe,
                                     seed=self.seed, chunk_size=self.chunk_size,
                                     device=self.device).build(X)
            self._labels = torch.from_numpy(y)  # votes are counted on the CPU
            return self
        # Kept on the search device so repeated queries pay no transfer.
        self._index = TorchIndex(device=self.device, precision=self.precision,
                                 rerank=self.rerank, chunk_size=self.chunk_size).build(X)
        self._labels = torch.from_numpy(y).to(self.device)  # (N_train,) int64
        return self

    @property
    def index_(self):
        """The FAISS index (backend="faiss"; not picklable, refit instead), else None."""
        return getattr(getattr(self, "_index", None), "index", None)

    @property
    def nlist_(self):
        """IVF list count of the fitted FAISS index; None for flat and the torch backend."""
        return getattr(getattr(self, "_index", None), "nlist_", None)

    @property
    def _train(self):
        """(N_train, D) float32 unit rows held by the torch backend (None for faiss)."""
        return getattr(getattr(self, "_index", None), "train", None)

    def kneighbors(self, X=None, *, exclude_self=False, exclude_groups=None):
        """Return (sims (N, k) float32, indices (N, k) int64) into the training set, most
        similar first; equal similarities in training-index order, lowest first (the same in
        every backend). X=None queries the training set itself; then exclude_self=True
        leaves each example out of its own neighbour list (leave-one-out), and with
        exclude_groups ((N_train,) int group ids, -1 = no group) also every row of its group
        (its duplicates). Note sklearn's kneighbors(None) always excludes self; here it is
        opt-in."""
        sims, idx = self._search(X, exclude_self, exclude_groups)
        return sims.cpu().numpy(), idx.cpu().numpy()

    def neighbor_labels(self, X=None, *, exclude_self=False, exclude_groups=None):
        """Training labels of each query's k neighbours, (N, k) int64, most similar first.
        Share of neighbours with another label (leave-one-out):
        (knn.neighbor_labels(exclude_self=True) != y[:, None]).mean(1)."""
        _, idx = self._search(X, exclude_self, exclude_groups)
        return self._labels[idx].cpu().numpy()

    def predict_proba(self, X=None, *, exclude_self=False, exclude_groups=None):
        """(N, n_classes_) float32 rows summing to 1: each class's share of the neighbour vote
        (higher = more of the neighbourhood has that label). exclude_self / exclude_groups:
        as in kneighbors."""
        return self.predict_proba_and_neighbors(X, exclude_self=exclude_self,
                                                exclude_groups=exclude_groups)[0]

    def predict_proba_and_neighbors(self, X=None, *, exclude_self=False, exclude_groups=None):
        """(proba (N, n_classes_), sims (N, k), indices (N, k)) from one search: callers that
        need both the vote and the neighbours pay for the similarity matmul once."""
        sims, idx = self._search(X, exclude_self, exclude_groups)
        votes = self._vote_weights(sims)  # (N, k)
        proba = torch.zeros(len(idx), self.n_classes_, device=idx.device)
        proba.scatter_add_(1, self._labels[idx], votes)  # (N, n_classes) vote sums
        proba /= proba.sum(1, keepdim=True)
        return proba.cpu().numpy(), sims.cpu().numpy(), idx.cpu().numpy()

    def predict(self, X=None, *, exclude_self=False, exclude_groups=None):
        """(N,) int64 class with the largest vote; ties go to the lowest class index."""
        return self.predict_proba(X, exclude_self=exclude_self,
                                  exclude_groups=exclude_groups).argmax(1)  # argmax: first max

    # -- internals -------------------------------------------------------------------

    def _check_params(self):
        if not (_is_int(self.k) and self.k >= 1):
            raise HeadError(f"k must be a positive integer, got {self.k!r}")
        if self.weights not in _WEIGHTS:
            raise HeadError(f"weights must be one of {_WEIGHTS}, got {self.weights!r}")
        if not self.temperature > 0:
            raise HeadError(f"temperature must be > 0, got {self.temperature!r}")
        if self.precision not in ("fp32", "bf16"):
            raise HeadError(f"precision must be fp32 or bf16, got {self.precision!r}")
        if self.backend not in ("torch", "faiss"):
            raise HeadError(f"backend must be torch or faiss, got {self.backend!r}")
        if self.chunk_size is not None and not self.chunk_size >= 1:
            raise HeadError(f"chunk_size must be None or >= 1, got {self.chunk_size!r}")
        if self.index not in _INDEXES:
            raise HeadError(f"index must be one of {_INDEXES}, got {self.index!r}")
        if self.index != "flat" and self.backend != "faiss":
            raise HeadError(f"index={self.index!r} needs backend='faiss' (the torch backend "
                             "is exact, as index='flat')")
        if self.nlist is not None and not (_is_int(self.nlist) and self.nlist >= 1):
            raise HeadError(f"nlist must be None or a positive integer, got {self.nlist!r}")
        if not (_is_int(self.nprobe) and self.nprobe >= 1):
            raise HeadError(f"nprobe must be a positive integer (IVF lists scanned per query), "
                             f"got {self.nprobe!r}")

    def _vote_weights(self, sims):
        if self.weights == "uniform":
            return torch.ones_like(sims)
        # exp(sim / T) scaled by exp(-max_sim / T) per row: the scale cancels in the
        # normalised vote, and it keeps small T from overflowing float32 (exp(1/0.01) = inf).
        return torch.exp((sims - sims[:, :1]) / self.temperature)  # sims sorted, col 0 = max

    def _search(self, X, exclude_self, exclude_groups):
        """Top-k (sims, indices) as torch tensors on self.device (on the CPU for faiss)."""
        check_is_fitted(self, "n_samples_fit_")
        if X is not None:
            if exclude_self:
                raise HeadError("exclude_self=True needs X=None (queries must be the "
                                "training set)")
            # faiss: finiteness chunk by chunk while searching
            X = (_check_shape(X, "X", allow_empty=True) if self.backend == "faiss"
                 else _check_features(X, "X", allow_empty=True))
            X = _check_n_features(X, self.n_features_in_)
        if exclude_groups is not None and not exclude_self:
            raise HeadError("exclude_groups needs exclude_self=True (a training query leaves "
                            "out its own group; other queries have none)")
        groups, group_max = (exclusion_groups(self.n_samples_fit_, exclude_groups)
                             if exclude_self else (None, 0))
        n_avail = self.n_samples_fit_ - group_max
        if self.k > n_avail:
            raise HeadError(
                f"k={self.k} is larger than the {n_avail} training examples available"
                + (" after leaving each query out (exclude_self=True)" if exclude_self else "")
                + (f" and its group (the largest holds {group_max})"
                   if exclude_groups is not None else ""))
        params = (("nprobe", "chunk_size") if self.backend == "faiss"
                  else ("precision", "rerank", "chunk_size"))
        self._index.set_search_params(**{p: getattr(self, p) for p in params})
        if X is not None and len(X) == 0:
            empty = torch.empty(0, self.k, device=self._labels.device)
            return empty, empty.long()
        return self._index.search(X, self.k, exclude=groups)
