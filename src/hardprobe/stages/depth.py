"""Prediction depth (Baldock, Maennel & Neyshabur 2021, "Deep Learning Through the Lens of
Example Difficulty").

kNN probes on the TRAIN split's features at each of the backbone's `depth_layers` (shallow ->
deep) predict a class for every example. An example's prediction depth is the earliest layer
index L (0-based, an index into layers.json) such that the probes at L and at every later layer
agree with the model's final prediction (the run's primary head: pred_model, else pred_linear,
else pred_knn). An example whose last probe disagrees never settles: depth = number of layers.
Low depth = the network settles early (easy); high = late or never (hard).

Features of a layer: the module's output pooled to (N, C). Conv maps (N, C, H, W) are averaged
over H, W (NHWC maps of some timm models are permuted first by the backbone's cam_reshape).
ViT token outputs (N, T, C): token_pool="mean" (default) averages the PATCH tokens (class and
register tokens are dropped when the backbone's cam_reshape knows the patch grid; otherwise all
tokens are averaged); token_pool="cls" takes token 0, the class token. One forward pass per
batch fills every layer (forward hooks, inference_mode, fp32). The arrays are cached in the
feature cache (CacheEntry) under a key that extends `features.feature_key` with the layer
list, the pooling and the rows, so a rerun reads them without running the model.

Probes: KNNClassifier with k = 30 neighbours by default, as Baldock et al. used (their own
option `k`, NOT the run's kNN-head k, 20 by default; summary.json and layers.json record it),
and the run's temperature and vote weights, fitted on the given labels
of the train split (or of its subset); train examples are left out of their own vote
(exclude_self=True), other splits query all of train. `subset` (optional) keeps at most that
many examples of every split, stratified by label (seeded with the run's seed).

    depth_run(RUN_DIR) writes RUN_DIR/depth/
      layers.json    {"layers": [module names, index = depth], "n_layers", "token_pool", "k"}
      depth.parquet  id, split, label, final_pred, prediction_depth, knn_pred_<i>, agree_<i>
      summary.json   per split: kNN accuracy and agreement with the final prediction per layer,
                     depth counts, mean depth, Spearman(depth, hardness); k, subset, notes
    and adds `prediction_depth` to RUN_DIR/examples.parquet (NaN for rows not covered).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..backbones import Backbone
from ..core.cache import CacheEntry, default_cache_dir
from ..core.device import default_num_workers, resolve_device
from ..core.io import atomic_write, atomic_write_text, write_json
from ..core.stats import spearman, stratified_subset
from ..data.datasets import Split, SplitDataset, collate_skipping
from ..errors import ConfigError
from ..heads.knn import KNNClassifier
from ..rundir.layout import primary_head, require
from ..rundir.run import load_run
from .extract.features import feature_key

log = logging.getLogger(__name__)

BALDOCK_K = 30  # neighbours of the layer probes in Baldock et al. 2021
DEPTH_VERSION = 1  # bump when a change here changes the cached arrays for the same inputs
OUT_DIR = "depth"
TRAIN = "train"
TOKEN_POOLS = ("mean", "cls")

__all__ = ["depth_run", "prediction_depth", "layer_knn_predictions", "extract_layer_features",
           "pool_output"]


# ------------------------------------------------------------------ pure parts


def prediction_depth(layer_preds, final_pred) -> np.ndarray:
    """(N,) int64 depth from (L, N) per-layer predictions and (N,) final predictions: the first
    layer index from which every layer agrees with the final prediction; L if the last does not."""
    P, final = np.asarray(layer_preds), np.asarray(final_pred)
    if P.ndim != 2 or P.shape[1] != len(final):
        raise ConfigError(f"layer_preds must be (L, N) with N = {len(final)}, got {P.shape}")
    agree = P == final[None, :]  # (L, N)
    trailing = np.cumprod(agree[::-1], axis=0).sum(axis=0)  # layers agreeing, counted from the end
    return (len(P) - trailing).astype(np.int64)


def layer_knn_predictions(train_layers, train_labels, query_layers=None, *, k=20,
                          temperature=0.07, weights="exp", n_classes=None,
                          device="cpu") -> np.ndarray:
    """(L, N_q) int64 kNN predictions, one probe per layer fitted on train_layers[l] (N_train,
    C_l). query_layers=None queries the train examples themselves, each left out of its vote."""
    preds = []
    for i, X in enumerate(train_layers):
        knn = KNNClassifier(k=k, temperature=temperature, weights=weights, device=device)
        knn.fit(X, np.asarray(train_labels), n_classes=n_classes)
        q = None if query_layers is None else query_layers[i]
        preds.append(knn.predict(q, exclude_self=q is None))
    n = len(train_labels) if query_layers is None else len(query_layers[0])
    return np.stack(preds).astype(np.int64) if preds else np.zeros((0, n), np.int64)


def pool_output(out, reshape=None, token_pool: str = "mean") -> torch.Tensor:
    """A module output -> (N, C): see the module docstring. Tuple outputs: the first element."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    if out.ndim == 2:
        return out
    if out.ndim == 3:  # tokens (N, T, C)
        if token_pool == "cls":
            return out[:, 0]
        if reshape is not None:
            try:
                return reshape(out).mean(dim=(2, 3))  # (N, C, h, w): patch tokens only
            except (ValueError, RuntimeError):
                pass
        return out.mean(dim=1)
    if out.ndim == 4:
        if reshape is not None:
            try:
                out = reshape(out)  # NHWC -> NCHW; a token reshape refuses a 4-D map
            except (ValueError, RuntimeError):
                pass
        return out.mean(dim=(2, 3))
    raise ConfigError(f"cannot pool a layer output of shape {tuple(out.shape)} to (N, C)")



