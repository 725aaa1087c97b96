"""Class activation maps of hard examples: where does the model look?

`compute_cams` runs pytorch-grad-cam on a backbone's logits, or for plain Grad-CAM a fast path
with the library's maps: one forward where the target layer's activation A is the only tensor
needing a gradient, then `torch.autograd.grad(score, A)`. Guards turn the library's silent
failures into errors or recorded warnings. `explain_run(RUN_DIR)` writes RUN_DIR/explain/.
"""
from __future__ import annotations

import contextlib
import difflib
import time
import warnings
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from pytorch_grad_cam import (EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, ScoreCAM,
                              XGradCAM)
from pytorch_grad_cam.metrics.road import NoisyLinearImputer
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF
from tqdm.auto import tqdm

from .cache import atomic_write
from .features import resolve_device
from .run import load_run, write_json

CAM_METHODS = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "xgradcam": XGradCAM,
               "layercam": LayerCAM, "hirescam": HiResCAM, "eigencam": EigenCAM,
               "scorecam": ScoreCAM}
FLAT_MAX = 0.5  # a library-scaled map whose max is below this was constant before scaling


class CamError(ValueError):
    """A CAM that cannot be computed faithfully (instead of a blank or wrong picture)."""


class CamWarning(UserWarning):
    """Some maps are blank (all zero): no positive, spatially varying evidence at that layer."""


# ------------------------------------------------------------------ model, layer, method
def linear_head(probe) -> nn.Linear:
    """A fitted LinearProbe as nn.Linear on the raw embedding (its standardisation folded in)."""
    coef = np.asarray(probe.coef_) / np.asarray(probe.scale_)  # (K, D)
    lin = nn.Linear(coef.shape[1], coef.shape[0])
    with torch.no_grad():
        lin.weight.copy_(torch.as_tensor(coef))
        lin.bias.copy_(torch.as_tensor(probe.intercept_ - coef @ np.asarray(probe.mean_)))
    return lin


class LogitsModel(nn.Module):
    """backbone (+ optional head on its embedding) -> logits only, as pytorch-grad-cam expects."""

    def __init__(self, backbone, head: nn.Module | None = None):
        super().__init__()
        self.backbone, self.net, self.head = backbone, backbone.model, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) -> (N, K)
        emb, logits = self.backbone.forward(x)
        if self.head is not None:
            return self.head(emb)
        if logits is None:
            raise CamError(f"{self.backbone.name} has no classifier (headless): pass head=, "
                           "e.g. linear_head(probe fitted on its features)")
        return logits


def cam_method(name: str):
    try:
        return CAM_METHODS[name]
    except KeyError:
        raise CamError(f"unknown CAM method {name!r}; choose one of "
                       f"{', '.join(CAM_METHODS)}") from None


def resolve_layer(backbone, name: str | None = None) -> nn.Module:
    """The module to hook (default `backbone.cam_layer`); a wrong name says what exists."""
    name = backbone.cam_layer if name is None else name
    modules = dict(backbone.model.named_modules())
    if name not in modules or not name:
        close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.5)
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise CamError(f"{backbone.name} has no layer {name!r}.{hint} "
                       f"List them with `hardprobe layers {backbone.name}`.")
    return modules[name]


@contextlib.contextmanager
def _requires_grad(model: nn.Module, flag: bool):
    """Set requires_grad on all parameters, then restore it (and drop the library's .grad)."""
    before = [(p, p.requires_grad) for p in model.parameters()]
    model.requires_grad_(flag)
    try:
        yield
    finally:
        for p, b in before:
            p.requires_grad_(b)
            p.grad = None if flag else p.grad


@contextlib.contextmanager
def _hooked(module: nn.Module, model: nn.Module, hook=None):
    """Count the layer's calls in the model's first forward (ScoreCAM runs more) and run
    `hook` on its output then (the hook may replace the output)."""
    calls, done = [], []

    def count(mod, inputs, out):
        if not done:
            calls.append(1)
            return hook(out) if hook else None

    handles = [module.register_forward_hook(count),
               model.register_forward_hook(lambda *a: done.append(1))]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def _check_calls(calls: int, name: str) -> None:
    if calls == 0:
        raise CamError(f"layer {name!r} never ran in the forward pass; pick a layer on the "
                       "path to the logits (`hardprobe layers MODEL`)")
    if calls > 1:
        raise CamError(f"layer {name!r} ran {calls} times in one forward pass (a shared "
                       "module); its CAM is ambiguous, pick a layer that runs once")


