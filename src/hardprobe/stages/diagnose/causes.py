"""The diagnosis rules: pure functions over arrays (numpy in, numpy out).

A *signal* is an out-of-sample opinion on an example's class: an (N,) int array with the class
it supports, -1 where it has none (missing evidence). Signals used (stage.py builds them):
the kNN leave-one-out vote, the linear probe (out-of-fold on train), the model's own head and
the other runs' primary heads outside the fit split (on train they are in-sample when the
model was trained on these images, so they do not vote there), fine-tuning (`ft_pred` where
not in-sample; on train an `ft_aum_flag` votes for `ft_pred`, no flag votes for the given
label), and the human majority label.

Rules (each documented with the reasoning behind its cut; quantile options are the user's):

    label_error  cleanlab's `label_issue` candidate AND the signals' most named other class c
                 is named by at least 2 signals AND by a strict majority of the available
                 signals AND no signal supports the given label (several independent signals
                 agree on the same other class, none dissents) AND the example is an
                 outlier of its given class but an ordinary member of c: its class-density
                 percentile is below `atypical_quantile` among the given class's train
                 examples and at least that among c's. The density condition separates a
                 wrong label (the image sits inside another class's cluster) from the
                 backbone's own confusion at a class border, where kNN, probe and model, all
                 reading one embedding, agree on the wrong class without being independent.
    ambiguous    the primary head's top-2 classes hold more than half the probability AND the
                 runner-up has at least `ratio` of the top class's probability AND among the
                 neighbours both classes appear with the same odds (minority / majority >=
                 `ratio`) and together make at least half the neighbours. ratio = 0.5: odds
                 of at most 2:1, i.e. the head's and the neighbours' evidence cannot tell the
                 two classes apart beyond a 2:1 bet.
                 With --soft-labels the people's vote is a second, independent reason: at
                 most 1/(1 + ratio) of the people chose the given label AND the human
                 entropy is at least H(1/(1 + ratio), ratio/(1 + ratio)), the entropy of a
                 two-class vote at those same 2:1 odds (ln 3 - 2/3 ln 2 = 0.64 nats at
                 ratio 0.5; `human_entropy_cut`). That is the lowest entropy any vote whose
                 given label holds no more than 2:1 can have, so a 5/5 split passes, a
                 10/0 vote for another class (a label error, entropy 0) does not, and a vote
                 of 80% for the given label does not however its rest is spread.
    atypical     the example's class-density percentile (its mean similarity to the nearest
                 train examples of its class, as a percentile of the same quantity for that
                 class's train examples, leave-one-out) is below `atypical_quantile`.
    model_error  the primary head is wrong AND the label is supported: the kNN vote names it
                 or a strict majority of the non-primary signals names it, and the human
                 majority (when the file has a row for the example) names it.
    fragile      the primary head is right on the clean image AND at least one corruption
                 flips it at the mildest severity computed by perturb.
    low_quality  any image-statistic flag (scoring.image_quality: Tukey far-out fences of
                 the train split).

Primary cause (`failure_mode`), first that holds: label_error, low_quality, ambiguous,
atypical, model_error (wrong only), fragile (right only); a wrong example that none explains is
`unknown`; the rest `correct`.
"""
from __future__ import annotations

import numpy as np

CAUSES = ("label_error", "low_quality", "ambiguous", "atypical", "model_error", "fragile")
MODES = CAUSES + ("unknown", "correct")


def vote_alternative(labels, signals: dict[str, np.ndarray]):
    """-> (alt (N,) most named class other than the given one, -1 if none; n_for (N,) signals
    naming alt; n_against (N,) signals naming the given label; n_avail (N,) signals present).
    Ties between other classes go to the lowest class index."""
    y = np.asarray(labels, np.int64)
    n = len(y)
    if not signals:
        z = np.zeros(n, np.int64)
        return np.full(n, -1), z, z.copy(), z.copy()
    S = np.stack([np.asarray(s, np.int64) for s in signals.values()], 1)  # (N, M)
    avail = S >= 0
    against = (S == y[:, None]).sum(1)
    n_classes = int(max(S.max(), y.max())) + 1
    counts = np.zeros((n, n_classes + 1), np.int64)  # last column collects -1 (missing)
    np.add.at(counts, (np.repeat(np.arange(n), S.shape[1]), np.where(avail, S, n_classes).ravel()),
              1)
    counts = counts[:, :n_classes]
    counts[np.arange(n), y] = 0  # only other classes compete
    alt = counts.argmax(1)
    n_for = counts[np.arange(n), alt]
    alt = np.where(n_for > 0, alt, -1)
    return alt, n_for, against, avail.sum(1)


def label_error_rule(label_issue, n_for, n_against, n_avail, own_density_pct,
                     alt_density_pct, quantile: float) -> np.ndarray:
    """True = the given label is probably wrong (see the module docstring). *_density_pct:
    the class-density percentiles among the train examples of the given class and of the
    alternative class (NaN = none); quantile: the atypical cut."""
    n_for, n_avail = np.asarray(n_for), np.asarray(n_avail)
    own = np.nan_to_num(np.asarray(own_density_pct, float), nan=1.0)
    alt = np.nan_to_num(np.asarray(alt_density_pct, float), nan=0.0)
    return (np.asarray(label_issue, bool) & (n_for >= 2) & (2 * n_for > n_avail)
            & (np.asarray(n_against) == 0) & (own < quantile) & (alt >= quantile))


