import warnings

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.datasets import make_classification
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler

from hardprobe.heads import KNNClassifier, LinearProbe, cross_val_predict_proba

EASY = dict(n_samples=2000, n_features=64, n_informative=30, n_classes=10, class_sep=1.5,
            random_state=0)
HARD = dict(n_samples=2000, n_features=64, n_informative=8, n_classes=10, class_sep=0.5,
            flip_y=0.2, random_state=1)
BINARY = dict(n_samples=600, n_features=20, n_classes=2, random_state=2)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: see conftest


def _sklearn_reference(X, y, C):
    Z = StandardScaler().fit_transform(X)
    return Z, LogisticRegression(C=C, max_iter=5000, tol=1e-10).fit(Z, y)


@pytest.mark.parametrize("data", [EASY, HARD, BINARY], ids=["easy", "hard", "binary"])
@pytest.mark.parametrize("C", [1.0, 0.01])
def test_matches_sklearn_logistic_regression(data, C):
    X, y = make_classification(**data)
    probe = LinearProbe(C=C).fit(X, y)
    Z, ref = _sklearn_reference(X, y, C)
    assert abs(probe.score(X, y) - ref.score(Z, y)) <= 0.005  # within half a point
    # Same objective -> same optimum: probabilities agree far below 1e-3.
    assert np.abs(probe.predict_proba(X) - ref.predict_proba(Z)).max() < 1e-4
    if data is BINARY:  # sklearn keeps one vector w; ours is [-w/2, w/2]
        np.testing.assert_allclose(probe.coef_[1] - probe.coef_[0], ref.coef_[0], atol=1e-3)
    else:
        np.testing.assert_allclose(probe.coef_, ref.coef_, atol=1e-3)
    np.testing.assert_allclose(probe.mean_, X.mean(0))
    np.testing.assert_allclose(probe.scale_, X.std(0))


def test_outputs_consistent():
    X, y = make_classification(**HARD)
    probe = LinearProbe().fit(X, y)
    logits, proba = probe.decision_function(X[:50]), probe.predict_proba(X[:50])
    assert logits.shape == proba.shape == (50, 10) and probe.coef_.shape == (10, 64)
    np.testing.assert_allclose(proba.sum(1), 1)
    np.testing.assert_array_equal(probe.predict(X[:50]), proba.argmax(1))
    Z = (X[:50] - probe.mean_) / probe.scale_  # coef_ acts on standardised features
    np.testing.assert_allclose(logits, Z @ probe.coef_.T + probe.intercept_)
    assert probe.n_iter_ > 0


def test_no_standardize_matches_sklearn_on_raw_features():
    X, y = make_classification(**BINARY)
    probe = LinearProbe(standardize=False, C=0.1).fit(X, y)
    ref = LogisticRegression(C=0.1, max_iter=5000, tol=1e-10).fit(X, y)
    assert np.abs(probe.predict_proba(X) - ref.predict_proba(X)).max() < 1e-4
    assert (probe.mean_ == 0).all() and (probe.scale_ == 1).all()


def test_constant_feature():
    X, y = make_classification(**BINARY)
    X = np.column_stack([X, np.full(len(X), 3.0)])  # zero variance
    probe = LinearProbe().fit(X, y)
    assert probe.scale_[-1] == 1.0 and probe.mean_[-1] == 3.0
    assert (probe.coef_[:, -1] == 0).all()
    Z, ref = _sklearn_reference(X, y, 1.0)
    assert np.abs(probe.predict_proba(X) - ref.predict_proba(Z)).max() < 1e-4


def test_absent_class_gets_zero_probability():
    X, y = make_classification(**HARD)
    keep = y != 4
    probe = LinearProbe().fit(X[keep], y[keep], n_classes=12)
    p = probe.predict_proba(X)
    assert p.shape == (len(X), 12) and (p[:, [4, 10, 11]] == 0).all()
    np.testing.assert_allclose(p.sum(1), 1)
    assert (probe.predict(X) != 4).all()


