"""Which similarity separates planted near-copies from distinct shots of the same class?

    PYTHONPATH=src python3 benchmarks/bench_duplicates.py [--train /tmp/cifar/train]
        [--test /tmp/cifar/test] [--weights ../shared/models/cifar-resnet/resnet20-12fca82f.th]
        [--n-per-class 30] [--pool-layer 1000] [--full]

Plants near-copies of `n_per_class` test images per class (exact byte copy, colour shift,
1-3 px translation, 1-3 px crop + resize back, rescale down-up, JPEG re-encode at quality
20-50, and all of colour + translation + JPEG at once) and compares, for each candidate
measure, the similarity of (image, its planted copy) with that of (image, its most similar
train image of the same class): the hardest non-copy for that measure. The train pool is the
whole class (5,000 images) for every measure except earlier-layer features (a random
`pool_layer` per class: they need a forward pass). Real CIFAR-10 has test images with a
near-copy in train (about 3%, Barz & Denzler 2020), so the top few percent of these
"non-copies" may be true duplicates: the montage of the highest ones says which.

Measures: resnet20 final embedding cosine; layer1 / layer2 outputs pooled to 4x4 (cosine);
normalised grey thumbnail correlation at 8x8 and 16x16; pHash and dHash similarity
(1 - 2 Hamming / 64). With --full, times the search on full train + test with the chosen one.
Writes benchmarks/results/bench_duplicates.json and a montage PNG.
"""
from __future__ import annotations

import argparse
import io
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance

from hardprobe.data.datasets import load_imagefolder
from hardprobe.data.descriptors import grey_thumbnail, split_thumbnails
from hardprobe.scoring import duplicates as D

OUT = Path(__file__).resolve().parent / "results"
KINDS = ("exact", "colour", "translate", "crop", "rescale", "jpeg", "combo")


# ---------------------------------------------------------------- planted copies
def _colour(im: Image.Image, rng) -> Image.Image:
    a = np.asarray(ImageEnhance.Color(im).enhance(rng.uniform(0.6, 1.4)), dtype=np.float32)
    a = a * rng.uniform(0.8, 1.2, size=3) + rng.uniform(-25, 25)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def _translate(im: Image.Image, rng, lo=1, hi=3) -> Image.Image:
    a = np.asarray(im)
    dx, dy = (rng.integers(lo, hi + 1) * rng.choice([-1, 1]) for _ in range(2))
    p = max(abs(dx), abs(dy))
    padded = np.pad(a, ((p, p), (p, p), (0, 0)), mode="edge")
    h, w = a.shape[:2]
    return Image.fromarray(padded[p + dy:p + dy + h, p + dx:p + dx + w])


def _crop(im: Image.Image, rng) -> Image.Image:
    w, h = im.size
    l, t, r, b = (int(v) for v in rng.integers(0, 4, size=4))
    if l + r + t + b == 0:
        l = 2
    return im.crop((l, t, w - r, h - b)).resize((w, h), Image.BILINEAR)


def _rescale(im: Image.Image, rng) -> Image.Image:
    s = int(rng.integers(16, 25))
    return im.resize((s, s), Image.BILINEAR).resize(im.size, Image.BICUBIC)


def _jpeg(im: Image.Image, rng, q=None) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=int(q or rng.integers(20, 51)))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def plant(im: Image.Image, kind: str, rng) -> Image.Image:
    if kind == "exact":
        return im.copy()
    if kind == "combo":
        return _jpeg(_translate(_colour(im, rng), rng, 1, 2), rng, 50)
    return {"colour": _colour, "translate": _translate, "crop": _crop, "rescale": _rescale,
            "jpeg": _jpeg}[kind](im, rng)


def to_tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)


