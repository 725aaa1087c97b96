"""Weighted k-nearest-neighbour classifier on frozen features (DINO's eval_knn).

Features are L2-normalised, so similarity is cosine in [-1, 1] (higher = closer).
Each query's k most similar training examples vote for their label with weight
exp(sim / T) ("exp", as in DINO) or 1 ("uniform", as sklearn's KNeighborsClassifier);
class probabilities are the per-class vote sums divided by the total vote.

The input validation helpers at the bottom are shared with `linear.py`.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

_WEIGHTS = ("exp", "uniform")


class KNNClassifier(ClassifierMixin, BaseEstimator):
    """Cosine-similarity kNN with exp(sim / temperature) or uniform votes.

    k: neighbours per query. temperature: T in exp(sim / T); smaller T lets the closest
    neighbours dominate (only used with weights="exp"). chunk_size: queries per similarity
    matmul; None derives it from the memory available (block_budget(): an eighth of it,
    64 MB to 1 GB, for the (chunk, n_train) block). backend: "torch" or "faiss" (exact
    IndexFlatIP; needs faiss-cpu). precision: "bf16" searches candidates in bf16 and
    re-ranks k + rerank of them exactly in fp32.
    device: torch device for the search ("cpu", "cuda", ...). Outputs are always numpy.

    Fitted attributes: n_classes_, classes_ (0..n_classes_-1), n_features_in_,
    n_samples_fit_, y_fit_ (N_train,) int64.
    """

    def __init__(self, *, k=20, temperature=0.07, weights="exp", chunk_size=None, device="cpu",
                 precision="fp32", rerank=32, backend="torch"):
        self.k = k
        self.temperature = temperature
        self.weights = weights
        self.chunk_size = chunk_size
        self.device = device
        self.precision = precision  # "bf16": candidate search in bf16, exact fp32 re-rank
        self.rerank = rerank  # extra bf16 candidates re-scored exactly per query
        self.backend = backend  # "torch" (chunked matmul) or "faiss" (IndexFlatIP, exact)

    def fit(self, X, y, n_classes=None):
        """Store L2-normalised training features. n_classes: number of classes; None means
        max(y) + 1. Give it explicitly so a class absent from y still gets a (zero) column."""
        self._check_params()
        X = _check_features(X, "X")
        y = _check_labels(y, len(X))
        self.n_classes_ = _resolve_n_classes(y, n_classes)
        self.classes_ = np.arange(self.n_classes_)
        self.n_features_in_ = X.shape[1]
        self.n_samples_fit_ = len(X)
        self.y_fit_ = y
        # Kept on the search device so repeated queries pay no transfer.
        self._train = _normalise(X, self.device)  # (N_train, D) float32, unit rows
        self._labels = torch.from_numpy(y).to(self.device)  # (N_train,) int64
        return self

    def kneighbors(self, X=None, *, exclude_self=False):
        """Return (sims (N, k) float32, indices (N, k) int64) into the training set, most
        similar first. X=None queries the training set itself; then exclude_self=True
        leaves each example out of its own neighbour list (leave-one-out). Note sklearn's
        kneighbors(None) always excludes self; here it is opt-in."""
        sims, idx = self._search(X, exclude_self)
        return sims.cpu().numpy(), idx.cpu().numpy()

    def neighbor_labels(self, X=None, *, exclude_self=False):
        """Training labels of each query's k neighbours, (N, k) int64, most similar first.
        Share of neighbours with another label (leave-one-out):
        (knn.neighbor_labels(exclude_self=True) != y[:, None]).mean(1)."""
        _, idx = self._search(X, exclude_self)
        return self._labels[idx].cpu().numpy()

    def predict_proba(self, X=None, *, exclude_self=False):
        """(N, n_classes_) float32 rows summing to 1: each class's share of the neighbour vote."""
        return self.predict_proba_and_neighbors(X, exclude_self=exclude_self)[0]

    def predict_proba_and_neighbors(self, X=None, *, exclude_self=False):
        """(proba (N, n_classes_), sims (N, k), indices (N, k)) from one search: callers that
        need both the vote and the neighbours pay for the similarity matmul once."""
        sims, idx = self._search(X, exclude_self)
        votes = self._vote_weights(sims)  # (N, k)
        proba = torch.zeros(len(idx), self.n_classes_, device=idx.device)
        proba.scatter_add_(1, self._labels[idx], votes)  # (N, n_classes) vote sums
        proba /= proba.sum(1, keepdim=True)
        return proba.cpu().numpy(), sims.cpu().numpy(), idx.cpu().numpy()

    def predict(self, X=None, *, exclude_self=False):
        """(N,) int64 class with the largest vote; ties go to the lowest class index."""
        return self.predict_proba(X, exclude_self=exclude_self).argmax(1)  # argmax: first max

    # -- internals -------------------------------------------------------------------

    def _check_params(self):
        if not (isinstance(self.k, (int, np.integer)) and self.k >= 1):
            raise ValueError(f"k must be a positive integer, got {self.k!r}")
        if self.weights not in _WEIGHTS:
            raise ValueError(f"weights must be one of {_WEIGHTS}, got {self.weights!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {self.precision!r}")
        if self.backend not in ("torch", "faiss"):
            raise ValueError(f"backend must be torch or faiss, got {self.backend!r}")
        if self.chunk_size is not None and not self.chunk_size >= 1:
            raise ValueError(f"chunk_size must be None or >= 1, got {self.chunk_size!r}")

    def _vote_weights(self, sims):
        if self.weights == "uniform":
            return torch.ones_like(sims)
        # exp(sim / T) scaled by exp(-max_sim / T) per row: the scale cancels in the
        # normalised vote, and it keeps small T from overflowing float32 (exp(1/0.01) = inf).
        return torch.exp((sims - sims[:, :1]) / self.temperature)  # sims sorted, col 0 = max

    def _search(self, X, exclude_self):
        """Top-k (sims, indices) as torch tensors on self.device."""
        check_is_fitted(self, "n_samples_fit_")
        queries, self_rows = self._queries(X, exclude_self)
        n_avail = self.n_samples_fit_ - (1 if exclude_self else 0)
        if self.k > n_avail:
            raise ValueError(
                f"k={self.k} is larger than the {n_avail} training examples available"
                + (" after leaving each query out (exclude_self=True)" if exclude_self else ""))
        if self.backend == "faiss":
            return self._search_faiss(queries, self_rows)
        # bytes per query row: its similarity row, plus in bf16 the gathered candidate features
        per_query = (4 * self.n_samples_fit_ if self.precision == "fp32" else
                     2 * self.n_samples_fit_ + 4 * (self.k + self.rerank) * self.n_features_in_)
        chunk = self.chunk_size or max(1, block_budget() // per_query)
        sims, idx = [], []
        train_lo = self._train.bfloat16() if self.precision == "bf16" else None
        with torch.inference_mode():
            for start in range(0, len(queries), chunk):
                q = queries[start:start + chunk]  # (chunk, D)
                s, i = (self._topk_exact(q, start, self_rows) if train_lo is None
                        else self._topk_bf16(q, train_lo, start, self_rows, n_avail))
                sims.append(s)
                idx.append(i)
        if not sims:  # zero queries
            empty = torch.empty(0, self.k, device=self._train.device)
            return empty, empty.long()
        return torch.cat(sims), torch.cat(idx)

    def _search_faiss(self, queries, self_rows):
        """Exact inner-product search with FAISS (IndexFlatIP on the unit rows = cosine)."""
        try:
            import faiss
        except ImportError as e:
            raise ImportError("backend='faiss' needs FAISS: pip install faiss-cpu "
                              "(or faiss-gpu)") from e
        index = faiss.IndexFlatIP(self.n_features_in_)
        index.add(self._train.cpu().numpy())
        k = self.k + (1 if self_rows else 0)
        sims, idx = index.search(queries.cpu().numpy(), k)  # (N, k) descending
        if self_rows:  # drop each query's own row; if a tie pushed it out, drop the last
            own = idx == np.arange(len(idx))[:, None]
            own[~own.any(1), -1] = True
            keep = ~own
            sims, idx = sims[keep].reshape(len(idx), -1), idx[keep].reshape(len(idx), -1)
        dev = self._train.device
        return torch.from_numpy(sims).to(dev), torch.from_numpy(idx).to(dev)

    def _topk_exact(self, q, start, self_rows):
        block = q @ self._train.T  # (chunk, N_train) cosine, fp32
        if self_rows:
            rows = torch.arange(len(block), device=block.device)
            block[rows, rows + start] = -torch.inf  # the query itself never ranks
        return torch.topk(block, self.k, dim=1)  # (chunk, k), descending

    def _topk_bf16(self, q, train_lo, start, self_rows, n_avail):
        """Candidates from a bf16 matmul (several times faster on AMX / tensor cores), then the
        exact fp32 similarity of each candidate decides the final top k."""
        block = q.bfloat16() @ train_lo.T  # (chunk, N_train) cosine, bf16 (~3 digits)
        if self_rows:
            rows = torch.arange(len(block), device=block.device)
            block[rows, rows + start] = -torch.inf
        cand = torch.topk(block, min(self.k + self.rerank, n_avail), dim=1).indices  # (chunk, k+r)
        exact = torch.einsum("cd,ckd->ck", q, self._train[cand])  # (chunk, k+r) fp32
        s, j = torch.topk(exact, self.k, dim=1)
        return s, torch.gather(cand, 1, j)

    def _queries(self, X, exclude_self):
        """(normalised query features (N, D), whether query row i is training row i)."""
        if X is None:
            return self._train, exclude_self
        if exclude_self:
            raise ValueError("exclude_self=True needs X=None (queries must be the training set)")
        X = _check_features(X, "X", allow_empty=True)
        if X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[1]} features, but the classifier was fitted "
                             f"with {self.n_features_in_}")
        return _normalise(X, self.device), False