def test_deterministic_and_cloneable():
    X, y = make_classification(**HARD)
    a = LinearProbe(C=0.5, seed=3).fit(X, y)
    b = clone(a).fit(X, y)
    assert b.get_params() == a.get_params()
    np.testing.assert_array_equal(a.coef_, b.coef_)
    np.testing.assert_array_equal(a.intercept_, b.intercept_)


def test_oof_rows_come_from_models_that_did_not_see_them():
    # Random labels, more features than examples: in-sample the probe memorises the labels,
    # out-of-fold it cannot beat chance. Seeing a row at fit time would show up at once.
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(120, 200)), np.arange(120) % 4
    probe = LinearProbe()
    in_sample = probe.fit(X, y).predict_proba(X)[np.arange(120), y]
    oof = cross_val_predict_proba(probe, X, y, n_folds=5, seed=0)
    assert oof.shape == (120, 4)
    np.testing.assert_allclose(oof.sum(1), 1)
    assert in_sample.min() > 0.8
    assert oof[np.arange(120), y].mean() < 0.35  # chance is 0.25
    # Row by row equal to fitting on the other folds of StratifiedKFold(shuffle, seed).
    for train, test in StratifiedKFold(5, shuffle=True, random_state=0).split(X, y):
        fold = LinearProbe().fit(X[train], y[train], n_classes=4)
        np.testing.assert_allclose(oof[test], fold.predict_proba(X[test]))


def test_oof_deterministic_in_seed_and_works_for_knn():
    X, y = make_classification(**BINARY)
    a = cross_val_predict_proba(LinearProbe(), X, y, seed=1)
    np.testing.assert_array_equal(a, cross_val_predict_proba(LinearProbe(), X, y, seed=1))
    assert not np.allclose(a, cross_val_predict_proba(LinearProbe(), X, y, seed=2))
    knn = cross_val_predict_proba(KNNClassifier(k=5), X, y, n_folds=3, n_classes=3)
    assert knn.shape == (len(X), 3) and (knn[:, 2] == 0).all()
    np.testing.assert_allclose(knn.sum(1), 1, atol=1e-6)


