"""Hard inputs made on purpose: corruptions, occlusion and blends, and where predictions break.

`perturb_run(run_dir)` probes a run's model with perturbed copies of a stratified subset of its
test images and writes RUN_DIR/perturb/:

    accuracy.csv       corruption, severity, head, accuracy, n  (every head of the run)
    summary.json       clean and mean corruption accuracy per head, accuracy by severity and by
                       corruption, Spearman(clean hardness, flip severity), the classes that
                       break first, occlusion / erasing / blend summaries, sources, seconds
    examples.parquet   one row per probed example: id, label, clean_pred, flip_severity,
                       flip_severity_<corruption>, occlusion_max_drop, erase_flip_area,
                       blend_flip_weight, blend_partner, blend_partner_id
    occlusion.npz      ids, maps (N, G, G) float32: drop of the given label's probability per
                       grey-patch position (Zeiler & Fergus 2014), grid, patch fractions

and joins the per-example columns (flip_severity, flip_severity_<corruption>,
occlusion_max_drop, erase_flip_area, blend_flip_weight) into RUN_DIR/examples.parquet; rows
outside the subset get NaN.

Definitions (primary head = the model's own classifier, else the linear probe, else k-NN; every
flip is a change of the primary head's prediction away from its prediction on the clean image):

    flip_severity_<c>  lowest severity at which corruption c flips the prediction; 6 = never
                       (at none of the severities computed)
    flip_severity      mean of flip_severity_<c> over the corruptions computed
    occlusion_max_drop largest drop of p(given label) over the grey-patch positions (can be < 0)
    erase_flip_area    smallest erased share of the image (ERASE_AREAS) that flips; 1.0 = never
    blend_flip_weight  smallest weight w of (1-w)*image + w*partner (BLEND_WEIGHTS) that flips;
                       1.0 = never

Heads: the run's own (config: heads, k, temperature, knn_weights, linear_c, seed), refitted on
the run's train features exactly as `classify` fits them, then applied to the features of the
perturbed test images. Perturbed images go through the backbone's own preprocessing and the
batched forward of `features.py` (`_forward_indices`: uint8 resize/crop, batched normalise,
channels_last, inference_mode, the run's precision).

Cost: 75 forward passes per example for 15 corruptions x 5 severities, plus G*G = 49
(occlusion), 7 (erasing) and 9 (blend); bounded by `subset`. The embeddings (and logits) of each
(corruption, severity, subset ids, images, backbone, precision) are cached as a CacheEntry under
the run's cache dir (its N x D float32 arrays: 75 x N x D x 4 bytes for all corruptions), and
occlusion / erasing / blend results per (subset, backbone, heads), so a rerun costs the lookups.

The 15 corruptions (Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common
Corruptions and Perturbations", ICLR 2019) use the CIFAR-10 parameters of the authors'
ImageNet-C/create_c/make_cifar_c.py (github.com/hendrycks/robustness), reimplemented here in
numpy / scipy.ndimage / PIL. The `imagecorruptions` package (github.com/bethgelab/imagecorruptions,
Michaelis et al. 2019) implements the same corruptions, but with the ImageNet parameters, through
OpenCV and scikit-image, and drawing from numpy's global random state (so not deterministic per
example without reseeding the process); its motion blur also fails on 32x32 inputs
(bethgelab/imagecorruptions#13). We therefore use neither package's code; we use its bundled
frost photographs when it is installed (see `frost_source`). Per corruption, see
CORRUPTION_NOTES. As in make_cifar_c.py, float results become uint8 by truncation
(np.uint8(x * 255)), which is how the released CIFAR-10-C was written.

Randomness: each example's draws come from np.random.default_rng([seed, crc32(corruption),
crc32(example id)]) -- independent of the subset and of the order, and the same draws at every
severity (common random numbers), so a higher severity changes the parameter, not the noise
pattern: flip severities are not blurred by resampling.
"""
from __future__ import annotations

import difflib
import functools
import importlib.util
import io
import math
import os
import sys
import time
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw
from scipy import ndimage as ndi

CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
               "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
               "elastic_transform", "pixelate", "jpeg_compression")
SEVERITIES = (1, 2, 3, 4, 5)
NEVER = 6  # flip severity of an example no computed severity flips
ERASE_AREAS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
BLEND_WEIGHTS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
OCCLUSION_GRID = 7  # patch positions per axis
OCCLUSION_PATCH = 0.25  # patch side as a share of the image side (8 px on 32x32)
OCCLUSION_GREY = 128
ERASE_ASPECT = (0.5, 2.0)  # log-uniform height/width ratio of the erased rectangle
PRIMARY_ORDER = ("model", "linear", "knn")
OUT_DIR = "perturb"
PERTURB_VERSION = 1
TEST = "test"
TRAIN = "train"

__all__ = ["CORRUPTIONS", "SEVERITIES", "CORRUPTION_NOTES", "NEVER", "ERASE_AREAS",
           "BLEND_WEIGHTS", "PerturbError", "corrupt", "example_rng", "frost_source",
           "occlude", "occlusion_positions", "erase", "blend", "lowest_flip",
           "stratified_subset", "predict_images", "flip_severities", "occlusion_sensitivity",
           "erase_flip_areas", "blend_flip_weights", "CIFAR10C", "read_cifar10c", "RunHeads",
           "perturb_run", "perturb_columns"]


class PerturbError(ValueError):
    """A perturbation that cannot run as asked; the message says how to fix it."""


# ------------------------------------------------------------------ CIFAR-10 parameters
# Transcribed from make_cifar_c.py (the CIFAR-10 lists, not the ImageNet ones), severity 1..5.
CIFAR_PARAMS: dict[str, list] = {
    "gaussian_noise": [0.04, 0.06, 0.08, 0.09, 0.10],  # std, on [0, 1]
    "shot_noise": [500, 250, 100, 75, 50],  # photons per unit intensity
    "impulse_noise": [0.01, 0.02, 0.03, 0.05, 0.07],  # share of values hit (salt & pepper)
    "defocus_blur": [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)],  # radius, alias
    "glass_blur": [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)],
    "motion_blur": [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)],  # radius, sigma
    "zoom_blur": [np.arange(1, 1.06, 0.01), np.arange(1, 1.11, 0.01), np.arange(1, 1.16, 0.01),
                  np.arange(1, 1.21, 0.01), np.arange(1, 1.26, 0.01)],  # zoom factors
    "snow": [(0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
             (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9), (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
             (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)],
    "frost": [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)],  # image, frost weight
    "fog": [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)],  # amount, wibble decay
    "brightness": [0.05, 0.1, 0.15, 0.2, 0.3],  # added to HSV value
    "contrast": [0.75, 0.5, 0.4, 0.3, 0.15],  # factor around the channel means
    "elastic_transform": [(0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06),
                          (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)],  # x image side: alpha, sigma,
    # affine jitter
    "pixelate": [0.95, 0.9, 0.85, 0.75, 0.65],  # downscale factor
    "jpeg_compression": [80, 65, 58, 50, 40],  # JPEG quality
}

