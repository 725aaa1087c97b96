"""The frost corruption's textures: the original photographs when found, else a stand-in."""
from __future__ import annotations

import functools
import importlib.util
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage as ndi

from ...errors import PerturbError
from .filters import _plasma

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
