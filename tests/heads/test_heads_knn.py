import math

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.neighbors import KNeighborsClassifier

from hardprobe.heads import KNNClassifier


def _data(seed, n_classes, n_train=150, n_test=40, dim=16):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_train + n_test, dim)).astype(np.float32)
    y = rng.permutation(np.arange(n_train) % n_classes)  # every class present in train
    return X[:n_train], y, X[n_train:]


def _sk(k, X, y):
    return KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute").fit(X, y)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 4, 5, 10])
@pytest.mark.parametrize("n_classes", [2, 3, 10])
def test_uniform_matches_sklearn(seed, k, n_classes):
    X, y, Xq = _data(seed, n_classes)
    ours = KNNClassifier(k=k, weights="uniform").fit(X, y)
    ref = _sk(k, X, y)
    np.testing.assert_array_equal(ours.predict(Xq), ref.predict(Xq))  # even k: ties -> lowest
    np.testing.assert_allclose(ours.predict_proba(Xq), ref.predict_proba(Xq), atol=1e-6)
    dist, idx = ref.kneighbors(Xq)
    sims, ours_idx = ours.kneighbors(Xq)
    np.testing.assert_array_equal(ours_idx, idx)
    np.testing.assert_allclose(sims, 1 - dist, atol=1e-5)
    assert sims.dtype == np.float32 and ours_idx.dtype == np.int64


def test_even_k_tie_goes_to_lowest_class():
    # Query (1, 0): neighbours (1, .1) label 1 and (1, -.1) label 0 tie 1:1 -> class 0.
    X = np.array([[1, 0.1], [1, -0.1], [-1, 0]], dtype=np.float32)
    knn = KNNClassifier(k=2, weights="uniform").fit(X, np.array([1, 0, 2]))
    np.testing.assert_allclose(knn.predict_proba([[1.0, 0.0]]), [[0.5, 0.5, 0.0]])
    assert knn.predict([[1.0, 0.0]]).tolist() == [0]


def test_exp_weights_hand_computed():
    # Train: a=(1,0) label 0, b=(1,1) label 1, c=(0,1) label 1, d=(-1,0) label 0.
    # Query q=(1,0), k=3, T=0.5. Cosines: a 1, b 1/sqrt2 = 0.70711, c 0, d -1 (dropped).
    # Weights exp(sim/T): a e^2 = 7.3890561, b e^sqrt2 = 4.1132504, c e^0 = 1.
    # Total 12.5023065 -> p0 = 7.3890561 / 12.5023065 = 0.5910154,
    #                     p1 = (4.1132504 + 1) / 12.5023065 = 0.4089846.
    X = np.array([[1, 0], [1, 1], [0, 1], [-1, 0]], dtype=np.float32)
    knn = KNNClassifier(k=3, temperature=0.5).fit(X, np.array([0, 1, 1, 0]))
    p = knn.predict_proba([[1.0, 0.0]])
    np.testing.assert_allclose(p, [[0.5910154, 0.4089846]], atol=1e-6)
    sims, idx = knn.kneighbors([[2.0, 0.0]])  # scale does not matter: cosine
    np.testing.assert_allclose(sims, [[1, 1 / math.sqrt(2), 0]], atol=1e-6)
    assert idx.tolist() == [[0, 1, 2]]


def test_small_temperature_does_not_overflow():
    X, y, Xq = _data(0, 5)
    p = KNNClassifier(k=10, temperature=1e-3).fit(X, y).predict_proba(Xq)
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p.sum(1), 1, atol=1e-6)


@pytest.mark.parametrize("weights", ["uniform", "exp"])
def test_leave_one_out_equals_refit_without_example(weights):
    X, y, _ = _data(3, 4)
    k = 7
    knn = KNNClassifier(k=k, weights=weights).fit(X, y)
    proba = knn.predict_proba(exclude_self=True)
    sims, idx = knn.kneighbors(exclude_self=True)
    for i in [0, 17, 80, 149]:
        keep = np.delete(np.arange(len(X)), i)
        alone = KNNClassifier(k=k, weights=weights).fit(X[keep], y[keep], n_classes=4)
        np.testing.assert_allclose(proba[i], alone.predict_proba(X[i:i + 1])[0], atol=1e-6)
        np.testing.assert_array_equal(idx[i], keep[alone.kneighbors(X[i:i + 1])[1][0]])
        if weights == "uniform":
            ref = _sk(k, X[keep], y[keep])
            np.testing.assert_allclose(proba[i], ref.predict_proba(X[i:i + 1])[0], atol=1e-6)