CORRUPTION_NOTES: dict[str, str] = {
    "gaussian_noise": "make_cifar_c.py's formula and parameters (numpy): x + N(0, c), clipped.",
    "shot_noise": "make_cifar_c.py's formula and parameters (numpy): Poisson(x * c) / c.",
    "impulse_noise": "make_cifar_c.py's parameters; skimage.util.random_noise(mode='s&p') "
                     "reimplemented in numpy: each value is hit with probability c, half salt "
                     "(1) and half pepper (0), per channel.",
    "defocus_blur": "make_cifar_c.py's parameters; its anti-aliased disk kernel (a 17x17 disk "
                    "smoothed by OpenCV's 3x3 Gaussian) built in numpy and applied with "
                    "scipy.ndimage.correlate, mode 'mirror' (= OpenCV's BORDER_REFLECT_101).",
    "glass_blur": "make_cifar_c.py's parameters; skimage's gaussian (scipy gaussian_filter, "
                  "mode 'nearest', truncate 4) around the local pixel shuffle. Faithful to the "
                  "released data in two quirks: np.random.randint(-1, 1) draws only -1 or 0, "
                  "and the tuple 'swap' of numpy views copies the neighbour into the pixel "
                  "instead of swapping (vectorised here: exact, since every source pixel is "
                  "read before the descending loop reaches it).",
    "motion_blur": "make_cifar_c.py's parameters; ImageMagick's MotionBlurImage (used through "
                   "Wand there) reimplemented in numpy: a one-sided Gaussian kernel of width "
                   "2*ceil(radius)+1 along a random angle in [-45, 45] degrees, integer offsets "
                   "ceil(i*cos - 0.5), ceil(i*sin - 0.5), edge pixels repeated; checked against "
                   "ImageMagick 6.9 Q16 through Wand: the same bytes on 96-99.9% of pixels, "
                   "+-1 on the rest.",
    "zoom_blur": "make_cifar_c.py's parameters and clipped zoom (centre crop, scipy.ndimage.zoom "
                 "order 1, centre trim; per axis for non-square images).",
    "snow": "make_cifar_c.py's parameters; the snow layer (normal noise, clipped zoom, "
            "threshold) is motion-blurred with the numpy ImageMagick kernel above, angle in "
            "[-135, -45] degrees; OpenCV's RGB2GRAY weights (0.299, 0.587, 0.114).",
    "frost": "make_cifar_c.py's parameters: c0 * image + c1 * a random 32x32 crop of a frost "
             "photograph shrunk to 0.2 (OpenCV INTER_LINEAR at 1/5 samples pixel 5i+2: done by "
             "slicing), one of frost1..frost5 (np.random.randint(5) never picks frost6). The "
             "photographs come from the imagecorruptions package when it is installed (or "
             "HARDPROBE_FROST_DIR); without them a procedural ice texture calibrated to their "
             "colour statistics stands in: see frost_source().",
    "fog": "make_cifar_c.py's parameters; its diamond-square plasma fractal (map size the next "
           "power of two of the image side, 32 on CIFAR) reimplemented in numpy.",
    "brightness": "make_cifar_c.py's parameters; skimage rgb2hsv -> V + c -> hsv2rgb in closed "
                  "form: hue and saturation kept, every channel scales by min(V + c, 1) / V "
                  "(black pixels become grey c).",
    "contrast": "make_cifar_c.py's formula and parameters (numpy): (x - mean) * c + mean per "
                "channel.",
    "elastic_transform": "make_cifar_c.py's parameters (fractions of the image side: 32 on "
                         "CIFAR); OpenCV's random affine warp (BORDER_REFLECT_101) and "
                         "skimage-smoothed displacement fields via scipy.ndimage "
                         "(map_coordinates order 1); float bilinear instead of OpenCV's "
                         "1/32-pixel fixed point.",
    "pixelate": "make_cifar_c.py's formula and parameters with PIL (BOX down, BOX up).",
    "jpeg_compression": "make_cifar_c.py's formula and parameters with PIL (JPEG quality c).",
}


# ------------------------------------------------------------------ helpers
def _f(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64) / 255.0