# ---------------------------------------------------------------- network features
def net_features(bb, images: torch.Tensor, batch=500) -> dict[str, np.ndarray]:
    """uint8 (N, 3, H, W) -> {"embedding", "layer1", "layer2"} float32 unit rows."""
    feats: dict[str, list] = {"layer1": [], "layer2": [], "embedding": []}
    hooks = [getattr(bb.model, n).register_forward_hook(
        lambda m, i, o, n=n: feats[n].append(
            torch.nn.functional.adaptive_avg_pool2d(o, 4).flatten(1))) for n in ("layer1", "layer2")]
    with torch.inference_mode():
        for s in range(0, len(images), batch):
            emb, _ = bb.forward(bb.preprocess(images[s:s + batch]))
            feats["embedding"].append(emb)
    for h in hooks:
        h.remove()
    return {k: torch.nn.functional.normalize(torch.cat(v), dim=1).numpy() for k, v in feats.items()}


# ---------------------------------------------------------------- statistics
def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(pos > neg) + P(tie) / 2: ROC AUC of the similarity as a copy detector."""
    allv = np.concatenate([pos, neg])
    ranks = np.argsort(np.argsort(allv, kind="stable"), kind="stable").astype(np.float64) + 1
    # average ranks for ties
    _, inv, cnt = np.unique(allv, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    ranks = (sums / cnt)[inv]
    rp = ranks[: len(pos)].sum()
    return float((rp - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def summarise(pos_by_kind: dict, neg: np.ndarray) -> dict:
    pos = np.concatenate(list(pos_by_kind.values()))
    q = lambda a, ps: {f"p{p:g}": round(float(np.percentile(a, p)), 4) for p in ps}  # noqa: E731
    out = {"auc": round(auc(pos, neg), 4),
           "pos": {k: q(v, (0, 1, 5, 50)) for k, v in pos_by_kind.items()},
           "neg": q(neg, (50, 90, 95, 97, 99, 100))}
    for p in (95, 97, 99):  # detection rate at a threshold above p% of the hardest non-copies
        t = np.percentile(neg, p)
        out[f"tpr_at_neg_p{p}"] = {k: round(float((v > t).mean()), 4) for k, v in pos_by_kind.items()}
    out["gap_pos_p1_minus_neg_p97"] = round(float(np.percentile(pos, 1) - np.percentile(neg, 97)), 4)
    return out


def montage(pairs, path: Path) -> None:
    """Rows of (test image, its most similar same-class train image), 64 px each."""
    tiles = [np.concatenate([np.asarray(a.resize((64, 64), Image.NEAREST)),
                             np.asarray(b.resize((64, 64), Image.NEAREST))], axis=1)
             for a, b in pairs]
    cols = 8
    rows = [np.concatenate(tiles[r:r + cols] + [np.zeros_like(tiles[0])] * (cols - len(tiles[r:r + cols])),
                           axis=1) for r in range(0, len(tiles), cols)]
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


def shift_measure(g_orig, g_copy, g_pool, orig_cls, pool_cls, n_kinds):
    """Like `measure` for D.shift_correlation; the pool's windows are built once per class."""
    n = len(g_orig)
    pos = D.shift_correlation(np.tile(g_orig, (n_kinds, 1, 1)), g_copy).reshape(n_kinds, n)
    neg, arg = np.full(n, -np.inf, np.float32), np.zeros(n, np.int64)
    c = (2 * D.MAX_SHIFT + 1) ** 2 // 2
    for k in np.unique(orig_cls):
        rows = np.flatnonzero(pool_cls == k)
        wp = D._windows(torch.from_numpy(g_pool[rows]).float(), D.MAX_SHIFT)  # (P, S, D)
        for q in np.flatnonzero(orig_cls == k):
            wq = D._windows(torch.from_numpy(g_orig[q:q + 1]).float(), D.MAX_SHIFT)[0]
            s = torch.maximum((wp @ wq[c]).amax(1), (wp[:, c] @ wq.T).amax(1))
            neg[q], arg[q] = float(s.max()), int(rows[int(s.argmax())])
    return pos, neg, arg


