"""Batched feature extraction with a resumable on-disk cache.

extract_split(backbone, split, ...) -> {"embedding": (N, D) float32, "logits": (N, C) float32?}
in the split's row order. Work is cut into shards of `shard_size` examples; each finished
shard is written atomically, so a rerun after an interruption starts at the first missing
shard, and a rerun with the same inputs reads the finished arrays without touching the model.
"""
from __future__ import annotations

import contextlib
import json
import logging

import numpy as np
import torch
from tqdm.auto import tqdm

from ...backbones import Backbone
from ...core import distributed
from ...core.cache import CacheEntry, default_cache_dir
from ...core.device import default_num_workers, resolve_device, resolve_precision
from ...core.io import atomic_write_text
from ...data.datasets import Split, SplitDataset, collate_ragged, collate_skipping
from ...errors import ConfigError, NonFiniteFeaturesError
from .engines import (
    INT8_MAX_DROP,
    engine_tag,
    int8_overflow_fix,
    make_engine,
    nncf_version,
    resolve_engine,
)

log = logging.getLogger(__name__)

# Bump when a change to this module changes what it writes for the same inputs.
FEATURES_VERSION = 3
RESIZE_ON = ("workers", "device", "auto")
INT8_CALIBRATION = 300  # train images that set int8's ranges
INT8_CHECK = 1024  # held-out train images on which int8 must agree with fp32 (engines._quantize)
INT8_SPLIT_CHECK = 1024  # images of another split that also run in fp32: int8's agreement there


def resolve_resize_on(resize_on: str, device: torch.device) -> str:
    """-> "workers" (DataLoader workers decode, resize and crop; the device normalises) or
    "device" (workers only decode; the device resizes, crops and normalises). auto: device on
    cuda, where the GPU resizes faster than a few CPU workers, else workers."""
    if resize_on not in RESIZE_ON:
        raise ConfigError(f"resize_on must be one of {', '.join(RESIZE_ON)}, not {resize_on!r}")
    if resize_on == "auto":
        return "device" if device.type == "cuda" else "workers"
    return resize_on


def feature_key(backbone: Backbone, split: Split, *, precision: str, with_logits: bool,
                dtype: str = "float32", engine: str = "torch", int8: dict | None = None) -> dict:
    """Everything that determines the arrays: the cache key."""
    key = {
        "version": FEATURES_VERSION,
        "backbone": backbone.describe(),
        "split": split.name,
        "n": len(split),
        "manifest": split.manifest_digest,
        "precision": precision,
        "with_logits": with_logits,
    }
    if dtype != "float32":  # stored embedding dtype; float32 keys stay as they were
        key["dtype"] = dtype
    if engine != "torch":  # engine_tag, e.g. openvino-2026.0.0; torch keys stay as they were
        key["engine"] = engine
    if int8 is not None:  # int8_recipe: its calibration images and settings
        key["int8"] = int8
    # Not in the key: resize_on, because the device runs the same torchvision resize on the
    # same uint8 images and gives the workers' pixels bit for bit on the CPU (measured and
    # tested: torchvision resizes each image of a batch on its own); on a GPU its float
    # kernels may round a pixel to the next uint8 level, noise of the same kind as the GPU
    # forward's, and the device is not in the key either. Nor compile (engines.TorchEngine):
    # torch.compile's outputs equal eager's within float tolerance (tested).
    return key


