"""Per-image statistics and the outlier rule that turns them into low-quality flags.

Pure numpy, vectorised over uint8 batches (N, H, W, 3) of one shape. Definitions (CleanVision's
issue types were the reference for what to measure; the formulas here are our own):

    grey           Rec. 601 luma 0.299 R + 0.587 G + 0.114 B, in [0, 255]
    brightness     mean grey / 255, in [0, 1]; lower = darker (dark), higher = overexposed
    contrast       standard deviation of grey / 255 (RMS contrast), in [0, 0.5]; lower = flatter
    sharpness      log(1 + variance of the 4-neighbour Laplacian of grey) over the interior
                   pixels; lower = blurrier (CleanVision's "blurry" uses edge variance likewise)
    information    Shannon entropy (bits) of the 256-bin grey histogram, in [0, 8]; lower = less
                   information (CleanVision's "low_information")
    log_area       log(H * W); log_aspect  log(W / H) (0 = square)

Outlier rule (`quality_flags`): Tukey's far-out fences of the REFERENCE rows (the train split):
a value below Q1 - fence * IQR (or above Q3 + fence * IQR) of the reference distribution is an
outlier; `fence` = 3 is Tukey's "far out" (1.5 is his "outside"). The fences come from the
measured distribution, so no share of images is flagged by construction; a statistic whose IQR
is 0 (every CIFAR image is 32 x 32) flags exactly the values that differ from the bulk.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

LUMA = np.array([0.299, 0.587, 0.114], np.float32)
STATS = ("brightness", "contrast", "sharpness", "information", "log_area", "log_aspect")
# issue -> (statistic, side of the fence): "low" = below the lower fence, "both" = either
ISSUES = {"dark": ("brightness", "low"), "overexposed": ("brightness", "high"),
          "low_contrast": ("contrast", "low"), "blurry": ("sharpness", "low"),
          "low_information": ("information", "low"), "odd_size": ("log_area", "both"),
          "odd_aspect": ("log_aspect", "both")}


def grey(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, H, W) float32 luma in [0, 255]."""
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got {x.dtype} {x.shape}")
    return x.astype(np.float32) @ LUMA


def image_statistics(images: np.ndarray) -> pd.DataFrame:
    """One row per image with the columns of STATS (see the module docstring for directions)."""
    g = grey(images)  # (N, H, W)
    n, h, w = g.shape
    flat = g.reshape(n, -1)
    out = {"brightness": flat.mean(1) / 255.0, "contrast": flat.std(1) / 255.0}
    if h >= 3 and w >= 3:  # 4-neighbour Laplacian on the interior (N, H-2, W-2)
        lap = (g[:, :-2, 1:-1] + g[:, 2:, 1:-1] + g[:, 1:-1, :-2] + g[:, 1:-1, 2:]
               - 4 * g[:, 1:-1, 1:-1])
        out["sharpness"] = np.log1p(lap.reshape(n, -1).var(1))
    else:
        out["sharpness"] = np.full(n, np.nan)
    levels = np.clip(np.rint(flat), 0, 255).astype(np.int64)  # (N, H*W)
    hist = np.bincount((levels + 256 * np.arange(n)[:, None]).ravel(),
                       minlength=256 * n).reshape(n, 256) / levels.shape[1]
    logp = np.log2(hist, out=np.zeros_like(hist), where=hist > 0)
    out["information"] = -(hist * logp).sum(1)
    out["log_area"] = np.full(n, np.log(float(h * w)))
    out["log_aspect"] = np.full(n, np.log(w / h))
    return pd.DataFrame({k: np.asarray(out[k], np.float64) for k in STATS})


def fences(reference: pd.DataFrame, fence: float = 3.0) -> dict[str, tuple[float, float]]:
    """{statistic: (lower, upper)} Tukey fences Q1 - fence*IQR, Q3 + fence*IQR of `reference`."""
    out = {}
    for s in STATS:
        v = reference[s].dropna().to_numpy()
        if not len(v):
            out[s] = (-np.inf, np.inf)
            continue
        q1, q3 = np.quantile(v, [0.25, 0.75])
        out[s] = (float(q1 - fence * (q3 - q1)), float(q3 + fence * (q3 - q1)))
    return out


def quality_flags(stats: pd.DataFrame, limits: dict[str, tuple[float, float]]) -> pd.DataFrame:
    """Boolean (N, len(ISSUES)) frame, True = the image is an outlier for that issue. A missing
    statistic (NaN) is never flagged."""
    out = {}
    for issue, (s, side) in ISSUES.items():
        lo, hi = limits[s]
        v = stats[s].to_numpy(float)
        low, high = v < lo, v > hi
        out[issue] = low if side == "low" else high if side == "high" else (low | high)
    return pd.DataFrame(out)
