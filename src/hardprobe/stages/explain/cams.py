"""Class activation maps: pytorch-grad-cam on a backbone's logits, plus our fast path.

`compute_cams` runs pytorch-grad-cam on a backbone's logits, or for plain Grad-CAM a fast path
with the library's maps: one forward where the target layer's activation A is the only tensor
needing a gradient, then `torch.autograd.grad(score, A)`. Guards turn the library's silent
failures into errors or recorded warnings. `cam_stats` describes the maps; `throughput` times
the fast path against the library. The public names are re-exported by `hardprobe.stages.explain`,
the stage that uses them.
"""
from __future__ import annotations

import contextlib
import difflib
import time
import warnings

import cv2
import numpy as np
import pandas as pd
import torch
from pytorch_grad_cam import (
    EigenCAM,
    GradCAM,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    ScoreCAM,
    XGradCAM,
)
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from ...core.device import resolve_device
from ...errors import CamError, CamWarning

CAM_METHODS = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "xgradcam": XGradCAM,
               "layercam": LayerCAM, "hirescam": HiResCAM, "eigencam": EigenCAM,
               "scorecam": ScoreCAM}
FLAT_MAX = 0.5  # a library-scaled map whose max is below this was constant before scaling


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
    logits, acts = _fast_forward(model, module, name, x)
    return _gradcam_from(logits, acts, targets, reshape, name)


def _fast_forward(model, module, name, x) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward where the layer's output A (returned) is the only tensor needing a gradient:
    logits (N, K) with the graph from A kept, so several targets can be differentiated."""
    store = {}

    def hook(out):
        if not torch.is_tensor(out):
            raise CamError(f"layer {name!r} returns {type(out).__name__}, not a tensor")
        store["A"] = a = out.detach().requires_grad_(True)  # the only tensor needing grad
        return a.clone()  # later in-place ops (ReLU(inplace), +=) act on the copy, not on A

    with _hooked(module, model, hook) as calls, torch.enable_grad(), _requires_grad(model, False):
        logits = model(x)  # (N, K)
    _check_calls(len(calls), name)
    return logits, store["A"]


def _gradcam_from(logits, acts, targets, reshape, name, keep_graph=False) -> np.ndarray:
    """Raw Grad-CAM (N, h, w) of `targets` from _fast_forward's logits and layer output.
    keep_graph: the graph survives, for another target's gradient."""
    _check_targets(targets, logits.shape[1])
    score = logits[torch.arange(len(logits)), torch.as_tensor(targets)].sum()
    grad = (torch.autograd.grad(score, acts, allow_unused=True, retain_graph=keep_graph)[0]
            if score.requires_grad else None)
    if grad is None:
        raise _no_gradient(name)
    acts = acts.detach()
    if reshape is not None:  # ViT: (N, T, C) tokens -> (N, C, h, w), prefix tokens dropped
        acts, grad = reshape(acts), reshape(grad)
    if acts.dim() != 4:
        raise CamError(f"layer {name!r} gives {tuple(acts.shape)}, not (N, C, h, w); token "
                       "outputs need the backbone's cam_reshape")
    weights = grad.float().mean(dim=(2, 3))  # (N, C)
    cam = (weights[:, :, None, None] * acts.float()).sum(dim=1)  # (N, h, w)
    return cam.cpu().numpy()


def cams_given_pred(backbone, x: torch.Tensor, given, pred, *, method: str = "gradcam",
                    layer: str | None = None, fast: bool = True, device="cpu",
                    head: nn.Module | None = None):
    """CAMs of two targets per image -> (given_maps, pred_maps, probs): compute_cams(x, given)
    and compute_cams(x, pred) from ONE forward on the fast Grad-CAM path (two gradients of
    the same graph; examples whose two targets agree reuse the given map). probs (N, K)
    float32: the softmax of that forward's logits, for faithfulness; None on the library
    path, which runs compute_cams twice."""
    given = np.asarray(given, np.int64).reshape(-1)
    pred = np.asarray(pred, np.int64).reshape(-1)
    kw = dict(method=method, layer=layer, fast=fast, device=device, head=head)
    if not (fast and method == "gradcam") or len(given) != len(x) or len(pred) != len(x):
        return compute_cams(backbone, x, given, **kw), compute_cams(backbone, x, pred, **kw), None
    name = backbone.cam_layer if layer is None else layer
    module = resolve_layer(backbone, name)
    dev = resolve_device(device)
    model = LogitsModel(backbone, head).to(dev).eval()
    x = x.to(dev, torch.float32)
    logits, acts = _fast_forward(model, module, name, x)
    differ = np.flatnonzero(given != pred)
    raw_g = _gradcam_from(logits, acts, given.tolist(), backbone.cam_reshape, name,
                          keep_graph=len(differ) > 0)
    raw_p = raw_g.copy()
    if len(differ):  # only the rows that differ carry a gradient; the others are dropped
        raw_p[differ] = _gradcam_from(logits, acts, pred.tolist(), backbone.cam_reshape,
                                      name)[differ]
    maps = []
    for raw in (raw_g, raw_p):
        maps.append(scale_like_library(raw, x.shape[-2:]))
        _check_maps(maps[-1], name, method)
    probs = torch.softmax(logits.detach().float(), dim=1).cpu().numpy()
    return maps[0], maps[1], probs


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


# ------------------------------------------------------------------ fast path vs library
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
