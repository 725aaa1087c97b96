"""The probe pipeline: data -> backbone -> features (cached) -> heads -> scores, into a run dir.

Stages are separate functions over the run directory so each can rerun alone:
`extract(cfg)` writes features and the examples skeleton, `classify(run_dir)` fits the heads
and writes the per-example scores and metrics, `run(cfg)` does both.
"""
from __future__ import annotations

import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from . import __version__, distributed, scores
from .backbones import Backbone, create_backbone
from .config import RunConfig, build_config, load_config, save_config
from .cache import atomic_write_text, key_digest
from .data import EXAMPLE_COLUMNS, DataError, ImageSet, load_dataset, plant_label_noise
from .features import extract_split, resolve_device
from .heads import KNNClassifier, LinearProbe, cross_val_predict_proba
from .run import (Run, feature_path, link_or_copy, load_run, read_json, save_array,
                  write_examples, write_json)

FIT_SPLIT = "train"


# ------------------------------------------------------------------ extract
def extract(cfg: RunConfig, *, progress: bool = True) -> Path:
    """Features and logits of every split, cached, linked into cfg.out."""
    t0 = time.perf_counter()
    ctx, device = distributed.init(cfg.device)  # under torchrun: this rank and its device
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if ctx.main:
        save_config(cfg, out / "config.yaml")
    # The model first: an unknown name or missing weights fail before a long folder scan.
    # Rank 0 downloads weights and data before the other ranks look for them.
    with distributed.main_first(ctx):
        backbone = create_backbone(cfg.model, weights=cfg.weights, weights_tag=cfg.weights_tag,
                                   random_init=cfg.random_init, image_size=cfg.image_size,
                                   trust_weights=cfg.trust_weights)
        dataset = load_dataset(cfg.data, data_root=cfg.data_root, train=cfg.train,
                               test=cfg.test, download=cfg.download)
    if FIT_SPLIT in dataset.splits:  # fail before the long extraction, not after it
        check_fit_classes(dataset.splits[FIT_SPLIT].examples["label"], dataset.class_names)
    use_head = model_head_applies(backbone, dataset.class_names, cfg.use_model_head)
    entries, frames, skipped = {}, [], []
    for name, split in dataset.splits.items():
        arrays, entry = extract_split(backbone, split, cache_dir=cfg.cache_dir, device=device,
                                      precision=cfg.precision, with_logits=use_head,
                                      batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                                      shard_size=cfg.shard_size, dtype=cfg.feature_dtype,
                                      progress=progress, ctx=ctx)
        if not ctx.main:  # rank 0 alone writes the run directory
            continue
        ok = arrays["ok"]
        bad = split.examples[~ok].assign(error=arrays["error"][~ok])
        if len(bad) and cfg.strict:
            raise DataError(f"{len(bad)} image(s) of split {name!r} could not be decoded, e.g. "
                            f"{bad['error'].iloc[0]}. Fix or remove them, or drop --strict to "
                            f"skip them (they are listed in skipped.csv)")
        skipped.append(bad)
        frames.append(split.examples[ok])
        _write_split_features(out, name, entry, arrays, ok)
        entries[name] = {"cache_entry": str(entry.dir), "key": entry.key, "skipped": int(len(bad))}
    distributed.shutdown()  # the later stages run on rank 0 alone
    if not ctx.main:
        return out
    examples = pd.concat(frames, ignore_index=True)[EXAMPLE_COLUMNS]
    examples = plant_label_noise(examples, cfg.label_noise, dataset.class_names, seed=cfg.seed)
    if not _same_examples(out, examples):  # a rerun on the same images keeps the scores
        write_examples(out, examples)
    skipped = pd.concat(skipped, ignore_index=True)[EXAMPLE_COLUMNS + ["error"]]
    atomic_write_text(out / "skipped.csv", skipped.to_csv(index=False))
    if len(skipped):
        warnings.warn(f"{len(skipped)} undecodable image(s) skipped; see {out / 'skipped.csv'}")
    write_json(out / "provenance.json", _provenance(cfg, backbone, dataset, entries, use_head,
                                                    time.perf_counter() - t0))
    return out


