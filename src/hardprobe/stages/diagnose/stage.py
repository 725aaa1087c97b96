"""The diagnose stage: one primary cause for every example, with the numbers behind it.

`diagnose_run(RUN_DIR)` reads examples.parquet, the cached features and the probabilities
classify stored (and perturb's and finetune's columns when present, and the runs given with
`with_runs`), applies the rules of causes.py and writes

    RUN_DIR/diagnose/summary.json   counts per cause / class / split, thresholds, label-error
                                    estimate, seconds, notes, and with --soft-labels
                                    human_vs_model (the model-hard x human-hard 2x2 of
                                    _human_vs_model) (also under "diagnose" in metrics.json)
    table columns  failure_mode, cause_<cause> (bool), evidence (text), dx_* (the numbers the
                   rules cut: dx_alt_class, dx_votes_for, dx_votes_against, dx_votes_avail,
                   dx_top2_ratio, dx_neighbour_split, dx_density_pct, dx_alt_density_pct), iq_* (image statistics
                   of scoring.image_quality and iq_flags, the issues that fired), slice_id
                   (test rows: the slice of slices.py, -1 = none; NA on other splits), and
                   with with_runs n_models_wrong, n_models_agree_wrong, hardness_rank_mean.
    RUN_DIR/slices/    slices.json, assignments.parquet, settings.json (slices.write_slices),
                       unless slices=False (--no-slices); summary["slices"] lists them.

Confident learning's estimate of the number of label errors (cleanlab.count.num_label_issues
on the issue head's out-of-sample probabilities, off-diagonal of the confident joint and its
calibrated version) is written next to the count of `label_issue` candidates per split.
"""
from __future__ import annotations

import logging
import shutil
import time
import warnings
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import pandas as pd

from ...config import check_config, option
from ...core.cache import key_digest, sha256_bytes_of
from ...core.device import default_num_workers
from ...core.io import read_json, write_json
from ...core.timing import StepTimes
from ...data.label_files import human_columns, read_soft_labels
from ...rundir.layout import FIT_SPLIT, primary_head, require
from ...rundir.run import load_run
from ...scoring import image_quality
from . import causes, evidence, slices
from .text import evidence_strings

log = logging.getLogger(__name__)
OUT_DIR = "diagnose"


@dataclass
class DiagnoseConfig:
    with_runs: list[str] = option(factory=list, help="other run directories on the same images "
                                  "(consensus columns, more label-error signals)")
    ambiguous_ratio: float = option(0.5, help="ambiguous: runner-up / top probability and "
                                    "minority / majority neighbour count at least this "
                                    "(0.5 = odds of at most 2:1)")
    atypical_quantile: float = option(0.05, help="atypical: class-density percentile below "
                                      "this share of the class's train examples")
    density_k: int | None = option(None, help="train neighbours of the own class for the "
                                   "density; default the run's k")
    quality_fence: float = option(3.0, help="low_quality: Tukey fence multiple of the train "
                                  "IQR (3 = 'far out')")
    images: bool = option(True, help="read the images for the image-quality statistics")
    slices: bool = option(True, help="find the slices of the test split where the primary head "
                          "fails far more than on their class (RUN_DIR/slices/, slice_id)")
    soft_labels: str | None = option(None, help="human label counts or distributions per "
                                     "example (.npy N x C in dataset order, or .csv/.parquet "
                                     "with an id or path column; see data/label_files.py): adds "
                                     "human_p_given, human_entropy (nats), human_majority")
    soft_labels_split: str = option("test", help="the split --soft-labels describes")
    seed: int = option(0, help="seed (recorded; the rules are deterministic)")
    batch_size: int = option(256, help="images per batch when reading images")
    num_workers: int | None = option(None, help="DataLoader workers reading images (default: "
                                     "the cores less one, at most 8)")
    progress: bool = option(True, help="progress bars")