def block_budget() -> int:
    """Bytes for one similarity block: an eighth of the memory available now, 64 MB to 1 GB."""
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not on this platform
        avail = 2**31
    return int(min(max(avail // 8, 64 * 2**20), 2**30))


def _normalise(X, device):
    # Zero rows stay zero (similarity 0 to everything) instead of becoming NaN.
    return F.normalize(torch.as_tensor(X, dtype=torch.float32, device=device), dim=1)


# -- input validation shared by the heads ------------------------------------------------

def _check_features(X, name="X", *, allow_empty=False):
    """Float (N, D) array with only finite values; raises ValueError otherwise."""
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, D) feature array, got shape {X.shape}")
    if not (np.issubdtype(X.dtype, np.floating) or np.issubdtype(X.dtype, np.integer)):
        raise ValueError(f"{name} must hold numbers, got dtype {X.dtype}")
    if len(X) == 0 and not allow_empty:
        raise ValueError(f"{name} is empty (0 rows)")
    bad = ~np.isfinite(X)
    if bad.any():
        rows = np.flatnonzero(bad.any(1))
        raise ValueError(f"{name} contains {int(bad.sum())} NaN/Inf values in {len(rows)} rows; "
                         f"first rows: {rows[:10].tolist()}")
    return X


def _check_labels(y, n_rows):
    """(N,) int64 labels >= 0 matching the feature rows."""
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n_rows:
        raise ValueError(f"y must be 1-D with one label per row of X ({n_rows}), "
                         f"got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y must hold integer class labels in [0, n_classes), got dtype {y.dtype}")
    if (y < 0).any():
        i = int(np.flatnonzero(y < 0)[0])
        raise ValueError(f"y must be in [0, n_classes); found label {y[i]} at row {i}")
    return y.astype(np.int64)


def _resolve_n_classes(y, n_classes):
    """n_classes if given (checked against y), else max(y) + 1."""
    top = int(y.max()) + 1 if len(y) else 0
    if n_classes is None:
        return top
    if top > n_classes:
        i = int(np.flatnonzero(y >= n_classes)[0])
        raise ValueError(f"label {y[i]} at row {i} is out of range for n_classes={n_classes} "
                         f"(labels must be in [0, {n_classes}))")
    return int(n_classes)
