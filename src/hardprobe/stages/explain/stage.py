"""Class activation maps of hard examples: where does the model look?

`explain_run(RUN_DIR)` writes RUN_DIR/explain/: CAMs of the given and the predicted class of
the hardest examples, their statistics and `faithfulness` (the drop in the class probability
when the CAM's top pixels are removed, against a random map). The CAM computation itself
(`compute_cams`: pytorch-grad-cam or the fast Grad-CAM path, its guards, `cam_stats`,
`throughput`) lives in `_cam.py` and is re-exported here.
"""
from __future__ import annotations

import difflib
import time
import warnings
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from pytorch_grad_cam.metrics.road import NoisyLinearImputer
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF
from tqdm.auto import tqdm

from ...core.device import resolve_device
from ...core.io import atomic_write, write_json
from ...errors import CamError, ConfigError
from ...rundir.layout import primary_head, require
from ...rundir.run import load_run
from .cams import (LogitsModel, cam_method, cam_stats, compute_cams, linear_head,
                   resolve_layer, throughput)

__all__ = ["explain_run", "faithfulness", "model_input_view", "pred_column", "CamError"]


# ------------------------------------------------------------------ faithfulness
def faithfulness(backbone, x: torch.Tensor, targets, maps: np.ndarray, *, fraction: float = 0.2,
                 seed: int = 0, perturbation: str = "road", random_grid: int = 7,
                 head: nn.Module | None = None, device="cpu") -> dict:
    """Drop in the target-class probability when the top `fraction` pixels are removed.

    Pixels are ranked by the CAM (ties broken at random, seeded), exactly round(fraction*H*W)
    are removed, and the same is done for a random map (uniform noise on a random_grid x
    random_grid grid, bilinearly upsampled: blobs like a CAM's, not salt noise). Removal:
    "road" = pytorch-grad-cam's ROAD NoisyLinearImputer (metrics.road) on our exact mask (its
    percentile mask removes every pixel when >80% of a CAM is 0); "mean" = the image's
    per-channel mean. Own code otherwise. drop_cam > drop_random means the CAM is faithful.
    """
    if not 0 < fraction < 1 or perturbation not in ("road", "mean"):
        raise ConfigError(f"need 0 < fraction < 1 and perturbation 'road' or 'mean', got "
                         f"{fraction!r}, {perturbation!r}")
    dev = resolve_device(device)
    model = LogitsModel(backbone, head).to(dev).eval()
    x = x.detach().to(dev, torch.float32)
    t = torch.tensor(np.array(targets, np.int64).reshape(-1), device=dev)  # (N,)
    rng = np.random.default_rng(seed)
    n, height, width = np.shape(maps)
    k = int(round(fraction * height * width))
    rand = _random_maps(rng, n, height, width, random_grid)  # (N, H, W)
    prob, drops = _probs(model, x, t), {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # ROAD's imputation noise
        for key, mp in (("cam", np.asarray(maps)), ("random", rand)):
            xs = torch.stack([_remove_top(x[i].cpu(), mp[i], k, perturbation, rng)
                              for i in range(n)]).to(dev)
            drops[key] = prob - _probs(model, xs, t)  # (N,)
    return _faith_summary(fraction, perturbation, prob, drops["cam"], drops["random"])


def _faith_summary(fraction, perturbation, prob, cam, rnd) -> dict:
    cam, rnd = np.asarray(cam, np.float64), np.asarray(rnd, np.float64)
    return {"fraction": fraction, "perturbation": perturbation, "n": len(cam),
            "mean_prob": float(np.mean(prob)), "drop_cam": float(cam.mean()),
            "drop_random": float(rnd.mean()), "cam_beats_random": float((cam > rnd).mean()),
            "prob": list(map(float, prob)), "drop_cam_each": cam.tolist(),
            "drop_random_each": rnd.tolist()}


@torch.no_grad()
def _probs(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> np.ndarray:
    return torch.softmax(model(x).float(), dim=1)[torch.arange(len(x)), t].cpu().numpy()


def _random_maps(rng, n: int, height: int, width: int, grid: int) -> np.ndarray:
    g = (min(grid, height), min(grid, width))
    return np.stack([cv2.resize(rng.random(g, dtype=np.float32), (width, height))
                     for _ in range(n)])


def _remove_top(img: torch.Tensor, cam: np.ndarray, k: int, how: str, rng) -> torch.Tensor:
    """img (C, H, W) with its k highest-`cam` pixels removed (imputed or set to the mean)."""
    c, height, width = img.shape
    order = np.lexsort((rng.random(height * width), -np.asarray(cam, np.float64).ravel()))
    keep = np.ones(height * width, np.float32)
    keep[order[:k]] = 0  # 1 = keep, 0 = remove
    keep = torch.from_numpy(keep.reshape(height, width))
    if how == "road":
        with warnings.catch_warnings():  # it calls np.argwhere on tensors (numpy 2 deprecation)
            warnings.simplefilter("ignore", DeprecationWarning)
            return NoisyLinearImputer()(img, keep)
    mean = img.mean(dim=(1, 2), keepdim=True)
    return torch.where(keep.bool(), img, mean)


# ------------------------------------------------------------------ the stage
def model_input_view(preprocess, img: torch.Tensor) -> np.ndarray:
    """uint8 (3, H0, W0) -> uint8 (H, W, 3): the preprocessing's resize/crop, not normalised,
    so a CAM of `preprocess(img)` aligns with it pixel for pixel."""
    v = img  # (3, H0, W0)
    if preprocess.resize_size is not None:
        v = TF.resize(v, [preprocess.resize_size],
                      interpolation=InterpolationMode(preprocess.interpolation),
                      antialias=preprocess.antialias)
    if preprocess.crop_size is not None:
        v = TF.center_crop(v, [preprocess.crop_size])
    return v.permute(1, 2, 0).contiguous().numpy()


def pred_column(examples: pd.DataFrame) -> str:
    """The prediction column of the run's primary head (rundir.layout.primary_head's order:
    the model's own classifier, else the linear probe, else k-NN)."""
    return f"pred_{primary_head(examples.columns)}"


def _select(examples: pd.DataFrame, ids, top: int, split: str) -> pd.DataFrame:
    if ids is not None:
        ids = [str(i) for i in ids]
        known = set(examples["id"])
        missing = [i for i in ids if i not in known]
        if missing:
            close = difflib.get_close_matches(missing[0], list(known), n=3)
            raise CamError(f"unknown example ids {missing[:5]}"
                           + (f"; did you mean {', '.join(close)}?" if close else ""))
        return examples.set_index("id").loc[ids].reset_index()
    require(examples.columns, "explain")
    if split not in set(examples["split"]):
        raise CamError(f"no split {split!r} in the run; splits: {sorted(set(examples['split']))}")
    sub = examples[examples["split"] == split]
    if sub.empty or top < 1:
        raise CamError(f"nothing to explain: split {split!r} has {len(sub)} examples, top={top}")
    return sub.sort_values("hardness", ascending=False, kind="stable").head(top)


def _score_head(run, pred_col: str) -> tuple[nn.Module | None, str]:
    """What the CAM differentiates: the model's logits when they are the run's label space,
    else the linear probe classify fitted and stored (RUN_DIR/heads/linear.*, with the run's
    linear_c). A run without a linear head (heads: knn) has no differentiable head: then a
    probe is fitted here on the train features, and meta.json's score_head says so."""
    if pred_col == "pred_model":
        return None, "model: the backbone's own classifier"
    from ...rundir.heads import load_heads, stored_names
    if "linear" in stored_names(run):
        probe = load_heads(run, names=("linear",))["linear"]
        return linear_head(probe), "linear: the probe classify fitted (RUN_DIR/heads/)"
    from ...heads import LinearProbe
    cfg = run.config
    labels = run.split_examples("train")["label"].to_numpy()
    probe = LinearProbe(C=cfg.linear_c, seed=cfg.seed).fit(
        run.features("train"), labels, n_classes=len(run.class_names))
    return linear_head(probe), ("linear: the run has no linear head (heads: "
                                f"{', '.join(cfg.heads)}); a probe fitted here for the CAM")


def explain_run(run_dir, *, ids=None, top: int = 24, split: str = "test",
                method: str = "gradcam", layer: str | None = None, fast: bool = True,
                device="auto", batch_size: int = 16, progress: bool = True,
                fraction: float = 0.2, benchmark: bool = True) -> Path:
    """CAMs of the given and the predicted class of the `top` hardest examples of `split` (or
    of `ids`) -> RUN_DIR/explain/ {cams.npz, cam_stats.parquet, meta.json}; returns that folder.
    benchmark: time the fast path against the library on the first batch (gradcam only)."""
    t0 = time.perf_counter()
    cam_method(method)
    run = load_run(run_dir)
    rows = _select(run.examples, ids, top, split)
    pcol = pred_column(run.examples)
    backbone = run.backbone().to(resolve_device(device))
    resolve_layer(backbone, layer)
    head, head_note = _score_head(run, pcol)
    kw = dict(method=method, layer=layer, fast=fast, device=device, head=head)
    acc = {k: [] for k in ("images", "given", "pred", "given_faith", "pred_faith")}
    cam_s, bench = 0.0, None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for b in tqdm(range(0, len(rows), batch_size), disable=not progress, desc="explain",
                      unit="batch"):
            part = rows.iloc[b:b + batch_size]
            imgs = run.images(part["id"].tolist())  # uint8 (3, H0, W0) each
            x = torch.stack([backbone.preprocess(im) for im in imgs])  # (B, 3, H, W)
            acc["images"].append(np.stack([model_input_view(backbone.preprocess, im)
                                           for im in imgs]))  # (B, H, W, 3)
            for key, col in (("given", "label"), ("pred", pcol)):
                t1 = time.perf_counter()
                maps = compute_cams(backbone, x, part[col].to_numpy(), **kw)  # (B, H, W)
                cam_s += time.perf_counter() - t1
                acc[key].append(maps)
                acc[f"{key}_faith"].append(faithfulness(
                    backbone, x, part[col].to_numpy(), maps, fraction=fraction, seed=b,
                    head=head, device=device))
            if benchmark and bench is None and method == "gradcam":
                bench = throughput(backbone, x, part["label"].to_numpy(), layer=layer,
                                   head=head, device=device)
    for w in caught:  # shown to the user and kept in meta.json
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    given, pred = np.concatenate(acc["given"]), np.concatenate(acc["pred"])  # (M, H, W)
    out = run.path / "explain"
    arrays = dict(ids=np.array(rows["id"].tolist(), dtype=str),
                  images=np.concatenate(acc["images"]), given=given.astype(np.float16),
                  pred=pred.astype(np.float16), given_class=rows["label"].to_numpy(np.int64),
                  pred_class=rows[pcol].to_numpy(np.int64))
    atomic_write(out / "cams.npz", lambda f: np.savez_compressed(f, **arrays))
    stats = _stats_table(rows, pcol, given, pred, run.class_names)
    atomic_write(out / "cam_stats.parquet", lambda f: stats.to_parquet(f, index=False))
    m, fast_used = len(rows), fast and method == "gradcam"
    write_json(out / "meta.json", {
        "method": method, "layer": layer or backbone.cam_layer, "backbone": backbone.name,
        "fast_path": fast_used, "fast_path_reason": (
            "plain gradcam: one forward, autograd.grad to the layer only" if fast_used
            else "fast=False" if method == "gradcam" else f"{method} has no fast path"),
        "score_head": head_note, "pred_column": pcol,
        "selection": "given ids" if ids is not None else f"top {top} of {split!r} by hardness",
        "n": m, "image_size": list(given.shape[1:]), "device": str(resolve_device(device)),
        "cam_seconds": round(cam_s, 3), "images_per_s": m / cam_s, "maps_per_s": 2 * m / cam_s,
        "throughput": bench, "faithfulness": {k: _merge_faith(acc[f"{k}_faith"])
                                              for k in ("given", "pred")},
        "warnings": sorted({str(w.message) for w in caught}),
        "seconds": round(time.perf_counter() - t0, 3)})
    return out


def _stats_table(rows, pcol, given, pred, names) -> pd.DataFrame:
    frames = []
    for target, col, maps in (("given", "label", given), ("pred", pcol, pred)):
        st, cls = cam_stats(maps), rows[col].to_numpy(np.int64)
        st.insert(0, "id", rows["id"].tolist())
        st.insert(1, "target", target)
        st.insert(2, "class_index", cls)
        st.insert(3, "class_name", [names[c] if 0 <= c < len(names) else str(c) for c in cls])
        frames.append(st)
    return pd.concat(frames, ignore_index=True)


def _merge_faith(parts: list[dict]) -> dict:
    """Per-batch faithfulness dicts -> one over all examples."""
    cat = {k: np.concatenate([p[k] for p in parts]) for k in ("prob", "drop_cam_each",
                                                             "drop_random_each")}
    return _faith_summary(parts[0]["fraction"], parts[0]["perturbation"], cat["prob"],
                          cat["drop_cam_each"], cat["drop_random_each"])