def diagnose_run(run_dir, config: DiagnoseConfig | None = None, **options) -> dict:
    """Diagnose every example of a classified run; returns the summary (see module doc)."""
    t0 = time.perf_counter()
    cfg = replace(config or DiagnoseConfig(), **options)
    check_config(cfg)
    run = load_run(run_dir)
    require(run.examples.columns, "diagnose")
    ex = run.examples
    n_classes = len(run.class_names)
    primary = primary_head(ex.columns)
    probs = evidence.HeadProbs(run, n_classes)
    others = evidence.other_runs(run, list(cfg.with_runs))
    times = StepTimes()
    with times("image_statistics"):
        quality = _quality(run, cfg)
    with times("causes"):
        parts = [_diagnose_split(run, s, cfg, probs, primary, others, quality)
                 for s in run.splits]
    table = pd.concat(parts, ignore_index=True)
    if others:
        table = table.merge(_consensus(run, primary, others), on="id", how="left")
    with times("slices"):
        table, sliced = _slices(run, cfg, table, probs, primary, quality)
    summary = _summary(run, table, probs, cfg, primary, others, quality)
    summary["slices"] = sliced
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    summary["seconds_by_step"] = dict(times)
    summary["options"] = _options(cfg)  # `hardprobe run` redoes diagnose with these
    (run.path / OUT_DIR).mkdir(exist_ok=True)
    write_json(run.path / OUT_DIR / "summary.json", summary)
    with run.lock():  # metrics.json is classify's file: add one key, keep the rest
        m = read_json(run.path / "metrics.json") if (run.path / "metrics.json").exists() else {}
        m["diagnose"] = summary
        write_json(run.path / "metrics.json", m)
    run.join("diagnose", table)
    run.stamp("diagnose", _key(run, cfg))
    log.info("diagnose: %s in %.1f s", summary["counts"], summary["seconds"])
    return summary


def _key(run, cfg: DiagnoseConfig) -> str:
    """The digest of diagnose's inputs: the stamps of the stages it reads and its options.
    Its own outputs (slice_id, the human_* columns, slices/) are not inputs: they follow from
    the options, so a rerun with the same options gets the same stamp whether or not the
    table already holds them."""
    st = run.stamps()
    soft = sha256_bytes_of(Path(cfg.soft_labels)) if cfg.soft_labels else None
    return key_digest({"classify": st.get("classify"), "perturb": st.get("perturb"),
                       "finetune": st.get("finetune"), "options": _options(cfg),
                       "soft_labels": soft})  # the file's contents: editing it re-runs


def _with_human(run, split: str, cfg, df: pd.DataFrame) -> pd.DataFrame:
    """df plus human_p_given, human_entropy (nats), human_majority (-1: no human row) from
    --soft-labels, for the split it describes. On other splits (or with no file) the human_*
    columns an earlier diagnose wrote are dropped: stale outputs, not a human vote."""
    if not cfg.soft_labels or split != cfg.soft_labels_split:
        return df.drop(columns=[c for c in HUMAN_COLUMNS if c in df])
    soft = read_soft_labels(cfg.soft_labels, df, len(run.class_names),
                            class_names=run.class_names)
    hum = human_columns(df, soft, df["label"].to_numpy())
    hum["human_p_majority"] = np.nanmax(np.where(np.isfinite(soft), soft, -np.inf), axis=1)
    hum.loc[hum["human_majority"] < 0, "human_p_majority"] = np.nan  # for the evidence only
    log.info("diagnose: --soft-labels matched %d of %d %s examples",
             int((hum["human_majority"] >= 0).sum()), len(df), split)
    df = df.drop(columns=[c for c in hum.columns if c != "id" and c in df])
    return df.merge(hum, on="id", how="left")


def _options(cfg: DiagnoseConfig) -> dict:
    """The options that shape the output (summary.json's "options"; progress and the
    number of image-reading workers do not)."""
    opts = {f.name: getattr(cfg, f.name) for f in fields(cfg)
            if f.name not in ("progress", "num_workers")}
    opts["with_runs"] = [str(Path(p).resolve()) for p in cfg.with_runs]
    return opts


HUMAN_COLUMNS = ("human_p_given", "human_entropy", "human_majority")
SLICE_SPLIT = "test"  # slices are fitted and held out within this split


