"""Occlusion, random erasing and blends, and the batched forward that finds where a model's
prediction flips under them and under the corruptions (flip severities, flip areas, flip
weights, occlusion sensitivity maps)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from PIL import Image

from ...core.stats import softmax
from ...errors import PerturbError
from .corruptions import (
    SEVERITIES,
    _check_image,
    check_severities,
    corrupt,
    example_rng,
)

NEVER = 6  # flip severity of an example no computed severity flips
ERASE_AREAS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
BLEND_WEIGHTS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
OCCLUSION_GRID = 7  # patch positions per axis
OCCLUSION_PATCH = 0.25  # patch side as a share of the image side (8 px on 32x32)
OCCLUSION_GREY = 128
ERASE_ASPECT = (0.5, 2.0)  # log-uniform height/width ratio of the erased rectangle


# ------------------------------------------------------------------ occlusion, erasing, blend
def occlusion_positions(h: int, w: int, grid: int = OCCLUSION_GRID,
                        patch: float = OCCLUSION_PATCH) -> tuple[int, int, list[tuple[int, int]]]:
    """(patch height, patch width, [(top, left)] in row-major order): a grid x grid lattice of
    patches of `patch` times the image side, from edge to edge (stride 4 px on 32x32)."""
    ph, pw = max(1, round(h * patch)), max(1, round(w * patch))
    tops = np.round(np.linspace(0, h - ph, grid)).astype(int)
    lefts = np.round(np.linspace(0, w - pw, grid)).astype(int)
    return ph, pw, [(int(t), int(l)) for t in tops for l in lefts]


def occlude(image, top: int, left: int, ph: int, pw: int, grey: int = OCCLUSION_GREY):
    """A copy of uint8 (H, W, 3) `image` with a grey ph x pw square at (top, left)."""
    out = np.array(image, dtype=np.uint8, copy=True)
    out[top:top + ph, left:left + pw] = grey
    return out


class _EraseDraw:
    """One example's random-erasing draws (Zhong et al. 2020): a centre, a log-uniform aspect
    ratio in ERASE_ASPECT and a uniform-noise fill; shared by every area, so the rectangles of
    growing area are nested."""

    def __init__(self, h: int, w: int, rng: np.random.Generator):
        self.h, self.w = h, w
        self.aspect = math.exp(rng.uniform(math.log(ERASE_ASPECT[0]), math.log(ERASE_ASPECT[1])))
        self.cy, self.cx = rng.uniform(0, h), rng.uniform(0, w)
        self.fill = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)

    def box(self, area: float) -> tuple[int, int, int, int]:
        a = area * self.h * self.w
        bh = int(np.clip(round(math.sqrt(a * self.aspect)), 1, self.h))
        bw = int(np.clip(round(a / bh), 1, self.w))
        top = int(np.clip(round(self.cy - bh / 2), 0, self.h - bh))
        left = int(np.clip(round(self.cx - bw / 2), 0, self.w - bw))
        return top, left, bh, bw


def erase(image, area: float, rng: np.random.Generator | None = None, *, seed: int = 0,
          _draw: _EraseDraw | None = None) -> np.ndarray:
    """A copy of uint8 (H, W, 3) `image` with a rectangle of `area` x the image filled with
    uniform noise (random erasing). Deterministic given rng / seed."""
    x = _check_image(image)
    d = _draw or _EraseDraw(x.shape[0], x.shape[1], rng or np.random.default_rng(seed))
    top, left, bh, bw = d.box(area)
    out = x.copy()
    out[top:top + bh, left:left + bw] = d.fill[top:top + bh, left:left + bw]
    return out


def blend(image, other, weight: float) -> np.ndarray:
    """(1 - weight) * image + weight * other, rounded to uint8; `other` is resized (bilinear)
    to the image's size when they differ."""
    x = _check_image(image)
    y = _check_image(other)
    if y.shape != x.shape:
        y = np.asarray(Image.fromarray(y).resize((x.shape[1], x.shape[0]), Image.BILINEAR))
    out = (1.0 - weight) * x.astype(np.float64) + weight * y.astype(np.float64)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def lowest_flip(clean_pred, preds, levels, never):
    """preds (K, N) at increasing `levels` (K,): per example the first level whose prediction
    differs from clean_pred (N,), else `never`."""
    preds = np.asarray(preds)
    changed = preds != np.asarray(clean_pred)[None, :]
    first = changed.argmax(axis=0)
    return np.where(changed.any(axis=0), np.asarray(levels)[first], never)



