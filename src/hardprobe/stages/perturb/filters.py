"""The image filters the corruptions are built from: numpy / scipy.ndimage ports of the
OpenCV, ImageMagick and scikit-image calls of make_cifar_c.py (see corruptions.py), and the
[0, 1] float <-> uint8 conversions it uses."""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

from ...errors import ConfigError


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
        raise ConfigError(f"plasma size must be a power of two, got {size}")
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


def _magick_u8(x: np.ndarray) -> np.ndarray:
    """Float 0..255 -> uint8 as ImageMagick 6 (Q16) hands its result back through PNG: measured
    against it via Wand, the floor (of x + 1e-6) gives the same byte on 96-99.9% of pixels,
    +-1 on the rest; rounding would be off by one on about half of them."""
    return np.clip(np.floor(x + 1e-6), 0, 255).astype(np.uint8)