def test_leave_one_out_with_duplicates_drops_own_index_only():
    # Rows 0, 1, 2 are identical; each must see the other two copies but never itself.
    rng = np.random.default_rng(0)
    X = rng.normal(size=(20, 5)).astype(np.float32)
    X[1] = X[2] = X[0]
    y = np.arange(20) % 3
    knn = KNNClassifier(k=3).fit(X, y)
    sims, idx = knn.kneighbors(exclude_self=True)
    for i in range(3):
        assert i not in idx[i]
        assert set(idx[i][:2]) == {0, 1, 2} - {i}
        np.testing.assert_allclose(sims[i][:2], 1, atol=1e-6)
    assert all(i not in row for i, row in enumerate(idx))
    # Without exclusion the query finds itself (similarity 1) among its neighbours.
    assert all(i in row for i, row in enumerate(knn.kneighbors()[1][:3]))


def test_neighbor_labels():
    X, y, Xq = _data(4, 5)
    knn = KNNClassifier(k=6).fit(X, y)
    np.testing.assert_array_equal(knn.neighbor_labels(Xq), y[knn.kneighbors(Xq)[1]])
    loo = knn.neighbor_labels(exclude_self=True)
    np.testing.assert_array_equal(loo, y[knn.kneighbors(exclude_self=True)[1]])
    disagree = (loo != y[:, None]).mean(1)  # share of neighbours with another label
    assert disagree.shape == (len(X),) and ((0 <= disagree) & (disagree <= 1)).all()


@pytest.mark.parametrize("exclude_self", [False, True])
def test_chunking_identical(exclude_self):
    X, y, _ = _data(5, 6, n_train=60)
    outs = []
    for chunk in [1, 7, len(X), None]:
        knn = KNNClassifier(k=5, chunk_size=chunk).fit(X, y)
        outs.append((*knn.kneighbors(exclude_self=exclude_self),
                     knn.predict_proba(exclude_self=exclude_self)))
    # Same neighbours exactly; similarities agree to float32 rounding only, because BLAS
    # picks a different kernel per block shape (a 1-row block is a matrix-vector product).
    for sims, idx, proba in outs[1:]:
        np.testing.assert_array_equal(idx, outs[0][1])
        np.testing.assert_allclose(sims, outs[0][0], rtol=0, atol=1e-6)
        np.testing.assert_allclose(proba, outs[0][2], rtol=0, atol=1e-6)


def test_chunk_size_from_memory_budget(monkeypatch):
    X, y, Xq = _data(5, 6, n_train=60)
    full = KNNClassifier(k=5).fit(X, y).kneighbors(Xq)[1]
    # Budget for 7 rows of a (chunk, 60) float32 block -> chunks of 7 queries.
    monkeypatch.setattr("hardprobe.heads._arrays.block_budget", lambda: 7 * 60 * 4)
    seen, real_topk = [], torch.topk

    def spy_topk(block, *args, **kwargs):
        seen.append(len(block))
        return real_topk(block, *args, **kwargs)

    monkeypatch.setattr(torch, "topk", spy_topk)
    np.testing.assert_array_equal(KNNClassifier(k=5).fit(X, y).kneighbors(Xq)[1], full)
    assert seen == [7] * 5 + [5]  # 40 queries


def test_absent_class_gets_zero_column_and_clone_works():
    X, y, Xq = _data(6, 3)
    knn = clone(KNNClassifier(k=5)).fit(X, y, n_classes=5)
    p = knn.predict_proba(Xq)
    assert p.shape == (len(Xq), 5) and (p[:, 3:] == 0).all()
    np.testing.assert_allclose(p.sum(1), 1, atol=1e-6)
    assert knn.predict_proba(np.empty((0, 16), np.float32)).shape == (0, 5)


def test_errors():
    X, y, _ = _data(7, 3, n_train=10)
    bad = X.copy()
    bad[2, 0], bad[5, 3], bad[5, 4] = np.nan, np.inf, -np.inf
    with pytest.raises(ValueError, match=r"3 NaN/Inf values in 2 rows; first rows: \[2, 5\]"):
        KNNClassifier().fit(bad, y)
    knn = KNNClassifier(k=10).fit(X, y)
    with pytest.raises(ValueError, match=r"NaN/Inf.*first rows: \[2, 5\]"):
        knn.predict(bad)
    with pytest.raises(ValueError, match="k=11 is larger than the 10 training examples"):
        KNNClassifier(k=11).fit(X, y).predict(X)
    with pytest.raises(ValueError, match="k=10 is larger than the 9 .*exclude_self"):
        knn.predict(exclude_self=True)
    with pytest.raises(ValueError, match="exclude_self=True needs X=None"):
        knn.predict(X, exclude_self=True)
    with pytest.raises(ValueError, match=r"label 2 at row \d+ is out of range for n_classes=2"):
        KNNClassifier().fit(X, y, n_classes=2)
    with pytest.raises(ValueError, match="found label -1 at row 0"):
        KNNClassifier().fit(X, np.r_[-1, y[1:]])
    with pytest.raises(ValueError, match="integer class labels"):
        KNNClassifier().fit(X, y.astype(float))
    with pytest.raises(ValueError, match="one label per row"):
        KNNClassifier().fit(X, y[:-1])
    with pytest.raises(ValueError, match="2-D"):
        KNNClassifier().fit(X[0], y)
    with pytest.raises(ValueError, match="X has 3 features, but the classifier was fitted with 16"):
        knn.predict(X[:, :3])
    with pytest.raises(ValueError, match="weights must be one of"):
        KNNClassifier(weights="distance").fit(X, y)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        KNNClassifier(temperature=0).fit(X, y)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        KNNClassifier(k=0).fit(X, y)