def top2(probs: np.ndarray):
    """-> (c1, c2, p1, p2): the two most probable classes and their probabilities, (N,) each."""
    order = np.argsort(-probs, axis=1, kind="stable")[:, :2]
    rows = np.arange(len(probs))
    return order[:, 0], order[:, 1], probs[rows, order[:, 0]], probs[rows, order[:, 1]]


def neighbour_counts(neighbor_labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """(N,) how many of each example's neighbours (N, k) carry the class classes[i]."""
    return (np.asarray(neighbor_labels) == np.asarray(classes)[:, None]).sum(1)


def ambiguous_rule(p1, p2, n1, n2, k, *, ratio: float = 0.5) -> np.ndarray:
    """True = two classes share the evidence. p1 >= p2: top-2 probabilities; n1, n2: the
    neighbour counts of those two classes among k neighbours (either may be larger)."""
    p1, p2, n1, n2 = (np.asarray(a, float) for a in (p1, p2, n1, n2))
    lo, hi = np.minimum(n1, n2), np.maximum(n1, n2)
    share = np.divide(lo, hi, out=np.zeros_like(lo), where=hi > 0)
    return (p1 + p2 > 0.5) & (p2 >= ratio * p1) & (share >= ratio) & (n1 + n2 >= k / 2)


def human_entropy_cut(ratio: float = 0.5) -> float:
    """Nats: the entropy of a two-class vote at odds 1 : ratio (0.637 at ratio 0.5); see the
    module docstring's `ambiguous`."""
    a, b = 1 / (1 + ratio), ratio / (1 + ratio)
    return float(-(a * np.log(a) + b * np.log(b)))


def human_ambiguous_rule(human_p_given, human_entropy, *, ratio: float = 0.5) -> np.ndarray:
    """True = the people cannot tell the classes apart beyond `ratio`'s odds: at most
    1/(1 + ratio) of them chose the given label and their entropy (nats; higher = more
    disagreement) is at least human_entropy_cut(ratio). NaN (no human row) -> False."""
    pg = np.nan_to_num(np.asarray(human_p_given, float), nan=1.0)
    ent = np.nan_to_num(np.asarray(human_entropy, float), nan=0.0)
    eps = 1e-9  # a 2:1 vote given as counts lands on the cut up to rounding
    return (pg <= 1 / (1 + ratio) + eps) & (ent >= human_entropy_cut(ratio) - eps)


def class_density_percentile(sim_ref: np.ndarray, ref_labels, sim: np.ndarray, labels,
                             n_classes: int) -> np.ndarray:
    """(N,) share of the reference (train) examples of the example's own class whose density
    is below the example's: 0 = less dense than every train example of its class (atypical),
    1 = denser than all. sim_ref (N_ref,), sim (N,): mean similarity to the nearest train
    examples of the own class; higher = more typical."""
    out = np.full(len(sim), np.nan)
    ref_labels, labels = np.asarray(ref_labels), np.asarray(labels)
    for c in range(n_classes):
        ref = np.sort(sim_ref[ref_labels == c])
        rows = labels == c
        if len(ref) and rows.any():
            out[rows] = np.searchsorted(ref, sim[rows], side="left") / len(ref)
    return out


def atypical_rule(density_pct, quantile: float) -> np.ndarray:
    d = np.asarray(density_pct, float)
    return np.nan_to_num(d, nan=1.0) < quantile


def model_error_rule(wrong, knn_names_label, n_against_other, n_avail_other,
                     human_names_label=None) -> np.ndarray:
    """True = the primary head is wrong although the evidence supports the given label.
    n_*_other: counts over the signals other than the primary head."""
    support = np.asarray(knn_names_label, bool) | (2 * np.asarray(n_against_other)
                                                  > np.asarray(n_avail_other))
    if human_names_label is not None:
        support &= np.asarray(human_names_label, bool)
    return np.asarray(wrong, bool) & support


def fragile_rule(correct, min_flip_severity, mildest: int) -> np.ndarray:
    """True = right on the clean image, flipped at the mildest severity by some corruption."""
    m = np.asarray(min_flip_severity, float)
    return np.asarray(correct, bool) & (np.nan_to_num(m, nan=np.inf) <= mildest)


def primary_cause(flags: dict[str, np.ndarray], wrong, known) -> np.ndarray:
    """(N,) object array of MODES. flags: {cause: (N,) bool}; wrong: primary head wrong;
    known: the row has a prediction at all (else `unknown`)."""
    wrong, known = np.asarray(wrong, bool), np.asarray(known, bool)
    n = len(wrong)
    out = np.where(wrong | ~known, "unknown", "correct").astype(object)
    done = ~known
    for cause in CAUSES:
        f = np.asarray(flags.get(cause, np.zeros(n, bool)), bool)
        if cause == "model_error":
            f = f & wrong
        if cause == "fragile":
            f = f & ~wrong
        hit = f & ~done
        out[hit] = cause
        done |= hit
    return out
