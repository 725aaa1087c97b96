"""Training dynamics: per-example statistics of a training run, recorded epoch by epoch.

Pure functions: numpy in, numpy/pandas out (no torch, no models). Public functions validate
their inputs and then call a private ``_core`` function, as `scores.py` does.

Record format (what the fine-tuning stage writes to RUN_DIR/finetune/dynamics.npz), one row
per training example and one column per epoch, taken from the example's own (augmented)
training forward pass in that epoch, as the papers below do:

``prob_given`` : (N, E) float, softmax probability of the label the example was trained with.
``correct``    : (N, E) bool, the training forward's argmax equals that label.
``margin``     : (N, E) float, that label's logit minus the largest other logit (AUM's margin,
                 Pleiss et al. 2020; negative = another class wins).

Statistics (each docstring says which way it points):

- dataset cartography (Swayamdipta et al. 2020, "Dataset Cartography"): confidence, variability,
  correctness and the easy-to-learn / ambiguous / hard-to-learn regions;
- area under the margin (Pleiss et al. 2020, "Identifying Mislabeled Data using the Area Under
  the Margin Ranking") with its threshold-sample recipe;
- forgetting events (Toneva et al. 2019, "An Empirical Study of Example Forgetting").
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import HeadError

EASY, AMBIGUOUS, HARD = "easy-to-learn", "ambiguous", "hard-to-learn"
REGIONS = (EASY, AMBIGUOUS, HARD)
AUM_PERCENTILE = 99.0
VARIABILITY_QUANTILE = 2 / 3
CONFIDENCE_THRESHOLD = 0.5

__all__ = ["epoch_record", "cartography", "regions", "area_under_margin", "threshold_samples",
           "aum_threshold", "aum_verdicts", "forgetting_events", "example_stats", "REGIONS"]


# --------------------------------------------------------------------------- validation
def _check_matrix(x, name: str, *, shape=None, unit: bool = False) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 2 or a.shape[1] < 1:
        raise HeadError(f"{name} must be a 2-D (N examples, E epochs) array with E >= 1, "
                         f"got shape {a.shape}")
    if shape is not None and a.shape != shape:
        raise HeadError(f"{name} has shape {a.shape}, but {shape} was expected (same examples "
                         "and epochs as the other arrays)")
    if a.dtype == bool:
        return a
    if not np.issubdtype(a.dtype, np.number):
        raise HeadError(f"{name} must hold numbers, got dtype {a.dtype}")
    a = a.astype(np.float64, copy=False)
    if not np.isfinite(a).all():
        raise HeadError(f"{name}: {int((~np.isfinite(a)).any(1).sum())} rows hold NaN or inf; "
                         "pass only the examples that were trained on in every epoch")
    if unit and ((a < 0) | (a > 1)).any():
        raise HeadError(f"{name} must lie in [0, 1]")
    return a


def _check_bool(x, name: str, shape=None) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype != bool:
        if not np.isin(a, (0, 1)).all():
            raise HeadError(f"{name} must be boolean (or 0/1), got values other than 0 and 1")
        a = a.astype(bool)
    return _check_matrix(a, name, shape=shape)


# --------------------------------------------------------------------------- one epoch
def epoch_record(logits, labels) -> dict[str, np.ndarray]:
    """One epoch's record from training logits (B, K) and the labels trained with (B,).

    Returns {"prob_given": softmax prob of the label (higher = easier), "correct": argmax ==
    label, "margin": label logit minus the largest other logit (lower = harder)}, each (B,).
    """
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] < 2:
        raise HeadError(f"logits must be 2-D (B, K) with K >= 2 classes, got shape {z.shape}")
    y = np.asarray(labels)
    if y.shape != (len(z),) or not np.issubdtype(y.dtype, np.integer):
        raise HeadError(f"labels must be (B,) = ({len(z)},) integers, got {y.shape} {y.dtype}")
    if ((y < 0) | (y >= z.shape[1])).any():
        raise HeadError(f"labels must lie in [0, {z.shape[1]})")
    return _epoch_record(z, y)


def _epoch_record(z: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    rows = np.arange(len(y))
    given = z[rows, y]
    others = z.copy()
    others[rows, y] = -np.inf
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return {"prob_given": e[rows, y] / e.sum(axis=1), "correct": z.argmax(axis=1) == y,
            "margin": given - others.max(axis=1)}


# --------------------------------------------------------------------------- cartography
def cartography(prob_given, correct) -> dict[str, np.ndarray]:
    """Dataset cartography per example, each (N,):

    confidence  = mean over epochs of prob_given (lower = harder);
    variability = population standard deviation over epochs of prob_given (ddof=0, as the
                  paper's code; higher = more ambiguous);
    correctness = share of epochs in which the training forward was correct (lower = harder).
    """
    p = _check_matrix(prob_given, "prob_given", unit=True)
    c = _check_bool(correct, "correct", p.shape)
    return _cartography(p, c)


def _cartography(p, c) -> dict[str, np.ndarray]:
    return {"confidence": p.mean(axis=1), "variability": p.std(axis=1),
            "correctness": c.mean(axis=1)}


def regions(confidence, variability, *, variability_quantile: float = VARIABILITY_QUANTILE,
            confidence_threshold: float = CONFIDENCE_THRESHOLD) -> np.ndarray:
    """Cartography region of each example, (N,) str, by this rule:

    ambiguous      variability >= the `variability_quantile` quantile of all variabilities
                   (default 2/3: the most variable third, as the paper's 33% ambiguous subsets;
                   relative to the data, as its figures);
    easy-to-learn  otherwise, confidence >= `confidence_threshold` (default 0.5);
    hard-to-learn  otherwise (low confidence, low variability).

    Ambiguous and hard-to-learn are the hard ones; easy-to-learn the easy.
    """
    conf = np.asarray(confidence, dtype=np.float64)
    var = np.asarray(variability, dtype=np.float64)
    if conf.ndim != 1 or var.shape != conf.shape or not len(conf):
        raise HeadError(f"confidence and variability must be 1-D of one length >= 1, got "
                         f"{conf.shape} and {var.shape}")
    if not (np.isfinite(conf).all() and np.isfinite(var).all()):
        raise HeadError("confidence and variability must be finite")
    if not 0 <= variability_quantile <= 1 or not 0 <= confidence_threshold <= 1:
        raise HeadError("variability_quantile and confidence_threshold must lie in [0, 1]")
    return _regions(conf, var, variability_quantile, confidence_threshold)


def _regions(conf, var, q, t) -> np.ndarray:
    cut = np.quantile(var, q)
    return np.where(var >= cut, AMBIGUOUS, np.where(conf >= t, EASY, HARD)).astype(object)


# --------------------------------------------------------------------------- AUM
def area_under_margin(margin) -> np.ndarray:
    """AUM per example, (N,): the mean over epochs of the margin (given-label logit minus the
    largest other logit). Lower = harder; strongly negative = likely mislabelled."""
    return _check_matrix(margin, "margin").mean(axis=1)


def threshold_samples(n: int, n_classes: int, *, runs: int = 2, seed: int = 0) -> np.ndarray:
    """(runs, n) bool: which examples each AUM run relabels to the fake extra class C.

    Each run takes n // (C + 1) examples (Pleiss et al.: N / (c + 1)), drawn at random
    (seeded); the runs' sets are disjoint, so with runs=2 every example is an ordinary
    (non-threshold) example in at least one run and gets a verdict. runs=0 gives (0, n).
    """
    n, n_classes, runs = int(n), int(n_classes), int(runs)
    if n_classes < 2:
        raise HeadError(f"n_classes must be >= 2, got {n_classes}")
    if runs < 0:
        raise HeadError(f"runs must be >= 0, got {runs}")
    k = n // (n_classes + 1)
    if runs and k < 1:
        raise HeadError(f"{n} examples are too few for threshold samples: N // (C + 1) = 0 "
                         f"with C = {n_classes}; use more examples or no AUM runs")
    if runs * k > n:
        raise HeadError(f"{runs} disjoint sets of {k} threshold samples need {runs * k} "
                         f"examples, there are {n}")
    perm = np.random.default_rng(seed).permutation(n)
    out = np.zeros((runs, n), dtype=bool)
    for r in range(runs):
        out[r, perm[r * k:(r + 1) * k]] = True
    return out


def aum_threshold(threshold_aums, *, percentile: float = AUM_PERCENTILE) -> float:
    """The AUM threshold: the `percentile` (default 99th, numpy's linear interpolation) of the
    threshold samples' AUMs. An ordinary example with AUM below it looks mislabelled."""
    a = np.asarray(threshold_aums, dtype=np.float64)
    if a.ndim != 1 or not len(a) or not np.isfinite(a).all():
        raise HeadError("threshold_aums must be a non-empty 1-D array of finite numbers")
    if not 0 <= percentile <= 100:
        raise HeadError(f"percentile must lie in [0, 100], got {percentile}")
    return float(np.percentile(a, percentile))


def aum_verdicts(aums, is_threshold, *, percentile: float = AUM_PERCENTILE) -> dict:
    """Combine R AUM runs: aums (R, N) (NaN where a run did not train on an example) and
    is_threshold (R, N) bool (which examples each run relabelled to the fake class).

    Each example's verdict comes from its *home run*: the first run in which it was trained as
    an ordinary example. Returns {"home": (N,) int (-1 = no home: it was a threshold sample in
    every run, e.g. runs=1), "aum": (N,) AUM in the home run (NaN without home; lower = harder),
    "thresholds": (R,) per-run threshold (NaN for a run without threshold samples),
    "flag": (N,) bool, AUM < its home run's threshold (False without a verdict),
    "has_verdict": (N,) bool}.
    """
    a = np.asarray(aums, dtype=np.float64)
    t = np.asarray(is_threshold, dtype=bool)
    if a.ndim != 2 or t.shape != a.shape:
        raise HeadError(f"aums and is_threshold must be 2-D (runs, N) of one shape, got "
                         f"{a.shape} and {t.shape}")
    if np.isnan(a[t]).any():
        raise HeadError("every threshold sample needs a finite AUM in its run")
    return _aum_verdicts(a, t, percentile)


def _aum_verdicts(a, t, percentile) -> dict:
    r, n = a.shape
    thr = np.array([np.percentile(a[k, t[k]], percentile) if t[k].any() else np.nan
                    for k in range(r)])
    ordinary = ~t & np.isfinite(a)
    home = np.where(ordinary.any(axis=0), ordinary.argmax(axis=0), -1)
    has = home >= 0
    aum = np.full(n, np.nan)
    aum[has] = a[home[has], np.flatnonzero(has)]
    home_thr = np.where(has, thr[np.maximum(home, 0)], np.nan)
    verdict = np.isfinite(home_thr)
    flag = np.zeros(n, bool)
    flag[verdict] = aum[verdict] < home_thr[verdict]
    return {"home": home, "aum": aum, "thresholds": thr, "flag": flag, "has_verdict": verdict}


# --------------------------------------------------------------------------- forgetting
def forgetting_events(correct) -> tuple[np.ndarray, np.ndarray]:
    """Forgetting events per example (Toneva et al. 2019): the number of epochs e >= 1 at which
    the example was correct at e-1 and incorrect at e, (N,) int64 (higher = harder).

    Examples never correct in any epoch have no transition, so count 0; the paper treats
    them as forgotten infinitely often. They are marked in the second array, never_learned
    (N,) bool (True = hardest of all): rank by (never_learned, count).
    """
    c = _check_bool(correct, "correct")
    return _forgetting(c)


def _forgetting(c) -> tuple[np.ndarray, np.ndarray]:
    events = (c[:, :-1] & ~c[:, 1:]).sum(axis=1).astype(np.int64)
    return events, ~c.any(axis=1)


# --------------------------------------------------------------------------- all at once
def example_stats(prob_given, correct, margin, **region_kw) -> pd.DataFrame:
    """All per-example statistics of one run's record, one row per example: confidence,
    variability, correctness, region, aum, forgetting, never_learned (see the functions above
    for the definitions and directions)."""
    p = _check_matrix(prob_given, "prob_given", unit=True)
    c = _check_bool(correct, "correct", p.shape)
    m = _check_matrix(margin, "margin", shape=p.shape)
    carto = _cartography(p, c)
    q = region_kw.get("variability_quantile", VARIABILITY_QUANTILE)
    t = region_kw.get("confidence_threshold", CONFIDENCE_THRESHOLD)
    events, never = _forgetting(c)
    return pd.DataFrame({**carto, "region": _regions(carto["confidence"], carto["variability"],
                                                     q, t),
                         "aum": m.mean(axis=1), "forgetting": events, "never_learned": never})