def test_proba_and_neighbors_in_one_search_equal_the_separate_calls():
    rng = np.random.default_rng(3)
    X, y = rng.normal(size=(60, 8)).astype(np.float32), rng.integers(0, 3, 60)
    knn = KNNClassifier(k=5).fit(X, y)
    p, s, i = knn.predict_proba_and_neighbors(None, exclude_self=True)
    np.testing.assert_array_equal(p, knn.predict_proba(None, exclude_self=True))
    s2, i2 = knn.kneighbors(None, exclude_self=True)
    np.testing.assert_array_equal(i, i2)
    np.testing.assert_array_equal(s, s2)


def test_bf16_search_with_exact_rerank_matches_fp32():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(800, 64)).astype(np.float32)
    y = rng.integers(0, 5, 800)
    Q = rng.normal(size=(100, 64)).astype(np.float32)
    exact = KNNClassifier(k=10).fit(X, y)
    fast = KNNClassifier(k=10, precision="bf16", rerank=32).fit(X, y)
    s1, i1 = exact.kneighbors(Q)
    s2, i2 = fast.kneighbors(Q)
    assert (i1 == i2).mean() > 0.99  # same neighbours, up to near-ties bf16 could not separate
    np.testing.assert_allclose(s2, s1, atol=1e-5)  # similarities are exact fp32 after re-rank
    _, j1 = exact.kneighbors(None, exclude_self=True)
    _, j2 = fast.kneighbors(None, exclude_self=True)
    assert (j1 == j2).mean() > 0.99 and not (j2 == np.arange(800)[:, None]).any()
    with pytest.raises(ValueError, match="precision"):
        KNNClassifier(precision="fp8").fit(X, y)


def test_faiss_backend_equals_our_exact_search():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(7)
    X, y = rng.normal(size=(500, 32)).astype(np.float32), rng.integers(0, 4, 500)
    Q = rng.normal(size=(50, 32)).astype(np.float32)
    ours = KNNClassifier(k=7).fit(X, y)
    fa = KNNClassifier(k=7, backend="faiss").fit(X, y)
    for args in ((Q,), (None,)):
        kw = {"exclude_self": args[0] is None}
        s1, i1 = ours.kneighbors(*args, **kw)
        s2, i2 = fa.kneighbors(*args, **kw)
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_allclose(s1, s2, atol=1e-5)
    np.testing.assert_allclose(ours.predict_proba(Q), fa.predict_proba(Q), atol=1e-5)


def test_block_budget_is_bounded():
    from hardprobe.heads._arrays import block_budget
    assert 64 * 2**20 <= block_budget() <= 2**30


# -- FAISS backend: flat (exact), IVF, memory-mapped input --------------------------------

