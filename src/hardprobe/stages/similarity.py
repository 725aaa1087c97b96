"""Embedding-space similarity: train neighbours, class geometry, silhouette, CKA, 2-D maps.

Conventions. "Similarity" is the cosine similarity of L2-normalised embeddings, in [-1, 1],
higher = more alike (zero embeddings stay zero: similarity 0 to everything). Pure functions
take (N, D) arrays; `similarity_run` is the stage that writes RUN_DIR/similarity/:

    neighbors.parquet         k nearest train examples of the hardest / label-issue examples
    centroid_similarity.csv   (C, C) cosine similarity of class centroids, class names on both axes
    class_separation.csv      per class: intra_mean, nearest_class, nearest_sim, margin
    map2d.parquet             2-D map (t-SNE or PCA) of every example of the split
    summary.json              silhouette, map settings, sizes, seconds, notes
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.io import atomic_write, atomic_write_text, write_json
from ..errors import ConfigError
from ..heads.knn import (
    KNNClassifier,
    _check_features,
    _check_labels,
    _resolve_n_classes,
)
from ..rundir.layout import require
from ..rundir.run import Run, load_run

log = logging.getLogger(__name__)

TRAIN = "train"
OUT_DIR = "similarity"
ISSUE_CAP = 200  # at most this many label-issue examples get neighbour lists
_MAP_METHODS = ("tsne", "pca")

__all__ = ["nearest_train_neighbors", "train_neighbors", "class_centroids", "centroid_similarity",
           "class_separation", "silhouette", "linear_cka", "cka_runs", "embedding_map",
           "similarity_run"]


# ------------------------------------------------------------------ neighbours
def train_neighbors(X_train, Q, self_rows=None, *, k=8):
    """Top-k cosine neighbours of queries Q (N_q, D) among X_train (N_train, D).

    self_rows (N_q,) int: the train row that query i *is*, or -1; that row never appears in
    query i's list. Returns (sims (N_q, k) float32, most similar first, idx (N_q, k) int64).
    """
    n_train = len(X_train)
    self_rows = np.full(len(Q), -1) if self_rows is None else np.asarray(self_rows)
    extra = int((self_rows >= 0).any())  # search one more when a query may find itself
    if not 1 <= k <= n_train - extra:
        raise ConfigError(f"k={k} must be in [1, {n_train - extra}] for {n_train} train examples"
                         + (" when a train example is a query" if extra else ""))
    knn = KNNClassifier(k=k + extra).fit(X_train, np.zeros(n_train, np.int64), n_classes=1)
    sims, idx = knn.kneighbors(Q)  # (N_q, k + extra)
    if not extra:
        return sims, idx
    keep = idx != self_rows[:, None]  # (N_q, k + 1): False at the query itself
    keep[keep.all(1), -1] = False  # the query was not in its list: drop the (k+1)-th instead
    return sims[keep].reshape(len(Q), k), idx[keep].reshape(len(Q), k)


def nearest_train_neighbors(run, ids, *, k=8) -> pd.DataFrame:
    """For each query id (any split), its k most cosine-similar TRAIN examples.

    One row per (query, rank), queries in the order of `ids`: query_id, rank (1 = most
    similar), neighbor_id, neighbor_label, neighbor_label_name, similarity (cosine, higher =
    closer, non-increasing with rank). A train query never returns itself (matched by row,
    so an exact duplicate image of it can still appear, with similarity 1).
    """
    run = _as_run(run)
    ids = list(ids)
    train = run.split_examples(TRAIN)
    Q, self_rows = _query_features(run, ids)  # (N_q, D), (N_q,)
    sims, idx = train_neighbors(run.features(TRAIN), Q, self_rows, k=k)  # (N_q, k)
    nb = train.iloc[idx.ravel()]
    return pd.DataFrame({
        "query_id": np.repeat(np.array(ids, dtype=object), k),
        "rank": np.tile(np.arange(1, k + 1), len(ids)),
        "neighbor_id": nb["id"].to_numpy(), "neighbor_label": nb["label"].to_numpy(),
        "neighbor_label_name": nb["label_name"].to_numpy(), "similarity": sims.ravel(),
    })


def _query_features(run: Run, ids: list):
    """(features (N_q, D) float32 of the examples with these ids, their train row or -1)."""
    ex = run.examples
    where = pd.DataFrame({"split": ex["split"].to_numpy(),
                          "pos": ex.groupby("split", sort=False).cumcount().to_numpy()},
                         index=pd.Index(ex["id"]))
    missing = [i for i in ids if i not in where.index]
    if missing:
        raise ConfigError(f"{len(missing)} ids are not in {run.path}: {missing[:5]}")
    rows = where.loc[ids] if ids else where.iloc[:0]
    split, pos = rows["split"].to_numpy(), rows["pos"].to_numpy()
    Q = np.zeros((len(ids), run.features(TRAIN, mmap=True).shape[1]), np.float32)
    for s in set(split):
        Q[split == s] = run.features(s, mmap=True)[pos[split == s]]
    return Q, np.where(split == TRAIN, pos, -1)


# ------------------------------------------------------------------ class geometry
def _unit(X) -> np.ndarray:
    """(N, D) float64 rows scaled to unit length; zero rows stay zero."""
    X = np.asarray(X, dtype=np.float64)
    n = np.linalg.norm(X, axis=1, keepdims=True)
    return np.divide(X, n, out=np.zeros_like(X), where=n > 0)


def class_centroids(X, y, n_classes=None) -> np.ndarray:
    """(C, D) float64 unit centroids: per class the mean of its unit-length features,
    renormalised to unit length. A class with no examples gets a NaN row."""
    X = _check_features(X)
    y = _check_labels(y, len(X))
    n_classes = _resolve_n_classes(y, n_classes)
    sums = np.zeros((n_classes, X.shape[1]))
    np.add.at(sums, y, _unit(X))  # (C, D) sums of unit vectors
    cent = _unit(sums)
    cent[np.bincount(y, minlength=n_classes) == 0] = np.nan
    return cent


def centroid_similarity(centroids) -> np.ndarray:
    """(C, C) cosine similarity of (unit) centroids in [-1, 1]; 1 on the diagonal, NaN for
    an absent class."""
    c = np.asarray(centroids, dtype=np.float64)
    return np.clip(c @ c.T, -1.0, 1.0)


def class_separation(X, y, class_names) -> pd.DataFrame:
    """Per class (one row each, in class order): class, n,
    intra_mean   mean over the class's examples of cos(x_i, own centroid); equals the length
                 of the mean unit vector, in [0, 1]; higher = tighter class,
    nearest_class / nearest_sim   the other class whose centroid is most cosine-similar to
                 this one, and that similarity in [-1, 1]; higher = closer neighbour class,
    margin       intra_mean - nearest_sim; higher = better separated (< 0: the nearest
                 centroid is closer to this centroid than the class's own examples are).
    NaN where undefined (absent class; no other class present)."""
    y = np.asarray(y)
    cent = class_centroids(X, y, len(class_names))  # (C, D)
    sim = centroid_similarity(cent)  # (C, C)
    n = np.bincount(y, minlength=len(class_names))  # (C,)
    cos = np.einsum("nd,nd->n", _unit(X), cent[y])  # (N,) cos(x_i, centroid of its class)
    intra = np.divide(np.bincount(y, cos, len(n)), n, out=np.full(len(n), np.nan), where=n > 0)
    other = np.where(np.eye(len(n), dtype=bool) | np.isnan(sim), -np.inf, sim)  # (C, C)
    j = other.argmax(1)
    near = other[np.arange(len(n)), j]
    has = np.isfinite(near) & (n > 0)
    return pd.DataFrame({
        "class": list(class_names), "n": n, "intra_mean": intra,
        "nearest_class": [class_names[i] if h else None for i, h in zip(j, has)],
        "nearest_sim": np.where(has, near, np.nan),
        "margin": np.where(has, intra - near, np.nan),
    })


def silhouette(X, y, *, metric="cosine", sample_size=5000, seed=0) -> dict:
    """sklearn's silhouette score (in [-1, 1], higher = classes better separated) on at most
    `sample_size` examples drawn uniformly with `seed`. Returns {"silhouette": float or None,
    "reason": why None, "metric", "n_used", "sampled"}."""
    from sklearn.metrics import silhouette_score
    X = _check_features(X)
    y = _check_labels(y, len(X))
    rows = np.arange(len(X))
    if len(X) > sample_size:
        rows = np.sort(np.random.default_rng(seed).choice(len(X), sample_size, replace=False))
    out = {"silhouette": None, "reason": None, "metric": metric, "n_used": len(rows),
           "sampled": len(rows) < len(X)}
    n_labels = len(np.unique(y[rows]))
    if not 2 <= n_labels <= len(rows) - 1:
        out["reason"] = (f"{n_labels} classes among {len(rows)} examples; silhouette needs "
                         "2 <= classes <= examples - 1")
        return out
    out["silhouette"] = float(silhouette_score(X[rows], y[rows], metric=metric))
    return out


# ------------------------------------------------------------------ CKA
def linear_cka(X, Y) -> float:
    """Linear CKA (Kornblith et al. 2019) of two representations of the same N examples,
    X (N, D1) and Y (N, D2), in float64 with centred features:
        CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)   in [0, 1], 1 = same geometry
    up to rotation and isotropic scaling (and translation)."""
    X, Y = _check_features(X, "X"), _check_features(Y, "Y")
    if len(X) != len(Y):
        raise ConfigError(f"X and Y must describe the same examples: {len(X)} vs {len(Y)} rows")
    if len(X) < 2:
        raise ConfigError("CKA needs at least 2 examples")
    Xc = X.astype(np.float64) - X.mean(0, dtype=np.float64)
    Yc = Y.astype(np.float64) - Y.mean(0, dtype=np.float64)
    for name, c, raw in (("X", Xc, X), ("Y", Yc, Y)):
        if np.abs(c).max() <= 1e-12 * np.abs(raw).max():  # all rows equal (up to rounding)
            raise ConfigError(f"{name} is constant across examples: CKA is undefined")
    num = np.linalg.norm(Yc.T @ Xc) ** 2
    den = np.linalg.norm(Xc.T @ Xc) * np.linalg.norm(Yc.T @ Yc)
    return float(np.clip(num / den, 0.0, 1.0))


def cka_runs(run_a, run_b, split="test") -> float:
    """Linear CKA of two runs' embeddings of the same images of `split`, rows matched by id."""
    a, b = _as_run(run_a), _as_run(run_b)
    ida, idb = a.split_examples(split)["id"], b.split_examples(split)["id"]
    only_a, only_b = set(ida) - set(idb), set(idb) - set(ida)
    if only_a or only_b or len(ida) == 0:
        raise ConfigError(f"the runs' {split!r} splits hold different examples: {len(only_a)} ids "
                         f"only in {a.path}, {len(only_b)} only in {b.path} "
                         f"(e.g. {sorted(only_a | only_b)[:3]})")
    order = pd.Index(idb).get_indexer(ida)  # (N,) row of b for each row of a
    return linear_cka(a.features(split), b.features(split)[order])


