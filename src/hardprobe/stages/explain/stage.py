"""Class activation maps of hard examples: where does the model look?

`explain_run(RUN_DIR)` writes RUN_DIR/explain/: CAMs of the given and the predicted class of
the hardest examples, their statistics and `faithfulness` (the drop in the class probability
when the CAM's top pixels are removed, against a random map). The CAM computation itself
(`compute_cams`, `cams_given_pred`: pytorch-grad-cam or the fast Grad-CAM path, its guards,
`cam_stats`, `throughput`) lives in `cams.py`. Per batch the fast path makes both targets'
maps from one forward and scores every perturbed image of both in one batched pass.
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
from pytorch_grad_cam.metrics.road import NoisyLinearImputer, neighbors_weights
from scipy.sparse import coo_matrix
from scipy.sparse.linalg import spsolve
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF
from tqdm.auto import tqdm

from ...core.device import resolve_device
from ...core.io import atomic_write, write_json
from ...errors import CamError, ConfigError
from ...rundir.layout import primary_head, require
from ...rundir.run import load_run
from .cams import (LogitsModel, cam_method, cam_stats, cams_given_pred, linear_head,
                   resolve_layer, throughput)

__all__ = ["explain_run", "faithfulness", "faithfulness_pair", "model_input_view", "pred_column",
           "CamError"]


# ------------------------------------------------------------------ faithfulness
def faithfulness(backbone, x: torch.Tensor, targets, maps: np.ndarray, *, fraction: float = 0.2,
                 seed: int = 0, perturbation: str = "road", random_grid: int = 7,
                 head: nn.Module | None = None, device="cpu",
                 channels_last: bool = True) -> dict:
    """Drop in the target-class probability when the top `fraction` pixels are removed.

    Pixels are ranked by the CAM (ties broken at random, seeded), exactly round(fraction*H*W)
    are removed, and the same is done for a random map (uniform noise on a random_grid x
    random_grid grid, bilinearly upsampled: blobs like a CAM's, not salt noise). Removal:
    "road" = pytorch-grad-cam's ROAD NoisyLinearImputer (metrics.road) on our exact mask (its
    percentile mask removes every pixel when >80% of a CAM is 0); "mean" = the image's
    per-channel mean. Own code otherwise. drop_cam > drop_random means the CAM is faithful.
    channels_last: score the images in that layout (faster; the same within float tolerance).
    """
    return faithfulness_pair(backbone, x, targets, targets, maps, maps, fraction=fraction,
                             seed=seed, perturbation=perturbation, random_grid=random_grid,
                             head=head, device=device, channels_last=channels_last)[0]


def faithfulness_pair(backbone, x: torch.Tensor, given, pred, given_maps, pred_maps, *,
                      fraction: float = 0.2, seed: int = 0, perturbation: str = "road",
                      random_grid: int = 7, head: nn.Module | None = None, device="cpu",
                      probs: np.ndarray | None = None,
                      channels_last: bool = True) -> tuple[dict, dict]:
    """(faithfulness(x, given, given_maps, seed=seed), the same for pred) in one pass: the
    same numbers (the two calls draw the same random maps, tie-breaks and ROAD noise), with
    the random-map images made and scored once for both classes, an example whose two
    targets and maps agree perturbed once, and every perturbed image in one batched scoring.
    probs: (N, K) softmax of x's logits when already computed (cams_given_pred), else one
    forward here. drop = prob(x) - prob(perturbed x); higher drop_cam = more faithful."""
    if not 0 < fraction < 1 or perturbation not in ("road", "mean"):
        raise ConfigError(f"need 0 < fraction < 1 and perturbation 'road' or 'mean', got "
                         f"{fraction!r}, {perturbation!r}")
    dev = resolve_device(device)
    model = LogitsModel(backbone, head).to(dev).eval()
    x = x.detach().to(dev, torch.float32)
    t = {key: np.array(v, np.int64).reshape(-1) for key, v in (("given", given), ("pred", pred))}
    gm, pm = np.asarray(given_maps), np.asarray(pred_maps)
    n, height, width = gm.shape
    same = (t["given"] == t["pred"]) & np.array([np.array_equal(gm[i], pm[i]) for i in range(n)])
    rng = np.random.default_rng(seed)
    k = int(round(fraction * height * width))
    rand = _random_maps(rng, n, height, width, random_grid)  # (N, H, W)
    ties = rng.random((2, n, height * width))  # the draws of the cam, then the random pass
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # ROAD's imputation noise
        xs, own = _perturbed(x.cpu(), gm, pm, rand, same, ties, k, perturbation)
    fwd = dict(chunk=max(n, 1), dev=dev, channels_last=channels_last)
    q = _softmax(model, torch.stack(xs), **fwd)  # (R, K) perturbed
    p = probs if probs is not None else _softmax(model, x, **fwd)
    rows, out = np.arange(n), []
    for key in ("given", "pred"):
        prob = p[rows, t[key]]
        cam, rnd = prob - q[own[key], t[key]], prob - q[own["random"], t[key]]
        out.append(_faith_summary(fraction, perturbation, prob, cam, rnd))
    return out[0], out[1]


def _perturbed(x, gm, pm, rand, same, ties, k, how) -> tuple[list, dict]:
    """The perturbed images in the order the two single-target passes made them (so the ROAD
    noise is the same draw): given's CAM removal, pred's where it differs (from the same
    noise state), then the random map's; and which image row belongs to which (N,) each."""
    n, xs, own = len(x), [], {"given": [], "pred": [], "random": []}
    for i in range(n):
        state = torch.get_rng_state()
        own["given"].append(len(xs))
        xs.append(_remove_top(x[i], gm[i], k, how, ties[0, i]))
        if same[i]:
            own["pred"].append(own["given"][-1])
            continue
        torch.set_rng_state(state)  # pred's pass drew the noise from the same state
        own["pred"].append(len(xs))
        xs.append(_remove_top(x[i], pm[i], k, how, ties[0, i]))
    for i in range(n):
        own["random"].append(len(xs))
        xs.append(_remove_top(x[i], rand[i], k, how, ties[1, i]))
    return xs, {key: np.array(v, np.int64) for key, v in own.items()}


