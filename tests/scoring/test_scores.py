"""Tests for hardprobe.scores: hand-computed values, cleanlab/sklearn cross-checks, properties."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import confusion_matrix as sk_confusion_matrix
from sklearn.model_selection import cross_val_predict

from hardprobe.scoring import scores as S

# ----------------------------------------------------------------------------- hand-computed
# 3 classes, 4 examples.
P3 = np.array([[0.7, 0.2, 0.1],
               [0.2, 0.5, 0.3],
               [1 / 3, 1 / 3, 1 / 3],
               [0.0, 0.0, 1.0]])
Y3 = np.array([0, 2, 1, 0])


def test_prob_true_hand():
    # row0 label0 -> .7; row1 label2 -> .3; row2 label1 -> 1/3; row3 label0 -> 0
    np.testing.assert_allclose(S.prob_true(P3, Y3), [0.7, 0.3, 1 / 3, 0.0])


def test_margin_hand():
    # row0: .7 - max(.2,.1) = .5; row1: .3 - max(.2,.5) = -.2 (misclassified)
    # row2: 1/3 - 1/3 = 0;  row3: 0 - max(0, 1) = -1
    np.testing.assert_allclose(S.margin(P3, Y3), [0.5, -0.2, 0.0, -1.0], atol=1e-12)


def test_entropy_hand():
    # row0: -(.7 ln .7 + .2 ln .2 + .1 ln .1) = .24967 + .32189 + .23026 = 0.801819 nats
    #       / ln 3 (1.098612) = 0.729847
    # row1: -(.2 ln .2 + .5 ln .5 + .3 ln .3) = .32189 + .34657 + .36119 = 1.029653 -> 0.937231
    # row2: uniform -> ln 3 -> 1;  row3: one-hot -> 0 (0 * log 0 = 0)
    np.testing.assert_allclose(S.entropy(P3), [0.729847, 0.937231, 1.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(S.entropy(P3, normalize=False),
                               [0.801819, 1.029653, np.log(3), 0.0], atol=1e-6)


@pytest.mark.parametrize("c", [2, 3, 10, 1000])
def test_entropy_uniform_and_one_hot(c):
    assert S.entropy(np.full((1, c), 1 / c))[0] == pytest.approx(1.0)
    np.testing.assert_array_equal(S.entropy(np.eye(c)), np.zeros(c))


def test_predicted_ties_lowest_index():
    # row2 is a 3-way tie -> 0; [0, .5, .5] -> 1
    np.testing.assert_array_equal(S.predicted(np.vstack([P3, [0, 0.5, 0.5]])), [0, 1, 0, 2, 1])


def test_knn_disagreement_hand():
    nb = np.array([[0, 0, 1], [2, 2, 2], [0, 1, 2]])
    # own labels 0, 1, 2 -> 1 of 3 differ, 3 of 3, 2 of 3
    np.testing.assert_allclose(S.knn_disagreement(nb, [0, 1, 2]), [1 / 3, 1.0, 2 / 3])


def test_hardness_hand():
    heads = {"linear": np.array([0.7, 0.3]), "knn": np.array([0.9, 0.1])}
    # mean prob_true = [.8, .2] -> head term 1 - . = [.2, .8]
    np.testing.assert_allclose(S.hardness(heads), [0.2, 0.8])
    # with d = [.5, 1]: ([.2 + .5] / 2, [.8 + 1] / 2) = [.35, .9]
    np.testing.assert_allclose(S.hardness(heads, np.array([0.5, 1.0])), [0.35, 0.9])
    np.testing.assert_allclose(S.hardness({"only": np.array([0.0, 1.0])}, None), [1.0, 0.0])


def test_accuracy_hand():
    assert S.accuracy([0, 1, 2, 2], [0, 2, 2, 2]) == pytest.approx(0.75)


# ----------------------------------------------------------------------------- confusion
def test_confusion_matrix_matches_sklearn():
    rng = np.random.default_rng(0)
    y, yhat = rng.integers(0, 4, 300), rng.integers(0, 4, 300)  # class 4 never used
    ours = S.confusion_matrix(y, yhat, 5)
    np.testing.assert_array_equal(ours, sk_confusion_matrix(y, yhat, labels=range(5)))
    assert ours.shape == (5, 5) and ours.sum() == 300
    # rows = true: 3 true-0 examples, two predicted 1
    np.testing.assert_array_equal(S.confusion_matrix([0, 0, 0, 1], [0, 1, 1, 1], 2), [[1, 2], [0, 1]])


def test_confused_pairs_hand():
    cm = np.array([[5, 3, 0],   # cat: 3 predicted dog
                   [1, 6, 2],   # dog: 1 predicted cat, 2 predicted frog
                   [0, 0, 4]])
    # errors = 3 + 1 + 2 = 6; (cat,dog) total 4 share 4/6; (dog,frog) total 2 share 2/6;
    # (cat,frog) total 0 -> dropped
    df = S.confused_pairs(cm, ["cat", "dog", "frog"])
    assert list(df.columns) == ["class_a", "class_b", "a_as_b", "b_as_a", "total", "share"]
    assert df[["class_a", "class_b"]].values.tolist() == [["cat", "dog"], ["dog", "frog"]]
    assert df["a_as_b"].tolist() == [3, 2] and df["b_as_a"].tolist() == [1, 0]
    assert df["total"].tolist() == [4, 2]
    np.testing.assert_allclose(df["share"], [4 / 6, 2 / 6])
    assert len(S.confused_pairs(cm, ["cat", "dog", "frog"], top=1)) == 1
    empty = S.confused_pairs(np.diag([3, 4]), ["a", "b"])
    assert empty.empty and list(empty.columns) == list(df.columns)


# ----------------------------------------------------------------------------- calibration
# 3 classes, 2 bins (0, .5] and (.5, 1]:
#   conf .4 correct, .45 wrong            -> bin 0: n=2, conf .425, acc .5, gap .075
#   conf .9 correct, .8 wrong, .7 correct -> bin 1: n=3, conf .8,  acc 2/3, gap .13333
#   ECE = 2/5 * .075 + 3/5 * .13333 = .03 + .08 = .11
PC = np.array([[0.4, 0.3, 0.3], [0.2, 0.45, 0.35], [0.9, 0.05, 0.05],
               [0.1, 0.8, 0.1], [0.1, 0.2, 0.7]])
YC = np.array([0, 2, 0, 0, 2])


def test_ece_hand_two_bins():
    assert S.expected_calibration_error(PC, YC, n_bins=2) == pytest.approx(0.11)
    assert S.expected_calibration_error(np.eye(3), [0, 1, 2]) == 0.0  # confident and right


def test_reliability_table_hand():
    t = S.reliability_table(PC, YC, n_bins=2)
    assert list(t.columns) == ["bin", "lower", "upper", "confidence", "accuracy", "count"]
    assert t["count"].tolist() == [2, 3]
    np.testing.assert_allclose(t["confidence"], [0.425, 0.8])
    np.testing.assert_allclose(t["accuracy"], [0.5, 2 / 3])
    # bins are (lower, upper]: a confidence of exactly .5 lands in bin 0; empty bins -> NaN
    t4 = S.reliability_table([[0.5, 0.5]], [0], n_bins=4)
    assert t4["count"].tolist() == [0, 1, 0, 0] and t4["confidence"].isna().sum() == 3


# ----------------------------------------------------------------------------- label issues
def _planted_noise(seed=0, n=800, c=4, noise=0.1):
    """Gaussian blobs, 10% labels flipped, out-of-sample probs from 5-fold logistic regression."""
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, c, n)
    x = rng.normal(size=(n, 2)) + 3.0 * np.stack([np.cos(2 * np.pi * y_true / c),
                                                   np.sin(2 * np.pi * y_true / c)], axis=1)
    flip = rng.random(n) < noise
    y = y_true.copy()
    y[flip] = (y[flip] + rng.integers(1, c, flip.sum())) % c
    probs = cross_val_predict(LogisticRegression(), x, y, cv=5, method="predict_proba")
    return probs, y, flip


@pytest.fixture(scope="module")
def planted():
    return _planted_noise()


@pytest.mark.parametrize("filter_by", ["prune_by_noise_rate", "both", "confident_learning"])
def test_label_issues_matches_cleanlab_and_finds_flips(planted, filter_by):
    from cleanlab.filter import find_label_issues

    probs, y, flip = planted
    mask = S.label_issues(probs, y, filter_by=filter_by)
    assert mask.dtype == bool and mask.shape == y.shape
    np.testing.assert_array_equal(mask, find_label_issues(y, probs, filter_by=filter_by))
    precision, recall = flip[mask].mean(), mask[flip].mean()
    assert precision > 5 * flip.mean()  # chance precision is the noise rate (~10%)
    assert recall > 0.5


def test_label_quality_is_self_confidence(planted):
    probs, y, flip = planted
    q = S.label_quality(probs, y)
    np.testing.assert_allclose(q, S.prob_true(probs, y))
    assert q[flip].mean() < q[~flip].mean()  # lower = more likely mislabeled


def test_label_issues_absent_classes(planted):
    from cleanlab.filter import find_label_issues

    probs, y, _ = planted
    keep = y != 3  # e.g. a test split that lacks the last class
    with pytest.warns(UserWarning, match=r"classes never appear in labels \(\[3\]\)") as rec:
        mask = S.label_issues(probs[keep], y[keep])
    assert not any("May not flag all label issues in class: 3" in str(w.message) for w in rec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.testing.assert_array_equal(mask, find_label_issues(y[keep], probs[keep]))
    # cleanlab itself needs a column for every label index it sees
    with pytest.raises(ValueError):
        find_label_issues(np.array([0, 1, 2] * 5), np.full((15, 2), 0.5))


@pytest.mark.parametrize("labels, match", [
    (np.zeros(40, int), "only 1 distinct class"),
    (np.array([0, 1, 2] * 4), r"too few examples \(N=12 < 5 x 3"),
])
def test_label_issues_degenerate_all_false_with_warning(labels, match):
    probs = np.full((len(labels), 3), 1 / 3)
    with pytest.warns(UserWarning, match=match):
        mask = S.label_issues(probs, labels)
    assert mask.dtype == bool and mask.shape == labels.shape and not mask.any()


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("probs, match", [
    (np.array([[np.nan, 1.0], [0.5, np.inf], [0.5, 0.5]]), "2 of 3 rows contain NaN or inf"),
    (np.array([[1.2, -0.2], [0.5, 0.5]]), r"1 of 2 rows have values outside \[0, 1\] \(first bad row: 0\)"),
    (np.array([[0.5, 0.5], [0.3, 0.3], [0.1, 0.1]]), "2 of 3 rows do not sum to 1"),
    (np.array([0.5, 0.5]), "2-D"),
    (np.ones((3, 1)), "2 columns"),
    (np.array([["a", "b"]]), "float"),
])
def test_probs_validation(probs, match):
    with pytest.raises(ValueError, match=match):
        S.prob_true(probs, np.zeros(len(probs), int))


@pytest.mark.parametrize("labels, match", [
    (np.array([0, 3, 1, 0]), r"labels: 1 of 4 values outside \[0, 3\) \(e.g. 3 at index 1\)"),
    (np.array([0, 1]), "2 entries but 4 were expected"),
    (np.array([0.0, 1.0, 2.0, 0.0]), "must hold integers"),
])
def test_labels_validation(labels, match):
    with pytest.raises(ValueError, match=match):
        S.margin(P3, labels)


def test_other_validation():
    with pytest.raises(ValueError, match="non-empty dict"):
        S.hardness({})
    with pytest.raises(ValueError, match="must be 1-D with 2 entries"):
        S.hardness({"a": np.array([0.1, 0.2]), "b": np.array([0.1])})
    with pytest.raises(ValueError, match=r"knn_disagreement: 1 of 2 values are not finite numbers in \[0, 1\]"):
        S.hardness({"a": np.array([0.1, 0.2])}, np.array([0.5, 1.5]))
    with pytest.raises(ValueError, match="filter_by must be one of"):
        S.label_issues(P3, Y3, filter_by="nope")
    with pytest.raises(ValueError, match=r"preds: 1 of 2 values outside \[0, 2\)"):
        S.confusion_matrix([0, 1], [0, 2], 2)
    with pytest.raises(ValueError, match="class_names has 2 names but cm has 3"):
        S.confused_pairs(np.eye(3), ["a", "b"])
    with pytest.raises(ValueError, match="neighbor_labels must be 2-D"):
        S.knn_disagreement(np.array([0, 1]), [0, 1])
    with pytest.raises(ValueError, match="n_bins must be >= 1"):
        S.expected_calibration_error(P3, Y3, n_bins=0)


# ----------------------------------------------------------------------------- properties
@st.composite
def probs_labels(draw, max_n=12, max_c=6):
    n, c = draw(st.integers(1, max_n)), draw(st.integers(2, max_c))
    w = draw(hnp.arrays(np.float64, (n, c),
                        elements=st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0))))
    hot = draw(hnp.arrays(np.int64, n, elements=st.integers(0, c - 1)))
    w[w.sum(axis=1) == 0, :] = 0.0
    w[np.arange(n)[w.sum(axis=1) == 0], hot[w.sum(axis=1) == 0]] = 1.0  # all-zero row -> one-hot
    p = w / w.sum(axis=1, keepdims=True)
    assume(np.all(np.abs(p.sum(axis=1) - 1) < 1e-9))
    y = draw(hnp.arrays(np.int64, n, elements=st.integers(0, c - 1)))
    return p, y


class _Strict:
    """No warnings and no numpy floating-point errors (underflow aside) inside the block."""

    def __enter__(self):
        self._w, self._e = warnings.catch_warnings(), np.errstate(all="raise", under="ignore")
        self._w.__enter__()
        warnings.simplefilter("error")
        self._e.__enter__()

    def __exit__(self, *exc):
        self._e.__exit__(*exc)
        return self._w.__exit__(*exc)


FAST = settings(max_examples=50, deadline=None)


@FAST
@given(probs_labels(), st.data())
def test_property_ranges(pl, data):
    p, y = pl
    n, c = p.shape
    k = data.draw(st.integers(1, 5))
    nb = data.draw(hnp.arrays(np.int64, (n, k), elements=st.integers(0, c - 1)))
    with _Strict():
        pt, m = S.prob_true(p, y), S.margin(p, y)
        h, hr = S.entropy(p), S.entropy(p, normalize=False)
        pred, d = S.predicted(p), S.knn_disagreement(nb, y)
        hard = S.hardness({"a": pt, "b": S.prob_true(p[:, ::-1].copy(), c - 1 - y)}, d)
        ece, table = S.expected_calibration_error(p, y), S.reliability_table(p, y)
        acc = S.accuracy(y, pred)
        cm = S.confusion_matrix(y, pred, c)
    for arr, lo, hi in [(pt, 0, 1), (m, -1, 1), (h, 0, 1), (hr, 0, np.log(c)), (d, 0, 1),
                        (hard, 0, 1)]:
        assert arr.shape == (n,) and np.all(np.isfinite(arr))
        assert np.all((arr >= lo) & (arr <= hi))
    assert np.all((pred >= 0) & (pred < c))
    assert np.all(pred[m > 0] == y[m > 0]) and np.all(pred[m < 0] != y[m < 0])
    assert 0.0 <= ece <= 1.0 and table["count"].sum() == n
    assert 0.0 <= acc <= 1.0 and cm.sum() == n and np.trace(cm) == round(acc * n)


@FAST
@given(probs_labels(), st.randoms(use_true_random=False))
def test_property_class_permutation_invariance(pl, rnd):
    p, y = pl
    c = p.shape[1]
    perm = np.array(rnd.sample(range(c), c))  # new column j holds old class perm[j]
    inv = np.argsort(perm)                    # old class k is now called inv[k]
    p2, y2 = p[:, perm], inv[y]
    np.testing.assert_array_equal(S.prob_true(p2, y2), S.prob_true(p, y))
    np.testing.assert_array_equal(S.margin(p2, y2), S.margin(p, y))
    np.testing.assert_allclose(S.entropy(p2), S.entropy(p), atol=1e-12)
    np.testing.assert_allclose(S.entropy(p2, normalize=False), S.entropy(p, normalize=False), atol=1e-12)
    d = np.linspace(0, 1, len(y))
    np.testing.assert_array_equal(S.hardness({"h": S.prob_true(p2, y2)}, d),
                                  S.hardness({"h": S.prob_true(p, y)}, d))


@FAST
@given(st.integers(2, 8), hnp.arrays(np.int64, st.integers(1, 10), elements=st.integers(0, 7)),
       st.data())
def test_property_exact_zero_one(c, hot, data):
    hot = hot % c
    p = np.eye(c)[hot]
    y = data.draw(hnp.arrays(np.int64, len(hot), elements=st.integers(0, c - 1)))
    right = y == hot
    with _Strict():
        pt, m, h = S.prob_true(p, y), S.margin(p, y), S.entropy(p)
        ece = S.expected_calibration_error(p, y)
        hard = S.hardness({"h": pt}, S.knn_disagreement(hot[:, None], y))
    np.testing.assert_array_equal(pt, right.astype(float))
    np.testing.assert_array_equal(m, np.where(right, 1.0, -1.0))
    np.testing.assert_array_equal(h, np.zeros(len(y)))
    np.testing.assert_array_equal(hard, np.where(right, 0.0, 1.0))
    assert ece == pytest.approx(1 - right.mean())  # all confidence 1, accuracy = share right


@FAST
@given(hnp.arrays(np.int64, st.integers(1, 60), elements=st.integers(0, 5)), st.data())
def test_property_confusion_matches_sklearn(y, data):
    yhat = data.draw(hnp.arrays(np.int64, len(y), elements=st.integers(0, 5)))
    np.testing.assert_array_equal(S.confusion_matrix(y, yhat, 6),
                                  sk_confusion_matrix(y, yhat, labels=range(6)))
    df = S.confused_pairs(S.confusion_matrix(y, yhat, 6), list("abcdef"), top=None)
    assert (df["total"] > 0).all() and df["total"].is_monotonic_decreasing
    assert df["total"].sum() == (y != yhat).sum()
    if len(df):
        assert df["share"].sum() == pytest.approx(1.0)


def test_module_imports_are_light():
    # scores must not import torch at all, and cleanlab only lazily (it takes ~2 s to import)
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(S))
    top = {a.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for a in node.names}
    top |= {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom) and node.module}
    assert not top & {"torch", "torchvision", "timm", "cleanlab"}


def test_detection_counts_by_hand():
    truth = np.array([1, 1, 0, 0, 0, 1, 0, 0], bool)
    flagged = np.array([1, 0, 1, 0, 0, 1, 0, 0], bool)
    score = np.array([.9, .2, .8, .1, .0, .7, .3, .4])
    d = S.detection(truth, flagged, score)
    assert (d["planted"], d["flagged"], d["caught"]) == (3, 3, 2)
    assert d["recall"] == pytest.approx(2 / 3) and d["precision"] == pytest.approx(2 / 3)
    assert d["base_rate"] == pytest.approx(3 / 8)
    # top 3 by score: .9 (t), .8 (f), .7 (t) -> 2/3. AUC over 3 x 5 pairs: .9 beats all 5
    # negatives, .7 beats 4 (not .8), .2 beats 2 (.1, .0) -> 11/15
    assert d["precision_at_planted"] == pytest.approx(2 / 3)
    assert d["auroc"] == pytest.approx(11 / 15)
    nothing = S.detection(np.zeros(4, bool), np.zeros(4, bool), np.zeros(4))
    assert nothing["recall"] is None and nothing["precision"] is None and nothing["auroc"] is None
    with pytest.raises(ValueError, match="one length"):
        S.detection(truth, flagged[:3])