def _write_split_features(out: Path, split: str, entry, arrays: dict, ok: np.ndarray) -> None:
    """Hard-link the cached arrays into the run, or write the decodable rows when some failed."""
    for name in ("embedding", "logits"):
        dst = feature_path(out, split, name)
        if name not in arrays:
            dst.unlink(missing_ok=True)
        elif ok.all():
            link_or_copy(entry.dir / f"{name}.npy", dst)
        else:
            save_array(out, split, name, np.ascontiguousarray(arrays[name][ok]))


def _same_examples(out: Path, examples: pd.DataFrame) -> bool:
    path = out / "examples.parquet"
    if not path.exists():
        return False
    import pyarrow.parquet as pq
    cols = list(examples.columns)
    if not set(cols) <= set(pq.read_schema(path).names):
        return False
    old = pd.read_parquet(path, columns=cols)  # not the later stages' columns
    return old.equals(examples.reset_index(drop=True))


# ------------------------------------------------------------------ stage stamps
HEAD_KEYS = ("heads", "k", "temperature", "knn_weights", "knn_backend", "knn_index", "knn_nlist",
             "knn_nprobe", "linear_c", "folds", "issue_head", "seed", "label_noise")


def _classify_key(run: Run, cfg: RunConfig) -> str:
    """Everything classify's output depends on: the features (cache digests) and head config."""
    feats = {s: f["key"] for s, f in run.provenance["features"].items()}
    return key_digest({"features": feats, "heads": {k: getattr(cfg, k) for k in HEAD_KEYS}})


def _stamps(run_dir: Path) -> dict:
    p = Path(run_dir) / "stages.json"
    return read_json(p) if p.exists() else {}


def _stamp(run_dir: Path, stage: str, key: str) -> None:
    write_json(Path(run_dir) / "stages.json", {**_stamps(run_dir), stage: key})


def model_head_applies(backbone: Backbone, class_names: list[str], force: bool | None) -> bool:
    """Use the model's own classifier only when its label space is the dataset's, in order."""
    if force is False or backbone.class_names is None:
        return False
    same = [_norm(c) for c in backbone.class_names] == [_norm(c) for c in class_names]
    if force and not same:
        if backbone.num_classes != len(class_names):
            raise ValueError(f"use_model_head: the model has {backbone.num_classes} classes, the "
                             f"dataset {len(class_names)}; its classifier cannot label this data")
        return True
    return same


def _norm(name: str) -> str:
    return name.lower().replace("_", " ").strip()


def _provenance(cfg, backbone: Backbone, dataset: ImageSet, entries, use_head, seconds) -> dict:
    import torch
    return {
        "hardprobe": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
        "platform": platform.platform(), "device": str(resolve_device(cfg.device)),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "extract_seconds": round(seconds, 2),
        "backbone": backbone.describe(), "cam_layer": backbone.cam_layer,
        "dataset": dataset.describe(), "model_head": use_head, "features": entries,
    }


# ------------------------------------------------------------------ classify
def classify(run_dir: str | Path, cfg: RunConfig | None = None) -> dict:
    """Fit the heads on the train split and score every example; updates the run dir."""
    t0 = time.perf_counter()
    run = load_run(run_dir)
    cfg = cfg or load_config(run.path / "config.yaml")
    save_config(cfg, run.path / "config.yaml")
    n_classes = len(run.class_names)
    if FIT_SPLIT not in run.splits:
        raise ValueError(f"{run.path} has no {FIT_SPLIT!r} split to fit the heads on")
    check_fit_classes(run.split_examples(FIT_SPLIT)["label"], run.class_names)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        examples, metrics = _classify(run, cfg, n_classes)
    for w in caught:  # shown to the user and kept in the run, not lost in a log
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    metrics["warnings"] = sorted({str(w.message) for w in caught})
    metrics["classify_seconds"] = round(time.perf_counter() - t0, 2)
    write_examples(run.path, _keep_other_stages(run.examples, examples))
    write_json(run.path / "metrics.json", metrics)
    _stamp(run.path, "classify", _classify_key(run, cfg))
    return metrics


