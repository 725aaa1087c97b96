"""The report's pictures as PNG bytes: matplotlib figures and example thumbnails.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, so no global backend or
open-figure state), with mathtext off so that a `$` in a class name stays text.
"""
from __future__ import annotations

import functools
import io

import numpy as np
from matplotlib import colormaps, rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from PIL import Image

RC = {"text.parse_math": False, "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9,
      "axes.spines.top": False, "axes.spines.right": False, "figure.dpi": 100,
      "savefig.dpi": 100}
HEAD_COLORS = {"model": "#1f77b4", "linear": "#d62728", "knn": "#2ca02c"}
SPLIT_COLORS = {"train": "#1f77b4", "test": "#ff7f0e"}
MAX_TICK_CLASSES = 40   # above this, heat maps have no class-name ticks
ANNOTATE_CLASSES = 20   # at or below this, heat-map cells carry their value


def _figure(fn):
    """Run a plotting function under the report's rcParams; it returns a Figure -> PNG bytes."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with rc_context(RC):
            fig = fn(*args, **kwargs)
            FigureCanvasAgg(fig)
            buf = io.BytesIO()
            fig.savefig(buf, format="png", bbox_inches="tight", pad_inches=0.08,
                        facecolor="white", metadata={"Software": None})
        return buf.getvalue()
    return wrapper


def short(name, n: int = 18) -> str:
    s = str(name)
    return s if len(s) <= n else s[: n - 1] + "…"


def class_colors(n: int):
    """n distinguishable colours: tab10/tab20 for few classes, a cyclic map beyond."""
    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [colormaps["tab20"](i) for i in range(n)]
    return [colormaps["hsv"](i / n) for i in range(n)]


def _heat(ax, values, names, *, annotate, cmap, vmin, vmax, fmt, counts=None):
    m = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest",
                  aspect="equal")
    c = len(names)
    if c <= MAX_TICK_CLASSES:
        ticks = np.arange(c)
        ax.set_xticks(ticks, [short(n) for n in names], rotation=45, ha="right",
                      rotation_mode="anchor", fontsize=8 if c > 12 else 9)
        ax.set_yticks(ticks, [short(n) for n in names], fontsize=8 if c > 12 else 9)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    if annotate and c <= ANNOTATE_CLASSES:
        shown = values if counts is None else counts
        rgba = m.cmap(m.norm(values))  # text colour by the luminance of its cell
        dark = (rgba[..., :3] @ np.array([0.299, 0.587, 0.114])) < 0.5
        for i in range(c):
            for j in range(c):
                v = shown[i, j]
                if (counts is not None and v == 0) or not np.isfinite(v):
                    continue
                ax.text(j, i, format(v, fmt), ha="center", va="center",
                        fontsize=8 if c <= 12 else 6.5,
                        color="white" if dark[i, j] else "#222222")
    for s in ax.spines.values():
        s.set_visible(False)
    return m


@_figure
def confusion_heatmap(cm, names, *, title: str) -> Figure:
    """Rows true, columns predicted; colour = share of the true class, text = counts."""
    cm = np.asarray(cm, dtype=np.int64)
    c = len(names)
    rate = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    side = min(11.0, max(4.2, 0.42 * c + 1.8))
    fig = Figure(figsize=(side + 1.0, side))
    ax = fig.add_subplot()
    m = _heat(ax, rate, names, annotate=True, cmap="Blues", vmin=0.0, vmax=1.0, fmt="d",
              counts=cm)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (given label)")
    ax.set_title(title)
    fig.colorbar(m, ax=ax, fraction=0.046, pad=0.03, label="share of the true class")
    return fig


@_figure
def similarity_heatmap(sim, names, *, title: str) -> Figure:
    sim = np.array(sim, dtype=np.float64)
    c = len(names)
    if sim.shape == (c, c):
        np.fill_diagonal(sim, np.nan)  # a centroid with itself: 1, and it would set the scale
    side = min(11.0, max(4.2, 0.42 * c + 1.8))
    fig = Figure(figsize=(side + 1.0, side))
    ax = fig.add_subplot()
    finite = sim[np.isfinite(sim)]
    lo = float(finite.min()) if finite.size else 0.0
    hi = float(finite.max()) if finite.size else 1.0
    cmap = colormaps["viridis"].with_extremes(bad="#eeeeee")
    m = _heat(ax, sim, names, annotate=c <= 12, cmap=cmap, vmin=lo, vmax=max(hi, lo + 1e-6),
              fmt=".2f")
    ax.set_title(title)
    fig.colorbar(m, ax=ax, fraction=0.046, pad=0.03, label="cosine similarity")
    return fig


@_figure
def reliability_diagram(tables: dict, eces: dict) -> Figure:
    """tables: {head: reliability records}; accuracy vs confidence per bin, counts below."""
    fig = Figure(figsize=(5.6, 5.4))
    gs = fig.add_gridspec(2, 1, height_ratios=[3, 1], hspace=0.08)
    ax, axc = fig.add_subplot(gs[0]), fig.add_subplot(gs[1])
    ax.plot([0, 1], [0, 1], ls="--", color="#999999", lw=1, label="perfect calibration")
    n_heads = max(len(tables), 1)
    for k, (head, rows) in enumerate(tables.items()):
        color = HEAD_COLORS.get(head, f"C{k + 3}")
        conf = np.array([r.get("confidence") for r in rows], dtype=float)
        acc = np.array([r.get("accuracy") for r in rows], dtype=float)
        count = np.array([r.get("count") or 0 for r in rows], dtype=float)
        lower = np.array([r.get("lower") for r in rows], dtype=float)
        upper = np.array([r.get("upper") for r in rows], dtype=float)
        ok = (count > 0) & np.isfinite(conf) & np.isfinite(acc)
        ece = eces.get(head)
        label = f"{head}" + (f" (ECE {ece:.3f})" if ece is not None else "")
        ax.plot(conf[ok], acc[ok], marker="o", ms=4, lw=1.5, color=color, label=label)
        width = (upper - lower) / (n_heads + 1)
        share = count / max(count.sum(), 1)
        axc.bar(lower + width * (k + 0.5), share, width=width, color=color, align="edge",
                alpha=0.85)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("accuracy")
    ax.set_xticklabels([])
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    ax.set_title("reliability (max probability)")
    axc.set_xlim(0, 1)
    axc.set_xlabel("confidence")
    axc.set_ylabel("share")
    return fig


@_figure
def hardness_histogram(values: dict) -> Figure:
    """values: {split: hardness array}; density histograms on [0, 1]."""
    fig = Figure(figsize=(6.0, 3.4))
    ax = fig.add_subplot()
    bins = np.linspace(0, 1, 41)
    for k, (split, v) in enumerate(values.items()):
        v = np.asarray(v, dtype=float)
        v = v[np.isfinite(v)]
        if not v.size:
            continue
        color = SPLIT_COLORS.get(split, f"C{k + 2}")
        ax.hist(v, bins=bins, density=True, histtype="stepfilled", alpha=0.25, color=color)
        ax.hist(v, bins=bins, density=True, histtype="step", lw=1.5, color=color,
                label=f"{split} (n={v.size:,}, median {np.median(v):.2f})")
    ax.set_xlim(0, 1)
    ax.set_xlabel("hardness (higher = harder)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8, frameon=False)
    return fig


@_figure
def map_scatter(x, y, labels, names, *, hard=None, issue=None, title: str = "") -> Figure:
    """2-D map coloured by class; `hard` ringed in black, `issue` marked with a red x."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    labels = np.asarray(labels, dtype=np.int64)
    n, c = len(x), len(names)
    legend = c <= 20
    fig = Figure(figsize=(8.6 if legend else 7.0, 6.4))
    ax = fig.add_subplot()
    colors = np.array(class_colors(max(c, 1)))
    s = float(np.clip(6000.0 / max(n, 1), 1.5, 22.0))
    valid = (labels >= 0) & (labels < c)
    pc = np.where(valid[:, None], colors[np.clip(labels, 0, max(c - 1, 0))], (0.5, 0.5, 0.5, 1))
    order = np.random.default_rng(0).permutation(n)  # no class painted over the others
    ax.scatter(x[order], y[order], c=pc[order], s=s, alpha=0.7, linewidths=0, rasterized=True)
    handles = []
    if issue is not None and np.any(issue):  # small dark crosses: visible on any class colour
        issue = np.asarray(issue, bool)
        many = issue.sum() > 500
        ax.scatter(x[issue], y[issue], s=8 if many else 18, marker="x", color="black",
                   linewidths=0.5 if many else 0.9, alpha=0.5 if many else 0.8, rasterized=True)
        handles.append(Line2D([], [], ls="", marker="x", color="black", alpha=0.7,
                              label=f"label-issue candidate ({int(issue.sum()):,})"))
    if hard is not None and np.any(hard):  # rings with a white halo, drawn last, on top
        hard = np.asarray(hard, bool)
        ring = max(4 * s, 70)
        ax.scatter(x[hard], y[hard], s=ring, facecolors="none", edgecolors="white",
                   linewidths=3.2)
        ax.scatter(x[hard], y[hard], s=ring, facecolors="none", edgecolors="black",
                   linewidths=1.6)
        handles.append(Line2D([], [], ls="", marker="o", ms=8, mfc="none", mec="black", mew=1.6,
                              label=f"hardest ({int(hard.sum()):,})"))
    if legend:
        handles = [Line2D([], [], ls="", marker="o", color=colors[i], label=short(nm, 16))
                   for i, nm in enumerate(names)] + handles
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
                  frameon=False)
    ax.set_xticks([])
    ax.set_yticks([])
    for sp in ax.spines.values():
        sp.set_visible(False)
    ax.set_title(title)
    return fig