def _slices(run, cfg: DiagnoseConfig, table: pd.DataFrame, probs, primary: str, quality):
    """-> (table with slice_id (Int64; -1 = in no slice, NA outside SLICE_SPLIT), the
    summary's "slices" entry). Writes RUN_DIR/slices/ (slices.write_slices); with
    cfg.slices off, or without a test split, a slices/ of an earlier run is removed so the
    report never shows slices that the table no longer names. The primary head's stored
    probabilities and the image-quality statistics already measured describe the slices
    (the images are not decoded a second time)."""
    folder = run.path / "slices"
    if not cfg.slices or SLICE_SPLIT not in run.splits:
        shutil.rmtree(folder, ignore_errors=True)
        why = "off (--no-slices)" if not cfg.slices else f"the run has no {SLICE_SPLIT} split"
        return table, {"computed": False, "reason": why}
    ex = run.split_examples(SLICE_SPLIT)
    inputs = slices.run_inputs(run, SLICE_SPLIT, with_images=False,
                               probs=probs.get(primary, SLICE_SPLIT))
    if quality[0] is not None:
        st = quality[0].reindex(ex["id"])
        inputs["image_stats"] = st[[c for c in st.columns if c.startswith("iq_")
                                    and c != "iq_flags"]].rename(
            columns=lambda c: c.removeprefix("iq_")).reset_index(drop=True)
    modes = table.set_index("id").loc[ex["id"], "failure_mode"].to_numpy()
    res = slices.find_slices(**inputs, seed=cfg.seed, failure_mode=modes)
    slices.write_slices(run, res, split=SLICE_SPLIT)
    col = pd.DataFrame({"id": ex["id"].to_numpy(), "slice_id": res.slice_id})
    table = table.merge(col, on="id", how="left")
    table["slice_id"] = table["slice_id"].astype("Int64")
    return table, {"computed": True, "split": SLICE_SPLIT, "n": len(res.slices),
                   "tested": res.settings.get("tested", 0),
                   "ci_level": res.settings.get("ci_level"),
                   "slices": [{k: s[k] for k in ("slice_id", "n", "error_rate", "ci_low",
                                                  "ci_high", "class_error_rate", "description")}
                              for s in res.slices]}


def _quality(run, cfg: DiagnoseConfig):
    """-> (stats by id with iq_ columns, fences) or (None, None) without images."""
    if not cfg.images:
        return None, None
    workers = default_num_workers() if cfg.num_workers is None else cfg.num_workers
    st = evidence.image_stats(run, batch_size=cfg.batch_size, num_workers=workers,
                              progress=cfg.progress)
    if st is None:
        return None, None
    split = run.examples.set_index("id")["split"]
    ref = st[split.loc[st["id"]].to_numpy() == FIT_SPLIT]
    limits = image_quality.fences(ref if len(ref) else st, cfg.quality_fence)
    flags = image_quality.quality_flags(st, limits)
    out = st.rename(columns={c: f"iq_{c}" for c in image_quality.STATS})
    out["iq_flags"] = [",".join(f for f, v in zip(flags.columns, row) if v)
                       for row in flags.to_numpy()]
    return out.set_index("id"), limits


def _signals(df: pd.DataFrame, split: str, primary: str, others: dict) -> dict:
    """{name: (N,) class supported, -1 missing} (see causes.py for who votes where)."""
    sig = {}
    for h in ("knn", "linear", "model"):
        if f"pred_{h}" in df and (h != "model" or split != FIT_SPLIT):
            sig[h] = df[f"pred_{h}"].fillna(-1).to_numpy(np.int64)
    if "ft_pred" in df:
        ft = df["ft_pred"].astype("Float64").fillna(-1).to_numpy(np.float64).astype(np.int64)
        ins = df.get("ft_in_sample", pd.Series(False, index=df.index)).fillna(True)
        ft = np.where(ins.to_numpy(bool), -1, ft)
        if "ft_aum_flag" in df and split == FIT_SPLIT:
            flag = df["ft_aum_flag"].astype("boolean")
            raw = df["ft_pred"].astype("Float64").fillna(-1).to_numpy(np.float64)
            ft = np.where(flag.isna().to_numpy(), -1,
                          np.where(flag.fillna(False).to_numpy(bool), raw,
                                   df["label"].to_numpy())).astype(np.int64)
        sig["finetune"] = ft
    if split != FIT_SPLIT:
        for name, o in others.items():
            sig[name] = (df[["id"]].merge(o[["id", "pred"]], on="id", how="left")["pred"]
                         .fillna(-1).to_numpy(np.int64))
    if "human_majority" in df:
        sig["human"] = df["human_majority"].fillna(-1).to_numpy(np.int64)
    return sig


