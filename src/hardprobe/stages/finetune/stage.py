"""Fine-tuning stage: a trained head or a fine-tuned backbone, and the per-example training
dynamics that only a training run shows (`hardprobe.scoring.dynamics`).

    finetune_run(RUN_DIR, mode=...) writes RUN_DIR/finetune/
      summary.json         options, accuracy before (the run's heads) and after, per-epoch loss
                           and accuracy of every training job, timings, region counts, AUM
                           thresholds, frozen-vs-dynamics comparison, planted-noise catch rates
      per_example.parquet  id, split and the ft_* columns below
      dynamics.npz         per run: prob_given, correct, margin (runs, N, epochs), is_threshold
                           and trained_label (runs, N); ids, label (N,)
      checkpoints/<job>/epoch_NNNN.pt   after every epoch (resume=True continues from them)
    and joins the ft_* columns into RUN_DIR/examples.parquet (replacing earlier ft_* only).

Modes: "head" (softmax regression) and "mlp" (MLP with dropout) train on the run's cached
features; "last" fine-tunes the backbone's last stage and a classifier, "all" every layer, on
the images (the backbone's preprocessing plus light augmentation, `finetune_images`).

Jobs. Dynamics come from `aum_runs` runs on the train split (or its stratified `subset`): each
relabels its own random N // (C + 1) threshold samples to a fake class C, disjoint between runs
(Pleiss et al. 2020); every statistic of an example comes from its home run, the first in which
it trained with its own label (aum_runs=2: every example has one; 1: the threshold samples
have none, their ft_ dynamics columns are empty; 0: one plain run, no AUM flags). With
folds=K, K more fine-tunes each predict their held-out fold, so train predictions are
out-of-sample, and test predictions are their mean; otherwise run 0 predicts both, and the
train ones are in-sample (ft_in_sample = True, summary "train_in_sample"). Predictions drop
the fake class. Train examples outside the subset get NaN / NA ft_ columns.

Columns (direction): ft_prob_true (lower = harder), ft_pred, ft_margin (given-label prob minus
best other, < 0 = wrong), ft_hardness (1 - ft_prob_true, hardprobe.scoring.scores; higher = harder),
ft_in_sample; train only: ft_confidence (lower = harder), ft_variability (higher = more
ambiguous), ft_correctness (lower = harder), ft_region, ft_aum (lower = harder), ft_aum_flag
(True = likely mislabelled), ft_forgetting (higher = harder), ft_never_learned (True = hardest).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ...core.cache import key_digest
from ...core.device import default_num_workers, resolve_device, resolve_precision
from ...core.io import atomic_write, write_json
from ...core.stats import softmax, stratified_subset
from ...errors import ConfigError
from ...heads.mlp import MLPNet, standardization
from ...heads.training import OPTIMIZERS, Trainer, predict_logits
from ...rundir.run import load_run
from ...scoring import dynamics, scores
from .images import FineTuneNet, ImageSource, set_trainable, train_mode

log = logging.getLogger(__name__)

MODES = ("head", "mlp", "last", "all")
HEAD_INITS = ("auto", "new", "model")
OUT_DIR = "finetune"
TRAIN, TEST = "train", "test"
DEFAULT_LR = {"sgd": 0.01, "adamw": 1e-3}
FT_PREFIX = "ft_"

__all__ = ["finetune_run", "MODES"]


def _data_source(run, sub, train, test, opts, *, num_workers, dev, progress):
    """Cached features (modes head, mlp) or decoded images (last, all) of the chosen examples."""
    cfg = run.config
    workers = ((cfg.num_workers if cfg.num_workers is not None else default_num_workers())
               if num_workers is None else int(num_workers))
    return (_FeatureData(run, sub, dev) if opts["mode"] in ("head", "mlp") else
            _ImageData(run, train, test, batch_size=opts["batch_size"], workers=workers,
                       device=dev, progress=progress))


def _clear_outputs(out: Path, resume: bool) -> Path:
    """Delete what an earlier run wrote at the end (and, unless resuming, its checkpoints)."""
    for name in ("summary.json", "per_example.parquet", "dynamics.npz"):  # written at the end
        (out / name).unlink(missing_ok=True)
    if not resume:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return out


def _base_key(run, opts, train) -> dict:
    """What every job's cache key shares: the options, the features' keys, the train examples."""
    return {"opts": opts, "features": {s: f["key"] for s, f in
                                       run.provenance["features"].items()},
            "train_ids": key_digest({"ids": train["id"].tolist(),
                                     "labels": train["label"].tolist()})}


def _train_jobs(ctx, is_thr, y, home, in_sample, *, has_test, seed):
    """The AUM runs (one per row of is_thr (R, N)), then, with folds, the cross-fitted fold
    jobs. Returns jobs {name: info}, records (one per AUM run), p_train (N, C) probabilities
    (NaN where no job predicted the example), p_test (list of (M, C) arrays to average)."""
    opts, n_classes = ctx["opts"], ctx["n_classes"]
    jobs, records, p_test = {}, [], []
    p_train = np.full((len(y), n_classes), np.nan)
    for r, thr in enumerate(is_thr):
        labels = np.where(thr, n_classes, y)
        own = np.flatnonzero(home == r) if in_sample else np.zeros(0, np.int64)
        res = _job(ctx, f"run{r}", r, np.arange(len(y)), labels, int(bool(opts["aum_runs"])),
                   predict_train=own if len(own) else None,
                   predict_test=in_sample and r == 0 and has_test)
        jobs[f"run{r}"] = res["info"]
        records.append(res["record"])
        if len(own):
            p_train[own] = res["train"]
        if "test" in res:
            p_test = [res["test"]]
    if not in_sample:
        from sklearn.model_selection import StratifiedKFold
        folds_ = StratifiedKFold(n_splits=opts["folds"], shuffle=True, random_state=seed)
        for f, (tr, held) in enumerate(folds_.split(np.zeros(len(y)), y)):
            res = _job(ctx, f"fold{f}", len(is_thr) + f, tr, y[tr], 0, predict_train=held,
                       predict_test=has_test)
            jobs[f"fold{f}"] = res["info"]
            p_train[held] = res["train"]
            p_test.append(res["test"])
    return jobs, records, p_train, p_test


def finetune_run(run_dir, *, mode: str = "all", epochs: int = 10, batch_size: int = 128,
                 lr: float | None = None, optimizer: str = "sgd", weight_decay: float = 5e-4,
                 momentum: float = 0.9, warmup_epochs: float = 1.0, label_smoothing: float = 0.0,
                 hidden=(512,), dropout: float = 0.5, augment: bool = True,
                 head_init: str = "auto", subset: int | None = None, folds: int = 0,
                 aum_runs: int = 2, precision: str = "fp32", device: str = "auto",
                 num_workers: int | None = None, seed: int | None = None, resume: bool = False,
                 keep_checkpoints: int = 2, progress: bool = True) -> Path:
    """Fine-tune on a run's train split and write RUN_DIR/finetune/ (see the module docstring);
    returns that folder.

    lr: default 0.01 (sgd) or 1e-3 (adamw); warmup_epochs of linear warm-up, then cosine to 0.
    hidden, dropout: the MLP of mode="mlp". augment: light augmentation (image modes).
    head_init: "model" keeps the backbone's own classifier (it must predict the dataset's
    classes), "new" puts a fresh linear layer on the embedding, "auto" = "model" when the run
    used the model's head. subset: train on this many train examples (stratified, seeded).
    precision: "fp32" | "bf16" (autocast) | "auto" (bf16 where the hardware has bf16 units).
    seed: default the run's seed. resume: continue every job from its last checkpoint (the
    result equals an uninterrupted run); False deletes earlier checkpoints first.
    """
    t0 = time.perf_counter()
    run = load_run(run_dir)
    cfg = run.config
    seed = cfg.seed if seed is None else int(seed)
    lr = DEFAULT_LR.get(optimizer, 0.0) if lr is None else float(lr)
    dev = resolve_device(device)
    hidden = (hidden,) if isinstance(hidden, int) else hidden
    opts = dict(mode=mode, epochs=int(epochs), batch_size=int(batch_size), lr=lr,
                optimizer=optimizer, weight_decay=float(weight_decay), momentum=float(momentum),
                warmup_epochs=float(warmup_epochs), label_smoothing=float(label_smoothing),
                hidden=[int(h) for h in hidden], dropout=float(dropout), augment=bool(augment),
                head_init=head_init, subset=subset, folds=int(folds), aum_runs=int(aum_runs),
                precision=resolve_precision(precision, dev), seed=seed)
    table = run.split_examples(TRAIN) if TRAIN in run.splits else None
    _check(opts, table, len(run.class_names))
    if int(keep_checkpoints) < 1:
        raise ConfigError(f"keep_checkpoints must be >= 1 (the last one is what resume reads), "
                         f"got {keep_checkpoints}")
    say = log.info if progress else (lambda m: None)
    n_classes = len(run.class_names)
    sub = stratified_subset(table["label"], subset, seed=seed)
    train = table.iloc[sub].reset_index(drop=True)
    test = run.split_examples(TEST) if TEST in run.splits else None
    y = train["label"].to_numpy()
    _check_folds(opts["folds"], y, run.class_names)
    use_model_head = _use_model_head(run, head_init, mode)
    is_thr = dynamics.threshold_samples(len(train), n_classes, runs=opts["aum_runs"], seed=seed)
    is_thr = is_thr if len(is_thr) else np.zeros((1, len(train)), bool)
    out = _clear_outputs(run.path / OUT_DIR, resume)
    data = _data_source(run, sub, train, test, opts, num_workers=num_workers, dev=dev,
                        progress=progress)
    base_key = _base_key(run, opts, train)
    ctx = dict(data=data, opts=opts, base_key=base_key, n_classes=n_classes, dev=dev, out=out,
               resume=resume, keep=keep_checkpoints, progress=progress,
               use_model_head=use_model_head,
               test_labels=None if test is None else test["label"].to_numpy())
    in_sample = opts["folds"] == 0
    # in-sample train predictions of an example come from its home run (the first run that
    # trained it under its given label), never from a run that trained it as a fake-class
    # threshold sample; with aum_runs=1 those have no home and stay NaN (summary note)
    home = _home_runs(is_thr)
    jobs, records, p_train, p_test = _train_jobs(ctx, is_thr, y, home, in_sample,
                                                 has_test=test is not None, seed=seed)
    say("per-example statistics")
    stats, verdict = _dynamics_table(records, is_thr, train)
    tables = [_prediction_columns(train, p_train, in_sample).join(stats)]
    if test is not None:
        tables.append(_prediction_columns(test, np.mean(p_test, axis=0), False))
    per_ex = pd.concat(tables, ignore_index=True)
    _write_dynamics(out, records, is_thr, y, train, n_classes)
    atomic_write(out / "per_example.parquet", lambda f: per_ex.to_parquet(f, index=False))
    run.join("finetune", per_ex[["id", *[c for c in per_ex if c.startswith(FT_PREFIX)]]])
    from .summary import summarize
    summary = summarize(run, opts, per_ex, train, jobs, verdict, data.errors, in_sample,
                        use_model_head, time.perf_counter() - t0,
                        no_home=int((home < 0).sum()) if in_sample else 0)
    write_json(out / "summary.json", summary)
    say(f"wrote {out}")
    return out


# ------------------------------------------------------------------ options
def _check(o: dict, table, n_classes: int) -> None:
    if o["mode"] not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, got {o['mode']!r}")
    if o["optimizer"] not in OPTIMIZERS:
        raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {o['optimizer']!r}")
    if o["head_init"] not in HEAD_INITS:
        raise ConfigError(f"head_init must be one of {HEAD_INITS}, got {o['head_init']!r}")
    for name in ("epochs", "batch_size"):
        if o[name] < 1:
            raise ConfigError(f"{name} must be >= 1, got {o[name]}")
    if not o["lr"] > 0 or o["weight_decay"] < 0 or o["warmup_epochs"] < 0:
        raise ConfigError("lr must be > 0, weight_decay and warmup_epochs >= 0")
    if not 0 <= o["label_smoothing"] < 1 or not 0 <= o["dropout"] < 1:
        raise ConfigError("label_smoothing and dropout must lie in [0, 1)")
    if o["folds"] == 1 or o["folds"] < 0:
        raise ConfigError(f"folds must be 0 (in-sample train predictions) or >= 2, got "
                         f"{o['folds']}")
    if o["aum_runs"] not in (0, 1, 2):
        raise ConfigError(f"aum_runs must be 0, 1 or 2, got {o['aum_runs']}")
    if table is None or not len(table):
        raise ConfigError(f"the run has no {TRAIN!r} examples to fine-tune on")
    if o["subset"] is not None:
        if o["subset"] > len(table):
            raise ConfigError(f"subset={o['subset']} is larger than the train split "
                             f"({len(table)} examples); pass at most {len(table)} or no subset")
        if o["subset"] < max(2 * n_classes, o["folds"]):
            raise ConfigError(f"subset={o['subset']} is too small: at least 2 examples per "
                             f"class ({2 * n_classes}) and one per fold")


def _check_folds(folds: int, y: np.ndarray, class_names) -> None:
    if folds < 2:
        return
    counts = np.bincount(y, minlength=len(class_names))
    small = [(class_names[k], int(c)) for k, c in enumerate(counts) if 0 < c < folds]
    if small:
        raise ConfigError(f"folds={folds}, but class {small[0][0]!r} has only {small[0][1]} "
                         "train example(s) in the subset; use fewer folds or a larger subset")


def _use_model_head(run, head_init: str, mode: str) -> bool:
    if mode in ("head", "mlp") or head_init == "new":
        return False
    applies = bool(run.provenance.get("model_head"))
    if head_init == "model" and not applies:
        raise ConfigError("head_init='model': the backbone's own classifier does not predict this "
                         "dataset's classes; use head_init='new'")
    return applies


# ------------------------------------------------------------------ data
class _FeatureData:
    """The run's cached features (modes head / mlp); no augmentation."""

    def __init__(self, run, sub, dev):
        self.X = {TRAIN: torch.as_tensor(run.features(TRAIN)[sub], dtype=torch.float32)}
        if TEST in run.splits:
            self.X[TEST] = torch.as_tensor(run.features(TEST), dtype=torch.float32)
        self.X = {k: v.to(dev) for k, v in self.X.items()}
        self.dim, self.errors = self.X[TRAIN].shape[1], []

    def size(self, split: str) -> int:
        return len(self.X[split])

    def batches(self, split, pos, batch_size, augmented=False):
        X = self.X[split][torch.from_numpy(np.asarray(pos, dtype=np.int64))]

        def it(order, gen=None):
            for s in range(0, len(order), batch_size):
                p = np.asarray(order[s:s + batch_size])
                yield X[torch.from_numpy(p)], p
        return it