def test_max_iter_warns():
    X, y = make_classification(**HARD)
    with pytest.warns(ConvergenceWarning, match="max_iter=2"):
        LinearProbe(max_iter=2).fit(X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        LinearProbe().fit(X, y)


def test_errors():
    X, y = make_classification(**BINARY)
    with pytest.raises(ValueError, match="at least 2 classes in y, got only class 1"):
        LinearProbe().fit(X, np.ones(len(X), dtype=int))
    bad = X.copy()
    bad[[7, 9], 0] = np.nan
    with pytest.raises(ValueError, match=r"2 NaN/Inf values in 2 rows; first rows: \[7, 9\]"):
        LinearProbe().fit(bad, y)
    probe = LinearProbe().fit(X, y)
    with pytest.raises(ValueError, match=r"first rows: \[7, 9\]"):
        probe.predict_proba(bad)
    with pytest.raises(ValueError, match="X has 5 features, but the probe was fitted with 20"):
        probe.predict(X[:, :5])
    with pytest.raises(ValueError, match="out of range for n_classes=1"):
        LinearProbe().fit(X, y, n_classes=1)
    with pytest.raises(ValueError, match="C must be > 0"):
        LinearProbe(C=0).fit(X, y)
    with pytest.raises(ValueError, match=r"out of range for n_classes=2"):
        cross_val_predict_proba(LinearProbe(), X, y + 1, n_classes=2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fit_leaves_the_features_untouched(dtype):
    """Standardisation runs in place on the probe's own copy, never on the caller's array."""
    rng = np.random.default_rng(0)
    X = rng.normal(3.0, 2.0, size=(200, 8)).astype(dtype)
    before = X.copy()
    LinearProbe().fit(X, rng.integers(0, 3, 200))
    np.testing.assert_array_equal(X, before)


def test_return_estimator_is_the_full_data_fit():
    X, y = make_classification(**EASY)
    oof, model = cross_val_predict_proba(LinearProbe(), X, y, return_estimator=True)
    np.testing.assert_array_equal(oof, cross_val_predict_proba(LinearProbe(), X, y))
    np.testing.assert_array_equal(model.coef_, LinearProbe().fit(X, y).coef_)


def test_groups_stay_inside_one_fold():
    # Each group holds 4 copies of one row with random labels: if a copy sat in the train
    # folds of its twin, the probe (which memorises, D > N) would score the twin's label high.
    rng = np.random.default_rng(0)
    base = rng.normal(size=(40, 200))
    X = np.repeat(base, 4, axis=0) + 1e-3 * rng.normal(size=(160, 200))
    y = np.repeat(np.arange(40) % 4, 4)
    groups = np.repeat(np.arange(40), 4)
    groups[:8] = -1  # two groups dissolved into singletons: they may split
    oof = cross_val_predict_proba(LinearProbe(), X, y, n_folds=4, groups=groups)
    leaky = cross_val_predict_proba(LinearProbe(), X, y, n_folds=4)
    true_grouped = oof[np.arange(8, 160), y[8:]].mean()
    assert true_grouped < 0.45 < leaky[np.arange(8, 160), y[8:]].mean()
    seen = {}
    from hardprobe.heads.linear import _folds
    for f, (_, test) in enumerate(_folds(X, y, 4, 0, groups)):
        for g in groups[test]:
            if g >= 0:
                assert seen.setdefault(g, f) == f
    with pytest.raises(ValueError, match="groups must be"):
        cross_val_predict_proba(LinearProbe(), X, y, groups=np.zeros(5, dtype=int))


def test_group_folds_of_mostly_singletons_are_stratified_and_keep_groups_whole():
    # the fast path (grouped rows and singletons split apart, then joined): every row in
    # exactly one test fold, each group in one fold, every fold within 1% of even per class
    from hardprobe.heads.linear import _folds
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 4000)
    groups = np.full(4000, -1)
    grouped = rng.choice(4000, 400, replace=False)
    groups[grouped] = rng.integers(0, 120, 400)
    folds = _folds(np.zeros((4000, 1)), y, 5, 0, groups)
    tests = [t for _, t in folds]
    assert np.array_equal(np.sort(np.concatenate(tests)), np.arange(4000))
    for tr, te in folds:
        assert len(np.intersect1d(tr, te)) == 0 and len(tr) + len(te) == 4000
        assert np.abs(np.bincount(y[te], minlength=4) - np.bincount(y, minlength=4) / 5).max() \
            <= 0.01 * 4000 / 5
    fold_of = {}
    for k, te in enumerate(tests):
        for g in groups[te][groups[te] >= 0]:
            assert fold_of.setdefault(g, k) == k


def test_folds_in_parallel_give_the_serial_answer_and_leave_torch_threads_alone():
    import torch

    from hardprobe.heads import fold_jobs
    X, y = make_classification(**HARD)
    before = torch.get_num_threads()
    serial, full_1 = cross_val_predict_proba(LinearProbe(), X, y, n_folds=4,
                                             return_estimator=True, n_jobs=1)
    parallel, full_3 = cross_val_predict_proba(LinearProbe(), X, y, n_folds=4,
                                               return_estimator=True, n_jobs=3)
    assert torch.get_num_threads() == before
    np.testing.assert_array_equal(parallel, serial)  # same fits, only run side by side
    np.testing.assert_array_equal(full_3.coef_, full_1.coef_)
    np.testing.assert_array_equal(full_1.coef_, LinearProbe().fit(X, y).coef_)
    # one per core, within the memory budget (12 bytes a value), at most folds + 1
    assert fold_jobs(5000, 2048, 5, cores=2) == 2
    assert fold_jobs(5000, 2048, 5, cores=16) == 6
    assert fold_jobs(48000, 2048, 5, cores=16) == 1  # 1.2 GB a fit: over the 1 GiB budget
    assert fold_jobs(48000, 2048, 5, cores=16, budget_bytes=4 << 30) == 3