# ------------------------------------------------------------------ 2-D map
def embedding_map(X, *, method="tsne", seed=0, pca_dim=50, max_points=10000, perplexity=30.0,
                  max_iter=500, return_info=False):
    """(N, 2) float32 map of L2-normalised features X (N, D); nearby = similar.

    method="pca": the first two principal components. method="tsne": PCA to pca_dim, then
    sklearn t-SNE (init="pca", learning_rate="auto", perplexity capped at (n - 1) / 3,
    max_iter=500: 250 early-exaggeration + 250 free iterations). t-SNE cannot embed new
    points, so when N > max_points it is fitted on a seeded uniform sample of max_points and
    every other point is placed at the mean map position of its 5 nearest fitted points (in
    the PCA space t-SNE saw): one coordinate system, no mixing with PCA axes. Axes carry no
    meaning; only neighbourhoods do. return_info=True also returns a dict (fitted mask, notes).
    """
    from sklearn.decomposition import PCA
    X = _check_features(X)
    if method not in _MAP_METHODS:
        raise ConfigError(f"method must be one of {_MAP_METHODS}, got {method!r}")
    n = len(X)
    Z = _unit(X)  # (N, D)
    info = {"method": method, "n": n, "fitted": np.ones(n, bool), "notes": []}
    if method == "pca" or n < 5:
        if min(Z.shape) < 2:
            raise ConfigError(f"a 2-D map needs at least 2 examples and 2 features, got {Z.shape}")
        if method == "tsne":
            info["notes"].append(f"{n} points are too few for t-SNE: PCA map instead")
            info["method"] = "pca"
        xy = PCA(2, random_state=seed).fit_transform(Z)
    else:
        if Z.shape[1] > pca_dim:
            Z = PCA(min(pca_dim, n), random_state=seed).fit_transform(Z)  # (N, pca_dim)
        xy, info = _tsne(Z, info, seed=seed, max_points=max_points, perplexity=perplexity,
                         max_iter=max_iter)
    xy = xy.astype(np.float32)
    return (xy, info) if return_info else xy


