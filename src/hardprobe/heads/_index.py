"""The search interface behind KNNClassifier, and its exact torch implementation.

An index holds the L2-normalised training rows and answers `search(Q, k, exclude=None)` with
(sims (N_q, k) float32, ids (N_q, k) int64) torch tensors: cosine similarity (higher = closer),
most similar first. Ties are broken by training index, lowest first, in every backend, so the
same data gives the same neighbours in torch and FAISS (`ordered_top`). Q=None queries the
training rows themselves; then `exclude` may be an (N_train,) int64 tensor of group ids, and
query i drops every training row j with exclude[j] == exclude[i] (its own row, and its
duplicates when they share the group; see `exclusion_groups`).

Two implementations: `TorchIndex` here (a chunked matmul + top-k, exact in fp32, or bf16
candidates re-ranked exactly in fp32; the top-k of a similarity block is `block_topk`, which
searches only the columns of the groups with the largest maxima) and `FaissIndex` in
`_faiss.py` (FAISS flat or IVF, read chunk by chunk from a possibly memory-mapped array).
Both derive from `Index` and import this module; this module imports neither KNNClassifier
nor FAISS.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import HeadError
from . import _arrays
from ._arrays import _check_nonzero_rows

_RERANK_ROWS = 256  # bf16 re-rank: queries gathered at once (fewer ops; 64 was 1.4x slower here)
_GROUP = 8  # columns per group in block_topk (of 4 to 64, 8 was fastest on this Xeon, 16 close)


def canonical_order(sims, ids):
    """(sims, ids) with each row sorted by similarity descending, then id ascending."""
    ids, order = torch.sort(ids, dim=1)  # id ascending ...
    sims = sims.gather(1, order)
    sims, order = torch.sort(sims, dim=1, descending=True, stable=True)  # ... within equal sims
    return sims, ids.gather(1, order)


def ordered_top(search, k, n_total):
    """The k most similar of n_total candidates per query, ties broken by lowest id.

    search(rows, K) -> (sims (R, K), ids (R, K)) torch tensors: the K most similar candidates
    of the queries `rows` (an int64 tensor; None = all queries), sorted by similarity with
    ties in any order. One search of k + 1 tells which queries have a tie across the k-th place (the k-th and the
    (k+1)-th similarity are equal); only those are searched again, with twice as many
    candidates until the list ends below the tied value (or holds all n_total), so every tied
    candidate is seen and the lowest ids win. The similarities compared all come from one
    search call, so a backend that rounds differently per batch shape stays consistent.
    """
    width = min(k + 1, n_total)
    sims, ids = search(None, width)  # most similar first; equal sims in any order
    # Only a query with two equal similarities among its k + 1 needs reordering: find them
    # with one comparison (the common case, no ties, then costs no sort at all).
    tied = torch.nonzero((sims[:, 1:] == sims[:, :-1]).any(1)).flatten()
    if len(tied):
        sims[tied], ids[tied] = canonical_order(sims[tied], ids[tied])
    rows = tied[sims[tied, k - 1] == sims[tied, k]] if width > k else tied[:0]
    while len(rows):  # a tie across the k-th place: widen until every tied candidate is in
        width = min(2 * width, n_total)
        s, i = canonical_order(*search(rows, width))
        done = (s[:, -1] < s[:, k - 1]) | (width == n_total)  # every tie is in the list
        sims[rows[done]], ids[rows[done]] = s[done, :sims.shape[1]], i[done, :ids.shape[1]]
        rows = rows[~done]
    return sims[:, :k], ids[:, :k]


def block_topk(block, K):
    """torch.topk(block, K, dim=1) for a (rows, n) block: the K largest values per row,
    sorted descending, with their column ids (equal values in any order, as topk's).

    Wide rows are reduced first in one pass: column j's group is j, j + L, j + 2L, ...
    (L = n // _GROUP; the < _GROUP columns past _GROUP * L are always candidates), and only
    the K groups with the largest maxima are searched. Exact: a value among a row's K largest
    lies in a chosen group, or else each of the K chosen groups holds one at least as large,
    so the candidates' K largest values are the row's. One strided max over the block and a
    topk of n / _GROUP values per row took 0.55x the time of one topk over all n (2,500 x
    20,000, K = 21, one thread, AMX Xeon): topk's per-row copy of n (value, index) pairs is
    the part this avoids."""
    r, n = block.shape
    L = n // _GROUP
    if L < 4 * K or r == 0:  # narrow rows (or K near n): a plain topk is as cheap
        return torch.topk(block, K, dim=1)
    group_max = block[:, :_GROUP * L].view(r, _GROUP, L).amax(1)  # (rows, L)
    _, g = torch.topk(group_max, K, dim=1, sorted=False)  # (rows, K) chosen groups
    offsets = torch.arange(0, _GROUP * L, L, device=block.device)
    cols = (g[:, None, :] + offsets[None, :, None]).view(r, -1)  # (rows, _GROUP * K)
    if _GROUP * L < n:
        tail = torch.arange(_GROUP * L, n, device=block.device)
        cols = torch.cat([cols, tail.expand(r, -1)], 1)
    sims, j = torch.topk(block.gather(1, cols), K, dim=1)
    return sims, cols.gather(1, j)


def exclusion_groups(n, exclude_groups):
    """(N_train,) int64 group ids for leave-out searches, and the largest group's size.

    exclude_groups None: every row is its own group (plain leave-one-out). Else an (N_train,)
    int array, -1 = no group: rows sharing an id >= 0 leave each other out; each -1 row gets a
    fresh id of its own."""
    if exclude_groups is None:
        return torch.arange(n), 1
    g = np.asarray(exclude_groups)
    if g.shape != (n,) or not np.issubdtype(g.dtype, np.integer):
        raise HeadError(f"exclude_groups must be an (N_train,) = ({n},) integer array of group "
                        f"ids (-1 = no group), got shape {g.shape}, dtype {g.dtype}")
    if (g < -1).any():
        raise HeadError(f"exclude_groups holds {int(g[g < -1][0])}: ids must be >= 0, or -1 "
                        "for a row in no group")
    g = g.astype(np.int64)  # a copy
    alone = g == -1
    g[alone] = g.max(initial=-1) + 1 + np.arange(int(alone.sum()))
    return torch.from_numpy(g), int(np.bincount(g).max(initial=1))


class Index:
    """Exact-order top-k search over normalised training rows; subclasses implement build()
    and _top(Q, k), the k most similar training rows under `ordered_top`'s order."""

    ntotal = 0

    def search(self, Q, k, *, exclude=None):
        """(sims, ids) (N_q, k), most similar first, ties by lowest id. Q None: the training
        rows; exclude: (N_train,) group ids (exclusion_groups) whose own group each training
        query leaves out. The top k + (largest group) are fetched and the own group filtered
        out: at most that many of them can belong to it."""
        if exclude is None:
            return self._top(Q, k)
        if Q is not None:
            raise HeadError("exclude_self=True needs X=None (queries must be the training set)")
        group_max = int(torch.bincount(exclude).max()) if len(exclude) else 1
        sims, ids = self._top(None, min(k + group_max, self.ntotal))
        own = exclude.to(ids.device)[ids] == exclude.to(ids.device)[:, None]  # (N, k + m)
        keep = ~own & ((~own).cumsum(1) <= k)  # the first k rows outside the own group
        return sims[keep].view(len(ids), k), ids[keep].view(len(ids), k)

    def set_search_params(self, **params):
        """Search-time parameters (the classifier's current values: set_params after fit)."""
        for name, value in params.items():
            setattr(self, name, value)


class TorchIndex(Index):
    """A normalised float32 copy of the training rows on `device`; search is a chunked
    matmul + top-k. precision "bf16": candidates (k + rerank) from a bf16 matmul, the final k
    from their exact fp32 similarity. chunk_size: queries per matmul, None from the memory
    budget (_arrays.block_budget(), for the (chunk, N_train) similarity block)."""

    def __init__(self, *, device="cpu", precision="fp32", rerank=32, chunk_size=None):
        self.device, self.precision, self.rerank, self.chunk_size = (
            device, precision, rerank, chunk_size)
        self.train = None

    def build(self, X):
        """X: (N, D) finite float array with no all-zero row (checked here)."""
        self.train = normalise_checked(X, self.device, "X")  # (N_train, D) float32, unit rows
        self._train_lo = None  # its bf16 copy, made when a bf16 search first needs it
        self.ntotal = len(self.train)
        return self

    def queries(self, X):
        return normalise_checked(X, self.device, "X")

    def _top(self, Q, k):
        queries = self.train if Q is None else self.queries(Q)
        n, d = self.train.shape
        bf16 = self.precision == "bf16"
        # bytes per query row: its similarity row, plus in bf16 the candidates' similarities
        per_query = 4 * n if not bf16 else 2 * n + 12 * min(k + self.rerank, n)
        chunk = max(1, min(len(queries),
                           self.chunk_size or _arrays.block_budget() // per_query))
        # one (chunk, N_train) block reused by every chunk (and kept for the next search): no
        # allocation and first-touch page faults per chunk; the matmul writes into it in place
        kept = self._take_block(chunk, n, torch.bfloat16 if bf16 else torch.float32)
        block = kept[:chunk]
        sims, ids = [], []
        with torch.inference_mode():
            for a in range(0, len(queries), chunk):
                q = queries[a:a + chunk]  # (chunk, D)
                s, i = (self._top_bf16(q, block[:len(q)], k) if bf16
                        else self._top_exact(q, block[:len(q)], k))
                sims.append(s)
                ids.append(i)
        if kept.device.type == "cpu":
            self._workspace = kept  # (>= chunk, n): the next search reuses it
        if len(sims) <= 1:  # one chunk: no copy
            return (sims[0], ids[0]) if sims else (torch.empty(0, k), torch.empty(0, k).long())
        return torch.cat(sims), torch.cat(ids)

    def _take_block(self, chunk, n, dtype):
        """A (>= chunk, n) similarity block: the one the previous search kept when it is large
        enough and of this dtype, else a new (chunk, n) one. Taken out of the index while in use
        (dict.pop is atomic), so a concurrent search on it allocates its own. On the CPU the
        first touch of a fresh block (page faults) cost 6% of the matmul's time at 2,048 dims
        here, more at fewer dims (it scales with the block, the matmul with dims too)."""
        kept = self.__dict__.pop("_workspace", None)
        if kept is not None and kept.dtype == dtype and kept.shape[1] == n and len(kept) >= chunk:
            return kept
        del kept  # freed before its successor is allocated
        return torch.empty(chunk, n, device=self.train.device, dtype=dtype)

    def __getstate__(self):  # the kept block is scratch space: not pickled
        state = dict(self.__dict__)
        state.pop("_workspace", None)
        return state

    def _top_exact(self, q, block, k):
        torch.mm(q, self.train.T, out=block)  # (chunk, N_train) cosine, fp32
        return ordered_top(lambda rows, K: _top_rows(block, rows, K), k, block.shape[1])

    def _top_bf16(self, q, block, k):
        """Candidates from a bf16 matmul (several times faster on AMX / tensor cores), then the
        exact fp32 similarity of each candidate decides the final top k."""
        if getattr(self, "_train_lo", None) is None:
            self._train_lo = self.train.bfloat16()  # (N_train, D), made once per index
        torch.mm(q.bfloat16(), self._train_lo.T, out=block)  # (chunk, N_train), ~3 digits
        n_cand = min(k + self.rerank, block.shape[1])
        _, cand = ordered_top(lambda rows, K: _top_rows(block, rows, K),
                              n_cand, block.shape[1])  # (chunk, k + rerank) ids
        exact = self._exact_sims(q, cand)  # (chunk, k + rerank) fp32

        def search(rows, K):
            s, j = torch.topk(_rows(exact, rows), K, dim=1)
            return s, _rows(cand, rows).gather(1, j)
        return ordered_top(search, k, n_cand)

    def _exact_sims(self, q, cand):
        """(chunk, C) fp32 cosine of each query with its C candidates (ids into train): the
        candidates' rows are gathered _RERANK_ROWS queries at a time into one buffer reused
        for every step (index_select(out=): row copies, no allocation and page faults per
        step; 2-3x faster than train[cand] here) and dotted with their query."""
        exact = torch.empty(cand.shape, device=q.device)
        step, width = max(1, min(_RERANK_ROWS, len(q))), cand.shape[1]
        rows = torch.empty(step * width, self.train.shape[1], device=q.device)
        for a in range(0, len(q), step):
            c = cand[a:a + step]
            gathered = torch.index_select(self.train, 0, c.flatten(), out=rows[:c.numel()])
            exact[a:a + step] = torch.einsum("cd,ckd->ck", q[a:a + step],
                                             gathered.view(len(c), width, -1))
        return exact


def _top_rows(block, rows, K):
    """block_topk of the given rows of block (None: all). When they are most of it (a bf16
    block ties at the candidates' last place in ~90% of rows, so ordered_top widens nearly
    all), the whole block is searched and those rows picked: no copy of the rows first."""
    if rows is not None and 2 * len(rows) > len(block):
        sims, ids = block_topk(block, K)
        return sims[rows], ids[rows]
    return block_topk(_rows(block, rows), K)


def _rows(t, rows):
    return t if rows is None else t[rows]


def normalise_checked(X, device, name):
    """(N, D) float32 unit rows on device; an all-zero row raises ZeroFeatureRowsError (its
    cosine similarity to everything is undefined, so its neighbours would be arbitrary)."""
    t = torch.as_tensor(X, dtype=torch.float32, device=device)
    zero = ~t.any(1)
    if zero.any():
        _check_nonzero_rows(X, name)  # raises, naming the rows
    return F.normalize(t, dim=1)
