"""Thin command line over the stages: one table of commands, flags generated from configs.

Every command's options are a config dataclass of `hardprobe.config` (help text and choices
next to each field), so `--batch-size` sets `batch_size`, a YAML file and the command line say
the same things, and the Python function behind a command has the same defaults.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import sys
import types
import typing
from dataclasses import dataclass
from typing import Callable

from . import config as C
from .errors import HardprobeError
from .report.explorer import ExploreConfig
from .stages.diagnose.stage import DiagnoseConfig

# the options of `hardprobe classify`: the head fields of RunConfig
HEAD_FIELDS = ("heads", "k", "temperature", "knn_weights", "knn_backend", "knn_index", "knn_nlist",
               "knn_nprobe", "linear_c", "folds", "issue_head", "seed", "duplicates", "device")


@dataclass(frozen=True)
class Command:
    """One subcommand: its positional arguments, its config, and the function it calls.

    target: "module:function" called as function(*positional, **config fields, **extra).
    """
    name: str
    help: str
    positional: tuple[str, ...] = ()
    config: type | None = None
    target: str = ""
    progress: bool = False  # takes --no-progress


COMMANDS = (
    Command("run", "all stages: extract features, fit heads, score every example",
            config=C.RunConfig, target="hardprobe.pipeline:run", progress=True),
    Command("extract", "extract (cached) features of every split into --out",
            config=C.RunConfig, target="hardprobe.pipeline:extract", progress=True),
    Command("classify", "fit the heads on a run's features and score examples", ("run_dir",),
            C.RunConfig, "hardprobe.pipeline:classify"),
    Command("rank", "print the hardest examples of a run", ("run_dir",), C.RankConfig,
            "hardprobe.pipeline:rank"),
    Command("explain", "Grad-CAM of the hardest examples (given vs predicted)", ("run_dir",),
            C.ExplainConfig, "hardprobe.stages.explain.stage:explain_run"),
    Command("similarity", "neighbours of hard examples, centroids, 2-D map", ("run_dir",),
            C.SimilarityConfig, "hardprobe.stages.similarity:similarity_run"),
    Command("cka", "linear CKA between the features of two runs on the same images",
            ("run_a", "run_b"), target="hardprobe.stages.similarity:cka_runs"),
    Command("perturb", "CIFAR-10-C corruptions, occlusion and blends: how much it takes to "
            "break each example", ("run_dir",), C.PerturbConfig,
            "hardprobe.stages.perturb:perturb_run"),
    Command("finetune", "fine-tune a head or the backbone on the train split and record "
            "training dynamics (cartography, AUM, forgetting)", ("run_dir",), C.FinetuneConfig,
            "hardprobe.stages.finetune.stage:finetune_run", progress=True),
    Command("depth", "prediction depth: the layer from which kNN probes agree with the final "
            "prediction (Baldock et al. 2021)", ("run_dir",), C.DepthConfig,
            "hardprobe.stages.depth:depth_run"),
    Command("compare", "two runs on the same images side by side (HTML)", ("run_a", "run_b"),
            C.CompareConfig, "hardprobe.compare:compare"),
    Command("diagnose", "a cause for every example (label error, ambiguous, atypical, model "
            "error, fragile, low quality) with its evidence", ("run_dir",), DiagnoseConfig, "hardprobe.stages.diagnose:diagnose_run"),
    Command("why", "one example's diagnosis: scores, evidence, neighbours, slice",
            ("run_dir", "example_id"), target="hardprobe.stages.diagnose:why"),
    Command("explore", "write RUN_DIR/explorer.html: browse every example offline",
            ("run_dir",), ExploreConfig, "hardprobe.report.explorer:explore_run"),
    Command("report", "write RUN_DIR/report.html (self-contained)", ("run_dir",),
            C.ReportConfig, "hardprobe.report:write_report"),
    Command("models", "list the registered backbones"),
    Command("doctor", "check the environment: versions, devices, cache, weights"),
    Command("layers", "list a model's layers (candidates for --cam-layer)", ("model",)),
)
BY_NAME = {c.name: c for c in COMMANDS}


def _help(f: dataclasses.Field) -> str:
    text = f.metadata.get("help", "")
    default = (f.default_factory() if f.default_factory is not dataclasses.MISSING
               else f.default)
    if default not in (None, False, [], ()):
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        text += f" (default: {shown})"
    return text.replace("%", "%%")


def add_flags(p: argparse.ArgumentParser, cls: type, only: tuple[str, ...] | None = None) -> None:
    """One flag per field of the config dataclass `cls`; an omitted flag parses as None."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        hint = hints[f.name]
        base = hint  # X | None -> X
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            base = next(a for a in typing.get_args(hint) if a is not type(None))
        kw = {"default": None, "help": _help(f), "dest": f.name}
        if f.metadata.get("choices") is not None:
            kw["choices"] = f.metadata["choices"]
        flag = "--" + f.name.replace("_", "-")
        if base is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(base) is list:
            p.add_argument(flag, nargs="+", type=typing.get_args(base)[0], **kw)
        else:
            p.add_argument(flag, type=base, **kw)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hardprobe", description="Probe pretrained vision models "
                                "with hard examples.")
    p.add_argument("--version", action="version", version=_version())
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    sub = p.add_subparsers(dest="command", required=True)
    for cmd in COMMANDS:
        s = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        for name in cmd.positional:
            s.add_argument(name)
        if cmd.name in ("run", "extract"):
            s.add_argument("--config", help="YAML file of config keys; flags override it")
        if cmd.config is not None:
            add_flags(s, cmd.config, HEAD_FIELDS if cmd.name == "classify" else None)
        if cmd.progress:
            s.add_argument("--no-progress", action="store_true", help="hide progress bars")
    sub.choices["cka"].add_argument("--split", default="test", help="split compared")
    sub.choices["doctor"].add_argument("--json", action="store_true", help="print JSON")
    return p