def _diagnose_split(run, split, cfg, probs, primary, others, quality) -> pd.DataFrame:
    df = _with_human(run, split, cfg, run.split_examples(split))
    y = df["label"].to_numpy()
    n = len(df)
    pred = df[f"pred_{primary}"].to_numpy()
    known = ~pd.isna(df[f"pred_{primary}"]).to_numpy()
    wrong = known & (pred != y)
    nb = probs.y_fit[probs.neighbors(split)]  # (N, k) neighbour labels
    k = nb.shape[1]
    sig = _signals(df, split, primary, others)
    alt, n_for, n_against, n_avail = causes.vote_alternative(y, sig)
    P = probs.get(primary, split)
    c1, c2, p1, p2 = causes.top2(P)
    n1, n2 = causes.neighbour_counts(nb, c1), causes.neighbour_counts(nb, c2)
    dens, dens_alt = _densities(run, split, cfg, probs, y, alt)
    flags = _flags(df, split, cfg, primary, sig, wrong, known, nb, k,
                   (alt, n_for, n_against, n_avail), (p1, p2, n1, n2), dens, dens_alt)
    flips, mildest = _flips(run, df)
    flags["fragile"] = (causes.fragile_rule(~wrong & known, flips.min(1), mildest)
                        if flips is not None else np.zeros(n, bool))
    out = pd.DataFrame({"id": df["id"].to_numpy()})
    if quality[0] is not None:
        q = quality[0].reindex(df["id"])
        for c in q.columns:
            out[c] = q[c].to_numpy()
        flags["low_quality"] = out["iq_flags"].fillna("").str.len().to_numpy() > 0
    out["failure_mode"] = causes.primary_cause(flags, wrong, known)
    for c in causes.CAUSES:
        out[f"cause_{c}"] = flags.get(c, np.zeros(n, bool))
    out["dx_alt_class"] = alt
    out["dx_votes_for"], out["dx_votes_against"], out["dx_votes_avail"] = n_for, n_against, n_avail
    out["dx_top2_ratio"] = np.divide(p2, p1, out=np.zeros(n), where=p1 > 0)
    lo, hi = np.minimum(n1, n2), np.maximum(n1, n2)
    out["dx_neighbour_split"] = np.divide(lo, hi, out=np.zeros(n), where=hi > 0)
    out["dx_density_pct"], out["dx_alt_density_pct"] = dens, dens_alt
    for c in HUMAN_COLUMNS:  # --soft-labels' columns (NaN / -1 on the other splits)
        out[c] = df[c].to_numpy() if c in df else (-1 if c == "human_majority" else np.nan)
    ctx = dict(names=run.class_names, y=y, pred=pred, primary=primary, c1=c1, c2=c2, p1=p1,
               p2=p2, n1=n1, n2=n2, k=k, nb=nb, sig=sig, flips=flips, mildest=mildest,
               flip_names=_flip_columns(df), limits=quality[1], cfg=cfg,
               label_quality=df.get("label_quality"), human=_human_ctx(df))
    out["evidence"] = evidence_strings(out, ctx)
    return out


def _human_ctx(df: pd.DataFrame):
    """(majority (N,), its share (N,), share for the given label (N,)) for the evidence
    strings, or None without --soft-labels on this split."""
    if "human_majority" not in df:
        return None
    return (df["human_majority"].fillna(-1).to_numpy(np.int64),
            df["human_p_majority"].to_numpy(float), df["human_p_given"].to_numpy(float))


def _densities(run, split, cfg, probs, y, alt):
    """-> (percentile among the own class's train examples, the same among the alternative
    class's; NaN without an alternative)."""
    dk = cfg.density_k or run.config.k
    if ("density", dk) not in probs.extra:
        probs.extra["density", dk] = evidence.class_similarity(run, FIT_SPLIT, dk)
    ref = probs.extra["density", dk]
    own = ref if split == FIT_SPLIT else evidence.class_similarity(run, split, dk)
    c = len(run.class_names)
    dens = causes.class_density_percentile(ref, probs.y_fit, own, y, c)
    sim_alt = evidence.class_similarity(run, split, dk, alt)
    return dens, causes.class_density_percentile(ref, probs.y_fit, sim_alt, alt, c)