# ---------------------------------------------------------------- thumbnails
def to_hwc(image) -> np.ndarray:
    """A uint8 image as (H, W, 3) from a (3, H, W) tensor/array or an (H, W, 3) array."""
    a = image.numpy() if hasattr(image, "numpy") else np.asarray(image)
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.moveaxis(a, 0, -1)
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    if a.dtype != np.uint8:
        a = np.clip(a, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(a[..., :3])


def resized(a: np.ndarray, size: int) -> Image.Image:
    """Small images grow by a whole factor with nearest neighbour (crisp pixels); large ones
    shrink to fit `size` with Lanczos."""
    im = Image.fromarray(a)
    side = max(im.size)
    if side <= size:
        f = max(1, round(size / side))
        return im.resize((im.width * f, im.height * f), Image.NEAREST) if f > 1 else im
    im.thumbnail((size, size), Image.LANCZOS)
    return im


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def thumbnail(image, size: int = 96) -> bytes:
    return png(resized(to_hwc(image), size))


_JET = ListedColormap(colormaps["jet"](np.linspace(0, 1, 256)))


def cam_overlay(image, cam, *, size: int = 96, alpha: float = 0.45) -> bytes:
    """A Grad-CAM map in [0, 1] blended over its (aligned) model-input image."""
    a = to_hwc(image).astype(np.float32)
    m = np.nan_to_num(np.asarray(cam, dtype=np.float32), nan=0.0).clip(0, 1)
    if m.shape != a.shape[:2]:
        m = np.asarray(Image.fromarray(m).resize((a.shape[1], a.shape[0]), Image.BILINEAR))
    heat = _JET(m)[..., :3] * 255.0
    out = ((1 - alpha) * a + alpha * heat).clip(0, 255).astype(np.uint8)
    return png(resized(out, size))