def _version() -> str:
    from . import __version__
    return f"hardprobe {__version__}"


def stage_config(cls: type, ns: argparse.Namespace):
    """The config `cls` from the flags that were given (None = not given: the default)."""
    given = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)
             if getattr(ns, f.name, None) is not None}
    cfg = cls(**given)
    C.check_config(cfg)
    return cfg


def _run_config(ns: argparse.Namespace, base: C.RunConfig | None = None) -> C.RunConfig:
    names = {f.name for f in dataclasses.fields(C.RunConfig)}
    given = {k: v for k, v in vars(ns).items() if k in names and v is not None}
    if base is not None:
        return C.build_config(**{**base.to_dict(), **given})
    return C.build_config(getattr(ns, "config", None), **given)


def target(cmd: Command) -> Callable:
    module, name = cmd.target.split(":")
    return getattr(importlib.import_module(module), name)


def setup_logging(quiet: bool = False) -> None:
    """One stderr handler for the package's loggers; progress bars stay tqdm."""
    log = logging.getLogger("hardprobe")
    if not any(getattr(h, "_hardprobe", False) for h in log.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
        h._hardprobe = True
        log.addHandler(h)
    log.setLevel(logging.WARNING if quiet else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    setup_logging(ns.quiet)
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
    cmd = BY_NAME[ns.command]
    special = {"run": _run, "extract": _run, "classify": _classify, "rank": _rank,
               "cka": _cka, "why": _why, "diagnose": _diagnose, "models": _models, "doctor": _doctor, "layers": _layers}
    if cmd.name in special:
        return special[cmd.name](ns, cmd)
    cfg = stage_config(cmd.config, ns)
    extra = {"progress": not ns.no_progress} if cmd.progress else {}
    out = target(cmd)(*(getattr(ns, a) for a in cmd.positional), **_kwargs(cfg), **extra)
    if cmd.name == "compare":
        out = out / "compare.html"
    print(f"wrote {out}")
    return 0


def _kwargs(cfg) -> dict:
    kw = dataclasses.asdict(cfg)
    if isinstance(cfg, C.PerturbConfig):  # 0 examples means all of them
        kw["subset"] = kw["subset"] or None
    return kw


def _run(ns, cmd) -> int:
    out = target(cmd)(_run_config(ns), progress=not ns.no_progress)
    from .core.distributed import env_context
    if not env_context().main:  # under torchrun rank 0 reports for all
        return 0
    print(f"wrote {out}")
    if cmd.name == "run":
        _print_summary(out)
    return 0


def _classify(ns, cmd) -> int:
    from .rundir.run import load_run
    run = load_run(ns.run_dir)
    target(cmd)(run.path, _run_config(ns, C.load_config(run.path / "config.yaml")))
    _print_summary(run.path)
    return 0


def _rank(ns, cmd) -> int:
    cfg = stage_config(cmd.config, ns)
    split = None if cfg.split == "all" else cfg.split
    df = target(cmd)(ns.run_dir, top=cfg.top, split=split, by=cfg.by)
    from .rundir.run import load_run
    _print_rank(df, load_run(ns.run_dir).class_names)
    return 0


def _why(ns, cmd) -> int:
    print(target(cmd)(ns.run_dir, ns.example_id))
    return 0


def _diagnose(ns, cmd) -> int:
    summary = target(cmd)(ns.run_dir, stage_config(cmd.config, ns))
    for cause, n in summary.get("counts", {}).items():
        print(f"  {cause:<12} {n}")
    print(f"wrote {ns.run_dir}")
    return 0


def _cka(ns, cmd) -> int:
    from .rundir.run import load_run
    value = target(cmd)(load_run(ns.run_a), load_run(ns.run_b), split=ns.split)
    print(f"linear CKA ({ns.split}): {value:.4f}")
    return 0


def _models(ns, cmd) -> int:
    from .backbones import list_backbones
    for m in list_backbones():
        print(f"{m['name']:<22} {m['summary']}")
    return 0


def _doctor(ns, cmd) -> int:
    import json

    from .doctor import environment, report
    env = environment()
    print(json.dumps(env, indent=2) if ns.json else report(env))
    return 0


def _layers(ns, cmd) -> int:
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
    cols = [c for c in ("id", "label_name", "hardness", "failure_mode", "label_issue",
                        "knn_disagreement") if c in df.columns]
    cols += [c for c in df.columns if c.startswith(("pred_", "prob_true_"))]
    df = df[cols].copy()
    for c in cols:  # predicted class indices -> names, as a person reads them
        if c.startswith("pred_"):
            df[c] = [class_names[i] for i in df[c]]
    # cleanlab's flag is a candidate for review, never a verdict (the diagnosis gives causes)
    df = df.rename(columns={"label_issue": "issue_candidate"})
    with pd.option_context("display.max_columns", None, "display.width", 200):
        print(df.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    raise SystemExit(main())
