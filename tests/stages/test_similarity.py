"""Embedding similarity: CKA, train neighbours, class geometry, silhouette, 2-D maps, the stage."""
import json
import warnings

import numpy as np
import pandas as pd
import pytest
from conftest import make_folder
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import silhouette_score

import hardprobe
from hardprobe import pipeline
from hardprobe.config import build_config
from hardprobe.core.io import write_json
from hardprobe.rundir.run import save_array, write_examples
from hardprobe.stages import similarity as sim


# ------------------------------------------------------------------ helpers
def fake_run(path, feats: dict, labels: dict, class_names, ids=None, **cols):
    """A run dir with given features per split (no images): enough for load_run."""
    frames = []
    for split, X in feats.items():
        y = np.asarray(labels[split])
        frames.append(pd.DataFrame({
            "id": ids[split] if ids else [f"{split}/{i}.png" for i in range(len(X))],
            "split": split, "path": [f"{i}.png" for i in range(len(X))], "label": y,
            "label_name": [class_names[c] for c in y]}))
        save_array(path, split, "embedding", np.asarray(X, np.float32))
    ex = pd.concat(frames, ignore_index=True)
    for c, v in cols.items():
        ex[c] = v
    write_examples(path, ex)
    write_json(path / "provenance.json", {"dataset": {"class_names": list(class_names)}})
    return hardprobe.load_run(path)