class _ImageData:
    """Images of the train rows and the test split, decoded once (modes last / all)."""

    def __init__(self, run, train, test, *, batch_size, workers, device, progress):
        self.backbone = run.backbone()
        dataset = run.dataset()
        self.src = {}
        for split, t in ((TRAIN, train), (TEST, test)):
            if t is None:
                continue
            rows = pd.Index(dataset.splits[split].examples["id"]).get_indexer(t["id"])
            if (rows < 0).any():
                raise ConfigError(f"{int((rows < 0).sum())} {split} examples of the run are not "
                                 "in its dataset any more; rerun `hardprobe run`")
            self.src[split] = ImageSource(self.backbone, dataset.splits[split], rows,
                                          batch_size=batch_size, num_workers=workers,
                                          device=device, progress=progress, desc=split)

    def size(self, split: str) -> int:
        return len(self.src[split].rows)

    @property
    def errors(self) -> list[str]:
        return [err for s in self.src.values() for _, err in s.errors]

    def batches(self, split, pos, batch_size, augmented=False):
        src, pos = self.src[split], np.asarray(pos, dtype=np.int64)
        local = np.full(len(src.rows), -1, np.int64)
        local[pos] = np.arange(len(pos))

        def it(order, gen=None):
            for x, p in src.batches(pos[order], gen, augmented=augmented):
                yield x, local[p]
        return it