def _u8(x01: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8 by truncation, as make_cifar_c.py's np.uint8(clip(x) * 255)."""
    return (np.clip(x01, 0.0, 1.0) * 255.0).astype(np.uint8)


def _gaussian(x: np.ndarray, sigma: float, mode: str = "nearest", truncate: float = 4.0):
    """skimage.filters.gaussian on float data: spatial axes only (channel_axis=-1 for 3-D)."""
    s = (sigma, sigma, 0) if x.ndim == 3 else sigma
    return ndi.gaussian_filter(x, sigma=s, mode=mode, truncate=truncate)


def _clipped_zoom(x: np.ndarray, z: float) -> np.ndarray:
    """Centre crop of size ceil(side / z), zoomed by z (bilinear), centre-trimmed to the side."""
    h, w = x.shape[:2]
    ch, cw = int(np.ceil(h / z)), int(np.ceil(w / z))
    top, left = (h - ch) // 2, (w - cw) // 2
    out = ndi.zoom(x[top:top + ch, left:left + cw], (z, z) + (1,) * (x.ndim - 2), order=1)
    th, tw = (out.shape[0] - h) // 2, (out.shape[1] - w) // 2
    return out[th:th + h, tw:tw + w]


def _motion_blur(x: np.ndarray, radius: float, sigma: float, angle: float) -> np.ndarray:
    """ImageMagick's MotionBlurImage on float data (H, W) or (H, W, C): out(y, x) =
    sum_i k_i * in(y + dy_i, x + dx_i), k_i ~ exp(-i^2 / 2 sigma^2), i = 0 .. 2*ceil(radius),
    offsets along `angle` (degrees), pixels outside the image repeat the edge."""
    width = int(2 * math.ceil(radius) + 1)
    i = np.arange(width, dtype=np.float64)
    k = np.exp(-(i ** 2) / (2.0 * sigma ** 2))
    k /= k.sum()
    a = math.radians(angle)
    dx = np.ceil(i * math.cos(a) - 0.5).astype(int)
    dy = np.ceil(i * math.sin(a) - 0.5).astype(int)
    h, w = x.shape[:2]
    p = width
    pad = ((p, p), (p, p)) + ((0, 0),) * (x.ndim - 2)
    xp = np.pad(x, pad, mode="edge")
    out = np.zeros(x.shape, dtype=np.float64)
    for ki, oy, ox in zip(k, dy, dx):
        out += ki * xp[p + oy:p + oy + h, p + ox:p + ox + w]
    return out


def _plasma(size: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """Diamond-square height map (size x size, size a power of two) scaled to [0, 1].

    The algorithm of make_cifar_c.py's plasma_fractal (itself after FLHerne/mapgen): corners
    start at 0; each pass sets square centres, then edge midpoints, to the mean of their four
    neighbours (wrapping around) plus wibble * U(-wibble, wibble); wibble starts at 100 and is
    divided by `decay` each pass."""
    if size & (size - 1):
        raise ValueError(f"plasma size must be a power of two, got {size}")
    m = np.zeros((size, size))
    step, wibble = size, 100.0

    def jitter(four_sum):
        return four_sum / 4 + wibble * rng.uniform(-wibble, wibble, four_sum.shape)

    while step >= 2:
        half = step // 2
        corners = m[0::step, 0::step]
        s = corners + np.roll(corners, -1, axis=0)
        m[half::step, half::step] = jitter(s + np.roll(s, -1, axis=1))
        centres, corners = m[half::step, half::step], m[0::step, 0::step]
        m[0::step, half::step] = jitter(centres + np.roll(centres, 1, axis=0)
                                        + corners + np.roll(corners, -1, axis=1))
        m[half::step, 0::step] = jitter(centres + np.roll(centres, 1, axis=1)
                                        + corners + np.roll(corners, -1, axis=0))
        step, wibble = half, wibble / decay
    m -= m.min()
    return m / m.max()


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 2 ** (int(n) - 1).bit_length()


# ------------------------------------------------------------------ the 15 corruptions
# Each: (uint8 (H, W, 3), severity 1..5, Generator) -> uint8 (H, W, 3).
def gaussian_noise(x, severity, rng):
    c = CIFAR_PARAMS["gaussian_noise"][severity - 1]
    x = _f(x)
    return _u8(x + rng.normal(size=x.shape, scale=c))


def shot_noise(x, severity, rng):
    c = CIFAR_PARAMS["shot_noise"][severity - 1]
    return _u8(rng.poisson(_f(x) * c) / c)


def impulse_noise(x, severity, rng):
    c = CIFAR_PARAMS["impulse_noise"][severity - 1]
    x = _f(x)
    hit = rng.random(x.shape) < c
    salt = rng.random(x.shape) < 0.5
    out = x.copy()
    out[hit & salt] = 1.0
    out[hit & ~salt] = 0.0
    return _u8(out)


def _disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """make_cifar_c.py's disk(): the 0/1 disk X^2 + Y^2 <= r^2 on a 17x17 grid (r <= 8),
    normalised, smoothed by a 3x3 Gaussian of sigma alias_blur (5x5 for r > 8), reflect-101
    borders; cropped here to its non-zero (centred) support."""
    half = 8 if radius <= 8 else int(math.ceil(radius))
    ksize = 3 if radius <= 8 else 5
    L = np.arange(-half, half + 1)
    X, Y = np.meshgrid(L, L)
    d = (X ** 2 + Y ** 2 <= radius ** 2).astype(np.float64)
    d /= d.sum()
    g = np.exp(-((np.arange(ksize) - (ksize - 1) / 2) ** 2) / (2 * alias_blur ** 2))
    g /= g.sum()
    d = ndi.correlate1d(ndi.correlate1d(d, g, axis=0, mode="mirror"), g, axis=1, mode="mirror")
    nz = np.flatnonzero(d.any(axis=0))
    r = int(max(half - nz.min(), nz.max() - half))
    return d[half - r:half + r + 1, half - r:half + r + 1]


def defocus_blur(x, severity, rng):
    radius, alias = CIFAR_PARAMS["defocus_blur"][severity - 1]
    k = _disk_kernel(radius, alias)
    x = _f(x)
    out = np.stack([ndi.correlate(x[..., d], k, mode="mirror") for d in range(x.shape[2])], -1)
    return _u8(out)


def glass_blur(x, severity, rng):
    sigma, delta, iterations = CIFAR_PARAMS["glass_blur"][severity - 1]
    x = (_gaussian(_f(x), sigma) * 255).astype(np.uint8)
    h, w = x.shape[:2]
    rows = np.arange(h - delta, delta, -1)  # as range(32 - delta, delta, -1)
    cols = np.arange(w - delta, delta, -1)
    for _ in range(iterations):
        # (dx, dy) per pixel in loop order, each in [-delta, delta) like np.random.randint
        d = rng.integers(-delta, delta, size=(len(rows), len(cols), 2))
        src = x.copy()
        x[rows[:, None], cols[None, :]] = src[rows[:, None] + d[..., 1], cols[None, :] + d[..., 0]]
    return _u8(_gaussian(x / 255.0, sigma))


def motion_blur(x, severity, rng):
    radius, sigma = CIFAR_PARAMS["motion_blur"][severity - 1]
    out = _motion_blur(np.asarray(x, np.float64), radius, sigma, rng.uniform(-45, 45))
    return _magick_u8(out)


def _magick_u8(x: np.ndarray) -> np.ndarray:
    """Float 0..255 -> uint8 as ImageMagick 6 (Q16) hands its result back through PNG: measured
    against it via Wand, the floor (of x + 1e-6) gives the same byte on 96-99.9% of pixels,
    +-1 on the rest; rounding would be off by one on about half of them."""
    return np.clip(np.floor(x + 1e-6), 0, 255).astype(np.uint8)


def zoom_blur(x, severity, rng):
    factors = CIFAR_PARAMS["zoom_blur"][severity - 1]
    x = _f(x).astype(np.float32)
    out = np.zeros_like(x)
    for z in factors:
        out += _clipped_zoom(x, z)
    return _u8((x + out) / (len(factors) + 1))


def snow(x, severity, rng):
    loc, scale, zoom, threshold, radius, sigma, keep = CIFAR_PARAMS["snow"][severity - 1]
    x = np.asarray(x, dtype=np.float32) / 255.0
    layer = rng.normal(size=x.shape[:2], loc=loc, scale=scale)
    layer = _clipped_zoom(layer[..., None], zoom)[..., 0]
    layer[layer < threshold] = 0
    layer = (np.clip(layer, 0, 1) * 255).astype(np.uint8)  # the greyscale PNG handed to Wand
    layer = _motion_blur(layer.astype(np.float64), radius, sigma, rng.uniform(-135, -45))
    layer = (_magick_u8(layer) / 255.0)[..., None]
    grey = (x @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
    x = keep * x + (1 - keep) * np.maximum(x, grey * 1.5 + 0.5)
    return _u8(x + layer + np.rot90(layer, k=2))


def frost(x, severity, rng):
    keep, amount = CIFAR_PARAMS["frost"][severity - 1]
    textures = _frost_textures(_frost_key())
    tex = textures[int(rng.integers(5))]  # np.random.randint(5): frost1..frost5
    h, w = x.shape[:2]
    if tex.shape[0] <= h or tex.shape[1] <= w:  # a large image: grow the texture to cover it
        f = 1.1 * max(h / tex.shape[0], w / tex.shape[1])
        size = (int(np.ceil(tex.shape[1] * f)), int(np.ceil(tex.shape[0] * f)))
        tex = np.asarray(Image.fromarray(tex.astype(np.uint8)).resize(size, Image.BICUBIC),
                         np.float64)
    top = int(rng.integers(0, tex.shape[0] - h))
    left = int(rng.integers(0, tex.shape[1] - w))
    out = keep * np.asarray(x, np.float64) + amount * tex[top:top + h, left:left + w]
    return np.clip(out, 0, 255).astype(np.uint8)


def fog(x, severity, rng):
    amount, decay = CIFAR_PARAMS["fog"][severity - 1]
    x = _f(x)
    h, w = x.shape[:2]
    top = x.max()
    x = x + amount * _plasma(_next_pow2(max(h, w)), decay, rng)[:h, :w, None]
    return _u8(x * top / (top + amount))


def brightness(x, severity, rng):
    c = CIFAR_PARAMS["brightness"][severity - 1]
    x = _f(x)
    v = x.max(axis=2, keepdims=True)  # HSV value
    v_new = np.minimum(v + c, 1.0)
    out = np.where(v > 0, x * (v_new / np.where(v > 0, v, 1.0)), v_new)
    return _u8(out)


def contrast(x, severity, rng):
    c = CIFAR_PARAMS["contrast"][severity - 1]
    x = _f(x)
    means = x.mean(axis=(0, 1), keepdims=True)
    return _u8((x - means) * c + means)


def elastic_transform(x, severity, rng):
    h, w = x.shape[:2]
    side = min(h, w)
    alpha, sigma, jitter = (side * f for f in CIFAR_PARAMS["elastic_transform"][severity - 1])
    x = np.asarray(x, np.float32) / 255.0
    # random affine: three points around the centre moved by U(-jitter, jitter); (x, y) order
    # as OpenCV's getAffineTransform / warpAffine use it
    centre = np.float32([w, h]) // 2
    sq = side // 3
    p1 = np.float32([centre + sq, [centre[0] + sq, centre[1] - sq], centre - sq])
    p2 = p1 + rng.uniform(-jitter, jitter, size=p1.shape).astype(np.float32)
    A = np.linalg.solve(np.c_[p2, np.ones(3)], np.c_[p1, np.ones(3)])[:, :2].T  # dst -> src
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    sx = A[0, 0] * xx + A[0, 1] * yy + A[0, 2]
    sy = A[1, 0] * xx + A[1, 1] * yy + A[1, 2]
    x = np.stack([ndi.map_coordinates(x[..., d], [sy, sx], order=1, mode="mirror")
                  for d in range(x.shape[2])], -1)
    dx = _gaussian(rng.uniform(-1, 1, size=(h, w)), sigma, mode="reflect", truncate=3) * alpha
    dy = _gaussian(rng.uniform(-1, 1, size=(h, w)), sigma, mode="reflect", truncate=3) * alpha
    out = np.stack([ndi.map_coordinates(x[..., d], [yy + dy, xx + dx], order=1, mode="reflect")
                    for d in range(x.shape[2])], -1)
    return _u8(out)


def pixelate(x, severity, rng):
    c = CIFAR_PARAMS["pixelate"][severity - 1]
    h, w = x.shape[:2]
    im = Image.fromarray(np.ascontiguousarray(x))
    im = im.resize((max(1, int(w * c)), max(1, int(h * c))), Image.BOX).resize((w, h), Image.BOX)
    return np.asarray(im, dtype=np.uint8).copy()


def jpeg_compression(x, severity, rng):
    q = CIFAR_PARAMS["jpeg_compression"][severity - 1]
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(x)).save(buf, "JPEG", quality=q)
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


_FUNCS: dict[str, Callable] = {name: globals()[name] for name in CORRUPTIONS}


def _check_image(image) -> np.ndarray:
    a = image.numpy() if hasattr(image, "numpy") else np.asarray(image)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
        raise PerturbError(f"corruptions take uint8 (H, W, 3) images, got {a.dtype} {a.shape}")
    return np.ascontiguousarray(a)


def check_corruptions(names) -> tuple[str, ...]:
    names = CORRUPTIONS if names is None else tuple(names)
    bad = [n for n in names if n not in _FUNCS]
    if bad:
        close = difflib.get_close_matches(bad[0], CORRUPTIONS, n=3)
        raise PerturbError(f"unknown corruption(s) {bad}"
                           + (f"; did you mean {', '.join(close)}?" if close else "")
                           + f" Known: {', '.join(CORRUPTIONS)}")
    if len(set(names)) != len(names) or not names:
        raise PerturbError(f"corruptions must be distinct and not empty, got {list(names)}")
    return names


def check_severities(severities) -> tuple[int, ...]:
    sev = tuple(int(s) for s in severities)
    if not sev or any(s not in SEVERITIES for s in sev) or len(set(sev)) != len(sev):
        raise PerturbError(f"severities must be distinct integers in 1..5, got {list(severities)}")
    return tuple(sorted(sev))


def example_rng(seed: int, kind: str, example_id: str) -> np.random.Generator:
    """The generator of one example's draws for one perturbation `kind` (a corruption name,
    'erase'): the same for every severity, independent of the subset and its order."""
    if int(seed) < 0:
        raise PerturbError(f"seed must be >= 0, got {seed}")
    return np.random.default_rng([int(seed), zlib.crc32(kind.encode()),
                                  zlib.crc32(str(example_id).encode())])


def corrupt(image, corruption: str, severity: int, *, seed: int = 0,
            rng: np.random.Generator | None = None) -> np.ndarray:
    """One CIFAR-10-C corruption of a uint8 (H, W, 3) image at severity 1..5 -> uint8 (H, W, 3).

    Deterministic: `rng` if given, else np.random.default_rng(seed). Parameters are the CIFAR-10
    ones (pixel units for 32x32 images: on larger images the pixel-scale corruptions, blurs
    and noise grain, are milder than on CIFAR). See CORRUPTION_NOTES for each one's source."""
    check_corruptions([corruption])
    if int(severity) not in SEVERITIES:
        raise PerturbError(f"severity must be in 1..5, got {severity}")
    x = _check_image(image)
    out = _FUNCS[corruption](x, int(severity), rng if rng is not None else
                             np.random.default_rng(seed))
    return np.ascontiguousarray(out, dtype=np.uint8)


# ------------------------------------------------------------------ frost images
_FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg")
# Per photograph frost1..frost5 after the 0.2 shrink: mean and standard deviation per RGB
# channel (measured on imagecorruptions 1.1.2's copies; frost2 and frost3 are the same picture).
# Stand-in texture k is scaled to photograph k's numbers.
_FROST_STATS = (((77.5, 149.0, 165.7), (26.8, 16.4, 15.3)),
                ((200.8, 205.4, 214.5), (21.4, 22.1, 22.6)),
                ((200.8, 205.4, 214.5), (21.4, 22.1, 22.6)),
                ((138.0, 153.2, 165.6), (29.0, 29.0, 30.2)),
                ((112.3, 123.3, 134.7), (44.3, 43.2, 41.6)))


def _frost_dir() -> tuple[str, Path | None]:
    env = os.environ.get("HARDPROBE_FROST_DIR")
    if env:
        d = Path(env).expanduser()
        missing = [f for f in _FROST_FILES if not (d / f).is_file()]
        if missing:
            raise PerturbError(f"HARDPROBE_FROST_DIR={env} lacks {', '.join(missing)}")
        return "directory", d
    try:
        spec = importlib.util.find_spec("imagecorruptions")  # located, not imported (no cv2)
    except (ImportError, ValueError):
        spec = None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        d = Path(loc) / "frost"
        if all((d / f).is_file() for f in _FROST_FILES):
            return "imagecorruptions", d
    return "procedural", None


def _frost_key() -> tuple[str, str]:
    return _frost_key_for(os.environ.get("HARDPROBE_FROST_DIR"))


@functools.lru_cache(maxsize=8)
def _frost_key_for(env: str | None) -> tuple[str, str]:  # one look-up per setting, not per image
    kind, d = _frost_dir()
    return kind, str(d or "")


def frost_source() -> dict:
    """Where the frost textures come from: {"kind": "imagecorruptions" | "directory" |
    "procedural", "path": folder or None, "note": ...}. Order: $HARDPROBE_FROST_DIR (a folder
    with frost1.png .. frost5.jpg), the imagecorruptions package's bundled copies of the
    original photographs, else a procedural stand-in (`_procedural_frost`)."""
    kind, d = _frost_dir()
    note = {"directory": "frost photographs from HARDPROBE_FROST_DIR",
            "imagecorruptions": "the original frost photographs, as bundled by the "
                                "imagecorruptions package",
            "procedural": "frost photographs not found (install imagecorruptions or set "
                          "HARDPROBE_FROST_DIR): a procedural ice texture with their colour "
                          "statistics stands in, so frost is NOT the CIFAR-10-C frost"}[kind]
    return {"kind": kind, "path": str(d) if d else None, "note": note}


@functools.lru_cache(maxsize=4)
def _frost_textures(key: tuple[str, str]) -> tuple[np.ndarray, ...]:
    kind, d = key
    if kind == "procedural":
        return tuple(_procedural_frost(i) for i in range(len(_FROST_FILES)))
    out = []
    for f in _FROST_FILES:
        with Image.open(Path(d) / f) as im:
            a = np.asarray(im.convert("RGB"), dtype=np.float64)
        out.append(a[2::5, 2::5])  # cv2.resize(fx=fy=0.2, INTER_LINEAR) samples pixel 5i+2
    return tuple(out)


def _procedural_frost(k: int, size: int = 128) -> np.ndarray:
    """A stand-in frost texture (size x size x 3 float in [0, 255]) when the photographs are
    unavailable: a plasma-fractal haze, fine grain, and short branching ice needles (random
    walks with side branches at +-60 degrees, drawn with PIL), then scaled per channel to the
    mean and standard deviation of photograph k (_FROST_STATS) -- the two statistics that set
    how much frost brightens and masks an image."""
    rng = np.random.default_rng([0xF2057, k])
    haze = _plasma(size, 2.0, rng)
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)

    def needle(x, y, angle, length, level, depth):
        for _ in range(int(length)):
            angle += rng.normal(0, 0.15)
            nx, ny = x + 2.0 * math.cos(angle), y + 2.0 * math.sin(angle)
            draw.line([(x, y), (nx, ny)], fill=int(level), width=1)
            if depth < 2 and rng.random() < 0.12:
                needle(nx, ny, angle + rng.choice([-1, 1]) * math.pi / 3, length * 0.4,
                       level * 0.8, depth + 1)
            x, y = nx, ny

    for _ in range(160):
        needle(rng.uniform(0, size), rng.uniform(0, size), rng.uniform(0, 2 * math.pi),
               rng.uniform(2, 9), rng.uniform(120, 255), 0)
    crystals = ndi.gaussian_filter(np.asarray(canvas, np.float64) / 255.0, 0.5)
    grain = ndi.gaussian_filter(rng.random((size, size)), 0.7)  # the photographs' fine speckle
    grain = (grain - grain.mean()) / grain.std()
    v = 1.2 * haze + 0.5 * crystals + 0.25 * grain * (0.5 + haze)
    v = (v - v.mean()) / (v.std() + 1e-12)
    mean, std = _FROST_STATS[k]
    return np.clip(np.stack([mean[c] + std[c] * v for c in range(3)], -1), 0, 255)


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


def stratified_subset(labels, n: int | None, seed: int = 0) -> np.ndarray:
    """Sorted row indices of a class-stratified random sample of n rows (all rows when n is
    None or >= len): each class gets its share n * n_c / N, rounded by largest remainder."""
    labels = np.asarray(labels)
    total = len(labels)
    if n is None or n >= total:
        return np.arange(total)
    if n < 1:
        raise PerturbError(f"subset must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = n * counts / total
    take = np.floor(quota).astype(int)
    rest = n - take.sum()
    order = np.lexsort((rng.random(len(classes)), -(quota - take)))  # ties broken at random
    take[order[:rest]] += 1
    rows = [rng.permutation(np.flatnonzero(labels == c))[:t] for c, t in zip(classes, take)]
    return np.sort(np.concatenate(rows)).astype(np.int64)


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
    from .data import Split
    from .features import _forward_indices, resolve_device, resolve_precision
    from tqdm.auto import tqdm
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
        out = _forward_indices(backbone, split, np.arange(n), dev, precision, batch_size,
                               num_workers, with_logits, bar)
    finally:
        bar.close()
    if not out["ok"].all():
        raise PerturbError(f"{(~out['ok']).sum()} perturbed image(s) failed: "
                           f"{out['error'][~out['ok']][0]}")
    return {k: out[k] for k in ("embedding", "logits") if k in out}


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


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


# ------------------------------------------------------------------ CIFAR-10-C on disk
class CIFAR10C:
    """A CIFAR-10-C folder (Hendrycks & Dietterich 2019): <corruption>.npy, (5 * B, 32, 32, 3)
    uint8, severity s in rows (s-1)*B .. s*B - 1 (B = 10,000 in the release), and labels.npy,
    (5 * B,) the labels of those rows (the CIFAR-10 test labels, in order, five times)."""

    def __init__(self, root):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise PerturbError(f"CIFAR-10-C folder {self.root} does not exist")
        lab = self.root / "labels.npy"
        if not lab.is_file():
            raise PerturbError(f"{self.root} has no labels.npy: not a CIFAR-10-C folder "
                               "(<corruption>.npy files and labels.npy)")
        self._labels = np.load(lab, mmap_mode="r")
        if self._labels.ndim != 1 or len(self._labels) % 5 or not len(self._labels):
            raise PerturbError(f"{lab} has shape {self._labels.shape}: expected (5 * B,) with "
                               "B labels per severity")
        self.block = len(self._labels) // 5

    def available(self) -> list[str]:
        return [c for c in CORRUPTIONS if (self.root / f"{c}.npy").is_file()]

    def labels(self, severity: int) -> np.ndarray:
        s = int(severity)
        return np.asarray(self._labels[(s - 1) * self.block:s * self.block], dtype=np.int64)

    def _array(self, corruption: str) -> np.ndarray:
        p = self.root / f"{corruption}.npy"
        if not p.is_file():
            raise PerturbError(f"{self.root} has no {corruption}.npy (it has: "
                               f"{', '.join(self.available()) or 'no corruption file'})")
        a = np.load(p, mmap_mode="r")
        if a.dtype != np.uint8 or a.ndim != 4 or a.shape[0] != 5 * self.block or a.shape[3] != 3:
            raise PerturbError(f"{p} has {a.dtype} {a.shape}; expected uint8 "
                               f"({5 * self.block}, H, W, 3) like labels.npy")
        return a

    def images(self, corruption: str, severity: int, rows=None) -> np.ndarray:
        """(n, H, W, 3) uint8: the block of `severity`, rows of it (default all), in memory."""
        s = int(severity)
        if s not in SEVERITIES:
            raise PerturbError(f"severity must be in 1..5, got {severity}")
        block = self._array(corruption)[(s - 1) * self.block:s * self.block]
        return np.array(block if rows is None else block[np.asarray(rows)], dtype=np.uint8)

    def check_labels(self, test_labels, severities=SEVERITIES) -> None:
        """Raise unless labels.npy's blocks equal `test_labels` (the run's test split, in
        order): CIFAR-10-C rows are CIFAR-10 test images by position."""
        test_labels = np.asarray(test_labels, np.int64)
        if len(test_labels) != self.block:
            raise PerturbError(
                f"the run's test split has {len(test_labels)} images but {self.root} has "
                f"{self.block} per severity: --cifar10c needs a run on the CIFAR-10 test set in "
                f"its original order (data: cifar10)")
        for s in severities:
            bad = int((self.labels(s) != test_labels).sum())
            if bad:
                raise PerturbError(
                    f"labels.npy of {self.root} (severity {s}) differs from the run's test "
                    f"labels at {bad} of {self.block} positions: its images are not this run's "
                    f"test images in order. --cifar10c needs a run on the CIFAR-10 test set in "
                    f"its original order (data: cifar10)")

    def describe(self, corruption: str | None = None) -> dict:
        files = ["labels.npy"] + ([f"{corruption}.npy"] if corruption else [])
        return {"root": str(self.root.resolve()),
                "files": {f: [(st := (self.root / f).stat()).st_size, st.st_mtime_ns]
                          for f in files}}


def read_cifar10c(root, corruption: str, severity: int, rows=None) -> np.ndarray:
    """(n, 32, 32, 3) uint8 images of `corruption` at `severity` from a CIFAR-10-C folder."""
    return CIFAR10C(root).images(corruption, severity, rows)


# ------------------------------------------------------------------ the run's heads
class RunHeads:
    """The run's heads refitted on its train features, as `classify` fits them: knn (k capped
    at n_train - 1, temperature, knn_weights), linear (linear_c, seed), and the model's own
    classifier when the run used it. probs(arrays) -> {head: (N, C) probabilities}."""

    def __init__(self, run, cfg=None, device="cpu"):
        from .heads import KNNClassifier, LinearProbe
        cfg = cfg or run.config
        self.cfg = cfg
        n_classes = len(run.class_names)
        fit_x = run.features(TRAIN)
        fit_y = run.split_examples(TRAIN)["label"].to_numpy()
        self.heads: dict[str, Callable] = {}
        if "knn" in cfg.heads:
            knn = KNNClassifier(k=min(cfg.k, len(fit_x) - 1), temperature=cfg.temperature,
                                weights=cfg.knn_weights, device=device)
            knn.fit(fit_x, fit_y, n_classes=n_classes)
            self.heads["knn"] = lambda a, m=knn: m.predict_proba(a["embedding"])
        if "linear" in cfg.heads:
            probe = LinearProbe(C=cfg.linear_c, seed=cfg.seed).fit(fit_x, fit_y,
                                                                    n_classes=n_classes)
            self.heads["linear"] = lambda a, m=probe: m.predict_proba(a["embedding"])
        self.with_logits = "model" in cfg.heads and run.logits(TRAIN) is not None
        if self.with_logits:
            self.heads["model"] = _model_probs
        if not self.heads:
            raise PerturbError(f"no head to probe: heads={cfg.heads} and the model's own "
                               "classifier does not apply; add knn or linear")
        self.names = [h for h in PRIMARY_ORDER if h in self.heads]
        self.primary = self.names[0]
        self.key = {"train": run.provenance["features"][TRAIN]["key"],
                    "config": {k: getattr(cfg, k) for k in ("heads", "k", "temperature",
                                                            "knn_weights", "linear_c", "seed")},
                    "primary": self.primary}

    def probs(self, arrays: dict) -> dict[str, np.ndarray]:
        return {h: np.asarray(self.heads[h](arrays), np.float64) for h in self.names}

    def primary_probs(self, arrays: dict) -> np.ndarray:
        return np.asarray(self.heads[self.primary](arrays), np.float64)


# ------------------------------------------------------------------ the stage
def perturb_columns(corruptions=CORRUPTIONS) -> list[str]:
    """The per-example columns perturb_run joins into examples.parquet (all it may write)."""
    return (["flip_severity"] + [f"flip_severity_{c}" for c in corruptions]
            + ["occlusion_max_drop", "erase_flip_area", "blend_flip_weight"])


def _is_perturb_column(c: str) -> bool:
    return c in perturb_columns(()) or c.startswith("flip_severity_")


def perturb_run(run_dir, *, subset: int | None = 2000, corruptions=None, severities=SEVERITIES,
                seed: int = 0, batch_size: int = 128, device="cpu", occlusion: bool = True,
                blend: bool = True, cifar10c=None, progress: bool = True,
                num_workers: int | None = None, cache_dir=None) -> Path:
    """Corruption, occlusion (grey patch + random erasing) and blend probes of a run's test
    split -> RUN_DIR/perturb/ (see the module docstring); returns that folder.

    subset: examples probed, stratified by class with `seed` (None = all). corruptions: names
    from CORRUPTIONS (None = all 15). occlusion: grey-patch sensitivity and random erasing.
    blend: blend toward the prototype of the nearest other class. cifar10c: a CIFAR-10-C folder
    whose images replace the generated corruptions (the run must be on CIFAR-10 test, in
    order). num_workers: DataLoader workers that build the perturbed images (None: the run's
    setting). cache_dir: default the run's cache dir.
    """
    from .cache import CacheEntry, default_cache_dir, key_digest
    from .features import default_num_workers, resolve_device, resolve_precision
    from .run import load_run

    t0 = time.perf_counter()
    secs: dict[str, float] = {}
    run = load_run(run_dir)
    cfg = run.config
    names = check_corruptions(corruptions)
    sev = check_severities(severities)
    if int(seed) < 0:
        raise PerturbError(f"seed must be >= 0, got {seed}")
    if TEST not in run.splits or TRAIN not in run.splits:
        raise PerturbError(f"{run.path} needs a train and a test split (it has {run.splits})")
    if "hardness" not in run.examples.columns:
        raise PerturbError(f"{run.path} has no scores yet; run `hardprobe classify` first")

    def say(msg):
        if progress:
            print(f"[perturb] {msg}", file=sys.stderr)

    dev = resolve_device(device)
    precision = resolve_precision(cfg.precision, dev)
    if num_workers is None:
        num_workers = cfg.num_workers if cfg.num_workers is not None else default_num_workers()
    cache_root = Path(cache_dir or cfg.cache_dir or default_cache_dir()).expanduser()
    fw = dict(device=str(dev), precision=precision, batch_size=batch_size,
              num_workers=num_workers, progress=progress)

    # ---- the subset, its clean predictions and images
    test = run.split_examples(TEST)
    labels_all = test["label"].to_numpy()
    rows = stratified_subset(labels_all, subset, seed)
    sub = test.iloc[rows].reset_index(drop=True)
    ids = sub["id"].astype(str).tolist()
    labels = sub["label"].to_numpy(np.int64)
    heads = RunHeads(run, cfg, device=str(dev))
    clean_arrays = {"embedding": run.features(TEST)[rows]}
    if heads.with_logits:
        clean_arrays["logits"] = run.logits(TEST)[rows]
    clean_probs = heads.probs(clean_arrays)
    clean_pred = clean_probs[heads.primary].argmax(1)
    backbone = run.backbone()
    say(f"{len(rows)} of {len(test)} test examples (stratified, seed {seed}); heads "
        f"{', '.join(heads.names)}, primary {heads.primary}")
    notes: list[str] = []
    c10c = None
    if cifar10c is not None:
        c10c = CIFAR10C(cifar10c)
        c10c.check_labels(labels_all, sev)
        notes.append(f"corrupted images read from CIFAR-10-C at {c10c.root}; its labels match "
                     "the run's test labels in order")
    images = [np.ascontiguousarray(t.permute(1, 2, 0).numpy()) for t in run.images(ids)]
    sizes = sorted({im.shape[:2] for im in images})
    if c10c is None and sizes != [(32, 32)]:
        notes.append(f"test images are {sizes[0][0]}x{sizes[0][1]}"
                     + (" and other sizes" if len(sizes) > 1 else "")
                     + ": the CIFAR-10 parameters are pixel units for 32x32, so blurs and noise "
                       "grain are milder relative to these images than on CIFAR-10-C")
    secs["setup"] = time.perf_counter() - t0

    base_key = {"version": PERTURB_VERSION, "backbone": backbone.describe(),
                "precision": precision, "with_logits": heads.with_logits,
                "images": run.provenance["dataset"]["splits"][TEST]["manifest"],
                "ids": key_digest({"ids": ids})}
    hits = {"computed": 0, "cached": 0}

    def cached(key: dict, compute: Callable[[], dict]) -> dict:
        entry = CacheEntry(cache_root, {**base_key, **key})
        with entry.lock():
            if not entry.complete:
                arrays = compute()
                n = len(next(iter(arrays.values())))
                entry.write_shard(0, index=np.arange(n), **arrays)
                entry.finalize(1, meta={"n": n, "kind": key.get("kind")})
                hits["computed"] += 1
            else:
                hits["cached"] += 1
            return {k: v for k, v in entry.load().items() if k != "index"}

    # ---- corruptions
    t1 = time.perf_counter()
    frost_info = frost_source() if "frost" in names and c10c is None else None
    if frost_info:
        _frost_textures(_frost_key())  # loaded once here, inherited by DataLoader workers
        if frost_info["kind"] == "procedural":
            notes.append(f"frost: {frost_info['note']}")
    acc_rows, flip = [], {}
    for c in names:
        preds = []
        for s in sev:
            if c10c is not None:
                key = {"kind": "cifar10c", "corruption": c, "severity": s,
                       "source": c10c.describe(c), "rows": key_digest({"rows": rows.tolist()})}
                src = _Plain(list(c10c.images(c, s, rows)))
            else:
                key = {"kind": "corruption", "corruption": c, "severity": s, "seed": int(seed),
                       "frost": frost_info and [frost_info["kind"], frost_info["path"]]}
                src = _Corrupted(images, ids, c, s, int(seed))
            arrays = cached(key, lambda: _forward(backbone, src, desc=f"{c} {s}",
                                                  with_logits=heads.with_logits, **fw))
            probs = heads.probs(arrays)
            for h in heads.names:
                acc_rows.append({"corruption": c, "severity": s, "head": h,
                                 "accuracy": float((probs[h].argmax(1) == labels).mean()),
                                 "n": len(labels)})
            preds.append(probs[heads.primary].argmax(1))
        flip[c] = lowest_flip(clean_pred, np.stack(preds), sev, NEVER)
        say(f"{c}: " + ", ".join(f"s{r['severity']} {r['accuracy']:.3f}" for r in acc_rows
                                 if r["corruption"] == c and r["head"] == heads.primary))
    secs["corruptions"] = time.perf_counter() - t1

    per_ex = sub[["id", "label", "label_name"]].copy()
    per_ex["clean_pred"] = clean_pred
    per_ex["flip_severity"] = np.mean([flip[c] for c in names], axis=0)
    for c in names:
        per_ex[f"flip_severity_{c}"] = flip[c].astype(np.int64)
    summary_extra: dict = {}
    hkey = {"heads": key_digest(heads.key)}

    # ---- occlusion and random erasing
    if occlusion:
        t1 = time.perf_counter()
        say(f"occlusion: {OCCLUSION_GRID}x{OCCLUSION_GRID} grey patches, random erasing at "
            f"{len(ERASE_AREAS)} areas")
        clean_p = clean_probs[heads.primary][np.arange(len(labels)), labels]
        occ = cached({"kind": "occlusion", "grid": OCCLUSION_GRID, "patch": OCCLUSION_PATCH,
                      "grey": OCCLUSION_GREY, **hkey},
                     lambda: dict(zip(("maps", "max_drop"), occlusion_sensitivity(
                         backbone, images, labels, predict=heads.primary_probs,
                         clean_prob=clean_p, **fw))))
        per_ex["occlusion_max_drop"] = occ["max_drop"].astype(np.float64)
        out_dir = run.path / OUT_DIR
        from .cache import atomic_write
        atomic_write(out_dir / "occlusion.npz", lambda f: np.savez_compressed(
            f, ids=np.array(ids, dtype=str), maps=occ["maps"],
            grid=np.int64(OCCLUSION_GRID), patch=np.float64(OCCLUSION_PATCH),
            grey=np.int64(OCCLUSION_GREY)))
        er = cached({"kind": "erase", "areas": list(ERASE_AREAS), "aspect": list(ERASE_ASPECT),
                     "seed": int(seed), **hkey},
                    lambda: {"flip_area": erase_flip_areas(
                        backbone, images, ids=ids, seed=int(seed), predict=heads.primary_probs,
                        clean_pred=clean_pred, **fw)})
        per_ex["erase_flip_area"] = er["flip_area"]
        summary_extra["occlusion"] = {
            "grid": OCCLUSION_GRID, "patch_fraction": OCCLUSION_PATCH, "grey": OCCLUSION_GREY,
            "mean_max_drop": float(per_ex["occlusion_max_drop"].mean()),
            "median_max_drop": float(per_ex["occlusion_max_drop"].median())}
        flipped = per_ex["erase_flip_area"] < 1.0
        summary_extra["erase"] = {
            "areas": list(ERASE_AREAS), "aspect_range": list(ERASE_ASPECT), "fill": "uniform noise",
            "share_flipped": float(flipped.mean()),
            "median_flip_area": float(per_ex.loc[flipped, "erase_flip_area"].median())
            if flipped.any() else None}
        secs["occlusion"] = time.perf_counter() - t1

    # ---- blend toward the nearest other class
    if blend:
        t1 = time.perf_counter()
        partner_cls, partner_ids = _blend_partners(run, clean_arrays["embedding"], labels)
        say(f"blend toward the nearest other class's prototype at {len(BLEND_WEIGHTS)} weights")
        uniq = sorted(set(partner_ids))
        decoded = dict(zip(uniq, (np.ascontiguousarray(t.permute(1, 2, 0).numpy())
                                  for t in run.images(uniq))))
        partners = [decoded[p] for p in partner_ids]
        bl = cached({"kind": "blend", "weights": list(BLEND_WEIGHTS),
                     "partners": key_digest({"p": partner_ids}), **hkey},
                    lambda: {"flip_weight": blend_flip_weights(
                        backbone, images, partners, predict=heads.primary_probs,
                        clean_pred=clean_pred, **fw)})
        per_ex["blend_flip_weight"] = bl["flip_weight"]
        per_ex["blend_partner"] = partner_cls
        per_ex["blend_partner_id"] = partner_ids
        flipped = per_ex["blend_flip_weight"] < 1.0
        summary_extra["blend"] = {
            "weights": list(BLEND_WEIGHTS),
            "partner": "the train example closest to its class centroid (its prototype), of the "
                       "class whose train centroid is most cosine-similar to the example's "
                       "embedding, among the classes other than its label",
            "share_flipped": float(flipped.mean()),
            "median_flip_weight": float(per_ex.loc[flipped, "blend_flip_weight"].median())
            if flipped.any() else None}
        secs["blend"] = time.perf_counter() - t1

    # ---- outputs
    out = run.path / OUT_DIR
    acc = pd.DataFrame(acc_rows, columns=["corruption", "severity", "head", "accuracy", "n"])
    summary = _summary(run, heads, acc, per_ex, names, sev, clean_probs, labels, seed, subset,
                       c10c, frost_info, notes, hits)
    summary.update(summary_extra)
    _write_outputs(run, out, acc, per_ex, names, summary, secs, t0)
    say(f"wrote {out} ({hits['computed']} computed, {hits['cached']} from the cache)")
    return out


def _blend_partners(run, emb: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Per example: the class (other than its label) whose train centroid is most similar to
    its embedding, and that class's prototype = the train example most similar to the centroid."""
    from .similarity import _unit, class_centroids
    train = run.split_examples(TRAIN)
    X, y = run.features(TRAIN), train["label"].to_numpy()
    n_classes = len(run.class_names)
    cent = class_centroids(X, y, n_classes)  # (C, D) unit, NaN rows for absent classes
    sims_train = _unit(X) @ np.nan_to_num(cent).T  # (N_train, C)
    proto = {}
    for c in range(n_classes):
        members = np.flatnonzero(y == c)
        if len(members):
            proto[c] = str(train["id"].iloc[members[np.argmax(sims_train[members, c])]])
    s = _unit(emb) @ np.nan_to_num(cent).T  # (N, C)
    s[:, [c for c in range(n_classes) if c not in proto]] = -np.inf
    s[np.arange(len(labels)), labels] = -np.inf
    if not np.isfinite(s).any(axis=1).all():
        raise PerturbError("blend needs a train example of at least one other class")
    cls = s.argmax(axis=1)
    return cls.astype(np.int64), [proto[int(c)] for c in cls]


def _summary(run, heads, acc, per_ex, names, sev, clean_probs, labels, seed, subset, c10c,
             frost_info, notes, hits) -> dict:
    from scipy.stats import spearmanr
    class_names = run.class_names
    pa = acc.pivot_table(index=["corruption", "severity"], columns="head", values="accuracy")
    by_sev = {h: {int(s): float(acc[(acc["head"] == h) & (acc["severity"] == s)]["accuracy"]
                                .mean()) for s in sev} for h in heads.names}
    by_cor = {h: {c: float(acc[(acc["head"] == h) & (acc["corruption"] == c)]["accuracy"].mean())
                  for c in names} for h in heads.names}
    hardness = run.examples.set_index("id").loc[per_ex["id"], "hardness"].to_numpy(float)
    fs = per_ex["flip_severity"].to_numpy(float)
    ok = np.isfinite(hardness) & np.isfinite(fs)
    if ok.sum() >= 3 and np.ptp(hardness[ok]) > 0 and np.ptp(fs[ok]) > 0:
        r, p = spearmanr(hardness[ok], fs[ok])
        rho = {"rho": float(r), "p_value": float(p), "n": int(ok.sum())}
    else:
        rho = {"rho": None, "p_value": None, "n": int(ok.sum()),
               "note": "undefined: fewer than 3 examples or a constant column"}
    flips = per_ex[[f"flip_severity_{c}" for c in names]]
    never_flipped = (flips == NEVER).all(axis=1).mean()
    per_class = per_ex.groupby("label")["flip_severity"].agg(["mean", "size"]).sort_values(
        "mean", kind="stable")
    classes = [{"class": class_names[int(k)] if 0 <= int(k) < len(class_names) else str(k),
                "label": int(k), "mean_flip_severity": float(v["mean"]), "n": int(v["size"])}
               for k, v in per_class.iterrows()]
    return {
        "split": TEST, "n": len(per_ex), "subset": subset, "seed": int(seed),
        "source": "cifar10c" if c10c is not None else "generated",
        "cifar10c": str(c10c.root) if c10c is not None else None,
        "corruptions": list(names), "severities": list(sev),
        "heads": heads.names, "primary_head": heads.primary,
        "clean_accuracy": {h: float((p.argmax(1) == labels).mean())
                           for h, p in clean_probs.items()},
        "mean_corruption_accuracy": {h: float(pa[h].mean()) for h in heads.names},
        "accuracy_by_severity": by_sev, "accuracy_by_corruption": by_cor,
        "flip_severity": {"never": NEVER, "mean": float(np.mean(fs)),
                          "share_never_flipped": float(never_flipped)},
        "hardness_flip_spearman": rho,
        "classes_break_first": classes,
        "frost": frost_info,
        "corruption_notes": {c: CORRUPTION_NOTES[c] for c in names} if c10c is None else None,
        "cache": dict(hits),
        "notes": notes + [
            "flips: the primary head's prediction differs from its prediction on the clean "
            "image; flip_severity 6 = no flip at any computed severity; erase_flip_area and "
            "blend_flip_weight 1.0 = no flip",
            "heads refitted on the run's train features with the run's configuration"],
    }


def _write_outputs(run, out: Path, acc, per_ex, names, summary, secs, t0) -> None:
    from .cache import atomic_write, atomic_write_text
    from .run import write_examples, write_json
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "accuracy.csv", acc.to_csv(index=False))
    atomic_write(out / "examples.parquet", lambda f: per_ex.to_parquet(f, index=False))
    if "occlusion_max_drop" not in per_ex and (out / "occlusion.npz").exists():
        (out / "occlusion.npz").unlink()  # a stale map of an earlier run with occlusion
    ex = run.examples
    ex = ex.drop(columns=[c for c in ex.columns if _is_perturb_column(c)])
    cols = [c for c in perturb_columns(names) if c in per_ex.columns]
    ex = ex.merge(per_ex[["id"] + cols], on="id", how="left", sort=False)
    write_examples(run.path, ex)
    secs["total"] = time.perf_counter() - t0
    summary["seconds"] = {k: round(v, 2) for k, v in secs.items()}
    write_json(out / "summary.json", summary)