def _faith_summary(fraction, perturbation, prob, cam, rnd) -> dict:
    cam, rnd = np.asarray(cam, np.float64), np.asarray(rnd, np.float64)
    return {"fraction": fraction, "perturbation": perturbation, "n": len(cam),
            "mean_prob": float(np.mean(prob)), "drop_cam": float(cam.mean()),
            "drop_random": float(rnd.mean()), "cam_beats_random": float((cam > rnd).mean()),
            "prob": list(map(float, prob)), "drop_cam_each": cam.tolist(),
            "drop_random_each": rnd.tolist()}


@torch.inference_mode()
def _softmax(model: nn.Module, x: torch.Tensor, *, chunk: int, dev,
             channels_last: bool) -> np.ndarray:
    """(R, K) float32 softmax of model(x), `chunk` images per forward. channels_last: the
    input in oneDNN's and cuDNN's fast convolution layout (1.35x for ResNet-50 @ 224 on a
    2-core AVX-512 CPU, measured; logits equal within float tolerance, ~5e-7 relative)."""
    fmt = torch.channels_last if channels_last and x.dim() == 4 else torch.contiguous_format
    return np.concatenate([torch.softmax(model(x[i:i + chunk].to(dev).contiguous(
        memory_format=fmt)).float(), dim=1).cpu().numpy() for i in range(0, len(x), chunk)])


def _random_maps(rng, n: int, height: int, width: int, grid: int) -> np.ndarray:
    g = (min(grid, height), min(grid, width))
    return np.stack([cv2.resize(rng.random(g, dtype=np.float32), (width, height))
                     for _ in range(n)])