def extract_split(backbone: Backbone, split: Split, *, cache_dir=None, device=None,
                  precision: str = "fp32", with_logits: bool = True, batch_size: int = 128,
                  num_workers: int | None = None, shard_size: int = 4096,
                  dtype: str = "float32", progress: bool = True,
                  ctx: distributed.Context = distributed.SINGLE, engine: str = "torch",
                  calibration: Split | None = None, resize_on: str = "auto",
                  compile: bool = False, int8_max_drop: float = INT8_MAX_DROP
                  ) -> tuple[dict[str, np.ndarray] | None, CacheEntry]:
    """Features of every example of `split`, from the cache when present.

    dtype: "float32", or "float16" to halve the disk and memory of the embeddings (the
    kNN neighbours change by about 0.05%, see docs/benchmarks.md); logits stay float32.
    engine: torch | openvino | auto (see engines.py); precision int8 quantises on
    INT8_CALIBRATION images of `calibration` (the train split) and keeps layers in float until
    its top-1 agreement with fp32 on INT8_CHECK held-out ones is within int8_max_drop.
    resize_on: workers | device | auto, where images are resized (see resolve_resize_on).
    compile: torch.compile the torch engine's forward (eager, with a warning, when it cannot).
    ctx: the torchrun ranks (see distributed.py). Each rank computes its share of the
    missing shards into the same cache entry; rank 0 joins them and returns the arrays,
    the other ranks return (None, entry).
    Returns ({"embedding": (N, D) float32 (or dtype), "logits": (N, C) float32 if with_logits,
              "ok": (N,) bool, "error": (N,) str}, entry); rows whose image could not be
    decoded have ok=False, NaN features and the reason in "error".
    """
    dev = resolve_device(device)
    precision = resolve_precision(precision, dev)
    with_logits = with_logits and backbone.num_classes is not None
    if dtype not in ("float32", "float16"):
        raise ConfigError(f"feature dtype must be float32 or float16, not {dtype!r}")
    eng_name, _ = resolve_engine(engine, dev, precision)
    int8 = int8_recipe(calibration, int8_max_drop) if precision == "int8" else None
    entry = CacheEntry(cache_dir or default_cache_dir(), feature_key(
        backbone, split, precision=precision, with_logits=with_logits, dtype=dtype,
        engine=engine_tag(eng_name), int8=int8))
    work = dict(dev=dev, precision=precision, with_logits=with_logits, batch_size=batch_size,
                engine=eng_name, calibration=calibration, compile=compile, int8=int8,
                resize_on=resolve_resize_on(resize_on, dev),
                num_workers=default_num_workers(ctx) if num_workers is None
                else num_workers, progress=progress, dtype=dtype)
    if ctx.broadcast(entry.digest) != entry.digest:
        raise ConfigError(f"rank {ctx.rank} sees other inputs for split {split.name!r} than "
                           "rank 0 (a different image list, weights or settings): every rank "
                           "must read the same files; check the paths are shared")
    # Rank 0 holds the entry's lock for the whole job, so another run waits for it; it alone
    # plans (which shards are missing) and joins, so no two ranks ever delete or join.
    with entry.lock() if ctx.main else contextlib.nullcontext():
        plan = None if entry.complete or not ctx.main else _plan(entry, len(split), shard_size)
        plan = ctx.broadcast(plan)
        if plan is not None:
            size, n_shards, todo = plan
            int8_check = _compute(backbone, split, entry, size, ctx.my_part(todo), ctx=ctx,
                                  **work)
            ctx.barrier()  # every rank's shards are written
            if ctx.main:
                entry.finalize(n_shards, meta={"n": len(split), "shard_size": size,
                                               "computed_shards": todo,
                                               "world_size": ctx.world_size,
                                               **({"int8_check": int8_check}
                                                  if int8_check else {})})
        ctx.barrier()  # the entry is complete before any rank returns
        if not ctx.main:
            return None, entry
        arrays = entry.load()
    check_finite(arrays, split)
    return arrays, entry


