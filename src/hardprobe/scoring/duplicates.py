"""Exact and near duplicates, within and across splits: pure functions on arrays.

Rule: two examples are near-duplicates when the shift-tolerant correlation of their grey
thumbnails (`shift_correlation`: best Pearson correlation of the centre 24x24 window of one
32x32 grey thumbnail, box-filtered to 12x12, against the other's window at any shift of up to
4 px each way, both directions) is >= THRESHOLD = 0.95. Candidates come from stage 1: each
example's CANDIDATES = 20 nearest neighbours (any split, any class) by the correlation of 8x8
normalised grey thumbnails (blockwise matmul + top-k), so the cost is N^2 * 64 for stage 1 and
N * 20 * 81 * 144 for stage 2, not N^2 * 81 * 144. Groups: union-find over the linked pairs.

Why this and this threshold (benchmarks/bench_duplicates.py; AMD EPYC Zen 4, 2 shared cores;
real CIFAR-10 JPEGs, cifar_resnet20 checkpoint resnet20-12fca82f.th): 300 test images (30 a
class), each with 7 planted copies (exact; colour shift = saturation x0.6-1.4, channel gains
0.8-1.2, offset +-25; translation 1-3 px in x and y; crop of 0-3 px a side resized back;
rescale to 16-24 px and back; JPEG quality 20-50; colour + 1-2 px translation + JPEG 50),
against the hardest non-copy: the most similar of the 5,000 train images of the same class
(1,000 for layer features). ROC AUC (copy vs hardest non-copy):
    backbone embedding cosine  0.43  (copies p50: rescale 0.88, JPEG 0.94; non-copies p50 0.97:
                                      the net maps distinct shots of a class closer together
                                      than a recompressed copy -- it does NOT separate them)
    layer1 / layer2, 4x4 pooled 0.88 / 0.95   pHash / dHash 0.75 / 0.76
    grey thumbnail 8x8 / 16x16 0.87 / 0.85  (colour, rescale, JPEG copies all >= 0.93 but a
                                             1-3 px translation drops to p50 0.80 / 0.68)
    shift_correlation (this)    0.987
shift_correlation quantiles: copies p1 -- exact 1.0, colour 0.994, translation 1.0, crop
0.763, rescale 0.941, JPEG 0.970, combination 0.985; hardest non-copies p50 0.80, p90 0.90,
p95 0.93, p97 0.94, p99 0.96, max 0.99. The montage of the highest "non-copies" shows that
real CIFAR-10 duplicates (a test image with a copy in train, about 3% of test per Barz &
Denzler 2020) fill that tail: of the 8 at >= 0.945, 6 are the same shot (recoloured or
re-cropped) and 2 are different ships on a flat sea, the failure mode (a single horizon
edge in low-texture images). 0.95 sits above the 97th percentile of the hardest non-copies
and below the 1st percentile of every copy kind except rescale (p1 0.941, about 97% found) and
crops with resize (p50 0.937: about 30% found; a crop that rescales by up to 23% is not
caught reliably). Stage 1's recall (copy within the original's top 20 of all 60,000 images):
exact, colour, rescale, JPEG 1.0; crop 0.98; combination 0.94; translation 1-3 px only 0.64
(the thumbnail at 8x8 is not shift-tolerant): translated copies that stage 1 misses are missed.

On the full shared CIFAR-10 (50,000 train + 10,000 test JPEGs): 862 groups holding 2,010
train and 410 test images; 625 groups with >= 2 train images, 34 with >= 2 test images; 372
test images (3.7%) with a near-copy in train (Barz & Denzler report 3.3% for CIFAR-10).
Search time, 2 cores: 83 s in all (stage 1 8 s, stage 2 `pair_shift_correlation` about 60 s);
the first stage 2, which built the windows once per pair, took 1,101 s on a busier machine;
the counts are the same. Stage 2 now multiplies each image's windows with all its partners'
centres at once instead of copying the windows once per pair (AMD EPYC, AVX2 only, 2 cores,
the same 60,000 thumbnails, one process, the same groups: stage 2 25.6 s, was 100 s; the
whole search 38 s, was 131 s; stage 1 is now the larger part, 17 s).

Functions:
    thumb_descriptor(grey32, size)   (N, size*size) float32 unit rows: normalised grey thumbnails
    phash_bits / dhash_bits(grey32)  (N, 64) bool perceptual hashes (measured, not used)
    candidate_pairs(desc, k)         stage 1: each example's k nearest thumbnails (matmul top-k)
    shift_correlation(a, b)          stage 2: best correlation over shifts of +-4 px
    groups_from_pairs(n, i, j)       union-find: (N,) group id, -1 where an example has no copy
    shared_groups(groups)            the groups, or None when no two rows share one
    find_duplicates(grey32, splits)  the table columns duplicate_group and train_duplicate
    duplicate_metrics(examples, heads)  metrics["duplicates"] (format below)
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import ConfigError

log = logging.getLogger(__name__)

THUMB_SIZE = 8   # stage-1 thumbnail side
THRESHOLD = 0.95
BLOCK = 4096  # query rows per matmul block: (BLOCK, N) float32 = 16 MiB per 1,000 columns
FIT_SPLIT = "train"


# ---------------------------------------------------------------- descriptors
def _pool(grey32: np.ndarray, size: int) -> torch.Tensor:
    """(N, H, W) uint8 -> (N, size, size) float32 equal-area means (box filter)."""
    g = torch.from_numpy(np.ascontiguousarray(grey32)).to(torch.float32)[:, None]
    return F.adaptive_avg_pool2d(g, size)[:, 0]


def thumb_descriptor(grey32: np.ndarray, size: int = THUMB_SIZE) -> np.ndarray:
    """(N, size*size) float32: the grey thumbnail box-filtered to size x size, minus its mean,
    divided by its norm. The dot product of two rows is the Pearson correlation of the two
    thumbnails, in [-1, 1], higher = more alike; it ignores brightness and contrast (any
    affine change of grey levels). A constant image has no pattern: its row is all zero, so
    it matches nothing (similarity 0)."""
    if grey32.ndim != 3:
        raise ConfigError(f"grey thumbnails must be (N, H, W), got shape {grey32.shape}")
    t = _pool(grey32, size).reshape(len(grey32), -1)
    t = t - t.mean(1, keepdim=True)
    norm = t.norm(dim=1, keepdim=True)
    t = torch.where(norm > 1e-3 * size, t / norm.clamp_min(1e-12), torch.zeros_like(t))
    return t.numpy()


def phash_bits(grey32: np.ndarray) -> np.ndarray:
    """(N, 64) bool pHash: DCT-II of the 32x32 grey image, the 8x8 lowest frequencies,
    each bit = coefficient above the median of the 63 non-DC ones."""
    from scipy.fft import dctn
    g = _pool(grey32, 32).numpy().astype(np.float64)
    low = dctn(g, type=2, axes=(1, 2), norm="ortho")[:, :8, :8].reshape(len(g), 64)
    med = np.median(low[:, 1:], axis=1, keepdims=True)
    return low > med


def dhash_bits(grey32: np.ndarray) -> np.ndarray:
    """(N, 64) bool dHash: grey image box-filtered to 8 rows x 9 columns, bit = right > left."""
    g = torch.from_numpy(np.ascontiguousarray(grey32)).to(torch.float32)[:, None]
    g = F.adaptive_avg_pool2d(g, (8, 9))[:, 0].numpy()
    return (g[:, :, 1:] > g[:, :, :-1]).reshape(len(g), 64)


def hash_similarity_rows(bits: np.ndarray) -> np.ndarray:
    """(N, B) bool -> (N, B) float32 rows whose dot product is 1 - 2 * Hamming / B, so a
    Hamming search runs as the same blockwise matmul (similarity 1 = identical hashes)."""
    return (bits.astype(np.float32) * 2 - 1) / np.sqrt(bits.shape[1])


MAX_SHIFT = 4   # pixels (of the 32x32 thumbnail) that shift_correlation searches each way
CANDIDATES = 20  # stage-1 neighbours per example that shift_correlation verifies


def _windows(grey32: torch.Tensor, max_shift: int) -> torch.Tensor:
    """(B, 32, 32) float -> (B, S, D) unit rows: the (32 - 2 max_shift)^2 window at every
    offset in [0, 2 max_shift]^2 (S = (2 max_shift + 1)^2), box-filtered 2x2 to half size,
    minus its mean, over its norm (zero rows for flat windows)."""
    p = F.avg_pool2d(grey32[:, None], 2, stride=1)[:, 0]  # (B, 31, 31): 2x2 means at every pixel
    side = 32 - 2 * max_shift
    wins = [p[:, oy:oy + side - 1:2, ox:ox + side - 1:2].reshape(len(p), -1)
            for oy in range(2 * max_shift + 1) for ox in range(2 * max_shift + 1)]
    w = torch.stack(wins, 1)
    w = w - w.mean(-1, keepdim=True)
    n = w.norm(dim=-1, keepdim=True)
    return torch.where(n > 1e-2, w / n.clamp_min(1e-12), torch.zeros_like(w))


def shift_correlation(grey_a: np.ndarray, grey_b: np.ndarray, *, max_shift: int = MAX_SHIFT,
                      batch: int = 8192) -> np.ndarray:
    """(P,) float32 similarity of paired (P, 32, 32) grey thumbnails, in [-1, 1], higher =
    more alike: the best Pearson correlation between the centre window of one image and the
    other image's window at any shift up to `max_shift` px each way (both directions, the
    max). Tolerates translation and small crops that plain thumbnail correlation does not."""
    out = np.empty(len(grey_a), dtype=np.float32)
    c = (2 * max_shift + 1) ** 2 // 2  # index of the unshifted (centre) window
    for s in range(0, len(grey_a), batch):
        a = torch.from_numpy(np.ascontiguousarray(grey_a[s:s + batch])).to(torch.float32)
        b = torch.from_numpy(np.ascontiguousarray(grey_b[s:s + batch])).to(torch.float32)
        wa, wb = _windows(a, max_shift), _windows(b, max_shift)
        ab = (wb * wa[:, c:c + 1]).sum(-1).amax(1)
        ba = (wa * wb[:, c:c + 1]).sum(-1).amax(1)
        out[s:s + batch] = torch.maximum(ab, ba).numpy()
    return out


def pair_shift_correlation(grey32: np.ndarray, i: np.ndarray, j: np.ndarray, *,
                           max_shift: int = MAX_SHIFT, block: int = 1024, width: int = 16,
                           progress: bool = False) -> np.ndarray:
    """(P,) `shift_correlation` of rows i[p] and j[p] of one (N, 32, 32) array, equal to
    shift_correlation(grey32[i], grey32[j]), at a fraction of its cost: each image's shifted
    windows are built once per block of `block` images and multiplied with the centre windows
    of all its partners at once (rows of up to `width` partners, one batched matmul per block),
    both directions of every pair in the same pass. No window is copied per pair: that copy,
    (pairs, 81, 144) float32, was most of the time."""
    i, j = np.asarray(i, np.int64), np.asarray(j, np.int64)
    c = (2 * max_shift + 1) ** 2 // 2
    n, p = len(grey32), len(i)
    centres = torch.empty(n, (16 - max_shift) ** 2)  # (N, D) unshifted window of each image
    for s in range(0, n, block):
        g = torch.from_numpy(np.ascontiguousarray(grey32[s:s + block])).to(torch.float32)
        centres[s:s + block] = _windows(g, max_shift)[:, c]
    # both directions as one list: image a's shifted windows against partner f's centre
    a, f, pair = np.concatenate([j, i]), np.concatenate([i, j]), np.tile(np.arange(p), 2)
    order = np.argsort(a, kind="stable")
    a, f, pair = a[order], f[order], pair[order]
    rank = np.arange(len(a)) - np.searchsorted(a, a)  # k-th partner of its image
    best = torch.full((p,), -2.0)
    bounds = np.searchsorted(a, np.arange(0, n + block, block))
    for b in tqdm(range(len(bounds) - 1), desc="duplicate check", disable=not progress,
                  mininterval=2.0):
        lo, hi = bounds[b], bounds[b + 1]
        if lo == hi:
            continue
        s = b * block
        g = torch.from_numpy(np.ascontiguousarray(grey32[s:s + block])).to(torch.float32)
        best.scatter_reduce_(0, torch.from_numpy(pair[lo:hi]), _block_best(
            _windows(g, max_shift), centres, a[lo:hi] - s, f[lo:hi], rank[lo:hi], width),
            reduce="amax")
    return best.numpy()


def _block_best(w: torch.Tensor, centres: torch.Tensor, a: np.ndarray, f: np.ndarray,
                rank: np.ndarray, width: int) -> torch.Tensor:
    """(M,) best correlation over shifts of w[a[m]] (one block's (B, S, D) windows) with
    centres[f[m]]: the M partners laid out in rows of `width` per image (R rows), one bmm."""
    row_key = a * (1 + rank.max() // width) + rank // width  # (image, chunk of its partners)
    keys, row = np.unique(row_key, return_inverse=True)
    slot = torch.from_numpy(rank % width)
    row_t = torch.from_numpy(row)
    part = torch.zeros(len(keys), width, centres.shape[1])  # (R, width, D); empty slots 0
    part[row_t, slot] = centres[torch.from_numpy(f)]
    first = np.zeros(len(keys), np.int64)
    first[row] = a  # the image of each row
    sims = torch.bmm(w[torch.from_numpy(first)], part.transpose(1, 2))  # (R, S, width)
    return sims.amax(1)[row_t, slot]


# ---------------------------------------------------------------- search and groups
def candidate_pairs(desc: np.ndarray, k: int = CANDIDATES, *, block: int = BLOCK,
                    progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Stage 1: each row's k most similar other rows by dot product (any split, any class),
    by blockwise matmul + top-k. desc: (N, D) float32 unit rows; cost N^2 D multiply-adds,
    memory (block, N) float32 per step. Returns unique pairs (i, j), i < j, int64."""
    X = torch.from_numpy(np.ascontiguousarray(desc, dtype=np.float32))
    n = len(X)
    k = min(k, n - 1)
    if k < 1:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    out_i, out_j = [], []
    for s in tqdm(range(0, n, block), desc="duplicate candidates", disable=not progress,
                  mininterval=2.0):
        e = min(s + block, n)
        sims = X[s:e] @ X.T  # (b, N)
        sims[torch.arange(e - s), torch.arange(s, e)] = -3.0  # not its own candidate
        top = sims.topk(k, dim=1).indices  # (b, k)
        out_i.append(np.repeat(np.arange(s, e), k))
        out_j.append(top.reshape(-1).numpy())
    i, j = np.concatenate(out_i), np.concatenate(out_j).astype(np.int64)
    lo, hi = np.minimum(i, j), np.maximum(i, j)
    pairs = np.unique(lo * n + hi)
    return pairs // n, pairs % n


def groups_from_pairs(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """(N,) int64 group ids from linked pairs (union-find, path halving): examples linked
    directly or through others share an id; ids are 0, 1, ... in order of each group's first
    row; -1 for an example linked to nobody."""
    parent = np.arange(n)

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in zip(np.asarray(i).tolist(), np.asarray(j).tolist()):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([find(a) for a in range(n)], dtype=np.int64)
    sizes = np.bincount(roots, minlength=n)
    linked = sizes[roots] > 1
    out = np.full(n, -1, dtype=np.int64)
    _, first = np.unique(roots[linked], return_inverse=True)
    # renumber by first row: np.unique sorts roots, and a root is its group's smallest row
    out[linked] = first
    return out


def find_duplicates(grey32: np.ndarray, splits, *, threshold: float = THRESHOLD,
                    size: int = THUMB_SIZE, candidates: int = CANDIDATES,
                    fit_split: str = FIT_SPLIT,
                    progress: bool = False) -> pd.DataFrame:
    """Duplicate groups of a run's examples, within and across splits.

    grey32: (N, H, W) uint8 grey thumbnails (`data.descriptors.run_thumbnails`), one per row
      of the examples table; splits: (N,) split names in the same order.
    Stage 1 takes each example's `candidates` nearest neighbours by the correlation of
    size x size normalised grey thumbnails; stage 2 links a candidate pair when its
    `shift_correlation` is >= threshold (higher = more alike). Groups are the connected
    components of the links (union-find), so a group may span splits.
    Returns a DataFrame in the input row order with
      duplicate_group  int64, -1 = no duplicate; examples with the same id are copies
      train_duplicate  bool for rows not in `fit_split` (True = it is linked directly to a
                       `fit_split` example: a near-copy of it was fitted on), NA for
                       `fit_split` rows.
    """
    if not 0 < threshold <= 1:
        raise ConfigError(f"duplicate threshold must be in (0, 1], got {threshold}")
    splits = np.asarray(splits).astype(str)
    if grey32.ndim != 3 or grey32.shape[1:] != (32, 32):
        raise ConfigError(f"find_duplicates needs (N, 32, 32) grey thumbnails, got {grey32.shape}")
    if len(splits) != len(grey32):
        raise ConfigError(f"{len(grey32)} thumbnails but {len(splits)} split names")
    i, j = candidate_pairs(thumb_descriptor(grey32, size), candidates, progress=progress)
    sim = pair_shift_correlation(grey32, i, j, progress=progress)
    keep = sim >= threshold
    group = groups_from_pairs(len(grey32), i[keep], j[keep])
    in_fit = splits == fit_split
    has_fit_copy = linked_to(len(grey32), i[keep], j[keep], in_fit)
    train_dup = pd.array(np.where(in_fit, pd.NA, has_fit_copy), dtype="boolean")
    return pd.DataFrame({"duplicate_group": group, "train_duplicate": train_dup})


def shared_groups(groups: np.ndarray) -> np.ndarray | None:
    """groups (N,) int64 (-1 = none) when at least two rows share a group, else None: the
    heads then run exactly as without groups (the linear probe's folds differ with them)."""
    linked = groups[groups >= 0]
    return groups if len(linked) and (np.bincount(linked) >= 2).any() else None


def linked_to(n: int, i: np.ndarray, j: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(n,) bool: rows linked by a pair (i, j) directly to a row where target is True.
    Direct links, not the group: on CIFAR-10 low-texture horizon shots chain into one group
    of 367 distinct ships and planes, whose test members are not copies of each other's
    train images."""
    out = np.zeros(n, bool)
    out[i[target[j]]] = True
    out[j[target[i]]] = True
    return out


# ---------------------------------------------------------------- metrics
def duplicate_metrics(examples: pd.DataFrame, heads, *, fit_split: str = FIT_SPLIT,
                      eval_split: str = "test") -> dict:
    """metrics.json's "duplicates" entry, from a table with duplicate_group, train_duplicate
    and correct_<head> columns:

        {"n_groups": {split: groups holding >= 2 examples of that split},
         "n_cross_split_groups": groups spanning more than one split,
         "n_groups_total": every group, "n_label_conflicts": groups whose members' given
         labels differ (None without a label column),
         "n_duplicated": {split: examples of that split in any group},
         "n_train_duplicates_in_test": eval_split examples with train_duplicate True,
         "threshold": ..., "descriptor": ...,  (added by the caller when it knows them)
         "accuracy": {head: {"all": accuracy on eval_split,
                             "without_train_duplicates": accuracy on the eval_split
                             examples whose train_duplicate is False, "n_without": ...}}}

    Accuracy with the train duplicates is optimistic: a near-copy of those test images was
    fitted on. Higher accuracy = better; the gap between the two says how much the copies
    help."""
    for c in ("duplicate_group", "train_duplicate", "split"):
        if c not in examples.columns:
            raise ConfigError(f"duplicate_metrics needs the {c!r} column")
    g = examples["duplicate_group"].to_numpy(np.int64)
    split = examples["split"].astype(str).to_numpy()
    n_groups, n_dup = {}, {}
    for s in dict.fromkeys(split):
        gs = g[(split == s) & (g >= 0)]
        n_groups[s] = int((np.bincount(gs) >= 2).sum()) if len(gs) else 0
        n_dup[s] = int(len(gs))
    linked = g >= 0
    spans = pd.Series(split[linked]).groupby(g[linked]).nunique()
    ev = examples[split == eval_split]
    flag = ev["train_duplicate"].fillna(False).to_numpy(bool)
    acc = {}
    for h in heads:
        col = f"correct_{h}"
        if col not in ev.columns:
            continue
        c = ev[col].to_numpy(bool)
        acc[h] = {"all": float(c.mean()) if len(c) else None,
                  "without_train_duplicates": float(c[~flag].mean()) if (~flag).any() else None,
                  "n_without": int((~flag).sum())}
    labels = (pd.Series(examples["label"].to_numpy()[linked]).groupby(g[linked]).nunique()
              if "label" in examples.columns else None)
    return {"n_groups": n_groups, "n_cross_split_groups": int((spans > 1).sum()),
            "n_groups_total": int(len(spans)),
            "n_label_conflicts": None if labels is None else int((labels > 1).sum()),
            "n_duplicated": n_dup, "n_train_duplicates_in_test": int(flag.sum()),
            "accuracy": acc}