def _remove_top(img: torch.Tensor, cam: np.ndarray, k: int, how: str,
                ties: np.ndarray) -> torch.Tensor:
    """img (C, H, W) with its k highest-`cam` pixels removed (imputed or set to the mean);
    ties (H*W,): random keys breaking ties in the ranking."""
    c, height, width = img.shape
    order = np.lexsort((ties, -np.asarray(cam, np.float64).ravel()))
    keep = np.ones(height * width, np.float32)
    keep[order[:k]] = 0  # 1 = keep, 0 = remove
    keep = keep.reshape(height, width)
    if how == "road":
        return road_impute(img, keep)
    mean = img.mean(dim=(1, 2), keepdim=True)
    return torch.where(torch.from_numpy(keep).bool(), img, mean)


def road_impute(img: torch.Tensor, keep: np.ndarray, noise: float = 0.01) -> torch.Tensor:
    """pytorch-grad-cam's ROAD NoisyLinearImputer()(img, keep), the same numbers (the same
    sparse system, solver and noise draw) about 2.5x faster: the system matrix goes straight
    to CSC instead of through a lil_matrix (~60 ms per 224 x 224 image alone).
    img (C, H, W) float; keep (H, W): 1 = keep, 0 = impute from the neighbours."""
    flat = img.reshape(img.shape[0], -1)  # (C, H*W)
    missing = np.flatnonzero(keep.reshape(-1) == 0)
    system, rhs = _road_system(keep, img.numpy())
    res = torch.tensor(spsolve(system, rhs), dtype=torch.float)  # (M, C), M = missing pixels
    if res.dim() == 1:  # spsolve drops the channel axis of a 1-channel image
        res = res[:, None]
    out = flat.clone()
    out[:, missing] = res.t() + noise * torch.randn_like(res.t())  # the library's noise draw
    return out.reshape_as(img)


def _road_system(keep: np.ndarray, img: np.ndarray):
    """NoisyLinearImputer.setup_sparse_system with the same arithmetic, in CSC: each missing
    pixel = the weighted mean of its 8 neighbours (missing ones unknowns, known ones on the
    right-hand side). Returns (A (M, M) csc with sorted indices, b (M, C))."""
    maskflt = keep.reshape(-1)
    imgflat = img.reshape(img.shape[0], -1)
    indices = np.flatnonzero(maskflt == 0)
    vidx = np.zeros(len(maskflt), dtype=int)
    vidx[indices] = np.arange(len(indices))
    m = len(indices)
    b, sum_neighbors = np.zeros((m, img.shape[0])), np.ones(m)
    rows, cols, vals = [np.arange(m)], [np.arange(m)], []
    for offset, weight in neighbors_weights:  # the library's 8 ((dy, dx), weight)
        valid, coords = NoisyLinearImputer.add_offset_to_indices(indices, offset, keep.shape)
        coords, ids = coords[valid], np.flatnonzero(valid)
        known = maskflt[coords] > 0.5
        b[ids[known], :] -= weight * imgflat[:, coords[known]].T
        unknown = maskflt[coords] < 0.5
        rows.append(ids[unknown])
        cols.append(vidx[coords[unknown]])
        vals.append(np.full(int(unknown.sum()), weight))
        sum_neighbors[~valid] -= weight
    vals.insert(0, -sum_neighbors)
    a = coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                   shape=(m, m)).tocsc()
    a.sort_indices()
    return a, b


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
                fraction: float = 0.2, benchmark: bool = False) -> Path:
    """CAMs of the given and the predicted class of the `top` hardest examples of `split` (or
    of `ids`) -> RUN_DIR/explain/ {cams.npz, cam_stats.parquet, meta.json}; returns that folder.
    benchmark: also time the fast path against the library on the first batch (gradcam only;
    off by default: it costs more than the CAMs themselves)."""
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
    secs, bench = dict.fromkeys(("images", "cams", "faithfulness", "throughput", "save"), 0.0), None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for b in tqdm(range(0, len(rows), batch_size), disable=not progress, desc="explain",
                      unit="batch"):
            t1 = time.perf_counter()
            part = rows.iloc[b:b + batch_size]
            imgs = run.images(part["id"].tolist())  # uint8 (3, H0, W0) each
            x = torch.stack([backbone.preprocess(im) for im in imgs])  # (B, 3, H, W)
            acc["images"].append(np.stack([model_input_view(backbone.preprocess, im)
                                           for im in imgs]))  # (B, H, W, 3)
            secs["images"] += time.perf_counter() - t1
            for key, v in _explain_batch(backbone, x, part["label"].to_numpy(),
                                         part[pcol].to_numpy(), seed=b, fraction=fraction,
                                         kw=kw, secs=secs).items():
                acc[key].append(v)
            if benchmark and bench is None and method == "gradcam":
                t1 = time.perf_counter()
                bench = throughput(backbone, x, part["label"].to_numpy(), layer=layer,
                                   head=head, device=device)
                secs["throughput"] += time.perf_counter() - t1
    for w in caught:  # shown to the user and kept in meta.json
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    t1 = time.perf_counter()
    out = _save(run, rows, pcol, acc)
    secs["save"] = time.perf_counter() - t1
    m, fast_used, cam_s = len(rows), fast and method == "gradcam", secs["cams"]
    write_json(out / "meta.json", {
        "method": method, "layer": layer or backbone.cam_layer, "backbone": backbone.name,
        "fast_path": fast_used, "fast_path_reason": (
            "plain gradcam: one forward for both targets, autograd.grad to the layer only"
            if fast_used else "fast=False" if method == "gradcam"
            else f"{method} has no fast path"),
        "score_head": head_note, "pred_column": pcol,
        "selection": "given ids" if ids is not None else f"top {top} of {split!r} by hardness",
        "n": m, "image_size": list(acc["given"][0].shape[1:]),
        "device": str(resolve_device(device)),
        "cam_seconds": round(cam_s, 3), "images_per_s": m / cam_s, "maps_per_s": 2 * m / cam_s,
        "throughput": bench if bench is not None else (
            "not measured (`hardprobe explain --benchmark` times the fast path against "
            "pytorch-grad-cam)"),
        "faithfulness": {k: _merge_faith(acc[f"{k}_faith"]) for k in ("given", "pred")},
        "warnings": sorted({str(w.message) for w in caught}),
        "seconds_by_part": {k: round(v, 3) for k, v in secs.items()},
        "seconds": round(time.perf_counter() - t0, 3)})
    return out