def _flags(df, split, cfg, primary, sig, wrong, known, nb, k, votes, top, dens, dens_alt):
    y = df["label"].to_numpy()
    alt, n_for, n_against, n_avail = votes
    p1, p2, n1, n2 = top
    issue = (df["label_issue"].fillna(False).to_numpy(bool) if "label_issue" in df
             else np.zeros(len(df), bool))
    rest = {s: v for s, v in sig.items() if s != primary}
    _, _, against_o, avail_o = causes.vote_alternative(y, rest)
    human, amb_h = None, np.zeros(len(df), bool)
    if "human_majority" in df:  # a row the file lacks (-1) neither vetoes nor supports
        hm = df["human_majority"].fillna(-1).to_numpy(np.int64)
        human = (hm == y) | (hm < 0)
        amb_h = causes.human_ambiguous_rule(df["human_p_given"], df["human_entropy"],
                                            ratio=cfg.ambiguous_ratio)
    return {
        "label_error": causes.label_error_rule(issue, n_for, n_against, n_avail, dens, dens_alt,
                                                cfg.atypical_quantile),
        "ambiguous": causes.ambiguous_rule(p1, p2, n1, n2, k, ratio=cfg.ambiguous_ratio)
        | amb_h,
        "atypical": causes.atypical_rule(dens, cfg.atypical_quantile),
        "model_error": causes.model_error_rule(wrong, (nb == y[:, None]).sum(1) * 2 > k,
                                               against_o, avail_o, human),
    }


def _flip_columns(df) -> list[str]:
    return [c for c in df.columns if c.startswith("flip_severity_")]


def _flips(run, df):
    """-> ((N, n_corruptions) lowest flipping severity, NaN where not probed; mildest
    severity computed) or (None, None) when perturb did not run on this split."""
    cols = _flip_columns(df)
    if not cols or df[cols].isna().all().all():
        return None, None
    acc = run.path / "perturb" / "accuracy.csv"
    mildest = int(pd.read_csv(acc)["severity"].min()) if acc.exists() else 1
    return df[cols].to_numpy(float), mildest


def _consensus(run, primary, others) -> pd.DataFrame:
    """Per id: n_models_wrong, n_models_agree_wrong (largest group of models sharing one wrong
    class), hardness_rank_mean (mean over models of the within-split percentile rank of
    hardness, in (0, 1]; higher = harder)."""
    ex = run.examples
    base = pd.DataFrame({"id": ex["id"], "split": ex["split"], "label": ex["label"]})
    preds, ranks = [ex[f"pred_{primary}"].to_numpy(float)], []
    ranks.append(ex.groupby("split")["hardness"].rank(pct=True).to_numpy())
    for o in others.values():
        m = base[["id"]].merge(o, on="id", how="left")
        preds.append(m["pred"].to_numpy(float))
        ranks.append(m.groupby(base["split"].to_numpy())["hardness"].rank(pct=True).to_numpy())
    P = np.stack(preds, 1)  # (N, M) NaN = the model lacks the row
    y = base["label"].to_numpy()[:, None]
    wrong = ~np.isnan(P) & (P != y)
    agree = np.zeros(len(P), np.int64)
    for c in range(len(run.class_names)):
        agree = np.maximum(agree, (wrong & (P == c)).sum(1))
    return pd.DataFrame({"id": base["id"].to_numpy(), "n_models_wrong": wrong.sum(1),
                         "n_models_agree_wrong": agree,
                         "hardness_rank_mean": np.nanmean(np.stack(ranks, 1), 1)})


def _summary(run, table, probs, cfg, primary, others, quality) -> dict:
    ex = run.examples[["id", "split", "label", "label_issue"]].merge(table, on="id")
    names = run.class_names
    counts, per_class, flags, est = {}, {}, {}, {}
    issue_head = run.metrics.get("label_issue_head", "linear")
    for s, d in ex.groupby("split", sort=False):
        counts[s] = {m: int((d["failure_mode"] == m).sum()) for m in causes.MODES}
        flags[s] = {c: int(d[f"cause_{c}"].sum()) for c in causes.CAUSES}
        per_class[s] = {names[int(k)]: {m: int(v) for m, v in g["failure_mode"].value_counts()
                                        .items()} for k, g in d.groupby("label")}
        est[s] = _label_error_estimate(run, s, probs, issue_head, d)
    return {
        "primary_head": primary, "counts": counts, "cause_flags": flags, "per_class": per_class,
        "label_errors": est, "label_issue_head": issue_head,
        "with_runs": [str(p) for p in cfg.with_runs], "models": [primary, *others],
        "thresholds": {"ambiguous_ratio": cfg.ambiguous_ratio,
                       "atypical_quantile": cfg.atypical_quantile,
                       "density_k": cfg.density_k or run.config.k,
                       "quality_fence": cfg.quality_fence,
                       "human_entropy_cut": causes.human_entropy_cut(cfg.ambiguous_ratio),
                       "quality_limits": quality[1]},
        "image_quality": quality[0] is not None,
        "human_vs_model": _human_vs_model(run, table, primary, cfg),
        "notes": ["label_issue is cleanlab's candidate flag, not a verdict; label_error needs "
                  "it and the agreement of several out-of-sample signals",
                  "model heads (this run's and --with runs') do not vote on the train split: "
                  "in-sample when the model was trained on these images",
                  f"atypical: by construction about {cfg.atypical_quantile:.0%} of each "
                  "class's train examples fall below the density cut"],
    }


