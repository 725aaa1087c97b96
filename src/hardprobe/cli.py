"""Thin command line over the pipeline: parse flags / --config YAML, call a stage, print.

Flags mirror RunConfig's fields one to one (`--batch-size` sets `batch_size`), so a YAML
config and the command line say the same things.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from .config import RunConfig, build_config
from .errors import HardprobeError

HELP = {
    "model": "backbone name (see `hardprobe models`), e.g. cifar_resnet56, resnet50, timm:<name>",
    "weights": "weights file to load (offline use); default: the published weights",
    "weights_tag": "named published weights, e.g. IMAGENET1K_V1 for resnet50",
    "random_init": "random weights, for tests and speed runs only (never a silent fallback)",
    "trust_weights": "allow unpickling a weights file that is not a plain state_dict; "
                     "only for files you trust",
    "image_size": "override the network input size of the weights' preprocessing",
    "data": "cifar10 (torchvision format under --data-root) or imagefolder (--train/--test)",
    "data_root": "folder holding cifar-10-batches-py (cifar10)",
    "train": "train folder of <class>/<image> files (imagefolder)",
    "test": "test folder of <class>/<image> files (imagefolder)",
    "download": "download CIFAR-10 when missing",
    "strict": "stop at an undecodable image instead of skipping it (skipped ones: skipped.csv)",
    "device": "auto (cuda, mps, cpu), or a torch device such as cuda:1",
    "precision": "fp32, bf16, or auto (bf16 where the device supports it)",
    "batch_size": "images per forward pass",
    "num_workers": "DataLoader workers (default: cores - 1, at most 8)",
    "cache_dir": "feature cache (default: $HARDPROBE_CACHE or ~/.cache/hardprobe)",
    "shard_size": "examples per cache shard, the unit of resume after an interruption",
    "feature_dtype": "float32, or float16 to halve disk and memory of the embeddings",
    "use_model_head": "use the model's own classifier as a head (default: when its classes "
                      "are the dataset's)",
    "heads": "heads to fit: knn linear model",
    "k": "neighbours of the kNN head",
    "temperature": "temperature T of the kNN votes exp(sim / T)",
    "knn_weights": "kNN votes: exp (DINO) or uniform",
    "knn_backend": "kNN search: torch (exact, in RAM) or faiss (index built from memory-mapped "
                   "features, for train sets beyond memory; needs faiss-cpu or faiss-gpu)",
    "knn_index": "FAISS index: flat (exact), ivf or ivf_fp16 (approximate; recall measured in "
                 "docs/benchmarks.md)",
    "knn_nlist": "IVF lists (default 4 * sqrt(N_train))",
    "knn_nprobe": "IVF lists scanned per query (more = higher recall, slower; >= nlist is exact)",
    "linear_c": "inverse L2 strength of the linear probe (scikit-learn's C)",
    "folds": "folds of the out-of-fold linear-probe probabilities on train",
    "issue_head": "head whose out-of-sample probabilities find label issues",
    "seed": "random seed",
    "label_noise": "flip this share of the train labels (with --seed) to measure how well label "
                   "issues are found; the originals are kept in clean_label",
    "top": "hardest examples explained (Grad-CAM), given neighbours and shown in the report; "
           "0 skips explain",
    "cam_method": "Grad-CAM method: gradcam, gradcam++, xgradcam, layercam, hirescam, eigencam, "
                  "scorecam",
    "cam_layer": "Grad-CAM target layer (default: the backbone's; see `hardprobe layers MODEL`)",
    "neighbors": "train neighbours shown per hard example",
    "map_method": "2-D map of the test embeddings: tsne or pca",
    "similarity": "compute neighbours, centroids and the 2-D map",
    "report": "write RUN_DIR/report.html",
    "out": "run directory to write",
}
HEAD_FIELDS = ("heads", "k", "temperature", "knn_weights", "knn_backend", "knn_index", "knn_nlist",
               "knn_nprobe", "linear_c", "folds", "issue_head", "seed", "device")


def _add_config_flags(p: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    hints = typing.get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        if only is not None and f.name not in only:
            continue
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        args = typing.get_args(hint)
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        kw = {"default": None, "help": HELP.get(f.name)}
        if base is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(hint) is list:
            p.add_argument(flag, nargs="+", **kw)
        else:
            p.add_argument(flag, type=base if base in (int, float) else str, **kw)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hardprobe", description="Probe pretrained vision models "
                                "with hard examples.")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in (("run", "all stages: extract features, fit heads, score every example"),
                       ("extract", "extract (cached) features of every split into --out")):
        s = sub.add_parser(name, help=text, description=text)
        s.add_argument("--config", help="YAML file of config keys; flags override it")
        _add_config_flags(s)
        s.add_argument("--no-progress", action="store_true", help="hide progress bars")
    s = sub.add_parser("classify", help="fit the heads on a run's features and score examples")
    s.add_argument("run_dir")
    _add_config_flags(s, HEAD_FIELDS)
    s = sub.add_parser("rank", help="print the hardest examples of a run")
    s.add_argument("run_dir")
    s.add_argument("--top", type=int, default=20)
    s.add_argument("--split", default="test", help="split to rank, or 'all'")
    s.add_argument("--by", default="hardness", help="column to sort by, highest first")
    s = sub.add_parser("explain", help="Grad-CAM of the hardest examples (given vs predicted)")
    s.add_argument("run_dir")
    s.add_argument("--top", type=int, default=24, help="hardest examples to explain")
    s.add_argument("--ids", nargs="+", help="explain these example ids instead")
    s.add_argument("--split", default="test")
    s.add_argument("--method", default="gradcam", help="gradcam, gradcam++, xgradcam, layercam, "
                   "hirescam, eigencam, scorecam")
    s.add_argument("--layer", help="target layer (see `hardprobe layers MODEL`)")
    s.add_argument("--no-fast", action="store_true", help="use the library path for gradcam too")
    s.add_argument("--device", default="auto")
    s.add_argument("--batch-size", type=int, default=16)
    s = sub.add_parser("similarity", help="neighbours of hard examples, centroids, 2-D map")
    s.add_argument("run_dir")
    s.add_argument("--top", type=int, default=24)
    s.add_argument("--k", type=int, default=8, help="train neighbours per example")
    s.add_argument("--split", default="test")
    s.add_argument("--map-method", default="tsne", choices=["tsne", "pca"])
    s = sub.add_parser("cka", help="linear CKA between the features of two runs on the same images")
    s.add_argument("run_a")
    s.add_argument("run_b")
    s.add_argument("--split", default="test")
    s = sub.add_parser("perturb", help="CIFAR-10-C corruptions, occlusion and blends: how much "
                       "it takes to break each example")
    s.add_argument("run_dir")
    s.add_argument("--subset", type=int, default=2000, help="test examples (stratified); 0 = all")
    s.add_argument("--corruptions", nargs="+", help="default: all 15")
    s.add_argument("--severities", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-occlusion", action="store_true")
    s.add_argument("--no-blend", action="store_true")
    s.add_argument("--cifar10c", help="a real CIFAR-10-C folder (<corruption>.npy, labels.npy)")
    s.add_argument("--device", default="auto")
    s.add_argument("--batch-size", type=int, default=128)
    s = sub.add_parser("finetune", help="fine-tune a head or the backbone on the train split and "
                       "record training dynamics (cartography, AUM, forgetting)")
    s.add_argument("run_dir")
    s.add_argument("--mode", default="all", choices=["head", "mlp", "last", "all"],
                   help="head: softmax regression on the cached features; mlp: MLP with dropout "
                   "on them; last: the backbone's last stage + classifier; all: every layer")
    s.add_argument("--epochs", type=int, default=10)
    s.add_argument("--batch-size", type=int, default=128)
    s.add_argument("--lr", type=float, help="peak learning rate (default 0.01 sgd, 1e-3 adamw)")
    s.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    s.add_argument("--weight-decay", type=float, default=5e-4)
    s.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (Nesterov)")
    s.add_argument("--warmup-epochs", type=float, default=1.0,
                   help="linear warm-up, then cosine decay to 0")
    s.add_argument("--label-smoothing", type=float, default=0.0)
    s.add_argument("--hidden", type=int, nargs="+", default=[512],
                   help="hidden widths (--mode mlp)")
    s.add_argument("--dropout", type=float, default=0.5, help="dropout (--mode mlp)")
    s.add_argument("--no-augment", dest="augment", action="store_false",
                   help="no random crop / flip (image modes)")
    s.add_argument("--head-init", default="auto", choices=["auto", "new", "model"],
                   help="model: keep the backbone's own classifier; new: a fresh linear layer; "
                   "auto: model when the run used the model's head")
    s.add_argument("--subset", type=int, help="train on this many train examples (stratified)")
    s.add_argument("--folds", type=int, default=0, help="K >= 2: K more fine-tunes give "
                   "out-of-fold train predictions; 0: in-sample (flagged as such)")
    s.add_argument("--aum-runs", type=int, default=2, choices=[0, 1, 2], help="runs with AUM "
                   "threshold samples (2: every example gets a verdict; 0: no AUM flags)")
    s.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])
    s.add_argument("--device", default="auto")
    s.add_argument("--num-workers", type=int, help="image decoding workers (default: the run's)")
    s.add_argument("--seed", type=int, help="default: the run's seed")
    s.add_argument("--resume", action="store_true",
                   help="continue from the last checkpoints (same options); else start over")
    s.add_argument("--keep-checkpoints", type=int, default=2)
    s.add_argument("--no-progress", action="store_true", help="hide progress bars")
    s = sub.add_parser("depth", help="prediction depth: the layer from which kNN probes agree "
                       "with the final prediction (Baldock et al. 2021)")
    s.add_argument("run_dir")
    s.add_argument("--subset", type=int, help="examples per split at most (stratified)")
    s.add_argument("--k", type=int, help="neighbours of the layer probes (default: the run's k)")
    s.add_argument("--token-pool", default="mean", choices=["mean", "cls"])
    s.add_argument("--device", default="auto")
    s.add_argument("--batch-size", type=int, default=128)
    s = sub.add_parser("compare", help="two runs on the same images side by side (HTML)")
    s.add_argument("run_a")
    s.add_argument("run_b")
    s.add_argument("--out", help="folder to write (default RUN_A/compare_<B>)")
    s.add_argument("--split", default="test")
    s.add_argument("--quantile", type=float, default=0.1, help="share of each run called hard")
    s.add_argument("--top", type=int, default=12, help="thumbnails per group")
    s = sub.add_parser("report", help="write RUN_DIR/report.html (self-contained)")
    s.add_argument("run_dir")
    s.add_argument("--top", type=int, default=24)
    s.add_argument("--max-rows", type=int, default=200)
    s.add_argument("--out", help="file or folder to write (default RUN_DIR/report.html)")
    sub.add_parser("models", help="list the registered backbones")
    s = sub.add_parser("doctor", help="check the environment: versions, devices, cache, weights")
    s.add_argument("--json", action="store_true", help="print JSON")
    s = sub.add_parser("layers", help="list a model's layers (candidates for --cam-layer)")
    s.add_argument("model")
    return p


def _version() -> str:
    from . import __version__
    return f"hardprobe {__version__}"


def _config_from(ns: argparse.Namespace, base: RunConfig | None = None) -> RunConfig:
    names = {f.name for f in dataclasses.fields(RunConfig)}
    given = {k: v for k, v in vars(ns).items() if k in names and v is not None}
    if base is not None:
        return build_config(**{**base.to_dict(), **given})
    return build_config(getattr(ns, "config", None), **given)


def main(argv: list[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    try:
        return _dispatch(ns)
    except KeyboardInterrupt:
        print("interrupted: finished shards are kept; rerun the same command to resume",
              file=sys.stderr)
        return 130
    except HardprobeError as e:  # expected: one line with the fix; anything else is a bug
        print(f"hardprobe {ns.command}: error: {e}", file=sys.stderr)
        return 2


def _dispatch(ns: argparse.Namespace) -> int:
    from . import pipeline

    if ns.command in ("run", "extract"):
        cfg = _config_from(ns)
        stage = pipeline.run if ns.command == "run" else pipeline.extract
        out = stage(cfg, progress=not ns.no_progress)
        from .core.distributed import env_context
        if not env_context().main:  # under torchrun rank 0 reports for all
            return 0
        print(f"wrote {out}")
        if ns.command == "run":
            _print_summary(out)
    elif ns.command == "classify":
        from .config import load_config
        from .rundir.run import load_run
        run = load_run(ns.run_dir)
        cfg = _config_from(ns, load_config(run.path / "config.yaml"))
        pipeline.classify(run.path, cfg)
        _print_summary(run.path)
    elif ns.command == "rank":
        df = pipeline.rank(ns.run_dir, top=ns.top, split=None if ns.split == "all" else ns.split,
                           by=ns.by)
        from .rundir.run import load_run
        _print_rank(df, load_run(ns.run_dir).class_names)
    elif ns.command == "explain":
        from .core.device import resolve_device
        from .stages.explain.stage import explain_run
        out = explain_run(ns.run_dir, ids=ns.ids, top=ns.top, split=ns.split, method=ns.method,
                          layer=ns.layer, fast=not ns.no_fast, batch_size=ns.batch_size,
                          device=str(resolve_device(ns.device)))
        print(f"wrote {out}")
    elif ns.command == "similarity":
        from .stages.similarity import similarity_run
        print(f"wrote {similarity_run(ns.run_dir, top=ns.top, k=ns.k, split=ns.split, map_method=ns.map_method)}")
    elif ns.command == "cka":
        from .rundir.run import load_run
        from .stages.similarity import cka_runs
        print(f"linear CKA ({ns.split}): {cka_runs(load_run(ns.run_a), load_run(ns.run_b), split=ns.split):.4f}")
    elif ns.command == "perturb":
        from .core.device import resolve_device
        from .stages.perturb import perturb_run
        out = perturb_run(ns.run_dir, subset=ns.subset or None, corruptions=ns.corruptions,
                          severities=tuple(ns.severities), seed=ns.seed,
                          occlusion=not ns.no_occlusion, blend=not ns.no_blend,
                          cifar10c=ns.cifar10c, device=str(resolve_device(ns.device)),
                          batch_size=ns.batch_size)
        print(f"wrote {out}")
    elif ns.command == "finetune":
        from .stages.finetune.stage import finetune_run
        out = finetune_run(ns.run_dir, mode=ns.mode, epochs=ns.epochs, batch_size=ns.batch_size,
                           lr=ns.lr, optimizer=ns.optimizer, weight_decay=ns.weight_decay,
                           momentum=ns.momentum, warmup_epochs=ns.warmup_epochs,
                           label_smoothing=ns.label_smoothing, hidden=tuple(ns.hidden),
                           dropout=ns.dropout, augment=ns.augment, head_init=ns.head_init,
                           subset=ns.subset, folds=ns.folds, aum_runs=ns.aum_runs,
                           precision=ns.precision, device=ns.device, num_workers=ns.num_workers,
                           seed=ns.seed, resume=ns.resume, keep_checkpoints=ns.keep_checkpoints,
                           progress=not ns.no_progress)
        print(f"wrote {out}")
    elif ns.command == "depth":
        from .core.device import resolve_device
        from .stages.depth import depth_run
        out = depth_run(ns.run_dir, subset=ns.subset, k=ns.k, token_pool=ns.token_pool,
                        device=str(resolve_device(ns.device)), batch_size=ns.batch_size)
        print(f"wrote {out}")
    elif ns.command == "compare":
        from .stages.compare import compare_runs
        out = compare_runs(ns.run_a, ns.run_b, out=ns.out, split=ns.split, quantile=ns.quantile,
                           top=ns.top)
        print(f"wrote {out / 'compare.html'}")
    elif ns.command == "report":
        from .report import write_report
        print(f"wrote {write_report(ns.run_dir, top=ns.top, max_rows=ns.max_rows, out=ns.out)}")
    elif ns.command == "models":
        from .backbones import list_backbones
        for m in list_backbones():
            print(f"{m['name']:<22} {m['summary']}")
    elif ns.command == "doctor":
        import json

        from .doctor import environment, report
        env = environment()
        print(json.dumps(env, indent=2) if ns.json else report(env))
    elif ns.command == "layers":
        from .backbones import create_backbone, list_layers
        bb = create_backbone(ns.model, random_init=True)
        print(f"# {ns.model}: Grad-CAM layer by default: {bb.cam_layer}")
        for name in list_layers(bb):
            print(name)
    return 0


def _print_summary(run_dir) -> None:
    from .rundir.run import load_run
    m = load_run(run_dir).metrics
    for head, per_split in m.get("heads", {}).items():
        accs = ", ".join(f"{s} {v['accuracy']:.2%}" for s, v in per_split.items())
        print(f"  {head:<7} accuracy: {accs}")


def _print_rank(df, class_names: list[str]) -> None:
    import pandas as pd
    cols = [c for c in ("id", "label_name", "hardness", "label_issue", "knn_disagreement")
            if c in df.columns]
    cols += [c for c in df.columns if c.startswith(("pred_", "prob_true_"))]
    df = df[cols].copy()
    for c in cols:  # predicted class indices -> names, as a person reads them
        if c.startswith("pred_"):
            df[c] = [class_names[i] for i in df[c]]
    with pd.option_context("display.max_columns", None, "display.width", 200):
        print(df.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    raise SystemExit(main())