def _explain_batch(backbone, x, given, pred, *, seed: int, fraction: float, kw: dict,
                   secs: dict) -> dict:
    """One batch's maps and faithfulness: {given, pred (B, H, W), given_faith, pred_faith};
    adds its seconds to secs["cams"] and secs["faithfulness"]."""
    t1 = time.perf_counter()
    gmaps, pmaps, probs = cams_given_pred(backbone, x, given, pred, **kw)
    t2 = time.perf_counter()
    gf, pf = faithfulness_pair(backbone, x, given, pred, gmaps, pmaps, fraction=fraction,
                               seed=seed, head=kw["head"], device=kw["device"], probs=probs)
    secs["cams"] += t2 - t1
    secs["faithfulness"] += time.perf_counter() - t2
    return {"given": gmaps, "pred": pmaps, "given_faith": gf, "pred_faith": pf}


def _save(run, rows, pcol, acc) -> Path:
    """cams.npz and cam_stats.parquet in RUN_DIR/explain/ (returned)."""
    given, pred = np.concatenate(acc["given"]), np.concatenate(acc["pred"])  # (M, H, W)
    out = run.path / "explain"
    arrays = dict(ids=np.array(rows["id"].tolist(), dtype=str),
                  images=np.concatenate(acc["images"]), given=given.astype(np.float16),
                  pred=pred.astype(np.float16), given_class=rows["label"].to_numpy(np.int64),
                  pred_class=rows[pcol].to_numpy(np.int64))
    atomic_write(out / "cams.npz", lambda f: np.savez_compressed(f, **arrays))
    stats = _stats_table(rows, pcol, given, pred, run.class_names)
    atomic_write(out / "cam_stats.parquet", lambda f: stats.to_parquet(f, index=False))
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