HARD_CELLS = ("both", "model_only", "people_only", "neither")
N_CELL_EXAMPLES = 4  # ids kept per cell of human_vs_model, hardest first, for the report


def _human_vs_model(run, table: pd.DataFrame, primary: str, cfg) -> dict | None:
    """The --soft-labels split's examples with a human row in a 2x2 of model-hard (the
    primary head predicts another class than the given label) by human-hard (fewer than half
    the people chose the given label, human_p_given < 0.5), with up to N_CELL_EXAMPLES ids
    per cell (highest hardness first). None without --soft-labels."""
    if not cfg.soft_labels or "human_p_given" not in table:
        return None
    cols = ["id", "split", "label", f"pred_{primary}"]
    ex = run.examples[cols + ["hardness"] if "hardness" in run.examples else cols].merge(
        table[["id", "human_p_given"]], on="id")
    ex = ex[(ex["split"] == cfg.soft_labels_split) & ex["human_p_given"].notna()
            & ex[f"pred_{primary}"].notna()]
    if "hardness" in ex:
        ex = ex.sort_values("hardness", ascending=False, kind="stable")
    model = (ex[f"pred_{primary}"].to_numpy() != ex["label"].to_numpy())
    people = ex["human_p_given"].to_numpy(float) < 0.5
    cells = dict(zip(HARD_CELLS, (model & people, model & ~people, ~model & people,
                                  ~model & ~people)))
    return {"split": cfg.soft_labels_split, "n": len(ex),
            "model_hard": f"the primary head ({primary}) predicts a class other than the "
                          "given label",
            "human_hard": "fewer than half the people chose the given label "
                          "(human_p_given < 0.5)",
            "counts": {c: int(m.sum()) for c, m in cells.items()},
            "examples": {c: [str(i) for i in ex["id"].to_numpy()[m][:N_CELL_EXAMPLES]]
                         for c, m in cells.items()}}


def _label_error_estimate(run, split, probs, head, d) -> dict:
    """Candidates (label_issue), diagnosed label errors, and confident learning's estimate."""
    from cleanlab.count import num_label_issues  # lazy: importing cleanlab takes ~2 s
    out = {"candidates": int(d["label_issue"].fillna(False).sum()),
           "diagnosed_label_error": int(d["cause_label_error"].sum()), "n": int(len(d))}
    y = run.split_examples(split)["label"].to_numpy()
    if len(np.unique(y)) < 2:
        return out
    P = probs.get(head, split)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for method in ("off_diagonal", "off_diagonal_calibrated"):
            out[f"estimated_{method}"] = int(num_label_issues(y, P, estimation_method=method))
    out["in_sample"] = head == "model"
    return out


def last_config(run_dir, *, progress: bool = True) -> DiagnoseConfig:
    """The options of the run's last diagnose (summary.json), or the defaults: so that
    `hardprobe run` keeps a user's `hardprobe diagnose --with-runs ...` when it redoes it."""
    path = Path(run_dir) / OUT_DIR / "summary.json"
    saved = read_json(path).get("options") if path.exists() else None
    known = {f.name for f in fields(DiagnoseConfig)}
    kept = {k: v for k, v in (saved or {}).items() if k in known and k != "progress"}
    return DiagnoseConfig(**kept, progress=progress)


def is_current(run_dir, cfg: DiagnoseConfig) -> bool:
    """Whether the run's diagnose output came from these options and the current inputs."""
    run = load_run(run_dir)
    return "failure_mode" in run.examples and run.stamps().get("diagnose") == _key(run, cfg)
