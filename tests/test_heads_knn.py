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
    monkeypatch.setattr("hardprobe.heads.knn.block_budget", lambda: 7 * 60 * 4)
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
    from hardprobe.heads.knn import block_budget
    assert 64 * 2**20 <= block_budget() <= 2**30