def _no_gradient(name: str) -> CamError:
    return CamError(f"no gradient of the logits reaches layer {name!r}: it is not on the path to "
                    "the classifier; pick a layer before the head (`hardprobe layers MODEL`)")


# ------------------------------------------------------------------ CAMs
def compute_cams(backbone, x: torch.Tensor, targets, *, method: str = "gradcam",
                 layer: str | None = None, fast: bool = True, device="cpu",
                 head: nn.Module | None = None) -> np.ndarray:
    """CAMs (N, H, W) float32 in [0, 1] of a preprocessed batch x (N, 3, H, W) for class `targets`.

    targets: (N,) class indices of the logits (of `head(embedding)` when head is given).
    fast: for method "gradcam", our one-forward path (same maps as the library); other methods
    always use the library. Blank maps raise a CamWarning naming the examples.
    """
    cls = cam_method(method)
    targets = [int(t) for t in np.asarray(targets).reshape(-1)]
    if len(targets) != len(x):
        raise CamError(f"{len(targets)} targets for a batch of {len(x)} images: one class each "
                       "(the library would silently leave the rest blank)")
    name = backbone.cam_layer if layer is None else layer
    module = resolve_layer(backbone, name)
    dev = resolve_device(device)
    model = LogitsModel(backbone, head).to(dev).eval()
    x = x.to(dev, torch.float32)
    if fast and method == "gradcam":
        raw = _fast_gradcam(model, module, name, backbone.cam_reshape, x, targets)
        maps = scale_like_library(raw, x.shape[-2:])
    else:
        maps = _library_cams(cls, model, module, name, backbone.cam_reshape, x, targets)
    _check_maps(maps, name, method)
    return maps


def _fast_gradcam(model, module, name, reshape, x, targets) -> np.ndarray:
    """Raw Grad-CAM (N, h, w) = sum_c mean_hw(dS/dA_c) * A_c, S = logits[i, targets[i]]."""
    store = {}

    def hook(out):
        if not torch.is_tensor(out):
            raise CamError(f"layer {name!r} returns {type(out).__name__}, not a tensor")
        store["A"] = a = out.detach().requires_grad_(True)  # the only tensor needing grad
        return a.clone()  # later in-place ops (ReLU(inplace), +=) act on the copy, not on A

    with _hooked(module, model, hook) as calls, torch.enable_grad(), _requires_grad(model, False):
        logits = model(x)  # (N, K)
    _check_calls(len(calls), name)
    _check_targets(targets, logits.shape[1])
    score = logits[torch.arange(len(x)), torch.as_tensor(targets)].sum()
    grad = (torch.autograd.grad(score, store["A"], allow_unused=True)[0]
            if score.requires_grad else None)
    if grad is None:
        raise _no_gradient(name)
    acts = store["A"].detach()
    if reshape is not None:  # ViT: (N, T, C) tokens -> (N, C, h, w), prefix tokens dropped
        acts, grad = reshape(acts), reshape(grad)
    if acts.dim() != 4:
        raise CamError(f"layer {name!r} gives {tuple(acts.shape)}, not (N, C, h, w); token "
                       "outputs need the backbone's cam_reshape")
    weights = grad.float().mean(dim=(2, 3))  # (N, C)
    cam = (weights[:, :, None, None] * acts.float()).sum(dim=1)  # (N, h, w)
    return cam.cpu().numpy()


def _check_targets(targets, n_classes: int) -> None:
    bad = [t for t in targets if not 0 <= t < n_classes]
    if bad:
        raise CamError(f"target classes {bad[:5]} are outside the {n_classes} logits")