def _clustered(seed, n=600, n_query=80, dim=24, n_centers=12):
    """Unit-scale gaussian clusters: IVF lists mean something, neighbours are not all ties."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_centers, dim)) * 2
    X = (centers[rng.integers(0, n_centers, n)] + rng.normal(size=(n, dim))).astype(np.float32)
    Q = (centers[rng.integers(0, n_centers, n_query)]
         + rng.normal(size=(n_query, dim))).astype(np.float32)
    return X, rng.integers(0, 4, n), Q


def _recall(idx, ref):
    """Share of the exact neighbours found, order ignored."""
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(idx, ref)]))


def _assert_same_search(a, b, Q, atol=1e-5):
    """Same neighbour ids and (up to float32 rounding) similarities and probabilities, for
    queries Q and for the training set with each example left out."""
    for X, loo in ((Q, False), (None, True)):
        pa, sa, ia = a.predict_proba_and_neighbors(X, exclude_self=loo)
        pb, sb, ib = b.predict_proba_and_neighbors(X, exclude_self=loo)
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_allclose(sa, sb, rtol=0, atol=atol)
        np.testing.assert_allclose(pa, pb, rtol=0, atol=atol)
        np.testing.assert_array_equal(a.neighbor_labels(X, exclude_self=loo),
                                      b.neighbor_labels(X, exclude_self=loo))


@pytest.mark.parametrize("weights", ["exp", "uniform"])
def test_faiss_flat_equals_torch_exact_including_leave_one_out(weights):
    pytest.importorskip("faiss")
    X, y, Q = _clustered(0)
    torch_knn = KNNClassifier(k=9, weights=weights).fit(X, y)
    faiss_knn = KNNClassifier(k=9, weights=weights, backend="faiss").fit(X, y)
    _assert_same_search(torch_knn, faiss_knn, Q)
    assert faiss_knn.index_.ntotal == len(X) and faiss_knn.nlist_ is None
    _, idx = faiss_knn.kneighbors(exclude_self=True)
    assert not (idx == np.arange(len(X))[:, None]).any()


def _save(tmp_path, X, name="train.npy"):
    np.save(tmp_path / name, X)
    return np.load(tmp_path / name, mmap_mode="r")


@pytest.mark.parametrize("index", ["flat", "ivf"])
def test_memmap_fit_is_identical_to_in_memory_fit(tmp_path, monkeypatch, index):
    pytest.importorskip("faiss")
    X, y, Q = _clustered(1)
    X_map, Q_map = _save(tmp_path, X), _save(tmp_path, Q, "query.npy")
    assert isinstance(X_map, np.memmap) and not X_map.flags.writeable
    kw = dict(k=7, backend="faiss", index=index, nlist=10, nprobe=3, chunk_size=64)
    in_ram = KNNClassifier(**kw).fit(X, y)
    expected = [in_ram.predict_proba_and_neighbors(X_q, exclude_self=X_q is None)
                for X_q in (Q, None)]
    # memory-mapped, read 64 rows at a time: record every chunk that is converted to float32
    seen, real = [], np.array

    def spy(obj, *args, **kwargs):
        if isinstance(obj, np.memmap):
            seen.append(len(obj))
        return real(obj, *args, **kwargs)

    monkeypatch.setattr(np, "array", spy)
    mapped = KNNClassifier(**kw).fit(X_map, y)
    assert len(seen) >= len(X) // 64 and max(seen) <= 64  # never a full float32 copy
    seen.clear()
    for X_q, want in zip((Q_map, None), expected):
        got = mapped.predict_proba_and_neighbors(X_q, exclude_self=X_q is None)
        for a, b in zip(want, got):
            np.testing.assert_array_equal(a, b)  # bit for bit
    assert len(seen) >= (len(Q) + len(X)) // 64 and max(seen) <= 64  # queries chunked too
    monkeypatch.undo()
    if index == "flat":  # the index holds exactly the torch backend's normalised rows
        np.testing.assert_array_equal(mapped.index_.reconstruct_n(0, len(X)),
                                      KNNClassifier(k=7).fit(X, y)._train.numpy())


def test_faiss_chunks_from_memory_budget(monkeypatch, tmp_path):
    pytest.importorskip("faiss")
    from hardprobe.heads._arrays import stream_rows
    X, y, Q = _clustered(2, n=300, dim=16)
    ref = KNNClassifier(k=5, backend="faiss").fit(X, y).kneighbors(Q)
    # block_budget() / 16 bytes of float32 rows per chunk: 1,600 bytes -> 25 rows of 16
    monkeypatch.setattr("hardprobe.heads._arrays.block_budget", lambda: 16 * 25 * 16 * 4)
    assert stream_rows(16) == 25
    knn = KNNClassifier(k=5, backend="faiss").fit(_save(tmp_path, X), y)
    searched, real_search = [], knn.index_.search
    monkeypatch.setattr(knn.index_, "search",
                        lambda q, k: searched.append(len(q)) or real_search(q, k), raising=False)
    sims, idx = knn.kneighbors(Q)
    assert searched == [25, 25, 25, 5]  # 80 queries
    np.testing.assert_array_equal(idx, ref[1])  # chunking changes rounding only
    np.testing.assert_allclose(sims, ref[0], rtol=0, atol=1e-6)


def test_ivf_probing_every_list_equals_exact():
    pytest.importorskip("faiss")
    X, y, Q = _clustered(3)
    exact = KNNClassifier(k=10).fit(X, y)
    ivf = KNNClassifier(k=10, backend="faiss", index="ivf", nlist=16, nprobe=16).fit(X, y)
    assert ivf.nlist_ == 16 and ivf.index_.ntotal == len(X)
    _assert_same_search(exact, ivf, Q)
    ivf.set_params(nprobe=100)  # more than nlist: every list, the same
    np.testing.assert_array_equal(ivf.kneighbors(Q)[1], exact.kneighbors(Q)[1])
    # float16 storage: the same neighbours up to near-ties, similarities to fp16 rounding
    fp16 = KNNClassifier(k=10, backend="faiss", index="ivf_fp16", nlist=16, nprobe=16).fit(X, y)
    s_ref, i_ref = exact.kneighbors(Q)
    s16, i16 = fp16.kneighbors(Q)
    assert _recall(i16, i_ref) >= 0.98
    np.testing.assert_allclose(s16, s_ref, rtol=0, atol=2e-3)


@pytest.mark.parametrize("index", ["ivf", "ivf_fp16"])
def test_ivf_recall_is_measured_monotone_and_reproducible(index):
    pytest.importorskip("faiss")
    X, y, Q = _clustered(4, n=2000, dim=32, n_centers=40)
    k, nlist = 20, 32
    _, exact = KNNClassifier(k=k).fit(X, y).kneighbors(Q)
    recalls = []
    for nprobe in (1, 2, 4, nlist):
        kw = dict(k=k, backend="faiss", index=index, nlist=nlist, nprobe=nprobe, seed=3)
        a = KNNClassifier(**kw).fit(X, y)
        b = KNNClassifier(**kw).fit(X, y)  # same seed: same quantizer, same answers
        sa, ia = a.kneighbors(Q)
        sb, ib = b.kneighbors(Q)
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(sa, sb)
        np.testing.assert_array_equal(a.predict_proba(exclude_self=True),
                                      b.predict_proba(exclude_self=True))
        assert (ia >= 0).all() and all(len(set(row)) == k for row in ia)  # k real neighbours
        recalls.append(_recall(ia, exact))
    assert all(0 < r <= 1 for r in recalls)
    assert recalls == sorted(recalls)  # probing more lists never loses a true neighbour
    assert recalls[0] < recalls[-1]  # nprobe=1 is approximate on this data ...
    if index == "ivf":
        assert recalls[-1] == 1  # ... and probing every list is exact


def test_ivf_short_lists_are_widened_to_k_neighbours():
    # 60 rows in 12 lists (about 5 each), k=15: one probed list cannot hold 15 neighbours;
    # FAISS would pad with id -1, the classifier probes more lists until it has 15.
    pytest.importorskip("faiss")
    X, y, Q = _clustered(5, n=60, n_query=30, dim=8, n_centers=12)
    knn = KNNClassifier(k=15, backend="faiss", index="ivf", nlist=12, nprobe=1).fit(X, y)
    for X_q, loo in ((Q, False), (None, True)):
        sims, idx = knn.kneighbors(X_q, exclude_self=loo)
        assert (idx >= 0).all() and all(len(set(row)) == 15 for row in idx)
        assert (np.diff(sims, axis=1) <= 1e-6).all()  # most similar first
        p = knn.predict_proba(X_q, exclude_self=loo)
        np.testing.assert_allclose(p.sum(1), 1, atol=1e-6)
    assert not (knn.kneighbors(exclude_self=True)[1] == np.arange(60)[:, None]).any()


def test_default_nlist_and_training_sample_follow_n():
    pytest.importorskip("faiss")
    from hardprobe.heads._faiss import _nlist
    assert _nlist(None, 50_000) == int(4 * math.sqrt(50_000))  # 894: FAISS's 4 sqrt(N)
    assert _nlist(None, 1000) == 1000 // 39  # small N: at least 39 training rows per list
    assert _nlist(None, 10) == 1 and _nlist(None, 10**12) == 65536
    X, y, _ = _clustered(6, n=1200, dim=8)
    knn = KNNClassifier(k=3, backend="faiss", index="ivf").fit(X, y)
    assert knn.nlist_ == 1200 // 39 and knn.index_.nlist == knn.nlist_
    assert knn._index.training_sample(X).shape == (min(1200, 40 * knn.nlist_), 8)


def test_faiss_errors(tmp_path, monkeypatch):
    pytest.importorskip("faiss")
    X, y, Q = _clustered(7, n=50, dim=6)
    with pytest.raises(ValueError, match="nlist=51 is larger than the 50 training examples"):
        KNNClassifier(backend="faiss", index="ivf", nlist=51, k=3).fit(X, y)
    with pytest.raises(ValueError, match="nprobe must be a positive integer"):
        KNNClassifier(backend="faiss", index="ivf", nprobe=0).fit(X, y)
    with pytest.raises(ValueError, match="nlist must be None or a positive integer"):
        KNNClassifier(backend="faiss", index="ivf", nlist=0).fit(X, y)
    with pytest.raises(ValueError, match="index must be one of"):
        KNNClassifier(backend="faiss", index="hnsw").fit(X, y)
    with pytest.raises(ValueError, match="index='ivf' needs backend='faiss'"):
        KNNClassifier(index="ivf").fit(X, y)
    # NaN/Inf in a memory-mapped train set or in queries: the same message as in memory,
    # counted over the whole array although it is read chunk by chunk
    bad = X.copy()
    bad[2, 0], bad[45, 3], bad[45, 4] = np.nan, np.inf, -np.inf
    for index in ("flat", "ivf"):
        with pytest.raises(ValueError, match=r"3 NaN/Inf values in 2 rows; first rows: \[2, 45\]"):
            KNNClassifier(k=3, backend="faiss", index=index, nlist=4,
                          chunk_size=8).fit(_save(tmp_path, bad), y)
    knn = KNNClassifier(k=3, backend="faiss", chunk_size=8).fit(X, y)
    with pytest.raises(ValueError, match=r"NaN/Inf.*first rows: \[2, 45\]"):
        knn.predict(bad)
    with pytest.raises(ValueError, match="X has 3 features, but the classifier was fitted with 6"):
        knn.predict(Q[:, :3])
    with pytest.raises(ValueError, match="exclude_self=True needs X=None"):
        knn.predict(Q, exclude_self=True)
    with pytest.raises(ValueError, match="k=50 is larger than the 49 .*exclude_self"):
        KNNClassifier(k=50, backend="faiss").fit(X, y).predict(exclude_self=True)
    assert knn.predict_proba(np.empty((0, 6), np.float32)).shape == (0, 4)
    # FAISS missing: the error names the package to install
    monkeypatch.setitem(__import__("sys").modules, "faiss", None)
    with pytest.raises(ImportError, match=r"pip install faiss-cpu .*hardprobe\[faiss\]"):
        KNNClassifier(backend="faiss", index="ivf").fit(X, y)


def test_faiss_gpu_when_available_else_cpu_with_a_warning(monkeypatch):
    faiss = pytest.importorskip("faiss")
    X, y, Q = _clustered(8, n=200, dim=8)
    ref = KNNClassifier(k=5, backend="faiss").fit(X, y).kneighbors(Q)
    if not hasattr(faiss, "StandardGpuResources"):  # faiss-cpu: cuda asked, CPU used, said so
        with pytest.warns(UserWarning, match="no GPU support .* searching on the CPU"):
            knn = KNNClassifier(k=5, backend="faiss", device="cuda").fit(X, y)
        np.testing.assert_array_equal(knn.kneighbors(Q)[1], ref[1])
    # With GPU support the index moves to the device named by `device` (a stand-in here:
    # the CPU index itself, so the wiring is checked on any machine).
    moved = []
    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: "resources", raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu",
                        lambda res, dev, index: moved.append((res, dev)) or index, raising=False)
    knn = KNNClassifier(k=5, backend="faiss", device="cuda:1").fit(X, y)
    assert moved == [("resources", 1)]
    np.testing.assert_array_equal(knn.kneighbors(Q)[1], ref[1])
    KNNClassifier(k=5, backend="faiss", device="cpu").fit(X, y)
    assert len(moved) == 1  # device cpu: never on the GPU


def test_faiss_clone_and_refit_on_another_backend():
    pytest.importorskip("faiss")
    X, y, Q = _clustered(9, n=100, dim=8)
    knn = clone(KNNClassifier(k=4, backend="faiss", index="ivf", nlist=5, nprobe=2, seed=1))
    assert knn.get_params()["index"] == "ivf" and knn.get_params()["nprobe"] == 2
    knn.fit(X, y)
    knn.set_params(backend="torch", index="flat").fit(X, y)
    assert knn.index_ is None and knn.nlist_ is None
    np.testing.assert_array_equal(knn.kneighbors(Q)[1],
                                  KNNClassifier(k=4).fit(X, y).kneighbors(Q)[1])


# -- ties, all-zero rows, leave-one-out with duplicate groups (issue 13, items 5 and 6) -------

def _duplicated(seed, n_base=40, copies=5, n_query=60, dim=12):
    """Each of n_base rows copied `copies` times (exact copies: a rescaled copy rounds to a
    unit row an ulp away, a near-tie, not a tie) at shuffled positions, each copy with its own
    label, so which tied copy is chosen changes the vote."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n_base, dim))
    owner = rng.permutation(np.repeat(np.arange(n_base), copies))  # row -> its base row
    X = base[owner].astype(np.float32)
    y = rng.integers(0, 4, len(owner))
    Q = rng.normal(size=(n_query, dim)).astype(np.float32)
    return X, y, Q, base, owner


