"""Simple per-image statistics, computed from the pixels alone (no model).

Definitions (an image is uint8 RGB, values scaled to [0, 1]; luma Y = 0.299 R + 0.587 G +
0.114 B, ITU-R BT.601):

    brightness  mean of Y                      higher = brighter
    contrast    standard deviation of Y        higher = more contrast (RMS contrast)
    saturation  mean of (max - min) / max      higher = more colourful (HSV saturation;
                over the channels, 0 where max = 0)
    sharpness   variance of the 4-neighbour    higher = sharper (more fine detail); a blurred
                Laplacian of Y (valid region)  copy of an image scores lower than the original

They describe how a group of images differs from its class (slices), not whether an image is
"bad": the z-scores that use them are relative to the class's own distribution.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

STAT_NAMES = ("brightness", "contrast", "saturation", "sharpness")
LUMA = np.array([0.299, 0.587, 0.114])


def image_stats(image) -> dict[str, float]:
    """STAT_NAMES of one uint8 image, (3, H, W) or (H, W, 3) (a torch tensor or an array)."""
    x = np.asarray(image, dtype=np.float64)
    if x.ndim == 2:  # greyscale: three equal channels
        x = np.repeat(x[None], 3, axis=0)
    if x.shape[0] != 3 and x.shape[-1] == 3:
        x = np.moveaxis(x, -1, 0)  # (3, H, W)
    x = x / 255.0
    y = np.tensordot(LUMA, x, axes=1)  # (H, W)
    hi, lo = x.max(axis=0), x.min(axis=0)
    sat = np.where(hi > 0, (hi - lo) / np.where(hi > 0, hi, 1.0), 0.0)
    if min(y.shape) >= 3:
        lap = (y[:-2, 1:-1] + y[2:, 1:-1] + y[1:-1, :-2] + y[1:-1, 2:] - 4 * y[1:-1, 1:-1])
        sharp = float(lap.var())
    else:
        sharp = 0.0
    return {"brightness": float(y.mean()), "contrast": float(y.std()),
            "saturation": float(sat.mean()), "sharpness": sharp}


def stats_table(images) -> pd.DataFrame:
    """(N, 4) DataFrame of STAT_NAMES, one row per image, in the order given."""
    return pd.DataFrame([image_stats(im) for im in images], columns=list(STAT_NAMES))