# ------------------------------------------------------------------ one training job
def _job(ctx, name, index, pos, labels, n_extra, *, predict_train=None, predict_test=False):
    o, data, dev, n_classes = ctx["opts"], ctx["data"], ctx["dev"], ctx["n_classes"]
    torch.manual_seed(o["seed"] + 1000 * index)
    if o["mode"] in ("head", "mlp"):
        mean, scale = standardization(data.X[TRAIN][torch.from_numpy(pos)].cpu().numpy())
        net = MLPNet(data.dim, n_classes + n_extra, mean=mean, scale=scale,
                     hidden=tuple(o["hidden"]) if o["mode"] == "mlp" else (),
                     dropout=o["dropout"]).to(dev)
        mode_fn = None
    else:
        bb = dataclasses.replace(data.backbone, model=copy.deepcopy(data.backbone.model))
        net = FineTuneNet(bb, n_classes, n_extra=n_extra, use_model_head=ctx["use_model_head"])
        mode_fn = train_mode(set_trainable(net, bb, o["mode"]))
        net.to(dev, memory_format=torch.channels_last)
    trainer = Trainer(
        net, net.parameters(), labels, epochs=o["epochs"], batch_size=o["batch_size"],
        optimizer=o["optimizer"], lr=o["lr"], weight_decay=o["weight_decay"],
        momentum=o["momentum"], warmup_epochs=o["warmup_epochs"],
        label_smoothing=o["label_smoothing"], precision=o["precision"], device=dev,
        seed=o["seed"], job=index, checkpoint_dir=ctx["out"] / "checkpoints" / name,
        key=key_digest({**ctx["base_key"], "job": name, "n_extra": n_extra}), keep=ctx["keep"],
        train_mode=mode_fn, progress=ctx["progress"], desc=name)
    if ctx["progress"]:
        log.info(f"{name}: {len(pos)} examples, {o['epochs']} epochs ({o['mode']})")
    t0 = time.perf_counter()
    trainer.fit(data.batches(TRAIN, pos, o["batch_size"], augmented=o["augment"]),
                resume=ctx["resume"])
    res = {"record": trainer.record, "info": {
        "n": len(pos), "n_threshold": int((labels == n_classes).sum()), "history":
        trainer.history, "seconds": round(time.perf_counter() - t0, 2),
        "trainable_parameters": sum(p.numel() for p in net.parameters() if p.requires_grad)}}
    test_rows = np.arange(data.size(TEST)) if predict_test else None
    for key, split, where in (("train", TRAIN, predict_train), ("test", TEST, test_rows)):
        if where is not None:
            z = predict_logits(net, data.batches(split, where, 2 * o["batch_size"])(
                np.arange(len(where))), len(where), n_classes + n_extra,
                precision=o["precision"], device=dev)
            res[key] = softmax(z[:, :n_classes])
    if "test" in res:
        y_test = ctx["test_labels"]
        ok = np.isfinite(res["test"]).all(axis=1)
        res["info"]["test_accuracy"] = float(np.mean(res["test"][ok].argmax(1) == y_test[ok]))
    return res