# ------------------------------------------------------------------ extraction
def depth_key(backbone: Backbone, split: Split, rows, layers, token_pool: str) -> dict:
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    return {**feature_key(backbone, split, precision="fp32", with_logits=False),
            "stage": "depth", "depth_version": DEPTH_VERSION, "layers": list(layers),
            "token_pool": token_pool, "n_rows": len(rows),
            "rows": hashlib.sha256(rows.tobytes()).hexdigest()}


def extract_layer_features(backbone: Backbone, split: Split, rows=None, *, layers=None,
                           token_pool: str = "mean", cache_dir=None, device="cpu",
                           batch_size: int = 128, num_workers: int = 0, shard_size: int = 4096,
                           progress: bool = True):
    """Pooled features of split rows `rows` (default all) at every layer, cached.

    Returns ({layer: (n, C_l) float32}, ok (n,) bool, CacheEntry); rows whose image could not
    be decoded have ok=False and NaN features."""
    layers = list(backbone.depth_layers if layers is None else layers)
    if not layers:
        raise ConfigError(f"{backbone.name} names no depth layers; pass layers=[module names] "
                         f"(see `hardprobe layers {backbone.name}`)")
    modules = dict(backbone.model.named_modules())
    missing = [name for name in layers if name not in modules]
    if missing:
        raise ConfigError(f"not modules of {backbone.name}: {missing[:5]} "
                         f"(see `hardprobe layers {backbone.name}`)")
    if token_pool not in TOKEN_POOLS:
        raise ConfigError(f"token_pool must be one of {TOKEN_POOLS}, got {token_pool!r}")
    rows = np.arange(len(split)) if rows is None else np.asarray(rows, np.int64)
    dev = resolve_device(device)
    entry = CacheEntry(cache_dir or default_cache_dir(),
                       depth_key(backbone, split, rows, layers, token_pool))
    with entry.lock():
        if not entry.complete:
            _fill_shards(backbone, split, rows, layers, token_pool, entry, dev, batch_size,
                         num_workers, shard_size, progress)
        arrays = entry.load()
    ok = arrays["ok"].astype(bool)
    feats = {name: arrays[_array_name(i)] for i, name in enumerate(layers)}
    for name, X in feats.items():
        if not np.isfinite(X[ok]).all():
            raise ConfigError(f"NaN/Inf in the pooled output of layer {name!r} of {backbone.name}")
    return feats, ok, entry


def _array_name(i: int) -> str:
    return f"layer_{i:03d}"


