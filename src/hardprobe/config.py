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
    model: str = option(
        "cifar_resnet56",
        help="backbone name (see `hardprobe models`), e.g. cifar_resnet56, resnet50, timm:<name>")
    weights: str | None = option(
        None, help="weights file to load (offline use); default: the published weights")
    weights_tag: str | None = option(
        None, help="named published weights, e.g. IMAGENET1K_V1 for resnet50")
    random_init: bool = option(
        False, help="random weights, for tests and speed runs only (never a silent fallback)")
    trust_weights: bool = option(
        False,
        help="allow unpickling a weights file that is not a plain state_dict; only for files you"
             " trust")
    image_size: int | None = option(
        None, help="override the network input size of the weights' preprocessing")
    # data
    data: str = option(
        "cifar10", choices=("cifar10", "imagefolder"),
        help="cifar10 (torchvision format under --data-root) or imagefolder (--train/--test)")
    data_root: str = option("data", help="folder holding cifar-10-batches-py (cifar10)")
    train: str | None = option(None, help="train folder of <class>/<image> files (imagefolder)")
    test: str | None = option(None, help="test folder of <class>/<image> files (imagefolder)")
    download: bool = option(True, help="download CIFAR-10 when missing")
    strict: bool = option(
        False,
        help="stop at an undecodable image instead of skipping it (skipped ones: skipped.csv)")
    # features
    device: str = option("auto", help="auto (cuda, mps, cpu), or a torch device such as cuda:1")
    precision: str = option(
        "fp32", choices=("fp32", "bf16", "fp16", "int8", "auto"),
        help="fp32, bf16, fp16 (CUDA only, never chosen by auto), int8 (OpenVINO+NNCF "
             "post-training quantisation on 300 train images, with the layers that most "
             "change the top-1 left in float until it agrees with fp32 on 1,024 held-out "
             "ones; CPU; the agreement goes to provenance.json; never chosen by auto), "
             "or auto (bf16 where the device supports it)")
    int8_max_drop: float = option(
        0.001, help="--precision int8: the most top-1 agreement with fp32 it may lose on the "
                    "held-out train images (0: none; lower keeps more layers in float, slower)")
    engine: str = option(
        "torch", choices=("torch", "openvino", "auto"),
        help="inference engine of extract: torch, openvino (CPU), or auto (openvino on a CPU "
             "when it is installed, else torch)")
    resize_on: str = option(
        "auto", choices=("workers", "device", "auto"),
        help="where extract resizes and crops: workers (DataLoader workers, uint8 at the model "
             "size), device (workers only decode; the uint8 source images are uploaded and "
             "resized on the device), or auto (device on cuda, else workers); same features")
    compile: bool = option(
        False, help="torch.compile the torch engine's forward (eager, with a warning, when it "
                    "cannot compile); same features within float tolerance")
    batch_size: int = option(128, help="images per forward pass")
    num_workers: int | None = option(
        None, help="DataLoader workers (default: cores - 1, at most 8)")
    cache_dir: str | None = option(
        None, help="feature cache (default: $HARDPROBE_CACHE or ~/.cache/hardprobe)")
    shard_size: int = option(
        4096, help="examples per cache shard, the unit of resume after an interruption")
    feature_dtype: str = option(
        "float32", choices=("float32", "float16"),
        help="float32, or float16 to halve disk and memory of the embeddings")
    use_model_head: bool | None = option(
        None,
        help="use the model's own classifier as a head (default: when its classes are the "
             "dataset's)")
    features_trained_on_train: bool | None = option(
        None,
        help="the train split is data the weights were trained on, so train figures are upper "
             "bounds (default: decided from the registry, CIFAR-10 train only)")
    # heads
    heads: list[str] = option(
        factory=lambda: ["knn", "linear", "model"], choices=("knn", "linear", "model"),
        help="heads to fit: knn linear model")
    k: int = option(20, help="neighbours of the kNN head")
    temperature: float = option(0.07, help="temperature T of the kNN votes exp(sim / T)")
    knn_weights: str = option(
        "exp", choices=("exp", "uniform"), help="kNN votes: exp (DINO) or uniform")
    knn_backend: str = option(
        "torch", choices=("torch", "faiss"),
        help="kNN search: torch (exact, in RAM) or faiss (index built from memory-mapped "
             "features, for train sets beyond memory; needs faiss-cpu or faiss-gpu)")
    knn_index: str = option(
        "flat", choices=("flat", "ivf", "ivf_fp16"),
        help="FAISS index: flat (exact), ivf or ivf_fp16 (approximate; recall measured in "
             "docs/benchmarks.md)")
    knn_nlist: int | None = option(None, help="IVF lists (default 4 * sqrt(N_train))")
    knn_nprobe: int = option(
        16, help="IVF lists scanned per query (more = higher recall, slower; >= nlist is exact)")
    linear_c: float = option(1.0, help="inverse L2 strength of the linear probe (scikit-learn's C)")
    folds: int = option(5, help="folds of the out-of-fold linear-probe probabilities on train")
    issue_head: str = option(
        "linear", choices=("knn", "linear", "model"),
        help="head whose out-of-sample probabilities find label issues")
    seed: int = option(0, help="random seed")
    label_noise: float = option(
        0.0,
        help="flip this share of the train labels (with --seed) to measure how well label issues"
             " are found; the originals are kept in clean_label")
    labels: str | None = option(
        None,
        help="replace the given labels of --labels-split with this file's (e.g. CIFAR-10N's "
             "human noisy labels): .npy in dataset order, or .csv/.parquet with an id or path "
             "column and a label column (names or indices); the originals are kept in "
             "clean_label and label issues are scored against them")
    labels_split: str = option("train", help="split whose labels --labels replaces")
    duplicates: bool = option(
        True,
        help="find near-duplicate images (pixel space) and leave an example's copies out of its"
             " kNN vote and linear-probe fold; test accuracy is also given without test images"
             " that have a copy in train")
    # explain / similarity / report (parts of `hardprobe run`; 0 / false skips a stage)
    top: int = option(
        24,
        help="hardest examples explained (Grad-CAM), given neighbours and shown in the report; 0"
             " skips explain")
    cam_method: str = option(
        "gradcam", choices=("gradcam", "gradcam++", "xgradcam", "layercam", "hirescam",
                            "eigencam", "scorecam"),
        help="Grad-CAM method: gradcam, gradcam++, xgradcam, layercam, hirescam, eigencam, "
             "scorecam")
    cam_layer: str | None = option(
        None, help="Grad-CAM target layer (default: the backbone's; see `hardprobe layers MODEL`)")
    neighbors: int = option(8, help="train neighbours shown per hard example")
    map_method: str = option(
        "tsne", choices=("tsne", "pca"), help="2-D map of the test embeddings: tsne or pca")
    similarity: bool = option(True, help="compute neighbours, centroids and the 2-D map")
    diagnose: bool = option(
        True, help="a cause for every example and the slices where the model fails (the "
                   "diagnose stage with its defaults; `hardprobe diagnose` for its options)")
    report: bool = option(True, help="write RUN_DIR/report.html")
    explorer: bool = option(True, help="write RUN_DIR/explorer.html (every test example, offline)")
    # output
    out: str = option("runs/latest", help="run directory to write")

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
    """What one field's type and choices cannot say: how the fields fit together."""
    check_config(cfg)
    if cfg.weights and cfg.random_init:
        raise ConfigError("weights and random_init contradict each other; pass one of them")
    if cfg.data == "imagefolder" and not cfg.train:
        raise ConfigError("data: imagefolder needs train: DIR (and usually test: DIR)")
    if cfg.knn_index != "flat" and cfg.knn_backend != "faiss":
        raise ConfigError(f"knn_index {cfg.knn_index} is a FAISS index: add knn_backend: faiss")
    if cfg.knn_nprobe < 1 or (cfg.knn_nlist is not None and cfg.knn_nlist < 1):
        raise ConfigError("knn_nprobe and knn_nlist must be positive integers")
    if not 0.0 <= cfg.label_noise < 1.0:
        raise ConfigError(f"label_noise is a share of the train labels in [0, 1), not "
                          f"{cfg.label_noise}")
    if cfg.labels and cfg.label_noise > 0:
        raise ConfigError("labels and label_noise both change the given labels; pass one of "
                          "them")
    if cfg.top < 0:
        raise ConfigError("top must be >= 0 (0 skips explain)")
    for name in ("k", "batch_size", "folds", "shard_size"):
        if getattr(cfg, name) < 1 or (name == "folds" and cfg.folds < 2):
            raise ConfigError(f"{name} must be a positive integer (folds >= 2)")