# ------------------------------------------------------------------ per-example columns
def _home_runs(is_thr: np.ndarray) -> np.ndarray:
    """(N,) index of the first run in which each example kept its given label; -1 = none
    (it was a threshold sample in every run). is_thr: (runs, N) bool."""
    ordinary = ~np.asarray(is_thr, bool)
    return np.where(ordinary.any(axis=0), ordinary.argmax(axis=0), -1)


def _prediction_columns(t: pd.DataFrame, probs: np.ndarray, in_sample: bool) -> pd.DataFrame:
    n = len(t)
    df = pd.DataFrame({"id": t["id"].to_numpy(), "split": t["split"].to_numpy(),
                       "ft_prob_true": np.nan, "ft_pred": pd.array([pd.NA] * n, "Int64"),
                       "ft_margin": np.nan, "ft_hardness": np.nan,
                       "ft_in_sample": pd.array([in_sample] * n, "boolean")})
    ok = np.isfinite(probs).all(axis=1)
    if ok.any():
        p, y = probs[ok], t["label"].to_numpy()[ok]
        pt = scores.prob_true(p, y)
        df.loc[ok, "ft_prob_true"] = pt
        df.loc[ok, "ft_pred"] = scores.predicted(p)
        df.loc[ok, "ft_margin"] = scores.margin(p, y)
        df.loc[ok, "ft_hardness"] = scores.hardness({"ft": pt})
    return df


