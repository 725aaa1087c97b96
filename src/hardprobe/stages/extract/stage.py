"""The extract stage: features and logits of every split (cached), linked into the run
directory with the examples skeleton, skipped.csv and provenance.json."""
from __future__ import annotations

import dataclasses
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from ... import __version__
from ...backbones import Backbone, create_backbone
from ...config import RunConfig, save_config
from ...core import distributed
from ...core.device import resolve_device
from ...core.io import atomic_write_text, write_json
from ...data.datasets import EXAMPLE_COLUMNS, ImageSet, load_dataset, plant_label_noise
from ...data.label_files import apply_labels, read_labels
from ...errors import ConfigError, DataError
from ...rundir.layout import FIT_SPLIT
from ...rundir.run import feature_path, link_or_copy, save_array, write_examples
from .features import extract_split
from .trained_on import features_trained_on_train


def extract(cfg: RunConfig, *, progress: bool = True) -> Path:
    """Features and logits of every split, cached, linked into cfg.out."""
    t0 = time.perf_counter()
    ctx, device = distributed.init(cfg.device)  # under torchrun: this rank and its device
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if ctx.main:
        save_config(cfg, out / "config.yaml")
    # The model first: an unknown name or missing weights fail before a long folder scan.
    # Rank 0 downloads weights and data before the other ranks look for them.
    with distributed.main_first(ctx):
        backbone = create_backbone(cfg.model, weights=cfg.weights, weights_tag=cfg.weights_tag,
                                   random_init=cfg.random_init, image_size=cfg.image_size,
                                   trust_weights=cfg.trust_weights)
        dataset = load_dataset(cfg.data, data_root=cfg.data_root, train=cfg.train,
                               test=cfg.test, download=cfg.download)
    if FIT_SPLIT in dataset.splits:  # fail before the long extraction, not after it
        check_fit_classes(dataset.splits[FIT_SPLIT].examples["label"], dataset.class_names)
    new_labels = _label_file(cfg, dataset)  # read before the long extraction, not after
    use_head = model_head_applies(backbone, dataset.class_names, cfg.use_model_head)
    entries, frames, skipped = {}, [], []
    for name, split in dataset.splits.items():
        arrays, entry = extract_split(backbone, split, cache_dir=cfg.cache_dir, device=device,
                                      precision=cfg.precision, with_logits=use_head,
                                      batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                                      shard_size=cfg.shard_size, dtype=cfg.feature_dtype,
                                      progress=progress, ctx=ctx, engine=cfg.engine,
                                      calibration=dataset.splits.get(FIT_SPLIT),
                                      int8_max_drop=cfg.int8_max_drop,
                                      resize_on=cfg.resize_on, compile=cfg.compile)
        if not ctx.main:  # rank 0 alone writes the run directory
            continue
        ok = arrays["ok"]
        bad = split.examples[~ok].assign(error=arrays["error"][~ok])
        if len(bad) and cfg.strict:
            raise DataError(f"{len(bad)} image(s) of split {name!r} could not be decoded, e.g. "
                            f"{bad['error'].iloc[0]}. Fix or remove them, or drop --strict to "
                            f"skip them (they are listed in skipped.csv)")
        skipped.append(bad)
        frames.append(split.examples[ok])
        _write_split_features(out, name, entry, arrays, ok)
        entries[name] = {"cache_entry": str(entry.dir), "key": entry.key, "skipped": int(len(bad))}
        if "int8_check" in entry.manifest()["meta"]:  # int8's measured agreement with fp32
            entries[name]["int8_check"] = entry.manifest()["meta"]["int8_check"]
    distributed.shutdown()  # the later stages run on rank 0 alone
    if not ctx.main:
        return out
    examples = pd.concat(frames, ignore_index=True)[EXAMPLE_COLUMNS]
    examples = plant_label_noise(examples, cfg.label_noise, dataset.class_names, seed=cfg.seed)
    if new_labels is not None:
        examples = apply_labels(examples, new_labels, dataset.class_names)
    if not _same_examples(out, examples):  # a rerun on the same images keeps the scores
        write_examples(out, examples)
    skipped = pd.concat(skipped, ignore_index=True)[EXAMPLE_COLUMNS + ["error"]]
    atomic_write_text(out / "skipped.csv", skipped.to_csv(index=False))
    if len(skipped):
        warnings.warn(f"{len(skipped)} undecodable image(s) skipped; see {out / 'skipped.csv'}")
    write_json(out / "provenance.json", _provenance(cfg, backbone, dataset, entries, use_head,
                                                    time.perf_counter() - t0))
    return out