def save_config(cfg: RunConfig, path: str | Path) -> None:
    from .core.io import atomic_write_text
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def load_config(path: str | Path) -> RunConfig:
    return build_config(str(path))


# One config per stage command. The CLI builds each command's flags from these, and a test
# checks that every stage function's keyword defaults equal its config's, so `hardprobe explain`
# and `explain_run(...)` do the same thing unless told otherwise.

CAM_METHODS = ("gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "eigencam",
               "scorecam")


@dataclass
class RankConfig:
    top: int = option(20, help="examples to print")
    split: str | None = option("test", help="split to rank (default test); all: every split")
    by: str = option("hardness", help="column to sort by, highest first")


@dataclass
class ExplainConfig:
    top: int = option(24, help="hardest examples to explain")
    ids: list[str] | None = option(None, help="explain these example ids instead")
    split: str = option("test", help="split whose hardest examples are explained")
    method: str = option("gradcam", choices=CAM_METHODS, help="CAM method")
    layer: str | None = option(None, help="target layer (see `hardprobe layers MODEL`)")
    fast: bool = option(True, help="closed-form Grad-CAM (equal to pytorch-grad-cam's); "
                                   "--no-fast uses the library path")
    device: str = option("auto", help="auto (cuda, mps, cpu) or a torch device")
    batch_size: int = option(16, help="images per backward pass")
    benchmark: bool = option(False, help="also time the fast path against pytorch-grad-cam "
                                         "on the first batch (meta.json's throughput)")