def brute_neighbors(T, Q, k, self_rows=None):
    """Cosine top-k by a full (N_q, N_train) matrix and argsort."""
    Tn = T / np.linalg.norm(T, axis=1, keepdims=True)
    Qn = Q / np.linalg.norm(Q, axis=1, keepdims=True)
    S = Qn @ Tn.T
    if self_rows is not None:
        for i, r in enumerate(self_rows):
            if r >= 0:
                S[i, r] = -np.inf
    idx = np.argsort(-S, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(S, idx, 1), idx


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A classified run of 3 colour classes: 36 train and 12 test images."""
    root = tmp_path_factory.mktemp("sim")
    train, test = make_folder(root / "train", 12, 0), make_folder(root / "test", 4, 1)

    def cfg(out, **kw):
        return build_config(model="cifar_resnet20", random_init=True, data="imagefolder",
                            train=str(train), test=str(test), out=str(root / out),
                            cache_dir=str(root / "cache"), k=5, num_workers=0, **kw)
    with warnings.catch_warnings():  # "too few examples" for label issues: expected here
        warnings.simplefilter("ignore")
        out = pipeline.run(cfg("run"), progress=False)
    return out, cfg


# ------------------------------------------------------------------ CKA
def test_linear_cka_invariances():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 12))
    Q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    assert sim.linear_cka(X, X) == pytest.approx(1, abs=1e-12)
    assert sim.linear_cka(X, X @ Q) == pytest.approx(1, abs=1e-10)
    assert sim.linear_cka(X, 3.5 * X + rng.normal(size=12)) == pytest.approx(1, abs=1e-10)
    assert sim.linear_cka(X.astype(np.float32), X[:, :5]) < 1  # a projection loses geometry
    a, b = rng.normal(size=(2000, 8)), rng.normal(size=(2000, 8))
    assert sim.linear_cka(a, b) < 0.02  # independent: ~ D1*D2/N-ish, near 0


def test_linear_cka_matches_gram_hsic():
    rng = np.random.default_rng(1)
    X, Y = rng.normal(size=(15, 4)), rng.normal(size=(15, 7))
    Y[:, :2] += X[:, :2]  # some shared structure
    H = np.eye(15) - 1 / 15  # centring matrix

    def hsic(K, L):  # Gretton's biased HSIC up to the 1/(n-1)^2 factor, which cancels
        return np.trace(K @ H @ L @ H)
    K, L = X @ X.T, Y @ Y.T
    want = hsic(K, L) / np.sqrt(hsic(K, K) * hsic(L, L))
    assert sim.linear_cka(X, Y) == pytest.approx(want, rel=1e-10)


def test_linear_cka_validates():
    X = np.ones((5, 3))
    with pytest.raises(ValueError, match="same examples"):
        sim.linear_cka(np.zeros((4, 2)), np.zeros((5, 2)))
    with pytest.raises(ValueError, match="NaN"):
        sim.linear_cka(np.full((4, 2), np.nan), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="constant"):
        sim.linear_cka(X, np.arange(15.0).reshape(5, 3))


def test_cka_runs_same_images(tiny_run, tmp_path):
    out, cfg = tiny_run
    out2 = pipeline.extract(cfg("run2"), progress=False)  # same cache: same features
    assert sim.cka_runs(out, out2) == pytest.approx(1, abs=1e-9)
    # rows are matched by id, not position: a run with its test rows shuffled gives 1 too
    run = hardprobe.load_run(out)
    ex = run.split_examples("test").sample(frac=1, random_state=0)
    X = run.features("test")[ex.index.to_numpy()]
    other = fake_run(tmp_path / "shuf", {"test": X}, {"test": ex["label"]}, run.class_names,
                     ids={"test": ex["id"].tolist()})
    assert sim.cka_runs(run, other) == pytest.approx(1, abs=1e-9)


def test_cka_runs_id_mismatch(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(6, 4))
    a = fake_run(tmp_path / "a", {"test": X}, {"test": [0] * 6}, ["c"])
    b = fake_run(tmp_path / "b", {"test": X}, {"test": [0] * 6}, ["c"],
                 ids={"test": [f"test/{i}.png" for i in range(4)] + ["x", "y"]})
    with pytest.raises(ValueError, match="2 ids only in .*, 2 only in"):
        sim.cka_runs(a, b)


# ------------------------------------------------------------------ neighbours
def test_train_neighbors_matches_brute_force():
    rng = np.random.default_rng(0)
    T, Q = rng.normal(size=(50, 6)), rng.normal(size=(9, 6))
    s, i = sim.train_neighbors(T, Q, k=7)
    ws, wi = brute_neighbors(T, Q, 7)
    np.testing.assert_array_equal(i, wi)
    np.testing.assert_allclose(s, ws, atol=1e-6)
    # queries that are train rows never find themselves; others are unaffected
    Q2 = np.vstack([T[[3, 40]], Q[:2]])
    rows = np.array([3, 40, -1, -1])
    s, i = sim.train_neighbors(T, Q2, rows, k=7)
    ws, wi = brute_neighbors(T, Q2, 7, rows)
    np.testing.assert_array_equal(i, wi)
    np.testing.assert_allclose(s, ws, atol=1e-6)
    assert not (i == rows[:, None]).any()
    with pytest.raises(ValueError, match="k=50"):
        sim.train_neighbors(T, Q2, rows, k=50)


def test_nearest_train_neighbors_on_a_run(tmp_path):
    rng = np.random.default_rng(2)
    T, E = rng.normal(size=(30, 5)), rng.normal(size=(8, 5))
    yt = rng.integers(0, 3, 30)
    run = fake_run(tmp_path, {"train": T, "test": E}, {"train": yt, "test": [1] * 8},
                   ["a", "b", "c"])
    ids = ["test/5.png", "train/7.png", "test/0.png"]
    df = sim.nearest_train_neighbors(run, ids, k=4)
    assert list(df.columns) == ["query_id", "rank", "neighbor_id", "neighbor_label",
                                "neighbor_label_name", "similarity"]
    assert df["query_id"].tolist() == [q for q in ids for _ in range(4)]
    assert df["rank"].tolist() == [1, 2, 3, 4] * 3
    ws, wi = brute_neighbors(T, np.vstack([E[5], T[7], E[0]]), 4, [-1, 7, -1])
    assert df["neighbor_id"].tolist() == [f"train/{j}.png" for j in wi.ravel()]
    np.testing.assert_array_equal(df["neighbor_label"], yt[wi.ravel()])
    assert df["neighbor_label_name"].tolist() == [["a", "b", "c"][c] for c in yt[wi.ravel()]]
    np.testing.assert_allclose(df["similarity"], ws.ravel(), atol=1e-6)
    with pytest.raises(ValueError, match="not in"):
        sim.nearest_train_neighbors(run, ["nope"], k=2)


# ------------------------------------------------------------------ class geometry
# Hand example (2-D). Unit vectors: class 0 = (1,0), (0,1); class 1 = (-1,0), (-1,0) (from
# (-2,0)); class 2 = (0,1) (from (0,3)). Centroids: c0 = (1,1)/sqrt2, c1 = (-1,0), c2 = (0,1).
# Cosines: c0.c1 = -1/sqrt2, c0.c2 = 1/sqrt2, c1.c2 = 0.
# intra_mean: class 0 = mean(cos(45 deg), cos(45 deg)) = 1/sqrt2; classes 1, 2 = 1.
# nearest: 0 -> 2 (1/sqrt2), margin 1/sqrt2 - 1/sqrt2 = 0; 1 -> 2 (0, beats -1/sqrt2),
# margin 1; 2 -> 0 (1/sqrt2), margin 1 - 1/sqrt2.
HAND_X = np.array([[1, 0], [0, 1], [-1, 0], [-2, 0], [0, 3]], float)
HAND_Y = np.array([0, 0, 1, 1, 2])
R = 1 / np.sqrt(2)


def test_centroids_and_similarity_by_hand():
    c = sim.class_centroids(HAND_X, HAND_Y, 3)
    np.testing.assert_allclose(c, [[R, R], [-1, 0], [0, 1]])
    np.testing.assert_allclose(sim.centroid_similarity(c), [[1, -R, R], [-R, 1, 0], [R, 0, 1]],
                               atol=1e-12)
    c4 = sim.class_centroids(HAND_X, HAND_Y, 4)  # an absent class gets NaN
    assert np.isnan(c4[3]).all()


def test_class_separation_by_hand():
    df = sim.class_separation(HAND_X, HAND_Y, ["a", "b", "c"])
    assert list(df.columns) == ["class", "n", "intra_mean", "nearest_class", "nearest_sim",
                                "margin"]
    assert df["n"].tolist() == [2, 2, 1]
    np.testing.assert_allclose(df["intra_mean"], [R, 1, 1])
    assert df["nearest_class"].tolist() == ["c", "c", "a"]
    np.testing.assert_allclose(df["nearest_sim"], [R, 0, R], atol=1e-12)
    np.testing.assert_allclose(df["margin"], [0, 1, 1 - R], atol=1e-12)
    df4 = sim.class_separation(HAND_X, HAND_Y, ["a", "b", "c", "d"])
    assert np.isnan(df4.loc[3, "intra_mean"]) and pd.isna(df4.loc[3, "nearest_class"])
    assert df4.loc[0, "nearest_class"] == "c"  # the absent class is never anyone's nearest


def test_silhouette_matches_sklearn():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(80, 5)) + np.repeat(np.eye(5)[:2] * 3, 40, axis=0)
    y = np.repeat([0, 1], 40)
    r = sim.silhouette(X, y)
    assert r["silhouette"] == pytest.approx(silhouette_score(X, y, metric="cosine"))
    assert r["n_used"] == 80 and not r["sampled"] and r["reason"] is None
    r = sim.silhouette(X, y, sample_size=30, seed=3)
    assert r["n_used"] == 30 and r["sampled"] and -1 <= r["silhouette"] <= 1
    assert r == sim.silhouette(X, y, sample_size=30, seed=3)
    one = sim.silhouette(X, np.zeros(80, int))
    assert one["silhouette"] is None and "1 classes" in one["reason"]


# ------------------------------------------------------------------ 2-D map
def blobs(n=60, d=10, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], n // 2)
    centers = np.zeros((2, d))
    centers[0, 0], centers[1, 1] = 5, 5
    return centers[y] + rng.normal(scale=0.5, size=(n, d)), y


@pytest.mark.parametrize("method", ["tsne", "pca"])
def test_embedding_map_separates_blobs(method):
    X, y = blobs()
    xy = sim.embedding_map(X, method=method, seed=0)
    assert xy.shape == (60, 2) and xy.dtype == np.float32 and np.isfinite(xy).all()
    np.testing.assert_array_equal(xy, sim.embedding_map(X, method=method, seed=0))
    assert LogisticRegression().fit(xy, y).score(xy, y) == 1.0


def test_embedding_map_samples_beyond_max_points():
    X, y = blobs(n=80, d=60)  # d > pca_dim: PCA first
    xy, info = sim.embedding_map(X, max_points=50, pca_dim=20, seed=1, return_info=True)
    assert xy.shape == (80, 2) and info["fitted"].sum() == 50
    assert any("sample of 50 of 80" in n for n in info["notes"])
    assert LogisticRegression().fit(xy, y).score(xy, y) == 1.0  # placed points join their blob
    with pytest.raises(ValueError, match="method"):
        sim.embedding_map(X, method="umap")


# ------------------------------------------------------------------ the stage
def test_similarity_run_end_to_end(tiny_run):
    out, _ = tiny_run
    folder = sim.similarity_run(out, top=3, k=4, progress=False)
    run = hardprobe.load_run(out)
    test = run.split_examples("test")
    assert folder == out / "similarity"
    nb = pd.read_parquet(folder / "neighbors.parquet")
    assert {"query_id", "rank", "neighbor_id", "neighbor_label", "neighbor_label_name",
            "similarity", "query_label", "query_hardness", "selected_by"} <= set(nb.columns)
    n_q = nb["query_id"].nunique()
    assert len(nb) == 4 * n_q and n_q >= 3 and nb["neighbor_id"].str.startswith("train/").all()
    hardest = test.sort_values("hardness", ascending=False, kind="stable")["id"][:3]
    assert set(hardest) <= set(nb["query_id"])
    assert set(nb.loc[nb["query_label_issue"], "query_id"]) == set(test.loc[test["label_issue"],
                                                                            "id"])
    cs = pd.read_csv(folder / "centroid_similarity.csv", index_col=0)
    assert cs.shape == (3, 3) and list(cs.columns) == list(cs.index) == ["cat", "dog", "frog"]
    np.testing.assert_allclose(np.diag(cs), 1, atol=1e-9)
    sep = pd.read_csv(folder / "class_separation.csv")
    assert sep["class"].tolist() == ["cat", "dog", "frog"] and "margin" in sep
    m = pd.read_parquet(folder / "map2d.parquet")
    assert m.columns.tolist()[:3] == ["id", "x", "y"] and len(m) == len(test)
    assert {"label", "hardness", "label_issue"} <= set(m.columns)
    assert m["id"].tolist() == test["id"].tolist()
    s = json.loads((folder / "summary.json").read_text())
    assert s["n_points"] == 12 and s["map"]["method"] == "tsne" and "silhouette" in s
    assert s["seconds"]["total"] >= 0 and not list(folder.glob(".*.tmp"))


def test_similarity_run_needs_hardness(tmp_path):
    rng = np.random.default_rng(0)
    fake_run(tmp_path, {"train": rng.normal(size=(10, 3)), "test": rng.normal(size=(4, 3))},
             {"train": [0, 1] * 5, "test": [0, 1] * 2}, ["a", "b"])
    with pytest.raises(ValueError, match="hardprobe classify"):
        sim.similarity_run(tmp_path, progress=False)


def test_similarity_run_caps_k_issues_and_uses_pca(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    hardness = np.r_[np.zeros(5), 0.9, 0.8, 0.1, 0.2, 0.3, 0.4]  # test rows: 0.9, 0.8 hardest
    fake_run(tmp_path, {"train": rng.normal(size=(5, 3)), "test": rng.normal(size=(6, 3))},
             {"train": [0, 1, 0, 1, 0], "test": [0, 1] * 3}, ["a", "b"],
             hardness=hardness, label_issue=[False] * 6 + [True] * 5)
    monkeypatch.setattr(sim, "ISSUE_CAP", 3)
    folder = sim.similarity_run(tmp_path, top=2, k=8, map_method="pca", progress=False)
    s = json.loads((folder / "summary.json").read_text())
    assert s["k"] == 5 and any("k lowered" in n for n in s["notes"])
    assert s["map"]["method"] == "pca" and s["n_queries"] == 4
    nb = pd.read_parquet(folder / "neighbors.parquet")
    assert len(nb) == 4 * 5
    by = nb.drop_duplicates("query_id").set_index("query_id")["selected_by"]
    # the 3 hardest flagged test rows are 1 (0.8), 5 (0.4) and 4 (0.3); row 0 is hardest only
    assert by.to_dict() == {"test/0.png": "hardest", "test/1.png": "hardest+label_issue",
                            "test/5.png": "label_issue", "test/4.png": "label_issue"}