def scale_like_library(cams: np.ndarray, size_hw) -> np.ndarray:
    """pytorch-grad-cam's post-processing: (N, h, w) raw -> (N, H, W) float32 in [0, 1].

    Per map: relu, (x - min) / (1e-7 + max), cv2 bilinear resize to (H, W), then the same
    min-max again (BaseCAM.compute_cam_per_layer + aggregate_multi_layers).
    """
    height, width = int(size_hw[0]), int(size_hw[1])
    out = np.empty((len(cams), height, width), np.float32)
    for i, cam in enumerate(np.maximum(np.asarray(cams, np.float32), 0)):  # (h, w)
        for step in range(2):
            if step:  # (h, w) -> (H, W); cv2 takes (width, height)
                cam = np.maximum(cv2.resize(np.float32(cam), (width, height)), 0)
            cam = cam - np.min(cam)
            cam = cam / (1e-7 + np.max(cam))
        out[i] = cam
    return out


def _library_cams(cls, model, module, name, reshape, x, targets) -> np.ndarray:
    """pytorch-grad-cam's own computation, with its failures diagnosed."""
    seen = {}  # a copy of the layer's output: the library keeps a view of it (on CPU)

    def keep(out):
        seen["A"] = out.detach().clone() if torch.is_tensor(out) else None

    # the library backpropagates into the parameters: they must require grad meanwhile
    with _hooked(module, model, keep) as calls, _requires_grad(model, True):
        cam = cls(model=model, target_layers=[module], reshape_transform=reshape)
        hooks = cam.activations_and_grads
        try:
            maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets])
            got_grads = bool(hooks.gradients)  # read before release() clears the lists
            _check_in_place(hooks.activations, seen.get("A"), reshape, name)
        except Exception as e:  # diagnose what the library reports as e.g. NoneType.shape
            if isinstance(e, CamError):
                raise
            _check_calls(len(calls), name)
            with torch.no_grad():
                _check_targets(targets, model(x[:1]).shape[1])
            if cam.uses_gradients and not hooks.gradients:
                raise _no_gradient(name) from e
            raise
        finally:
            hooks.release()
    _check_calls(len(calls), name)
    if cam.uses_gradients and not got_grads:
        raise _no_gradient(name)
    return np.asarray(maps, np.float32)


def _check_in_place(stored: list, a: torch.Tensor | None, reshape, name: str) -> None:
    """The library's activation must still be the layer's output (no later in-place op)."""
    if stored and a is not None and not torch.allclose(
            stored[0], (reshape(a) if reshape else a).to(stored[0].device), rtol=0, atol=0,
            equal_nan=True):
        raise CamError(f"the output of layer {name!r} is changed in place later in the forward "
                       "(e.g. `out += identity`), so pytorch-grad-cam's CAM would use the wrong "
                       "activation; use fast=True (gradcam) or the next layer")


def blank_maps(maps: np.ndarray) -> np.ndarray:
    """(N,) bool: maps that are blank (all zero / constant before scaling)."""
    maps = np.asarray(maps)
    return maps.reshape(len(maps), -1).max(axis=1) < FLAT_MAX


def _check_maps(maps: np.ndarray, name: str, method: str) -> None:
    bad = ~np.isfinite(maps.reshape(len(maps), -1)).all(axis=1)
    if bad.any():
        raise CamError(f"{method} maps of examples {np.flatnonzero(bad).tolist()} at layer "
                       f"{name!r} are not finite (NaN/inf activations or gradients)")
    blank = blank_maps(maps)
    if blank.any():
        warnings.warn(CamWarning(
            f"{method} maps of examples {np.flatnonzero(blank).tolist()} (of {len(maps)}) at "
            f"layer {name!r} are blank: the class score's gradient is zero there (zero head, or "
            "a layer after the class token / pooling) or the evidence is nowhere positive"),
            stacklevel=3)