def _plan(entry: CacheEntry, n: int, shard_size: int) -> tuple[int, int, list[int]]:
    """(shard size, number of shards, the shards still missing) of an incomplete entry."""
    shard_size = _layout(entry, shard_size)  # a resumed entry keeps its first shard size
    n_shards = max(1, -(-n // shard_size))
    entry.drop_bad_shards(n_shards)
    return shard_size, n_shards, [i for i in range(n_shards) if not entry.has_shard(i)]


def _compute(backbone, split, entry, shard_size, shards, *, dev, precision, with_logits,
             batch_size, num_workers, progress, dtype, engine="torch", calibration=None,
             int8=None, resize_on="workers", compile=False,
             ctx=distributed.SINGLE) -> dict | None:
    """Forward the rows of `shards` and write each as it finishes. -> int8's measured
    agreement with fp32 (OpenVINOEngine.int8_check), None for other precisions."""
    n = len(split)
    ranges = [np.arange(i * shard_size, min(n, (i + 1) * shard_size)) for i in shards]
    # channels_last: the layout oneDNN and cuDNN convolutions run fastest in (1.6x measured
    # for ResNet-50 on this 2-core AVX-512 CPU); harmless for a ViT's patch embedding.
    backbone.to(dev)
    backbone.model.to(memory_format=torch.channels_last)
    if ctx.active:  # one bar (rank 0's share); interleaved bars from every rank are unreadable
        total, done, desc = sum(map(len, ranges)), 0, f"{backbone.name} {split.name} " \
                                                       f"({ctx.describe()})"
    else:
        total, done, desc = n, n - sum(map(len, ranges)), f"{backbone.name} {split.name}"
    calib, check = (calibration_batches(backbone, calibration, batch_size),
                    calibration_batches(backbone, calibration, batch_size, n=INT8_CHECK,
                                        start=INT8_CALIBRATION)) \
        if precision == "int8" else (None, None)
    runner = make_engine(backbone, dev, engine=engine, precision=precision, calibration=calib,
                         cache_dir=entry.dir.parents[1] / "openvino"
                         if engine == "openvino" else None, compile=compile, validation=check,
                         max_drop=(int8 or {}).get("max_drop", INT8_MAX_DROP),
                         overflow_fix=(int8 or {}).get("overflow_fix"),
                         split_check=INT8_SPLIT_CHECK if precision == "int8"
                         and calibration is not None
                         and calibration.manifest_digest != split.manifest_digest else 0)
    log.info("extract: resize and crop on the %s", resize_on)
    bar = tqdm(total=total, initial=done, unit="img", disable=not progress or not ctx.main,
               desc=desc)
    for i, idx in zip(shards, ranges):
        arrays = _forward_indices(backbone, split, idx, dev, runner, batch_size,
                                  num_workers, with_logits, bar, resize_on)
        arrays["embedding"] = arrays["embedding"].astype(dtype, copy=False)
        entry.write_shard(i, index=idx, **arrays)
    bar.close()
    check = getattr(runner, "int8_check", None)
    if check and "split" in check:
        metric, value = next(iter(check["split"].items()))
        log.info("int8: %s with fp32 %.2f%% on the first %d images of %s (what its features "
                 "lose; the held-out train images' figure flatters a model trained on them)",
                 metric.replace("_", " "), 100 * value, check["split"]["images"], split.name)
    return check


def _layout(entry: CacheEntry, shard_size: int) -> int:
    path = entry.dir / "layout.json"
    if path.exists():
        return int(json.loads(path.read_text())["shard_size"])
    atomic_write_text(path, json.dumps({"shard_size": shard_size}))
    return shard_size


def int8_recipe(calibration: Split | None, max_drop: float) -> dict:
    """What int8 features depend on beyond the backbone: the calibration split's images, how
    many calibrate and check, the agreement allowed, NNCF's overflow fix (it follows the CPU:
    int8_overflow_fix) and the NNCF version (the cache key)."""
    if not 0.0 <= max_drop < 1.0:
        raise ConfigError(f"int8_max_drop must be in [0, 1), not {max_drop!r} (a share of "
                          f"top-1 agreement: 0.001 is 0.1 point)")
    if calibration is None:
        raise ConfigError("--precision int8 needs calibration images from the train split; "
                          "this dataset has none")
    return {"calibration": calibration.manifest_digest, "n": INT8_CALIBRATION,
            "check": INT8_CHECK, "max_drop": float(max_drop),
            "overflow_fix": int8_overflow_fix(), "nncf": nncf_version()}


def calibration_batches(backbone, split: Split | None, batch_size: int,
                        n: int = INT8_CALIBRATION, seed: int = 0,
                        start: int = 0) -> list[torch.Tensor] | None:
    """int8: n train images drawn at random (seed), normalised, in batches; start skips the
    first ones drawn (the check images follow the calibration ones, so they are held out)."""
    if split is None:
        return None
    idx = np.sort(np.random.default_rng(seed).permutation(len(split))[start:start + n])
    if len(idx) == 0:
        return []
    loader = torch.utils.data.DataLoader(SplitDataset(split, backbone.preprocess.geometric, idx),
                                         batch_size=min(batch_size, 64),
                                         collate_fn=collate_skipping)
    return [backbone.preprocess.normalize(x) for x, _, _ in loader if x is not None]


def _forward_indices(backbone, split, idx, dev, runner, batch_size, num_workers, with_logits,
                     bar, resize_on="workers") -> dict[str, np.ndarray]:
    """Features of rows idx (a contiguous range). Undecodable images get NaN rows, ok=False and
    their error message, so one bad file never stops or loses a run."""
    # workers: they decode and resize/crop to uint8; the main process normalises whole batches
    # on the device (a quarter of the bytes of float32 to move, one fused op per batch).
    # device: they only decode; the uint8 source images go up pinned and the device resizes,
    # crops and normalises (a list per batch when the sources differ in size).
    on_device = resize_on == "device"
    loader = torch.utils.data.DataLoader(
        SplitDataset(split, None if on_device else backbone.preprocess.geometric, idx),
        batch_size=batch_size, num_workers=num_workers, pin_memory=dev.type == "cuda",
        collate_fn=collate_ragged if on_device else collate_skipping)
    n, start = len(idx), int(idx[0])
    out = {"embedding": np.full((n, backbone.embed_dim), np.nan, np.float32),
           "ok": np.ones(n, bool), "error": np.full(n, "", dtype=object)}
    if with_logits:
        out["logits"] = np.full((n, backbone.num_classes), np.nan, np.float32)
    with torch.inference_mode():
        for x, rows, failed in loader:  # x: uint8 (B, 3, H, W) or [(3, H, W)], rows: (B,)
            for i, err in failed:
                out["ok"][i - start], out["error"][i - start] = False, err
            if x is not None:
                x = upload(x, dev)
                if on_device:
                    x = backbone.preprocess.geometric_batch(x)
                x = backbone.preprocess.normalize(x)
                e, lg = runner(x)  # float32 numpy (B, D), (B, C) or None
                pos = rows.numpy() - start
                out["embedding"][pos] = e
                if with_logits:
                    out["logits"][pos] = lg
            bar.update(len(rows) + len(failed))
    out["error"] = out["error"].astype(str)  # fixed-width unicode: saved without pickle
    return out


def upload(x: torch.Tensor | list[torch.Tensor], dev: torch.device):
    """A batch (a tensor, or collate_ragged's list of tensors) to `dev`; non_blocking, so a
    pinned batch's copy overlaps the work queued before it."""
    if isinstance(x, torch.Tensor):
        return x.to(dev, non_blocking=True)
    return [t.to(dev, non_blocking=True) for t in x]


def check_finite(arrays: dict[str, np.ndarray], split: Split) -> None:
    """NaN/Inf features of an image that did decode mean a broken model or precision: stop."""
    ok = arrays.get("ok", np.ones(len(split), bool))
    for name in ("embedding", "logits"):
        if name not in arrays:
            continue
        bad = np.flatnonzero(ok & ~np.isfinite(arrays[name]).all(axis=1))
        if len(bad):
            ids = split.examples["id"].iloc[bad[:5]].tolist()
            raise NonFiniteFeaturesError(
                f"{len(bad)} example(s) of split {split.name!r} have NaN/Inf in their {name} "
                f"(first: {ids}). Check those images and the weights; with --precision bf16 "
                f"try fp32.")