def _label_file(cfg: RunConfig, dataset: ImageSet) -> pd.Series | None:
    """--labels: id -> class index for every image of cfg.labels_split (dataset order, so a
    .npy lines up even when some images are later skipped as undecodable); None without it."""
    if not cfg.labels:
        return None
    if cfg.labels_split not in dataset.splits:
        raise ConfigError(f"labels_split {cfg.labels_split!r} is not a split of this dataset "
                          f"({', '.join(dataset.splits)})")
    split = dataset.splits[cfg.labels_split].examples
    labels = read_labels(cfg.labels, split, len(dataset.class_names),
                         class_names=dataset.class_names)
    return pd.Series(labels, index=split["id"].to_numpy())


def _write_split_features(out: Path, split: str, entry, arrays: dict, ok: np.ndarray) -> None:
    """Hard-link the cached arrays into the run, or write the decodable rows when some failed."""
    for name in ("embedding", "logits"):
        dst = feature_path(out, split, name)
        if name not in arrays:
            dst.unlink(missing_ok=True)
        elif ok.all():
            link_or_copy(entry.dir / f"{name}.npy", dst)
        else:
            save_array(out, split, name, np.ascontiguousarray(arrays[name][ok]))


def _same_examples(out: Path, examples: pd.DataFrame) -> bool:
    path = out / "examples.parquet"
    if not path.exists():
        return False
    import pyarrow.parquet as pq
    cols = list(examples.columns)
    if not set(cols) <= set(pq.read_schema(path).names):
        return False
    old = pd.read_parquet(path, columns=cols)  # not the later stages' columns
    return old.equals(examples.reset_index(drop=True))


def model_head_applies(backbone: Backbone, class_names: list[str], force: bool | None) -> bool:
    """Use the model's own classifier only when its label space is the dataset's, in order."""
    if force is False or backbone.class_names is None:
        return False
    same = [_norm(c) for c in backbone.class_names] == [_norm(c) for c in class_names]
    if force and not same:
        if backbone.num_classes != len(class_names):
            raise ConfigError(f"use_model_head: the model has {backbone.num_classes} classes, the "
                             f"dataset {len(class_names)}; its classifier cannot label this data")
        return True
    return same


def _norm(name: str) -> str:
    return name.lower().replace("_", " ").strip()


def _provenance(cfg, backbone: Backbone, dataset: ImageSet, entries, use_head, seconds) -> dict:
    import torch
    info = backbone.weights_info
    return {
        "hardprobe": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
        "platform": platform.platform(), "device": str(resolve_device(cfg.device)),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "extract_seconds": round(seconds, 2),
        "backbone": backbone.describe(), "cam_layer": backbone.cam_layer,
        "dataset": dataset.describe(), "model_head": use_head, "features": entries,
        "weights_info": None if info is None else dataclasses.asdict(info),
        "features_trained_on_train": features_trained_on_train(
            None if info is None else info.trained_on, dataset.describe(),
            getattr(cfg, "features_trained_on_train", None)),
        "engine": {s: e["key"].get("engine", "torch") for s, e in entries.items()},
        "precision": {s: e["key"]["precision"] for s, e in entries.items()},
    }


def check_fit_classes(labels: pd.Series, class_names: list[str]) -> None:
    """The heads are classifiers: the train split needs examples of at least two classes."""
    present = sorted(set(int(v) for v in labels))
    if len(present) < 2:
        which = f"only class {class_names[present[0]]!r}" if present else "no examples"
        raise ConfigError(f"the {FIT_SPLIT} split has {which}: the heads need examples of at "
                         f"least 2 classes. Point --train at a folder with one sub-folder per "
                         f"class (<root>/<class>/<image>)")