# ------------------------------------------------------------------ statistics
def cam_stats(maps: np.ndarray) -> pd.DataFrame:
    """Per map (N, H, W): peak_y, peak_x (row/(H-1), col/(W-1) of the max, in [0, 1]),
    top10_mass (share of the total in the top ceil(10%) pixels), entropy (of map/sum, divided
    by log(H*W), in [0, 1]) and warning. Negative values count as 0. Non-finite, all-zero or
    constant maps get NaN stats and a warning."""
    maps = np.asarray(maps, np.float64)
    n, height, width = maps.shape
    size, rows = height * width, []
    k = max(1, -(-size // 10))  # ceil(10%) of the pixels
    for m in maps.reshape(n, size):
        problem = _map_problem(m)
        if problem:
            rows.append(dict(peak_y=np.nan, peak_x=np.nan, top10_mass=np.nan, entropy=np.nan,
                             warning=problem))
            continue
        p = np.maximum(m, 0) / np.maximum(m, 0).sum()  # (H*W,) a distribution
        y, x = divmod(int(np.argmax(p)), width)
        nz = p[p > 0]
        ent = float(-(nz * np.log(nz)).sum() / np.log(size)) if size > 1 else 0.0
        rows.append(dict(peak_y=y / max(height - 1, 1), peak_x=x / max(width - 1, 1),
                         top10_mass=float(np.sort(p)[::-1][:k].sum()), entropy=ent,
                         warning=None))
    return pd.DataFrame(rows, columns=["peak_y", "peak_x", "top10_mass", "entropy", "warning"])


def _map_problem(m: np.ndarray) -> str | None:
    if not np.isfinite(m).all():
        return "non-finite map"
    if np.maximum(m, 0).sum() == 0:
        return "all-zero map"
    if np.ptp(m) <= 1e-6 * max(1.0, float(np.abs(m).max())):
        return "constant map"
    return None


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
        raise ValueError(f"need 0 < fraction < 1 and perturbation 'road' or 'mean', got "
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


def throughput(backbone, x: torch.Tensor, targets, *, layer: str | None = None,
               head: nn.Module | None = None, device="cpu") -> dict:
    """Images/s of the fast Grad-CAM path and of the library on the same batch (+ max |diff|)."""
    out, maps = {"batch": len(x)}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CamWarning)
        for key, fast in (("fast", True), ("library", False)):
            t0 = time.perf_counter()
            maps[key] = compute_cams(backbone, x, targets, layer=layer, fast=fast,
                                     device=device, head=head)
            out[f"{key}_images_per_s"] = len(x) / (time.perf_counter() - t0)
    out["speedup"] = out["fast_images_per_s"] / out["library_images_per_s"]
    out["max_abs_diff"] = float(np.abs(maps["fast"] - maps["library"]).max())
    return out


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
    """The run's primary head: the model's own classifier, else the linear probe, else k-NN."""
    for col in ("pred_model", "pred_linear", "pred_knn"):
        if col in examples.columns:
            return col
    raise CamError("the run has no predictions; run `hardprobe classify` first")


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
    if "hardness" not in examples.columns:
        raise CamError("the run has no hardness column; run `hardprobe classify` first")
    if split not in set(examples["split"]):
        raise CamError(f"no split {split!r} in the run; splits: {sorted(set(examples['split']))}")
    sub = examples[examples["split"] == split]
    if sub.empty or top < 1:
        raise CamError(f"nothing to explain: split {split!r} has {len(sub)} examples, top={top}")
    return sub.sort_values("hardness", ascending=False, kind="stable").head(top)


def _score_head(run, pred_col: str) -> tuple[nn.Module | None, str]:
    """What the CAM differentiates: the model's logits when they are the run's label space,
    else a linear probe refitted (deterministically, as `classify` does) on the train features."""
    if pred_col == "pred_model":
        return None, "model: the backbone's own classifier"
    from .heads import LinearProbe
    cfg = run.config
    labels = run.split_examples("train")["label"].to_numpy()
    probe = LinearProbe(C=cfg.linear_c, seed=cfg.seed).fit(
        run.features("train"), labels, n_classes=len(run.class_names))
    return linear_head(probe), "linear: probe refitted on the train features"


def explain_run(run_dir, *, ids=None, top: int = 16, split: str = "test",
                method: str = "gradcam", layer: str | None = None, fast: bool = True,
                device="cpu", batch_size: int = 16, progress: bool = True,
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