def _tsne(Z, info, *, seed, max_points, perplexity, max_iter):
    from sklearn.manifold import TSNE
    from sklearn.neighbors import NearestNeighbors
    n = len(Z)
    fit = np.arange(n)
    if n > max_points:
        fit = np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))
        info["notes"].append(f"t-SNE fitted on a random sample of {max_points} of {n} points; "
                             "the others are placed at the mean of their 5 nearest fitted points")
    p = min(perplexity, (len(fit) - 1) / 3)
    tsne = TSNE(2, perplexity=p, max_iter=max(max_iter, 250), init="pca", learning_rate="auto",
                random_state=seed)
    xy = np.zeros((n, 2))
    xy[fit] = tsne.fit_transform(Z[fit])  # (n_fit, 2)
    rest = np.setdiff1d(np.arange(n), fit)
    if len(rest):
        nn = NearestNeighbors(n_neighbors=min(5, len(fit))).fit(Z[fit])
        _, j = nn.kneighbors(Z[rest])  # (n_rest, 5) rows of fit
        xy[rest] = xy[fit][j].mean(1)
    info["fitted"] = np.isin(np.arange(n), fit)
    info.update(perplexity=float(p), max_iter=int(tsne.max_iter), kl_divergence=float(
        tsne.kl_divergence_))
    return xy, info