def candidate_recall(g_orig, g_copy, g_all, orig_rows, n_kinds, ks=(5, 10, 20, 50)):
    """Share of planted copies among the top-k stage-1 neighbours of their original when
    searched among all train + test images (any class), per thumbnail size and kind."""
    out = {}
    n = len(g_orig)
    for size in (4, 8, 16):
        a, b = D.thumb_descriptor(g_orig, size), D.thumb_descriptor(g_copy, size)
        sims = a @ D.thumb_descriptor(g_all, size).T  # (n, N_all)
        sims[np.arange(n), orig_rows] = -np.inf
        pos = (b.reshape(n_kinds, n, -1) * a[None]).sum(-1)  # (kinds, n)
        rank = (sims[None] > pos[..., None]).sum(-1)  # (kinds, n) non-copies above the copy
        out[f"thumb{size}"] = {k: {kind: round(float((rank[i] < k).mean()), 4)
                                   for i, kind in enumerate(KINDS)} for k in ks}
    return out


# ---------------------------------------------------------------- main
def cached_thumbnails(split, cache: Path) -> tuple[np.ndarray, float]:
    """(N, 32, 32) uint8 grey thumbnails of a split and the seconds it took (0 when cached)."""
    if cache.exists():
        return np.load(cache), 0.0
    t0 = time.perf_counter()
    g, _ = split_thumbnails(split.decode, np.arange(len(split)), desc=f"thumbnails {split.name}")
    secs = time.perf_counter() - t0
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, g)
    return g, secs


def pixel_measures(g_orig, g_copy, g_pool):
    """{measure: (desc of originals, desc of copies, desc of pool)} for the pixel measures."""
    out = {}
    for s in (8, 16):
        out[f"thumb{s}"] = tuple(D.thumb_descriptor(g, s) for g in (g_orig, g_copy, g_pool))
    for name, fn in (("phash", D.phash_bits), ("dhash", D.dhash_bits)):
        out[name] = tuple(D.hash_similarity_rows(fn(g)) for g in (g_orig, g_copy, g_pool))
    return out


