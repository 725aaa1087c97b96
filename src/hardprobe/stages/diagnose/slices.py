"""Slices: coherent groups of examples where the primary head fails far more than on their class.

In the spirit of Domino (Eyuboglu et al., ICLR 2022: a mixture model over embeddings, labels
and predictions, so that components gather errors of one kind), with scikit-learn alone:

1. Halves. The examples are split into two halves, stratified by label (seeded). The mixture
   is fitted on the *fit* half; error rates are measured on the *held-out* half only.
2. Space. Embeddings are L2-normalised (the kNN head's cosine geometry), projected by a PCA
   fitted on the fit half onto `pca_dim` whitened components (unit variance each), then
   concatenated with `label_weight` x one-hot(label) and `prob_weight` x the head's
   probabilities. GaussianMixture(covariance_type="diag", reg_covar=REG_COVAR).
   Weights: with diagonal covariances, a component holding one class has variance about
   REG_COVAR on the label dimensions, so a point of another class pays about
   label_weight**2 / (2 * REG_COVAR) nats per mismatched label dimension (225 at the
   defaults): labels fix membership and slices stay within a class, as with Domino's large
   label weight. Measured on cifar_resnet56's 10,000 test images: label_weight 1 leaves
   components whose dominant class holds as little as 35% of their members (mean 85%), 2 as
   little as 40%, 3 makes every component one class. Probabilities pay the same per unit of squared difference, so components also
   separate confidently-wrong from right examples of one class on the fit half.
3. Held-out assignment. A held-out example is assigned by the mixture's *marginal* over the
   PCA and label dimensions only (a diagonal Gaussian marginalises by dropping dimensions):
   its own prediction never decides its membership, so a slice's held-out error rate is
   evidence about a region of embedding space, not implied by the definition of the slice.
   Every example (both halves) gets its slice this way.
4. Test. Per component: held-out error rate with a percentile bootstrap interval (a bootstrap
   resample of n Bernoulli outcomes has Binomial(n, p_hat) / n errors, drawn exactly), at level
   1 - alpha / K (Bonferroni over the K components tested). A slice is kept when its lower
   bound exceeds its class error rate on the held-out half (the held-out error rate of each
   member's class, averaged over the members) and it has >= min_size held-out members.

Fit-half figures (the pair, the typical images) are descriptive; only error_rate, ci_low and
ci_high are held-out figures.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ...scoring.image_stats import STAT_NAMES

log = logging.getLogger(__name__)

REG_COVAR = 0.02  # variance floor of every dimension (PCA dimensions have variance 1)
EFFECT = 0.5  # |z| (in class standard deviations) from which a statistic is named: a "medium"
#              standardised mean difference (Cohen's d), as a description threshold only
NEVER_FLIPS = 6  # perturb's flip_severity_<c> value for "no flip at any severity"


@dataclass
class SliceResult:
    slice_id: np.ndarray  # (N,) int: kept slice of each example, -1 = none
    slices: list[dict]  # one dict per kept slice, worst first (see module docstring)
    held_out: np.ndarray  # (N,) bool: in the held-out half (error rates come from these)
    responsibility: np.ndarray  # (N,) marginal responsibility of the assigned component
    component: np.ndarray  # (N,) assigned mixture component, kept or not
    settings: dict = field(default_factory=dict)
    ids: list | None = None  # (N,) example ids when given

    def table(self) -> pd.DataFrame:
        """One row per example: id (or row), slice_id, component, responsibility, held_out."""
        return pd.DataFrame({"id": self.ids if self.ids is not None else range(len(self.slice_id)),
                             "slice_id": self.slice_id, "component": self.component,
                             "responsibility": self.responsibility, "held_out": self.held_out})


def stratified_halves(labels, seed: int = 0) -> np.ndarray:
    """(N,) bool: True for the held-out half, about half of every class (seeded)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng([int(seed), 0x736C6963])  # own stream
    held = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        held[idx[: len(idx) // 2]] = True
    return held


def find_slices(features, labels, probs, *, n_components: int | None = None, seed: int = 0,
                pca_dim: int = 32, label_weight: float = 3.0, prob_weight: float = 1.0,
                alpha: float = 0.05, min_size: int = 10, n_boot: int = 10000,
                ids=None, class_names=None, image_stats: pd.DataFrame | None = None,
                flips: pd.DataFrame | None = None, failure_mode=None,
                n_top: int = 8) -> SliceResult:
    """Slices where argmax(probs) != labels far more than on the slice's class (held out).

    features (N, D) embeddings, labels (N,) ints in [0, C), probs (N, C) the primary head's
    probabilities. The optional per-example inputs describe the slices: ids (top_ids),
    class_names, image_stats (N rows of STAT_NAMES), flips (perturb's flip_severity_<c>
    columns, NaN where not probed), failure_mode (N,) strings. n_components default:
    min(4 C, N_fit // 25), at least 2. See the module docstring for the method and weights.
    """
    x = np.asarray(features, np.float64)
    y = np.asarray(labels, np.int64)
    p = np.asarray(probs, np.float64)
    n, n_classes = len(y), p.shape[1]
    held = stratified_halves(y, seed)
    n_fit = int((~held).sum())
    k = min(n_components or max(2, min(4 * n_classes, n_fit // 25)), n_fit // 2)
    if k < 2:  # too few examples to fit two components: no slice can be shown held out
        log.warning("slices: %d fit examples are too few for a mixture; no slices", n_fit)
        return SliceResult(np.full(n, -1, np.int64), [], held, np.full(n, np.nan),
                           np.full(n, -1, np.int64), {"n_fit": n_fit, "tested": 0},
                           None if ids is None else [str(i) for i in ids])
    gmm, space = _fit_mixture(x, y, p, ~held, k=k, seed=seed, pca_dim=pca_dim,
                              label_weight=label_weight, prob_weight=prob_weight)
    comp, resp = _assign(gmm, space, x, y)
    err = np.argmax(p, axis=1) != y
    tested = _held_out_rates(comp, err, y, held, k=k, n_classes=n_classes, alpha=alpha,
                             n_boot=n_boot, seed=seed)
    kept = [t for t in tested if t["n"] >= min_size and t["ci_low"] > t["class_error_rate"]]
    kept.sort(key=lambda t: (t["class_error_rate"] - t["error_rate"], t["component"]))
    slice_id = np.full(n, -1, np.int64)
    ctx = _Context(ids=ids, class_names=class_names, labels=y, preds=np.argmax(p, axis=1),
                   stats=image_stats, flips=flips, modes=failure_mode, n_top=n_top)
    for sid, t in enumerate(kept):
        members = comp == t["component"]
        slice_id[members] = sid
        t.update(slice_id=sid, n_all=int(members.sum()))
        t.update(_describe(ctx, members, resp))
    settings = {"n_components": k, "seed": seed, "pca_dim": space["pca"].n_components_,
                "label_weight": label_weight, "prob_weight": prob_weight,
                "reg_covar": REG_COVAR, "alpha": alpha, "ci_level": 1 - alpha / k,
                "min_size": min_size, "n_boot": n_boot, "n_fit": int((~held).sum()),
                "n_held_out": int(held.sum()), "tested": len(tested)}
    log.info("slices: %d of %d components kept", len(kept), k)
    return SliceResult(slice_id, kept, held, resp, comp, settings,
                       None if ids is None else [str(i) for i in ids])


def _fit_mixture(x, y, p, fit, *, k, seed, pca_dim, label_weight, prob_weight):
    """GaussianMixture on [whitened PCA(x), w_y onehot(y), w_p p] of the fit rows."""
    from sklearn.decomposition import PCA
    from sklearn.mixture import GaussianMixture
    xn = _l2(x)
    dim = int(min(pca_dim, x.shape[1], fit.sum() - 1))
    pca = PCA(n_components=dim, whiten=True, random_state=seed).fit(xn[fit])
    n_classes = p.shape[1]
    z = np.hstack([pca.transform(xn[fit]), label_weight * np.eye(n_classes)[y[fit]],
                   prob_weight * p[fit]])
    gmm = GaussianMixture(n_components=k, covariance_type="diag", reg_covar=REG_COVAR,
                          n_init=2, random_state=seed, max_iter=200).fit(z)
    return gmm, {"pca": pca, "dim": dim, "n_classes": n_classes, "label_weight": label_weight}


def _assign(gmm, space, x, y):
    """Component and responsibility of every row from the marginal over PCA + label dims."""
    d, c = space["dim"], space["n_classes"]
    z = np.hstack([space["pca"].transform(_l2(x)), space["label_weight"] * np.eye(c)[y]])
    mu, var = gmm.means_[:, : d + c], gmm.covariances_[:, : d + c]  # (K, d + C) each
    loglik = np.empty((len(z), len(mu)))
    for j in range(len(mu)):  # (N, K), one component at a time to bound memory
        loglik[:, j] = -0.5 * (np.log(2 * np.pi * var[j]).sum()
                               + (((z - mu[j]) ** 2) / var[j]).sum(axis=1))
    loglik += np.log(gmm.weights_)
    loglik -= loglik.max(axis=1, keepdims=True)
    resp = np.exp(loglik)
    resp /= resp.sum(axis=1, keepdims=True)
    comp = resp.argmax(axis=1)
    return comp, resp[np.arange(len(comp)), comp]


def _held_out_rates(comp, err, y, held, *, k, n_classes, alpha, n_boot, seed) -> list[dict]:
    """Per component with held-out members: error rate, bootstrap CI, class error rate."""
    class_err = np.array([err[held & (y == c)].mean() if (held & (y == c)).any() else np.nan
                          for c in range(n_classes)])
    rng = np.random.default_rng([int(seed), 0x626F6F74])
    q = alpha / k / 2  # two-sided, Bonferroni over the k components
    out = []
    for j in range(k):
        m = held & (comp == j)
        nj = int(m.sum())
        if nj == 0:
            continue
        rate = float(err[m].mean())
        boot = rng.binomial(nj, rate, size=n_boot) / nj
        lo, hi = np.quantile(boot, [q, 1 - q])
        out.append({"component": j, "n": nj, "error_rate": rate, "ci_low": float(lo),
                    "ci_high": float(hi), "class_error_rate": float(np.nanmean(class_err[y[m]]))})
    return out


def _l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass
class _Context:
    ids: object
    class_names: object
    labels: np.ndarray
    preds: np.ndarray
    stats: pd.DataFrame | None
    flips: pd.DataFrame | None
    modes: object
    n_top: int


def _describe(ctx: _Context, members: np.ndarray, resp: np.ndarray) -> dict:
    """pair, stats_z, worst_corruption, mode_mix, top_ids and a one-line description."""
    name = (lambda c: ctx.class_names[c]) if ctx.class_names is not None else str
    y, pr = ctx.labels[members], ctx.preds[members]
    given = int(np.bincount(y).argmax())
    in_class = ctx.labels == given
    wrong = pr[(y == given) & (pr != given)]
    pred = int(np.bincount(wrong).argmax()) if len(wrong) else given
    pair = {"given": name(given), "predicted": name(pred),
            "share_of_errors": float((wrong == pred).mean()) if len(wrong) else 0.0}
    stats_z = _stats_z(ctx.stats, members, in_class)
    worst = _worst_corruption(ctx.flips, members, in_class)
    rows = np.flatnonzero(members)
    top = rows[np.argsort(-resp[rows], kind="stable")[: ctx.n_top]]
    top_ids = [str(ctx.ids[i]) for i in top] if ctx.ids is not None else [int(i) for i in top]
    mix = None
    if ctx.modes is not None:
        mix = pd.Series(np.asarray(ctx.modes)[members]).value_counts(normalize=True).to_dict()
    text = f"{pair['given']} -> {pair['predicted']}"
    if len(wrong):
        text += f" ({pair['share_of_errors']:.0%} of its errors)"
    named = [f"{'higher' if z > 0 else 'lower'} {s} (z={z:+.1f})" for s, z in stats_z.items()
             if abs(z) >= EFFECT]
    if named:
        text += "; " + ", ".join(named) + f" than other {pair['given']}"
    if worst:
        text += (f"; hurt most by {worst['name']} (flips at severity "
                 f"{worst['slice_mean']:.1f} vs {worst['class_mean']:.1f} for its class)")
    return {"pair": pair, "stats_z": stats_z, "worst_corruption": worst, "mode_mix": mix,
            "top_ids": top_ids, "description": text}


def _stats_z(stats, members, in_class) -> dict:
    """(slice mean - class mean) / class std per statistic: an effect size, not a test."""
    if stats is None:
        return {}
    out = {}
    for s in (c for c in STAT_NAMES if c in stats):
        v = stats[s].to_numpy(float)
        sd = np.nanstd(v[in_class])
        if np.isfinite(sd) and sd > 0:
            out[s] = float((np.nanmean(v[members]) - np.nanmean(v[in_class])) / sd)
    return out


def _worst_corruption(flips, members, in_class) -> dict | None:
    """The corruption whose flip severity drops most below the class's (lower = flips sooner).
    Only examples perturb probed count (NaN elsewhere); None without two probed members."""
    if flips is None:
        return None
    best = None
    for col in (c for c in flips.columns if c.startswith("flip_severity_")):
        v = flips[col].to_numpy(float)
        s, c = v[members & np.isfinite(v)], v[in_class & np.isfinite(v)]
        if len(s) < 2 or len(c) < 2:
            continue
        drop = float(c.mean() - s.mean())
        if best is None or drop > best["drop"]:
            best = {"name": col.removeprefix("flip_severity_"), "slice_mean": float(s.mean()),
                    "class_mean": float(c.mean()), "drop": drop, "n_probed": int(len(s)),
                    "never": NEVER_FLIPS}
    return best


SLICE_KEYS = ("slice_id", "n", "error_rate", "ci_low", "ci_high", "class_error_rate",
              "description", "top_ids", "pair", "stats_z", "worst_corruption")


def run_inputs(run, split: str = "test", *, with_images: bool = True, probs=None) -> dict:
    """find_slices' inputs from a run: features, labels, the primary head's probabilities
    (`probs` when given, e.g. those classify stored; else softmax of the model's logits when
    the primary head is the model; else a one-hot of the primary head's predictions, which
    only the error rate and the pair use), ids, class names, image statistics (decoded from
    the dataset when with_images) and perturb's flips."""
    from ...core.stats import softmax
    from ...rundir.layout import primary_head, require
    from ...scoring.image_stats import stats_table
    require(run.examples.columns, "slices")
    ex = run.split_examples(split)
    head = primary_head(ex.columns)
    logits = run.logits(split) if head == "model" and probs is None else None
    if probs is not None:
        probs = np.asarray(probs, np.float64)
    elif logits is not None:
        probs = softmax(logits)
    else:
        probs = np.eye(len(run.class_names))[ex[f"pred_{head}"].to_numpy(np.int64)]
    flip_cols = [c for c in ex.columns if c.startswith("flip_severity_")]
    stats = stats_table(run.images(ex["id"])) if with_images else None
    return {"features": run.features(split), "labels": ex["label"].to_numpy(np.int64),
            "probs": probs, "ids": ex["id"].tolist(), "class_names": run.class_names,
            "image_stats": stats, "flips": ex[flip_cols] if flip_cols else None}


def write_slices(run, result: SliceResult, *, split: str = "test"):
    """RUN_DIR/slices/: slices.json (a list of dicts with SLICE_KEYS and more),
    assignments.parquet (one row per example of `split`) and settings.json. -> the folder."""
    from ...core.io import atomic_write, write_json
    out = run.path / "slices"
    out.mkdir(exist_ok=True)
    rows = [{k: s.get(k) for k in SLICE_KEYS}
            | {k: v for k, v in s.items() if k not in SLICE_KEYS} for s in result.slices]
    write_json(out / "slices.json", rows)
    write_json(out / "settings.json", result.settings | {"split": split,
               "held_out_figures": ["error_rate", "ci_low", "ci_high", "class_error_rate"]})
    atomic_write(out / "assignments.parquet",
                 lambda f: result.table().assign(split=split).to_parquet(f, index=False))
    return out