# ------------------------------------------------------------------ stage
def similarity_run(run_dir, *, top=24, k=8, split="test", map_method="tsne",
                   progress=True) -> Path:
    """Write RUN_DIR/similarity/ (see the module docstring) for one split; returns the folder.
    Centroids, separation, silhouette and the map use the split's own features and labels."""
    t0 = time.perf_counter()
    run = load_run(run_dir)
    require(run.examples.columns, "similarity")
    if split not in run.splits:
        raise ConfigError(f"no split {split!r} in the run; splits: {run.splits}")
    ex = run.split_examples(split)
    ex["label_issue"] = ex["label_issue"].astype(bool) if "label_issue" in ex else False
    out, secs = run.path / OUT_DIR, {}
    say = log.info if progress else (lambda msg: None)
    X, names = run.features(split), run.class_names  # (N, D)

    say(f"train neighbours of the hardest {split} examples")
    summary = _write_neighbors(run, ex, out, top=top, k=k, split=split)
    secs["neighbors"] = time.perf_counter() - t0
    say("class geometry")
    summary["silhouette"] = _write_geometry(X, ex["label"].to_numpy(), names, out)
    secs["geometry"] = time.perf_counter() - t0 - sum(secs.values())
    say(f"{map_method} map of {len(X)} points")
    summary["map"] = _write_map(X, ex, out, map_method)
    secs["map"] = time.perf_counter() - t0 - sum(secs.values())
    secs["total"] = time.perf_counter() - t0
    summary["notes"] += summary["map"].pop("notes") + [
        "similarity = cosine of L2-normalised embeddings; neighbours are train examples",
        "centroids, separation, silhouette and map use the split's own features and labels"]
    write_json(out / "summary.json", {"split": split, "n_points": len(X), "feature_dim": int(
        X.shape[1]), **summary, "seconds": {s: round(v, 2) for s, v in secs.items()}})
    say(f"wrote {out}")
    return out