def measure(orig, copies, pool, orig_cls, pool_cls, n_kinds):
    """pos (n_kinds, n) similarity to the planted copies; neg (n,) max over same-class pool."""
    n = len(orig)
    pos = (copies.reshape(n_kinds, n, -1) * orig[None]).sum(-1)
    sims = orig @ pool.T  # (n, n_pool)
    sims[orig_cls[:, None] != pool_cls[None, :]] = -np.inf
    return pos, sims.max(1), sims.argmax(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", default="/tmp/cifar/train")
    ap.add_argument("--test", default="/tmp/cifar/test")
    ap.add_argument("--weights", default="../shared/models/cifar-resnet/resnet20-12fca82f.th")
    ap.add_argument("--features", default="/work/runs/r20/features/train.embedding.npy")
    ap.add_argument("--n-per-class", type=int, default=30)
    ap.add_argument("--pool-layer", type=int, default=1000)
    ap.add_argument("--cache", default="/tmp/dups_bench")
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--no-net", action="store_true", help="skip the network measures")
    args = ap.parse_args()
    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    ds = load_imagefolder(args.train, args.test)
    tr, te = ds.splits["train"], ds.splits["test"]
    g_tr, t_tr = cached_thumbnails(tr, Path(args.cache) / "grey32_train.npy")
    g_te, t_te = cached_thumbnails(te, Path(args.cache) / "grey32_test.npy")
    y_tr, y_te = tr.examples["label"].to_numpy(), te.examples["label"].to_numpy()
    pick = np.concatenate([rng.choice(np.flatnonzero(y_te == c), args.n_per_class, replace=False)
                           for c in range(len(ds.class_names))])
    orig = [Image.fromarray(te.decode(int(i)).permute(1, 2, 0).numpy()) for i in pick]
    copies = [plant(im, k, rng) for k in KINDS for im in orig]  # kind-major
    g_orig = g_te[pick]
    g_copy = np.stack([grey_thumbnail(to_tensor(c)) for c in copies])
    res, worst = {}, {}
    for name, (a, b, p) in pixel_measures(g_orig, g_copy, g_tr).items():
        pos, neg, arg = measure(a, b, p, y_te[pick], y_tr, len(KINDS))
        res[name], worst[name] = summarise(dict(zip(KINDS, pos)), neg), (neg, arg)
    pos, neg, arg = shift_measure(g_orig, g_copy, g_tr, y_te[pick], y_tr, len(KINDS))
    res["shift_corr"], worst["shift_corr"] = summarise(dict(zip(KINDS, pos)), neg), (neg, arg)
    res["candidate_recall"] = candidate_recall(g_orig, g_copy, np.concatenate([g_tr, g_te]),
                                               pick + len(g_tr), len(KINDS))
    if args.no_net:
        return finish(args, res, worst, orig, tr, t_tr, t_te, g_tr, g_te)
    from hardprobe.backbones import create_backbone
    bb = create_backbone("cifar_resnet20", weights=args.weights)
    bb.model.eval()
    x = torch.stack([to_tensor(im) for im in orig + copies])
    f = net_features(bb, x)
    n = len(orig)
    emb_tr = np.load(args.features)
    emb_tr = emb_tr / np.linalg.norm(emb_tr, axis=1, keepdims=True)
    pos, neg, arg = measure(f["embedding"][:n], f["embedding"][n:], emb_tr, y_te[pick], y_tr,
                            len(KINDS))
    res["embedding"] = summarise(dict(zip(KINDS, pos)), neg)
    sub = np.concatenate([rng.choice(np.flatnonzero(y_tr == c), args.pool_layer, replace=False)
                          for c in range(len(ds.class_names))])
    fp = net_features(bb, torch.stack([tr.decode(int(i)) for i in sub]))
    for layer in ("layer1", "layer2"):
        pos, neg, _ = measure(f[layer][:n], f[layer][n:], fp[layer], y_te[pick], y_tr[sub],
                              len(KINDS))
        res[layer] = summarise(dict(zip(KINDS, pos)), neg)
        res[layer]["pool_per_class"] = args.pool_layer
    finish(args, res, worst, orig, tr, t_tr, t_te, g_tr, g_te)


def finish(args, res, worst, orig, tr, t_tr, t_te, g_tr, g_te):
    OUT.mkdir(exist_ok=True)
    neg, arg = worst["shift_corr"]
    top = np.argsort(-neg)[:48]
    montage([(orig[t], Image.fromarray(tr.decode(int(arg[t])).permute(1, 2, 0).numpy()))
             for t in top], OUT / "bench_duplicates_top_nonplanted.png")
    out = {"machine": platform.processor() or platform.machine(), "torch_threads": 2,
           "n_originals": len(orig), "kinds": KINDS, "measures": res,
           "thumbnail_seconds": {"train": t_tr, "test": t_te},
           "top_nonplanted_shift_corr": [round(float(neg[t]), 4) for t in top]}
    if args.full:
        out["full"] = full_search(np.concatenate([g_tr, g_te]),
                                  np.array(["train"] * len(g_tr) + ["test"] * len(g_te)))
    (OUT / "bench_duplicates.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


def full_search(grey32: np.ndarray, splits: np.ndarray) -> dict:
    """find_duplicates on every example at the module's threshold, timed."""
    t0 = time.perf_counter()
    cols = D.find_duplicates(grey32, splits, progress=True)
    secs = time.perf_counter() - t0
    g = cols["duplicate_group"].to_numpy()
    td = cols["train_duplicate"].fillna(False).to_numpy(bool)
    n_groups = {s: int((np.bincount(g[(splits == s) & (g >= 0)]) >= 2).sum()) for s in ("train", "test")}
    return {"threshold": D.THRESHOLD, "thumb_size": D.THUMB_SIZE, "seconds": round(secs, 2),
            "n_groups_within": n_groups, "n_groups": int(g.max() + 1),
            "n_in_groups": {s: int(((splits == s) & (g >= 0)).sum()) for s in ("train", "test")},
            "test_with_train_copy": int(td.sum())}


if __name__ == "__main__":
    main()