def _fill_shards(backbone, split, rows, layers, token_pool, entry, dev, batch_size, num_workers,
                 shard_size, progress) -> None:
    n = len(rows)
    layout = entry.dir / "layout.json"  # a resumed entry keeps its first shard size
    if layout.exists():
        shard_size = int(json.loads(layout.read_text())["shard_size"])
    else:
        atomic_write_text(layout, json.dumps({"shard_size": shard_size}))
    n_shards = max(1, -(-n // shard_size))
    entry.drop_bad_shards(n_shards)
    todo = [i for i in range(n_shards) if not entry.has_shard(i)]
    backbone.to(dev)
    modules = dict(backbone.model.named_modules())
    captured: dict[str, torch.Tensor] = {}

    def hook_for(name):
        def hook(module, inputs, output):
            captured[name] = pool_output(output, backbone.cam_reshape, token_pool).float()
        return hook

    handles = [modules[name].register_forward_hook(hook_for(name)) for name in layers]
    bar = tqdm(total=sum(min(n, (i + 1) * shard_size) - i * shard_size for i in todo),
               unit="img", disable=not progress, desc=f"{backbone.name} {split.name} depth")
    try:
        for i in todo:
            pos = np.arange(i * shard_size, min(n, (i + 1) * shard_size))
            arrays = _forward_rows(backbone, split, rows[pos], layers, captured, dev,
                                   batch_size, num_workers, bar)
            entry.write_shard(i, index=pos, **arrays)
    finally:
        for h in handles:
            h.remove()
        bar.close()
    entry.finalize(n_shards, meta={"n": n, "shard_size": shard_size, "layers": layers})


def _forward_rows(backbone, split, split_rows, layers, captured, dev, batch_size, num_workers,
                  bar) -> dict[str, np.ndarray]:
    loader = torch.utils.data.DataLoader(
        SplitDataset(split, backbone.preprocess.geometric, split_rows), batch_size=batch_size,
        num_workers=num_workers, pin_memory=dev.type == "cuda", collate_fn=collate_skipping)
    where = {int(r): j for j, r in enumerate(split_rows)}  # split row -> position in this shard
    n = len(split_rows)
    out: dict[str, np.ndarray] = {"ok": np.ones(n, bool)}
    with torch.inference_mode():
        for x, batch_rows, failed in loader:
            for r, _ in failed:
                out["ok"][where[int(r)]] = False
            if x is not None:
                captured.clear()
                backbone(backbone.preprocess.normalize(x.to(dev, non_blocking=True)))
                pos = [where[int(r)] for r in batch_rows]
                for i, name in enumerate(layers):
                    if name not in captured:
                        raise ConfigError(f"layer {name!r} did not run in the forward pass")
                    f = captured[name].cpu().numpy()  # (B, C_l)
                    arr = out.setdefault(_array_name(i), np.full((n, f.shape[1]), np.nan,
                                                                 np.float32))
                    arr[pos] = f
            bar.update(len(batch_rows) + len(failed))
    if len(out) == 1:
        raise ConfigError(f"no image of rows {int(split_rows[0])}..{int(split_rows[-1])} of "
                           f"split {split.name!r} could be decoded")
    return out


# ------------------------------------------------------------------ stage
def _split_features(run, backbone, dataset, splits, layers, *, subset, say, token_pool, device,
                    batch_size, num_workers, progress):
    """Pooled layer features of each split's (stratified subset of) examples.
    Returns feats {split: [L arrays of (N, D_l)]}, tables {split: the N decoded examples' rows},
    notes (undecodable images left out)."""
    cfg = run.config
    feats, tables, notes = {}, {}, []
    for s in splits:
        t = run.split_examples(s)
        t = t.iloc[stratified_subset(t["label"], subset, seed=cfg.seed)]
        rows = pd.Index(dataset.splits[s].examples["id"]).get_indexer(t["id"])
        if (rows < 0).any():
            raise ConfigError(f"{int((rows < 0).sum())} {s} examples of the run are not in its "
                             "dataset any more; rerun `hardprobe run`")
        say(f"{len(layers)} layers of {backbone.name} on {len(t)} {s} examples")
        f, ok, _ = extract_layer_features(
            backbone, dataset.splits[s], rows, layers=layers, token_pool=token_pool,
            cache_dir=cfg.cache_dir, device=device, batch_size=batch_size,
            num_workers=num_workers, shard_size=cfg.shard_size, progress=progress)
        if not ok.all():
            notes.append(f"{int((~ok).sum())} {s} images could not be decoded: left out")
        feats[s] = [f[name][ok] for name in layers]
        tables[s] = t[ok].reset_index(drop=True)
    return feats, tables, notes


def _split_depth(s, t, preds, head):
    """One split's depth table and summary from its (L, N) layer-probe predictions `preds`
    against the primary head's final prediction. Depth: higher = settles later (harder);
    L = never settles."""
    L = len(preds)
    final, labels = t[f"pred_{head}"].to_numpy(), t["label"].to_numpy()
    depth = prediction_depth(preds, final)  # (N,)
    cols = {"id": t["id"], "split": s, "label": labels, "final_pred": final,
            "prediction_depth": depth}
    cols.update({f"knn_pred_{i}": preds[i] for i in range(L)})
    cols.update({f"agree_{i}": preds[i] == final for i in range(L)})
    summary = {
        "n": len(t), "final_accuracy": float(np.mean(final == labels)) if len(t) else None,
        "knn_accuracy": (preds == labels).mean(axis=1).tolist() if len(t) else [],
        "agreement_with_final": (preds == final).mean(axis=1).tolist() if len(t) else [],
        "mean_depth": float(depth.mean()) if len(t) else None,
        "depth_counts": np.bincount(depth, minlength=L + 1).tolist(),
        "never_settled": int((depth == L).sum()),
        "spearman_hardness": spearman(depth, t["hardness"])}
    return pd.DataFrame(cols), summary


def depth_run(run_dir, *, subset: int | None = None, k: int = BALDOCK_K, device="auto",
              batch_size: int = 128, progress: bool = True, layers=None,
              token_pool: str = "mean", num_workers: int | None = None) -> Path:
    """Prediction depth of every example (or of a stratified `subset` per split) of a classified
    run; writes RUN_DIR/depth/ (see the module docstring) and returns that folder.
    k: neighbours of the probes (default 30, Baldock et al.'s; None: the run's kNN-head k);
    layers: module names overriding the backbone's depth_layers."""
    t0 = time.perf_counter()
    run = load_run(run_dir)
    ex = run.examples
    require(ex.columns, "depth")
    head = primary_head(ex.columns)
    if TRAIN not in run.splits:
        raise ConfigError(f"{run.path} has no {TRAIN!r} split to fit the probes on")
    if subset is not None and subset < 2:
        raise ConfigError(f"subset must be at least 2 examples per split, got {subset}")
    say = log.info if progress else (lambda m: None)
    cfg = run.config
    k = cfg.k if k is None else int(k)
    backbone, dataset = run.backbone(), run.dataset()
    layers = list(backbone.depth_layers if layers is None else layers)
    workers = (cfg.num_workers if cfg.num_workers is not None else default_num_workers()
               ) if num_workers is None else num_workers
    splits = [TRAIN] + [s for s in run.splits if s != TRAIN]
    feats, tables, notes = _split_features(
        run, backbone, dataset, splits, layers, subset=subset, say=say, token_pool=token_pool,
        device=device, batch_size=batch_size, num_workers=workers, progress=progress)
    y_train = tables[TRAIN]["label"].to_numpy()
    k_used = min(k, len(y_train) - 1)
    if k_used < 1:
        raise ConfigError(f"{len(y_train)} train examples are too few for kNN probes")
    if k_used < k:
        notes.append(f"k lowered from {k} to {k_used}: only {len(y_train)} train examples")
    knn_kw = dict(k=k_used, temperature=cfg.temperature, weights=cfg.knn_weights,
                  n_classes=len(run.class_names), device=str(resolve_device(device)))
    frames, per_split, L = [], {}, len(layers)
    for s in splits:
        t = tables[s]
        say(f"kNN probes on {s}")
        preds = layer_knn_predictions(feats[TRAIN], y_train, None if s == TRAIN else feats[s],
                                      **knn_kw)  # (L, N)
        frame, per_split[s] = _split_depth(s, t, preds, head)
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True)
    out = run.path / OUT_DIR
    write_json(out / "layers.json", {"layers": layers, "n_layers": L, "token_pool": token_pool,
                                     "k": k_used})
    atomic_write(out / "depth.parquet", lambda f: table.to_parquet(f, index=False))
    all_h = pd.concat([tables[s]["hardness"] for s in splits], ignore_index=True)
    notes += [f"final prediction = pred_{head}; depth = first layer index (0-based) from which "
              f"all probes agree with it; {L} = never settles",
              "probes: kNN on the train split's pooled layer features; train examples are "
              "left out of their own vote",
              f"probe k = {k_used}" + (" (Baldock et al. 2021 used 30)" if k_used != BALDOCK_K
                                       else " as in Baldock et al. 2021") +
              f"; the run's kNN head uses k = {cfg.k}"]
    write_json(out / "summary.json", {
        "backbone": backbone.name, "layers": layers, "n_layers": L, "primary_head": head,
        "k": k, "k_used": k_used, "temperature": cfg.temperature, "knn_weights": cfg.knn_weights,
        "subset": subset, "token_pool": token_pool, "splits": per_split,
        "knn_accuracy": {s: v["knn_accuracy"] for s, v in per_split.items()},
        "spearman_hardness": spearman(table["prediction_depth"], all_h),
        "seconds": round(time.perf_counter() - t0, 2), "notes": notes})
    run.join("depth", table[["id", "prediction_depth"]].astype({"prediction_depth": float}))
    say(f"wrote {out}")
    return out