def _lowest_index_reference(base, owner, Q, k):
    """Known answer: rank the distinct base rows by float64 cosine, expand each into its
    copies in index order (they tie exactly), keep the first k."""
    unit = base / np.linalg.norm(base, axis=1, keepdims=True)
    q = Q / np.linalg.norm(Q, axis=1, keepdims=True)
    out = []
    for row in q @ unit.T:
        ranked = np.concatenate([np.flatnonzero(owner == b) for b in np.argsort(-row)])
        out.append(ranked[:k])
    return np.array(out)


def test_ties_go_to_the_lowest_index_and_torch_equals_faiss():
    faiss = pytest.importorskip("faiss")  # noqa: F841
    X, y, Q, base, owner = _duplicated(0)
    k = 7  # 5 copies per base row: the 7th neighbour cuts through the second tie group
    want = _lowest_index_reference(base, owner, Q, k)
    fits = {name: KNNClassifier(k=k, **kw).fit(X, y) for name, kw in (
        ("torch", {}), ("bf16", {"precision": "bf16"}), ("faiss", {"backend": "faiss"}),
        ("chunked", {"chunk_size": 7}))}
    probas = {}
    for name, knn in fits.items():
        probas[name], _, idx = knn.predict_proba_and_neighbors(Q)
        np.testing.assert_array_equal(idx, want, err_msg=name)
    for name in ("bf16", "faiss", "chunked"):
        np.testing.assert_allclose(probas[name], probas["torch"], rtol=0, atol=1e-6)
    # leave-one-out: the same neighbours in every backend, and ties still lowest first
    loo = {name: knn.kneighbors(exclude_self=True)[1] for name, knn in fits.items()}
    for name in ("bf16", "faiss", "chunked"):
        np.testing.assert_array_equal(loo[name], loo["torch"], err_msg=name)
    for i, row in enumerate(loo["torch"]):
        same = owner[row] == owner[i]  # the query's own copies (sim 1) come first, in order
        assert same[:same.sum()].all() and (np.diff(row[same]) > 0).all() and i not in row