# ------------------------------------------------------------------ batched forward
class _Source:
    """Row j -> uint8 (3, H, W) tensor; a class (not a closure) so DataLoader workers can
    pickle it. Subclasses build image j from in-memory clean images."""

    def __init__(self, images: list[np.ndarray]):
        self.images = images

    def image(self, j: int) -> np.ndarray:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def __call__(self, j: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.image(j))).permute(2, 0, 1).contiguous()


class _Plain(_Source):
    def image(self, j):
        return self.images[j]

    def __len__(self):
        return len(self.images)


class _Corrupted(_Source):
    def __init__(self, images, ids, corruption, severity, seed):
        super().__init__(images)
        self.ids, self.corruption, self.severity, self.seed = ids, corruption, severity, seed

    def image(self, j):
        return corrupt(self.images[j], self.corruption, self.severity,
                       rng=example_rng(self.seed, self.corruption, self.ids[j]))

    def __len__(self):
        return len(self.images)


class _Occluded(_Source):
    def __init__(self, images, grid, patch, grey):
        super().__init__(images)
        self.grid, self.patch, self.grey = grid, patch, grey

    def image(self, j):
        i, p = divmod(j, self.grid * self.grid)
        x = self.images[i]
        ph, pw, pos = occlusion_positions(x.shape[0], x.shape[1], self.grid, self.patch)
        return occlude(x, *pos[p], ph, pw, self.grey)

    def __len__(self):
        return len(self.images) * self.grid * self.grid


class _Erased(_Source):
    def __init__(self, images, ids, areas, seed):
        super().__init__(images)
        self.ids, self.areas, self.seed = ids, tuple(areas), seed

    def image(self, j):
        i, a = divmod(j, len(self.areas))
        x = self.images[i]
        d = _EraseDraw(x.shape[0], x.shape[1], example_rng(self.seed, "erase", self.ids[i]))
        return erase(x, self.areas[a], _draw=d)

    def __len__(self):
        return len(self.images) * len(self.areas)


class _Blended(_Source):
    def __init__(self, images, partners, weights):
        super().__init__(images)
        self.partners, self.weights = partners, tuple(weights)

    def image(self, j):
        i, k = divmod(j, len(self.weights))
        return blend(self.images[i], self.partners[i], self.weights[k])

    def __len__(self):
        return len(self.images) * len(self.weights)


def _forward(backbone, source: _Source, *, device="cpu", precision="fp32", batch_size=128,
             num_workers=0, progress=False, desc="perturb", with_logits=None) -> dict:
    """{"embedding": (N, D) float32, "logits": (N, C) float32 if the backbone has a classifier}
    of every image of `source`, through the feature extractor's batched path."""
    from tqdm.auto import tqdm

    from ...core.device import resolve_device, resolve_precision
    from ...data.datasets import Split
    from ..extract.engines import TorchEngine
    from ..extract.features import _forward_indices
    dev = resolve_device(device)
    precision = resolve_precision(precision, dev)
    with_logits = backbone.num_classes is not None if with_logits is None else with_logits
    n = len(source)
    if n == 0:
        out = {"embedding": np.zeros((0, backbone.embed_dim), np.float32)}
        if with_logits:
            out["logits"] = np.zeros((0, backbone.num_classes), np.float32)
        return out
    split = Split(desc, "", pd.DataFrame(index=pd.RangeIndex(n)), source, "")
    backbone.to(dev)
    backbone.model.to(memory_format=torch.channels_last)
    bar = tqdm(total=n, unit="img", disable=not progress, desc=desc, leave=False)
    try:
        runner = TorchEngine(backbone, dev, precision)  # no engine choice or log per call
        out = _forward_indices(backbone, split, np.arange(n), dev, runner, batch_size,
                               num_workers, with_logits, bar)
    finally:
        bar.close()
    if not out["ok"].all():
        raise PerturbError(f"{(~out['ok']).sum()} perturbed image(s) failed: "
                           f"{out['error'][~out['ok']][0]}")
    return {k: out[k] for k in ("embedding", "logits") if k in out}



def _model_probs(arrays: dict) -> np.ndarray:
    if arrays.get("logits") is None:
        raise PerturbError("this backbone has no classifier: pass predict= (features -> probs)")
    return softmax(arrays["logits"])


