"""Pack a run's examples into the explorer's compact JSON: typed columns and sprite sheets.

Columns travel as little-endian typed arrays in base64 (floats as float32, integers as int32,
booleans as uint8 with 255 = missing) or as JSON lists of strings, coded against their unique
values when they repeat. Thumbnails are square tiles packed row-major into a few JPEG (or
WebP) sprite sheets: tile t sits on sheet t // per_sheet, at column (t % per_sheet) % cols and
row (t % per_sheet) // cols.
"""
from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

MISSING_BOOL = 255  # uint8 code of a missing boolean


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")


def _is_bool_like(s: pd.Series) -> bool:
    if s.dtype == bool or str(s.dtype) == "boolean":
        return True
    if s.dtype != object:
        return False
    vals = s.dropna()
    return len(vals) > 0 and all(isinstance(v, (bool, np.bool_)) for v in vals)


def pack_column(s: pd.Series) -> dict:
    """One column -> {"t": type, ...}; `unpack_column` inverts it (floats to float32)."""
    if _is_bool_like(s):
        codes = np.full(len(s), MISSING_BOOL, np.uint8)
        ok = s.notna().to_numpy()
        codes[ok] = s[ok].astype(bool).to_numpy()
        return {"t": "bool", "b64": _b64(codes)}
    if pd.api.types.is_integer_dtype(s.dtype) and s.notna().all():
        v = s.to_numpy(np.int64)
        if len(v) == 0 or (v.min() >= -2**31 and v.max() < 2**31):
            return {"t": "i32", "b64": _b64(v.astype("<i4"))}
    if pd.api.types.is_numeric_dtype(s.dtype):
        return {"t": "f32", "b64": _b64(s.to_numpy(np.float64, na_value=np.nan).astype("<f4"))}
    return _pack_strings(s)


def _pack_strings(s: pd.Series) -> dict:
    vals = [None if _missing(v) else str(v) for v in s]
    uniq = list(dict.fromkeys(v for v in vals if v is not None))
    if len(uniq) > max(256, len(vals) // 4):  # mostly distinct (ids, paths, evidence)
        return {"t": "str", "v": vals}
    index = {u: k for k, u in enumerate(uniq)}
    codes = np.array([-1 if v is None else index[v] for v in vals], "<i4")
    return {"t": "cat", "values": uniq, "b64": _b64(codes)}


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA


def unpack_column(spec: dict):
    """Inverse of pack_column: ndarray for numbers and booleans (bool: float with NaN where
    missing), list of str/None for strings."""
    t = spec["t"]
    if t in ("str",):
        return list(spec["v"])
    raw = base64.b64decode(spec["b64"])
    if t == "bool":
        codes = np.frombuffer(raw, np.uint8)
        out = codes.astype(float)
        out[codes == MISSING_BOOL] = np.nan
        return out
    if t == "cat":
        codes = np.frombuffer(raw, "<i4")
        return [None if c < 0 else spec["values"][c] for c in codes]
    return np.frombuffer(raw, {"i32": "<i4", "f32": "<f4"}[t]).copy()


def pack_table(df: pd.DataFrame) -> dict:
    """{column: packed column} of every column of df, in its order."""
    return {str(c): pack_column(df[c]) for c in df.columns}


# ---------------------------------------------------------------- sprites
@dataclass(frozen=True)
class SpriteLayout:
    """Where tile t lies: sheet t // per_sheet, pixel (x, y) = (col * size, row * size)."""
    size: int  # tile side, px
    cols: int  # tiles per sheet row
    rows: int  # tile rows per full sheet

    @property
    def per_sheet(self) -> int:
        return self.cols * self.rows

    def place(self, t: int) -> tuple[int, int, int]:
        """-> (sheet, x, y) of tile t, in pixels."""
        sheet, k = divmod(int(t), self.per_sheet)
        return sheet, (k % self.cols) * self.size, (k // self.cols) * self.size

    def sheet_shape(self, n: int, sheet: int) -> tuple[int, int]:
        """(height, width) px of sheet `sheet` of n tiles: the last sheet only as tall as it
        needs to be."""
        in_sheet = min(self.per_sheet, n - sheet * self.per_sheet)
        return -(-in_sheet // self.cols) * self.size, self.cols * self.size

    def n_sheets(self, n: int) -> int:
        return max(1, -(-n // self.per_sheet))

    def to_json(self) -> dict:
        return {"size": self.size, "cols": self.cols, "rows": self.rows,
                "per_sheet": self.per_sheet}


def tile(image: np.ndarray | None, size: int) -> np.ndarray:
    """(size, size, 3) uint8 thumbnail: centre crop to a square, then resize; grey when None."""
    if image is None:
        return np.full((size, size, 3), 128, np.uint8)
    if image.shape == (size, size, 3) and image.dtype == np.uint8:
        return image
    im = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
    if im.size != (size, size):
        im = ImageOps.fit(im, (size, size), Image.Resampling.LANCZOS)
    return np.asarray(im)


class SpriteWriter:
    """Adds tiles one by one (so 60,000 images never sit in memory full size) and encodes the
    sheets. `fmt` jpeg or webp; with a tile size that is a multiple of 16, JPEG's blocks never
    straddle two tiles, so no tile bleeds into its neighbour."""

    def __init__(self, layout: SpriteLayout, n: int, fmt: str = "jpeg", quality: int = 80):
        self.layout, self.n, self.fmt, self.quality = layout, n, fmt, quality
        self.sheets = [np.full((*layout.sheet_shape(n, s), 3), 128, np.uint8)
                       for s in range(layout.n_sheets(n))]
        self.count = 0

    def add(self, thumb: np.ndarray) -> int:
        """Place the next tile; returns its index."""
        t = self.count
        s, x, y = self.layout.place(t)
        z = self.layout.size
        self.sheets[s][y:y + z, x:x + z] = thumb
        self.count += 1
        return t

    def encode(self) -> list[str]:
        """The sheets as data: URLs."""
        mime = {"jpeg": "image/jpeg", "webp": "image/webp", "png": "image/png"}[self.fmt]
        out = []
        for arr in self.sheets:
            buf = io.BytesIO()
            kw = {} if self.fmt == "png" else {"quality": self.quality}
            Image.fromarray(arr).save(buf, format=self.fmt.upper(), **kw)
            out.append(f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii"))
        return out