def test_all_zero_feature_rows_raise_naming_them(tmp_path):
    from hardprobe.errors import HeadError, ZeroFeatureRowsError
    X, y, Q = _clustered(10, n=80, dim=6)
    bad = X.copy()
    bad[[4, 61]] = 0
    msg = r"X has 2 all-zero feature rows; first rows: \[4, 61\].*Drop those rows"
    fits = [dict(), dict(backend="faiss", chunk_size=16),
            dict(backend="faiss", index="ivf", nlist=2, chunk_size=16)]
    for kw in fits:
        for data in (bad, _save(tmp_path, bad)):
            with pytest.raises(ZeroFeatureRowsError, match=msg):
                KNNClassifier(k=3, **kw).fit(data, y)
        with pytest.raises(ZeroFeatureRowsError, match=msg):  # queries too
            KNNClassifier(k=3, **kw).fit(X, y).predict(bad)
    assert issubclass(ZeroFeatureRowsError, HeadError)


def _mislabelled_pair():
    """Two well separated classes (0 around +e0, 1 around -e0) and rows 3 and 10, an exact
    copy of each other (one rescaled) in class 0's cluster, both labelled 1."""
    rng = np.random.default_rng(11)
    X = rng.normal(size=(60, 32)).astype(np.float32) * 0.6  # within a class cosine ~0.4
    y = np.arange(60) % 2
    X[:, 0] += np.where(y == 0, 3.0, -3.0)
    X[3, 0] = 3.0  # in class 0's cluster ...
    X[10] = 3 * X[3]  # ... and its rescaled copy
    y[3] = y[10] = 1
    groups = np.full(60, -1)
    groups[[3, 10]] = 7
    return X, y, groups


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_exclude_groups_exposes_a_mislabelled_duplicate_pair(backend):
    if backend == "faiss":
        pytest.importorskip("faiss")
    X, y, groups = _mislabelled_pair()
    knn = KNNClassifier(k=5, backend=backend).fit(X, y)
    # plain leave-one-out: each copy is the other's nearest neighbour (sim 1, weight
    # exp(1/0.07)) and outvotes everything else, so the wrong label looks right
    plain = knn.predict_proba(exclude_self=True)
    assert (plain[[3, 10], 1] > 0.9).all()
    grouped = knn.predict_proba(exclude_self=True, exclude_groups=groups)
    assert (grouped[[3, 10], 0] > 0.99).all()  # the class-0 neighbourhood speaks
    _, idx = knn.kneighbors(exclude_self=True, exclude_groups=groups)
    assert 10 not in idx[3] and 3 not in idx[10]
    # known answer: a group's rows see what a fit without the whole group would see; rows
    # outside every group are plain leave-one-out
    keep = np.delete(np.arange(60), [3, 10])
    alone = KNNClassifier(k=5, backend=backend).fit(X[keep], y[keep], n_classes=2)
    for i in (3, 10):
        np.testing.assert_array_equal(idx[i], keep[alone.kneighbors(X[i:i + 1])[1][0]])
        np.testing.assert_allclose(grouped[i], alone.predict_proba(X[i:i + 1])[0], atol=1e-6)
    others = np.setdiff1d(np.arange(60), [3, 10])
    np.testing.assert_array_equal(idx[others], knn.kneighbors(exclude_self=True)[1][others])
    np.testing.assert_array_equal(
        knn.predict(exclude_self=True, exclude_groups=groups), grouped.argmax(1))
    np.testing.assert_array_equal(
        knn.neighbor_labels(exclude_self=True, exclude_groups=groups), y[idx])