def _dynamics_table(records, is_thr, train) -> tuple[pd.DataFrame, dict]:
    """ft_ dynamics columns of the train rows, each from the example's home run."""
    n = len(train)
    margin = np.stack([r["margin"] for r in records]).astype(np.float64)
    seen = np.isfinite(margin).all(axis=2)  # (runs, N): every epoch recorded
    aums = np.where(seen, margin.mean(axis=2), np.nan)
    v = dynamics.aum_verdicts(aums, is_thr & seen)
    cols = {c: np.full(n, np.nan) for c in ("ft_confidence", "ft_variability",
                                            "ft_correctness")}
    forget, never = pd.array([pd.NA] * n, "Int64"), pd.array([pd.NA] * n, "boolean")
    for k, rec in enumerate(records):
        rows = np.flatnonzero(v["home"] == k)
        if not len(rows):
            continue
        c = dynamics.cartography(rec["prob_given"][rows], rec["correct"][rows])
        for name in ("confidence", "variability", "correctness"):
            cols[f"ft_{name}"][rows] = c[name]
        events, nl = dynamics.forgetting_events(rec["correct"][rows])
        forget[rows], never[rows] = events, nl
    has = v["home"] >= 0
    region = np.full(n, None, dtype=object)
    if has.any():
        region[has] = dynamics.regions(cols["ft_confidence"][has], cols["ft_variability"][has])
    flag = pd.array([pd.NA] * n, "boolean")
    flag[v["has_verdict"]] = v["flag"][v["has_verdict"]]
    df = pd.DataFrame({**cols, "ft_region": region, "ft_aum": v["aum"], "ft_aum_flag": flag,
                       "ft_forgetting": forget, "ft_never_learned": never})
    return df, v


def _write_dynamics(out: Path, records, is_thr, y, train, n_classes: int) -> None:
    arrays = {k: np.stack([r[k] for r in records]) for k in ("prob_given", "correct", "margin")}
    trained = np.where(is_thr, n_classes, y[None, :])
    atomic_write(out / "dynamics.npz", lambda f: np.savez_compressed(
        f, **arrays, is_threshold=is_thr, trained_label=trained,
        ids=train["id"].to_numpy().astype(str), label=y))



