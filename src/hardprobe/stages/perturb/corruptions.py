"""The 15 CIFAR-10-C corruptions: `corrupt(image, name, severity)`, their parameters and notes.

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
import io
import zlib
from typing import Callable

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from ...errors import PerturbError
from .filters import (
    _clipped_zoom,
    _disk_kernel,
    _f,
    _gaussian,
    _magick_u8,
    _motion_blur,
    _next_pow2,
    _plasma,
    _u8,
)
from .frost_textures import _frost_key, _frost_textures

CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
               "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
               "elastic_transform", "pixelate", "jpeg_compression")
SEVERITIES = (1, 2, 3, 4, 5)

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