def test_exclude_groups_same_in_torch_and_faiss_and_errors():
    pytest.importorskip("faiss")
    X, y, Q, base, owner = _duplicated(1, n_base=30, copies=3)
    groups = owner.copy()
    groups[::4] = -1  # some copies in no group: they see their own copies again
    a = KNNClassifier(k=6).fit(X, y)
    b = KNNClassifier(k=6, backend="faiss").fit(X, y)
    pa, sa, ia = a.predict_proba_and_neighbors(exclude_self=True, exclude_groups=groups)
    pb, sb, ib = b.predict_proba_and_neighbors(exclude_self=True, exclude_groups=groups)
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_allclose(pa, pb, rtol=0, atol=1e-6)
    same = (groups[ia] == groups[:, None]) & (groups[:, None] >= 0)
    assert not same.any() and not (ia == np.arange(len(X))[:, None]).any()
    with pytest.raises(ValueError, match="exclude_groups needs exclude_self=True"):
        a.predict(exclude_groups=groups)
    with pytest.raises(ValueError, match=r"exclude_groups must be an \(N_train,\) = \(90,\)"):
        a.predict(exclude_self=True, exclude_groups=groups[:-1])
    with pytest.raises(ValueError, match="ids must be >= 0, or -1"):
        a.predict(exclude_self=True, exclude_groups=np.full(90, -2))
    with pytest.raises(ValueError, match=r"k=6 is larger than the 3 .*the largest holds 87"):
        a.predict(exclude_self=True, exclude_groups=np.r_[np.zeros(87, int), -np.ones(3, int)])


