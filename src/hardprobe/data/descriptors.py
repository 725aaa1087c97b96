"""Small grey thumbnails of every example: the raw material of duplicate detection.

Duplicate detection (`scoring.duplicates`) compares images in pixel space, not through the
backbone (a network trained for classes maps different shots of one class close together and
is built to ignore the colour shifts, crops and recompressions that make a near-copy). It
needs one compact array per image, read once from the images themselves:

    grey32: (N, 32, 32) uint8, luminance (ITU-R 601: 0.299 R + 0.587 G + 0.114 B) averaged
            over equal areas (box filter) to 32 x 32, whatever the image's size.

Both dataset sources expose images the same way (`Split.decode(row)` -> uint8 (3, H, W)), so
an ImageFolder run and a CIFAR-10 pickle run (which has no image files) are read alike.
`run_thumbnails` caches the array in the run directory (RUN_DIR/duplicates/grey32.npy, with
the ids it belongs to), so the images are decoded once per run, by DataLoader workers.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.io import atomic_save_npy
from ..errors import DataError
from .datasets import SplitDataset

log = logging.getLogger(__name__)

GREY_SIZE = 32
CACHE_DIR = "duplicates"
CACHE_FILE = "grey32.npy"
CACHE_IDS = "grey32_ids.npy"
_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)


def grey_thumbnail(image: torch.Tensor, size: int = GREY_SIZE) -> np.ndarray:
    """uint8 (3, H, W) (or (1, H, W)) image -> (size, size) uint8 grey, box-filtered.

    Images smaller than `size` on a side are upsampled bilinearly first (rare: the
    thumbnail is meant to shrink)."""
    x = image.to(torch.float32)
    g = (x * _LUMA).sum(0) if x.shape[0] == 3 else x[0]  # (H, W)
    g = g[None, None]
    if min(g.shape[-2:]) < size:
        g = F.interpolate(g, size=(size, size), mode="bilinear", align_corners=False)
    g = F.adaptive_avg_pool2d(g, size)  # equal-area means: exact box filter when H, W divide
    return g[0, 0].round().clamp(0, 255).to(torch.uint8).numpy()


def split_thumbnails(split, rows, *, size: int = GREY_SIZE, desc: str = "thumbnails",
                     num_workers: int = 0, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Grey thumbnails of `rows` of a split (`Split.decode(row)` -> uint8 (3, H, W)), decoded
    by `num_workers` DataLoader workers (0: in this process).

    Returns ((n, size, size) uint8, ok (n,) bool). An image that cannot be decoded (DataError)
    gets an all-zero thumbnail and ok False: it is then nobody's duplicate."""
    rows = np.asarray(rows, dtype=np.int64)
    out = np.zeros((len(rows), size, size), dtype=np.uint8)
    ok = np.ones(len(rows), dtype=bool)
    at = {int(r): j for j, r in enumerate(rows)}
    loader = torch.utils.data.DataLoader(
        SplitDataset(split, functools.partial(grey_thumbnail, size=size), rows),
        batch_size=256, num_workers=num_workers, collate_fn=_as_list)
    with tqdm(total=len(rows), desc=desc, unit="img", disable=not progress,
              mininterval=2.0) as bar:
        for batch in loader:
            for thumb, r, err in batch:
                if err:
                    ok[at[r]] = False
                    log.warning("duplicates: %s", err)
                else:
                    out[at[r]] = thumb
            bar.update(len(batch))
    return out, ok


def _as_list(batch):  # module level so that DataLoader workers can pickle it
    return batch


def run_thumbnails(run, *, cache: bool = True, num_workers: int = 0,
                   progress: bool = True) -> np.ndarray:
    """(N, 32, 32) uint8 grey thumbnails of a run's examples, in the row order of
    `run.examples`. `run` is a `hardprobe.rundir.Run` (duck-typed: examples, dataset(), path).

    Cached in RUN_DIR/duplicates/grey32.npy next to the ids they belong to; the cache is used
    only when those ids equal the table's (same examples, same order). Images are reopened
    through `run.dataset()`, which refuses images changed since the run was made, and
    decoded by `num_workers` DataLoader workers (0: in this process)."""
    ids = run.examples["id"].astype(str).to_numpy()
    folder = Path(run.path) / CACHE_DIR
    if cache and (folder / CACHE_FILE).exists() and (folder / CACHE_IDS).exists():
        cached_ids = np.load(folder / CACHE_IDS, allow_pickle=False)
        if len(cached_ids) == len(ids) and (cached_ids == ids).all():
            return np.load(folder / CACHE_FILE)
        log.info("duplicates: cached thumbnails belong to other examples; recomputing")
    ds = run.dataset()
    out = np.zeros((len(ids), GREY_SIZE, GREY_SIZE), dtype=np.uint8)
    split_col = run.examples["split"].to_numpy()
    for name, split in ds.splits.items():
        where = np.flatnonzero(split_col == name)
        if not len(where):
            continue
        row_of = {i: r for r, i in enumerate(split.examples["id"].astype(str))}
        missing = [ids[w] for w in where if ids[w] not in row_of]
        if missing:
            raise DataError(f"{len(missing)} examples of split {name!r} (e.g. {missing[0]}) are "
                            f"not in the dataset any more; rerun `hardprobe run`")
        rows = np.array([row_of[ids[w]] for w in where], dtype=np.int64)
        out[where], _ = split_thumbnails(split, rows, desc=f"thumbnails {name}",
                                         num_workers=num_workers, progress=progress)
    if cache:
        atomic_save_npy(folder / CACHE_FILE, out)
        atomic_save_npy(folder / CACHE_IDS, ids.astype(str))
    return out
