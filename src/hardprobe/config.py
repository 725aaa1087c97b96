"""Typed run configuration: YAML in, CLI flags on top, resolved config out.

Unknown keys and wrong types are errors, never ignored: a typo in a config file must not
silently run with a default.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from .errors import ConfigError


def option(default=dataclasses.MISSING, *, help: str, choices=None, factory=None):
    """A config field with its help text and allowed values next to it.

    The CLI builds its flags from these (`--batch-size` for `batch_size`), so Python callers and
    the command line get the same defaults and the same validation (`check_config`).
    """
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def check_config(cfg) -> None:
    """Raise ConfigError when a field of the config dataclass `cfg` has the wrong type or a
    value outside its declared choices (a list field: every element)."""
    hints = typing.get_type_hints(type(cfg))
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        _check_type(f.name, value, hints[f.name])
        choices = f.metadata.get("choices")
        if choices is None or value is None:
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v not in choices:
                raise ConfigError(f"{f.name} must be one of {', '.join(map(str, choices))}, "
                                  f"not {v!r}")


@dataclass
class RunConfig:
    # backbone
    model: str = "cifar_resnet56"
    weights: str | None = None  # weights file for offline use
    weights_tag: str | None = None  # e.g. IMAGENET1K_V1 for resnet50
    random_init: bool = False  # tests and speed runs only
    trust_weights: bool = False  # allow unpickling a weights file (only for files you trust)
    image_size: int | None = None
    # data
    data: str = "cifar10"  # cifar10 | imagefolder
    data_root: str = "data"  # cifar10: folder holding cifar-10-batches-py
    train: str | None = None  # imagefolder train folder
    test: str | None = None  # imagefolder test folder
    download: bool = True
    strict: bool = False  # stop at an undecodable image instead of skipping it
    # features
    device: str = "auto"
    precision: str = "fp32"  # fp32 | bf16 | auto
    batch_size: int = 128
    num_workers: int | None = None
    cache_dir: str | None = None
    shard_size: int = 4096  # examples per cache shard: the unit of resume after an interruption
    feature_dtype: str = "float32"  # float16 halves disk and RAM of the embeddings
    use_model_head: bool | None = None  # None = when the model's classes match the dataset's
    # heads
    heads: list[str] = dataclasses.field(default_factory=lambda: ["knn", "linear", "model"])
    k: int = 20
    temperature: float = 0.07
    knn_weights: str = "exp"  # exp | uniform
    knn_backend: str = "torch"  # torch (exact, in RAM) | faiss (index from memory-mapped features)
    knn_index: str = "flat"  # faiss only: flat (exact) | ivf | ivf_fp16 (approximate)
    knn_nlist: int | None = None  # IVF lists; None: 4 * sqrt(N_train), at most N / 39 and 65536
    knn_nprobe: int = 16  # IVF lists scanned per query; >= nlist is exact
    linear_c: float = 1.0
    folds: int = 5
    issue_head: str = "linear"  # head whose out-of-sample probabilities feed label_issue
    seed: int = 0
    label_noise: float = 0.0  # share of train labels flipped (seed) to measure issue finding
    # explain / similarity / report (parts of `hardprobe run`; 0 / false skips a stage)
    top: int = 24  # hardest examples explained, given neighbours and shown in the report
    cam_method: str = "gradcam"
    cam_layer: str | None = None  # default: the backbone's (see `hardprobe layers MODEL`)
    neighbors: int = 8  # train neighbours per hard example
    map_method: str = "tsne"  # tsne | pca
    similarity: bool = True
    report: bool = True
    # output
    out: str = "runs/latest"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_type(name: str, value, hint) -> None:
    origin = typing.get_origin(hint)
    allowed = typing.get_args(hint) if origin in (typing.Union, types.UnionType) else (hint,)
    for t in allowed:
        if t is type(None) and value is None:
            return
        base = typing.get_origin(t) or t
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return
        if base is int and isinstance(value, bool):
            continue
        if isinstance(value, base):
            return
    raise ConfigError(f"config key {name!r} must be {hint}, got {value!r} ({type(value).__name__})")


def build_config(file: str | None = None, **overrides) -> RunConfig:
    """Defaults <- YAML file <- overrides (CLI flags that were given; None means 'not given')."""
    known = {f.name for f in fields(RunConfig)}
    values: dict = {}
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise ConfigError(f"config file {file} not found")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {file} must hold a mapping of keys to values")
        values.update({k.replace("-", "_"): v for k, v in loaded.items()})
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(unknown)}. Known keys: "
                          f"{', '.join(sorted(known))}")
    for name, value in values.items():
        _check_type(name, value, typing.get_type_hints(RunConfig)[name])
    cfg = RunConfig(**values)
    _check_consistency(cfg)
    return cfg


def _check_consistency(cfg: RunConfig) -> None:
    if cfg.weights and cfg.random_init:
        raise ConfigError("weights and random_init contradict each other; pass one of them")
    if cfg.data == "imagefolder" and not cfg.train:
        raise ConfigError("data: imagefolder needs train: DIR (and usually test: DIR)")
    if cfg.data not in ("cifar10", "imagefolder"):
        raise ConfigError(f"data must be cifar10 or imagefolder, not {cfg.data!r}")
    bad_heads = sorted(set(cfg.heads) - {"knn", "linear", "model"})
    if bad_heads:
        raise ConfigError(f"unknown head(s) {bad_heads}; choose from knn, linear, model")
    if cfg.feature_dtype not in ("float32", "float16"):
        raise ConfigError(f"feature_dtype must be float32 or float16, not {cfg.feature_dtype!r}")
    if cfg.map_method not in ("tsne", "pca"):
        raise ConfigError(f"map_method must be tsne or pca, not {cfg.map_method!r}")
    if cfg.knn_backend not in ("torch", "faiss"):
        raise ConfigError(f"knn_backend must be torch or faiss, not {cfg.knn_backend!r}")
    if cfg.knn_index not in ("flat", "ivf", "ivf_fp16"):
        raise ConfigError(f"knn_index must be flat, ivf or ivf_fp16, not {cfg.knn_index!r}")
    if cfg.knn_index != "flat" and cfg.knn_backend != "faiss":
        raise ConfigError(f"knn_index {cfg.knn_index} is a FAISS index: add knn_backend: faiss")
    if cfg.knn_nprobe < 1 or (cfg.knn_nlist is not None and cfg.knn_nlist < 1):
        raise ConfigError("knn_nprobe and knn_nlist must be positive integers")
    if not 0.0 <= cfg.label_noise < 1.0:
        raise ConfigError(f"label_noise is a share of the train labels in [0, 1), not "
                          f"{cfg.label_noise}")
    if cfg.top < 0:
        raise ConfigError("top must be >= 0 (0 skips explain)")
    if cfg.issue_head not in ("knn", "linear", "model"):
        raise ConfigError(f"issue_head must be knn, linear or model, not {cfg.issue_head!r}")
    if cfg.knn_weights not in ("exp", "uniform"):
        raise ConfigError(f"knn_weights must be exp or uniform, not {cfg.knn_weights!r}")
    for name in ("k", "batch_size", "folds", "shard_size"):
        if getattr(cfg, name) < 1 or (name == "folds" and cfg.folds < 2):
            raise ConfigError(f"{name} must be a positive integer (folds >= 2)")


def save_config(cfg: RunConfig, path: str | Path) -> None:
    from .core.io import atomic_write_text
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def load_config(path: str | Path) -> RunConfig:
    return build_config(str(path))