@dataclass
class SimilarityConfig:
    top: int = option(24, help="hardest examples given train neighbours")
    k: int = option(8, help="train neighbours per example")
    split: str = option("test", help="split whose hardest examples get neighbours")
    map_method: str = option("tsne", choices=("tsne", "pca"), help="2-D map of the embeddings")


@dataclass
class PerturbConfig:
    subset: int | None = option(2000, help="test examples probed (stratified by class); "
                                           "0 or none: all")
    corruptions: list[str] | None = option(None, help="CIFAR-10-C corruptions (default: all 15)")
    severities: list[int] = option(factory=lambda: [1, 2, 3, 4, 5], choices=(1, 2, 3, 4, 5),
                                   help="corruption severities")
    seed: int = option(0, help="random seed of the subset and of the random draws")
    occlusion: bool = option(True, help="grey-patch occlusion and random erasing")
    blend: bool = option(True, help="blend toward the nearest other class's prototype")
    cifar10c: str | None = option(None, help="a real CIFAR-10-C folder (<corruption>.npy, "
                                             "labels.npy) instead of generated corruptions")
    device: str = option("auto", help="auto (cuda, mps, cpu) or a torch device")
    batch_size: int = option(128, help="images per forward pass")


@dataclass
class FinetuneConfig:
    mode: str = option("all", choices=("head", "mlp", "last", "all"),
                       help="head: softmax regression on the cached features; mlp: MLP with "
                            "dropout on them; last: the backbone's last stage + classifier; "
                            "all: every layer")
    epochs: int = option(10, help="training epochs")
    batch_size: int = option(128, help="examples per step")
    lr: float | None = option(None, help="peak learning rate (default 0.01 sgd, 1e-3 adamw)")
    optimizer: str = option("sgd", choices=("sgd", "adamw"), help="optimizer")
    weight_decay: float = option(5e-4, help="weight decay")
    momentum: float = option(0.9, help="SGD momentum (Nesterov)")
    warmup_epochs: float = option(1.0, help="linear warm-up, then cosine decay to 0")
    label_smoothing: float = option(0.0, help="label smoothing of the cross-entropy")
    hidden: list[int] = option(factory=lambda: [512], help="hidden widths (--mode mlp)")
    dropout: float = option(0.5, help="dropout (--mode mlp)")
    augment: bool = option(True, help="random crop / flip (image modes)")
    head_init: str = option("auto", choices=("auto", "new", "model"),
                            help="model: keep the backbone's own classifier; new: a fresh linear "
                                 "layer; auto: model when the run used the model's head")
    subset: int | None = option(None, help="train on this many train examples (stratified)")
    folds: int = option(0, help="K >= 2: K more fine-tunes give out-of-fold train predictions; "
                                "0: in-sample (flagged as such)")
    aum_runs: int = option(2, choices=(0, 1, 2),
                           help="runs with AUM threshold samples (2: every example gets a "
                                "verdict; 0: no AUM flags)")
    precision: str = option("fp32", choices=("fp32", "bf16", "auto"), help="training precision")
    device: str = option("auto", help="auto (cuda, mps, cpu) or a torch device")
    num_workers: int | None = option(None, help="image decoding workers (default: the run's)")
    seed: int | None = option(None, help="random seed (default: the run's)")
    resume: bool = option(False, help="continue from the last checkpoints (same options); "
                                      "else start over")
    keep_checkpoints: int = option(2, help="checkpoints kept per job")


@dataclass
class DepthConfig:
    subset: int | None = option(None, help="examples per split at most (stratified)")
    k: int = option(30, help="neighbours of the layer probes (30 as in Baldock et al. 2021; "
                             "not the run's k)")
    token_pool: str = option("mean", choices=("mean", "cls"),
                             help="how a ViT layer's tokens become one vector")
    device: str = option("auto", help="auto (cuda, mps, cpu) or a torch device")
    batch_size: int = option(128, help="images per forward pass")


@dataclass
class CompareConfig:
    out: str | None = option(None, help="folder to write (default RUN_A/compare_<B>)")
    split: str = option("test", help="split compared")
    quantile: float = option(0.1, help="share of each run called hard")
    top: int = option(12, help="thumbnails per group")


@dataclass
class ReportConfig:
    top: int = option(24, help="hardest examples shown as a grid")
    max_rows: int = option(200, help="rows per table at most")
    out: str | None = option(None, help="file or folder to write (default RUN_DIR/report.html)")