def predict_images(backbone, images, *, predict=None, **fw) -> np.ndarray:
    """(N, C) probabilities of uint8 (H, W, 3) images; predict(arrays) -> probs, default the
    softmax of the backbone's logits. fw: device, precision, batch_size, num_workers, progress."""
    return (predict or _model_probs)(_forward(backbone, _Plain(list(images)), **fw))


def _clean_pred(backbone, images, predict, clean_pred, fw) -> np.ndarray:
    if clean_pred is not None:
        return np.asarray(clean_pred)
    return predict_images(backbone, images, predict=predict, **fw).argmax(axis=1)


def flip_severities(backbone, images, corruption: str, *, severities=SEVERITIES, ids=None,
                    seed: int = 0, predict=None, clean_pred=None, **fw) -> np.ndarray:
    """(N,) lowest severity at which `corruption` changes the prediction (argmax of predict)
    from the clean one; NEVER (6) when none of `severities` does. ids: example ids that seed
    each image's draws (default 0..N-1)."""
    images = [_check_image(im) for im in images]
    ids = [str(i) for i in (ids if ids is not None else range(len(images)))]
    sev = check_severities(severities)
    base = _clean_pred(backbone, images, predict, clean_pred, fw)
    preds = [(predict or _model_probs)(_forward(
        backbone, _Corrupted(images, ids, corruption, s, seed),
        **{"desc": f"{corruption} {s}", **fw})).argmax(1) for s in sev]
    return lowest_flip(base, np.stack(preds), sev, NEVER)


def occlusion_sensitivity(backbone, images, targets, *, predict=None, grid: int = OCCLUSION_GRID,
                          patch: float = OCCLUSION_PATCH, grey: int = OCCLUSION_GREY,
                          clean_prob=None, **fw) -> tuple[np.ndarray, np.ndarray]:
    """Zeiler & Fergus (2014) occlusion sensitivity: a grey square (patch x side) slid over a
    grid x grid lattice. Returns (maps (N, grid, grid) float32: p_clean(target) -
    p_occluded(target) per position, row-major as the lattice; max_drop (N,)).
    clean_prob: (N,) p(target) of the clean images, computed when not given."""
    images = [_check_image(im) for im in images]
    targets = np.asarray(targets, np.int64)
    n, g2 = len(images), grid * grid
    if clean_prob is None:
        clean_prob = predict_images(backbone, images, predict=predict, **fw)[np.arange(n), targets]
    probs = (predict or _model_probs)(_forward(backbone, _Occluded(images, grid, patch, grey),
                                               **{"desc": "occlusion", **fw}))  # (N * G^2, C)
    p = probs[np.arange(n * g2), np.repeat(targets, g2)].reshape(n, grid, grid)
    maps = (np.asarray(clean_prob, np.float64)[:, None, None] - p).astype(np.float32)
    return maps, maps.reshape(n, -1).max(axis=1) if n else np.zeros(0, np.float32)


def erase_flip_areas(backbone, images, *, areas=ERASE_AREAS, ids=None, seed: int = 0,
                     predict=None, clean_pred=None, **fw) -> np.ndarray:
    """(N,) smallest erased share (of `areas`, increasing) whose random erasing changes the
    prediction from the clean one; 1.0 when none does."""
    images = [_check_image(im) for im in images]
    ids = [str(i) for i in (ids if ids is not None else range(len(images)))]
    areas = tuple(sorted(areas))
    base = _clean_pred(backbone, images, predict, clean_pred, fw)
    probs = (predict or _model_probs)(_forward(backbone, _Erased(images, ids, areas, seed),
                                               **{"desc": "random erasing", **fw}))
    preds = probs.argmax(1).reshape(len(images), len(areas)).T  # (A, N)
    return lowest_flip(base, preds, areas, 1.0).astype(np.float64)


def blend_flip_weights(backbone, images, partners, *, weights=BLEND_WEIGHTS, predict=None,
                       clean_pred=None, **fw) -> np.ndarray:
    """(N,) smallest blend weight w (of `weights`, increasing) at which (1-w)*image +
    w*partner changes the prediction from the clean one; 1.0 when none does."""
    images = [_check_image(im) for im in images]
    partners = [_check_image(im) for im in partners]
    weights = tuple(sorted(weights))
    base = _clean_pred(backbone, images, predict, clean_pred, fw)
    probs = (predict or _model_probs)(_forward(backbone, _Blended(images, partners, weights),
                                               **{"desc": "blend", **fw}))
    preds = probs.argmax(1).reshape(len(images), len(weights)).T  # (K, N)
    return lowest_flip(base, preds, weights, 1.0).astype(np.float64)