def test_block_topk_equals_topk_on_wide_rows():
    from hardprobe.heads._index import _GROUP, block_topk
    g = torch.Generator().manual_seed(0)
    for n in (_GROUP * 200, _GROUP * 200 + 7):  # n % _GROUP: the tail columns are candidates
        block = torch.randn(50, n, generator=g)
        block[0, -1] = 10.0  # the largest value in the tail (or the last group)
        sims, ids = block_topk(block, 21)
        want, _ = torch.topk(block, 21, dim=1)
        assert torch.equal(sims, want)
        assert torch.equal(block.gather(1, ids), sims)  # ids point at those values
        assert ids[0, 0] == n - 1
    # a row's 21 largest all in m groups (columns j, j + L, ... for j < m), every other
    # group's max just below the 21st: the two-pass search still finds all 21, in order
    L, m = 100, -(-21 // _GROUP) + 1
    top = 100.0 + m * _GROUP
    block = torch.zeros(1, _GROUP * L)
    cols = torch.arange(m).repeat(_GROUP) + torch.arange(_GROUP).repeat_interleave(m) * L
    block[0, cols] = top - torch.arange(m * _GROUP, dtype=torch.float32)  # top, top - 1, ...
    block[0, m:L] = top - 20.5  # groups m .. L - 1
    sims, ids = block_topk(block, 21)
    assert sims[0].tolist() == [top - i for i in range(21)]
    assert torch.equal(block[0, ids[0]], sims[0])


def test_block_topk_all_equal_rows_gives_distinct_ids():
    from hardprobe.heads._index import block_topk
    sims, ids = block_topk(torch.ones(3, 5000), 21)
    assert (sims == 1).all()
    assert all(len(set(row.tolist())) == 21 for row in ids)  # 21 different columns per row


@pytest.mark.parametrize("kw", [{}, {"precision": "bf16"}, {"chunk_size": 300}])
def test_ties_go_to_the_lowest_index_on_wide_train_sets(kw):
    # 2,000 train rows: wide enough for block_topk's two-pass search (20 rows < 4 k * _GROUP
    # in the test above take a plain topk)
    X, y, Q, base, owner = _duplicated(3, n_base=400, copies=5, n_query=100, dim=16)
    k = 7
    idx = KNNClassifier(k=k, **kw).fit(X, y).kneighbors(Q)[1]
    np.testing.assert_array_equal(idx, _lowest_index_reference(base, owner, Q, k))


def test_kept_block_gives_the_same_answers_and_is_not_pickled():
    import pickle
    X, y, Q, base, owner = _duplicated(4, n_base=400, copies=5, n_query=100, dim=16)
    want = _lowest_index_reference(base, owner, Q, 7)
    knn = KNNClassifier(k=7).fit(X, y)
    for precision, rows in (("fp32", 100), ("fp32", 30), ("bf16", 100), ("fp32", 100)):
        knn.set_params(precision=precision)  # a smaller, then a bf16 search reuse or replace it
        np.testing.assert_array_equal(knn.kneighbors(Q[:rows])[1], want[:rows])
    assert knn._index._workspace.shape == (100, len(X))  # kept after the search
    knn.set_params(precision="fp32")
    knn.kneighbors(Q[:30])
    assert knn._index._workspace.shape == (100, len(X))  # the larger block stays kept
    assert "_workspace" not in pickle.loads(pickle.dumps(knn._index)).__dict__


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_ties_lowest_index_when_only_some_queries_tie(precision):
    # base rows copied 1 or 4 times: a query's 7th place cuts a tie group for some queries
    # only, so the widening searches a few rows (copied out) rather than most of the block
    rng = np.random.default_rng(5)
    base = rng.normal(size=(600, 16))
    owner = rng.permutation(np.repeat(np.arange(600), np.where(np.arange(600) < 60, 4, 1)))
    X, y = base[owner].astype(np.float32), rng.integers(0, 3, len(owner))
    Q = rng.normal(size=(200, 16)).astype(np.float32)
    want = _lowest_index_reference(base, owner, Q, 7)
    knn = KNNClassifier(k=7, precision=precision).fit(X, y)
    calls = []
    import hardprobe.heads._index as index_module
    real = index_module.block_topk
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(index_module, "block_topk", lambda b, K: calls.append(len(b)) or real(b, K))
        np.testing.assert_array_equal(knn.kneighbors(Q)[1], want)
    assert any(0 < n < len(Q) / 2 for n in calls)  # a widened search of a minority of rows