_CLASSIFY_PREFIXES = ("pred_", "prob_true_", "margin_", "entropy_", "correct_")
_CLASSIFY_COLUMNS = {"knn_disagreement", "heads_disagree", "hardness", "label_quality",
                     "label_issue"}


def _keep_other_stages(old: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """Columns that later stages joined in (prediction_depth, flip severities...) survive a
    re-classify; classify's own columns are replaced."""
    theirs = [c for c in old.columns if c not in new.columns and c not in _CLASSIFY_COLUMNS
              and not c.startswith(_CLASSIFY_PREFIXES)]
    if not theirs:
        return new
    return new.merge(old[["id", *theirs]], on="id", how="left")


def check_fit_classes(labels: pd.Series, class_names: list[str]) -> None:
    """The heads are classifiers: the train split needs examples of at least two classes."""
    present = sorted(set(int(v) for v in labels))
    if len(present) < 2:
        which = f"only class {class_names[present[0]]!r}" if present else "no examples"
        raise ValueError(f"the {FIT_SPLIT} split has {which}: the heads need examples of at "
                         f"least 2 classes. Point --train at a folder with one sub-folder per "
                         f"class (<root>/<class>/<image>)")


def classify_if_changed(run_dir: str | Path, cfg: RunConfig) -> bool:
    """Run classify unless the run already holds its output for these features and heads."""
    run = load_run(run_dir)
    if _stamps(run.path).get("classify") == _classify_key(run, cfg) and "hardness" in run.examples:
        return False
    classify(run.path, cfg)
    return True


def _classify(run: Run, cfg: RunConfig, n_classes: int) -> tuple[pd.DataFrame, dict]:
    probs, neighbor_labels = _head_probabilities(run, cfg, n_classes)
    frames, metrics = [], {"heads": {}, "splits": run.splits, "n_classes": n_classes,
                           "class_names": run.class_names}
    for split in run.splits:
        df = run.split_examples(split)[EXAMPLE_COLUMNS].copy()
        labels = df["label"].to_numpy()
        split_probs = {h: p[split] for h, p in probs.items()}
        _score_columns(df, split_probs, labels, neighbor_labels.get(split))
        issue_probs = split_probs[_issue_head(cfg, probs)]
        df["label_quality"] = scores.label_quality(issue_probs, labels)
        df["label_issue"] = scores.label_issues(issue_probs, labels)
        frames.append(df)
        for head, p in split_probs.items():
            metrics["heads"].setdefault(head, {})[split] = _head_metrics(
                p, labels, run.class_names)
    metrics["label_issue_head"] = _issue_head(cfg, probs)
    if "knn" in probs:
        metrics["knn_search"] = {"backend": cfg.knn_backend, "index": cfg.knn_index,
                                 "exact": cfg.knn_index == "flat"}
        if cfg.knn_index != "flat":
            metrics["knn_search"].update(nlist=cfg.knn_nlist, nprobe=cfg.knn_nprobe)
    metrics["notes"] = _notes(probs)
    out = pd.concat(frames, ignore_index=True)
    if "planted_noise" in run.examples:
        fit = out[out["split"] == FIT_SPLIT]
        planted = run.examples.set_index("id").loc[fit["id"], "planted_noise"].to_numpy(bool)
        metrics["planted_noise"] = scores.detection(planted, fit["label_issue"].to_numpy(bool),
                                                    -fit["label_quality"].to_numpy(float))
    return out, metrics


def _head_probabilities(run: Run, cfg: RunConfig, n_classes: int):
    """-> ({head: {split: (N, C) out-of-sample probs}}, {split: (N, k) neighbour labels})."""
    fit_x, fit_y = run.features(FIT_SPLIT), run.split_examples(FIT_SPLIT)["label"].to_numpy()
    others = [s for s in run.splits if s != FIT_SPLIT]
    probs, neighbor_labels = {}, {}
    if "knn" in cfg.heads:
        k = min(cfg.k, len(fit_x) - 1)
        if k < cfg.k:
            warnings.warn(f"k={cfg.k} but the train split has {len(fit_x)} examples: kNN uses "
                          f"k={k} (each train example is left out of its own vote)")
        knn = KNNClassifier(k=k, temperature=cfg.temperature, weights=cfg.knn_weights,
                            device=_head_device(cfg), backend=cfg.knn_backend,
                            index=cfg.knn_index, nlist=cfg.knn_nlist, nprobe=cfg.knn_nprobe,
                            seed=cfg.seed)
        # FAISS reads the features memory-mapped, chunk by chunk: no copy of train in RAM
        mmap = cfg.knn_backend == "faiss"
        knn.fit(run.features(FIT_SPLIT, mmap=True) if mmap else fit_x, fit_y,
                n_classes=n_classes)
        probs["knn"] = {}
        for s in run.splits:  # train: leave-one-out; other splits: against all of train
            x = None if s == FIT_SPLIT else run.features(s, mmap=mmap)
            p, _, idx = knn.predict_proba_and_neighbors(x, exclude_self=x is None)
            probs["knn"][s], neighbor_labels[s] = p, fit_y[idx]
        del knn  # its normalised copy of the train features: free it before the probe fits
    if "linear" in cfg.heads:
        probe = LinearProbe(C=cfg.linear_c, seed=cfg.seed)
        probs["linear"] = {FIT_SPLIT: cross_val_predict_proba(
            probe, fit_x, fit_y, n_folds=cfg.folds, seed=cfg.seed, n_classes=n_classes)}
        probe.fit(fit_x, fit_y, n_classes=n_classes)
        for s in others:
            probs["linear"][s] = probe.predict_proba(run.features(s))
    if "model" in cfg.heads and run.logits(FIT_SPLIT) is not None:
        probs["model"] = {s: _softmax(run.logits(s)) for s in run.splits}
    if not probs:
        raise ValueError(f"no head could run: heads={cfg.heads} and the model's own classifier "
                         "does not apply to this dataset; add knn or linear")
    return probs, neighbor_labels


def _issue_head(cfg: RunConfig, probs: dict) -> str:
    """The head whose out-of-sample probabilities feed label_issue (linear, else knn, else any)."""
    for head in (cfg.issue_head, "linear", "knn"):
        if head in probs:
            return head
    return next(iter(probs))


def _head_device(cfg: RunConfig) -> str:
    return str(resolve_device(cfg.device))


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _score_columns(df: pd.DataFrame, probs: dict[str, np.ndarray], labels: np.ndarray,
                   neighbor_labels: np.ndarray | None) -> None:
    for head, p in probs.items():
        df[f"pred_{head}"] = scores.predicted(p)
        df[f"prob_true_{head}"] = scores.prob_true(p, labels)
        df[f"margin_{head}"] = scores.margin(p, labels)
        df[f"entropy_{head}"] = scores.entropy(p)
        df[f"correct_{head}"] = df[f"pred_{head}"].to_numpy() == labels
    knn_dis = None
    if neighbor_labels is not None:
        knn_dis = scores.knn_disagreement(neighbor_labels, labels)
        df["knn_disagreement"] = knn_dis
    df["hardness"] = scores.hardness({h: df[f"prob_true_{h}"].to_numpy() for h in probs}, knn_dis)
    if len(probs) > 1:  # heads that disagree on the prediction mark an ambiguous example
        preds = np.stack([df[f"pred_{h}"].to_numpy() for h in probs], axis=1)
        df["heads_disagree"] = (preds != preds[:, :1]).any(axis=1)


def _head_metrics(probs: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict:
    preds = scores.predicted(probs)
    cm = scores.confusion_matrix(labels, preds, len(class_names))
    support = cm.sum(axis=1)
    per_class = np.divide(np.diag(cm), support, out=np.full(len(support), np.nan),
                          where=support > 0)
    return {
        "accuracy": float(scores.accuracy(labels, preds)),
        "ece": float(scores.expected_calibration_error(probs, labels)),
        "confusion_matrix": cm.tolist(),
        "confused_pairs": scores.confused_pairs(cm, class_names, top=10).to_dict("records"),
        "per_class_accuracy": {c: (None if np.isnan(a) else float(a))
                               for c, a in zip(class_names, per_class)},
        "reliability": scores.reliability_table(probs, labels).to_dict("records"),
    }


def _notes(probs: dict) -> list[str]:
    notes = ["knn (train): leave-one-out; linear (train): out-of-fold"]
    if "model" in probs:
        notes.append("model (train): the backbone's own classifier saw these images in training "
                     "if it was trained on them: train probabilities are in-sample")
    return notes


# ------------------------------------------------------------------ run
def run(cfg: RunConfig, *, progress: bool = True) -> Path:
    """All stages of the probe pipeline into cfg.out."""
    out = extract(cfg, progress=progress)
    if not distributed.env_context().main:  # under torchrun, rank 0 goes on alone
        return out
    classify_if_changed(out, cfg)
    splits = load_run(out).splits
    base = _stamps(out)["classify"]
    if cfg.similarity:
        key = key_digest({"classify": base, "top": cfg.top, "k": cfg.neighbors,
                          "map": cfg.map_method, "seed": cfg.seed})
        if _stamps(out).get("similarity") != key:
            from .similarity import similarity_run
            similarity_run(out, top=cfg.top, k=cfg.neighbors, map_method=cfg.map_method,
                           progress=progress)
            _stamp(out, "similarity", key)
    if cfg.top > 0 and "test" in splits:
        key = key_digest({"classify": base, "top": cfg.top, "method": cfg.cam_method,
                          "layer": cfg.cam_layer})
        if _stamps(out).get("explain") != key:
            from .explain import explain_run
            explain_run(out, top=cfg.top, method=cfg.cam_method, layer=cfg.cam_layer,
                        device=str(resolve_device(cfg.device)), progress=progress)
            _stamp(out, "explain", key)
    if cfg.report:
        stamps = _stamps(out)
        key = key_digest({s: stamps.get(s) for s in ("classify", "similarity", "explain")}
                         | {"top": cfg.top} | _optional_stage_digests(out))
        if stamps.get("report") != key or not (out / "report.html").exists():
            from .report import write_report
            write_report(out, top=cfg.top)
            _stamp(out, "report", key)
    return out


def _optional_stage_digests(out: Path) -> dict:
    """The stages a user runs alone (perturb, depth, finetune) change the report too: their
    summaries' digests join its stamp, so `hardprobe run` redraws it after one of them."""
    from .cache import sha256_bytes_of
    files = {d: out / d / "summary.json" for d in ("perturb", "depth", "finetune")}
    return {d: sha256_bytes_of(f) if f.exists() else None for d, f in files.items()}


def rank(run_dir: str | Path, *, top: int = 20, split: str | None = "test",
         by: str = "hardness") -> pd.DataFrame:
    """The `top` hardest examples (highest `by` first)."""
    df = load_run(run_dir).examples
    if by not in df.columns:
        raise ValueError(f"no column {by!r} in the run; run `hardprobe classify` first "
                         f"(columns: {', '.join(df.columns)})")
    if split is not None:
        if split not in set(df["split"]):
            raise ValueError(f"no split {split!r} in the run; splits: {sorted(set(df['split']))}")
        df = df[df["split"] == split]
    return df.sort_values(by, ascending=False, kind="stable").head(top)


__all__ = ["build_config", "classify", "extract", "rank", "run"]