def _write_neighbors(run: Run, ex: pd.DataFrame, out: Path, *, top, k, split) -> dict:
    """neighbors.parquet: query columns (_select_queries) + nearest_train_neighbors columns."""
    n_train = len(run.split_examples(TRAIN))
    k_used = min(k, n_train - (split == TRAIN))
    notes = [f"k lowered from {k} to {k_used}: only {n_train} train examples"] if k_used < k else []
    queries = _select_queries(ex, top)
    nb = nearest_train_neighbors(run, queries["id"], k=k_used)
    nb = queries.rename(columns={"id": "query_id"}).merge(nb, on="query_id", sort=False)
    _write_parquet(out / "neighbors.parquet", nb)
    return {"k": k_used, "top": top, "n_queries": len(queries), "notes": notes,
            "n_label_issue_queries": int(queries["query_label_issue"].sum())}


def _write_geometry(X, y, names, out: Path) -> dict:
    """centroid_similarity.csv and class_separation.csv; returns the silhouette dict."""
    cs = pd.DataFrame(centroid_similarity(class_centroids(X, y, len(names))), index=names,
                      columns=names)  # (C, C)
    atomic_write_text(out / "centroid_similarity.csv", cs.to_csv(index_label="class"))
    sep = class_separation(X, y, names)
    atomic_write_text(out / "class_separation.csv", sep.to_csv(index=False))
    return silhouette(X, y)


def _write_map(X, ex: pd.DataFrame, out: Path, method: str) -> dict:
    """map2d.parquet: id, x, y, label, label_name, hardness, label_issue, fitted."""
    xy, info = embedding_map(X, method=method, return_info=True)  # (N, 2)
    m = ex[["id"]].assign(x=xy[:, 0], y=xy[:, 1])
    m = m.join(ex[["label", "label_name", "hardness", "label_issue"]]).assign(
        fitted=info.pop("fitted"))
    _write_parquet(out / "map2d.parquet", m)
    return info


def _select_queries(ex: pd.DataFrame, top: int) -> pd.DataFrame:
    """The `top` hardest examples, then label issues (hardest first) up to ISSUE_CAP:
    id, query_label, query_label_name, query_hardness, query_label_issue, selected_by."""
    order = ex["hardness"].sort_values(ascending=False, kind="stable").index
    hard = set(order[:top])
    flagged = set([i for i in order if ex.at[i, "label_issue"]][:ISSUE_CAP])
    rows = [i for i in order if i in hard or i in flagged]
    by = ["+".join(t for t, s in (("hardest", hard), ("label_issue", flagged)) if i in s)
          for i in rows]
    q = ex.loc[rows, ["id", "label", "label_name", "hardness", "label_issue"]]
    return q.add_prefix("query_").rename(columns={"query_id": "id"}).assign(
        selected_by=by).reset_index(drop=True)


def _write_parquet(path: Path, df: pd.DataFrame) -> None:
    atomic_write(path, lambda f: df.to_parquet(f, index=False))


def _as_run(run) -> Run:
    return run if isinstance(run, Run) else load_run(run)
