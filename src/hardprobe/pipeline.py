"""The probe pipeline: `run(cfg)` walks the stages in the order of the stage table
(rundir/layout.py) and skips every stage whose stamp says its inputs did not change."""
from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from .config import RunConfig, build_config
from .core import distributed
from .core.cache import key_digest, sha256_bytes_of
from .core.device import resolve_device
from .errors import ConfigError
from .rundir.run import load_run
from .stages.classify import classify, classify_if_changed
from .stages.extract.stage import extract
from .stages.extract.trained_on import rank_warning

log = logging.getLogger(__name__)


def run(cfg: RunConfig, *, progress: bool = True) -> Path:
    """All stages of `hardprobe run` into cfg.out; a stage whose inputs did not change since
    its stamp is skipped."""
    out = extract(cfg, progress=progress)
    if not distributed.env_context().main:  # under torchrun, rank 0 goes on alone
        return out
    classify_if_changed(out, cfg, progress=progress)
    r = load_run(out)
    base = r.stamps()["classify"]
    device = str(resolve_device(cfg.device))
    if cfg.similarity:
        from .stages.similarity import similarity_run
        _step(r, "similarity", {"classify": base, "top": cfg.top, "k": cfg.neighbors,
                                "map": cfg.map_method, "seed": cfg.seed},
              lambda: similarity_run(out, top=cfg.top, k=cfg.neighbors,
                                     map_method=cfg.map_method, progress=progress))
    if cfg.top > 0 and "test" in r.splits:
        from .stages.explain import explain_run
        _step(r, "explain", {"classify": base, "top": cfg.top, "method": cfg.cam_method,
                             "layer": cfg.cam_layer},
              lambda: explain_run(out, top=cfg.top, method=cfg.cam_method, layer=cfg.cam_layer,
                                  device=device, progress=progress))
    if cfg.diagnose:
        _diagnose(out, progress)
    if cfg.report:
        from .report import write_report
        stamps = r.stamps()
        key = ({s: stamps.get(s) for s in ("classify", "similarity", "explain", "diagnose")}
               | {"top": cfg.top} | _optional_stage_digests(out))
        _step(r, "report", key, lambda: write_report(out, top=cfg.top),
              also=not (out / "report.html").exists())
    if cfg.explorer and "test" in r.splits:
        from .report.explorer import write_explorer
        stamps = r.stamps()
        key = {s: stamps.get(s) for s in ("classify", "similarity", "explain", "diagnose")} | {
            "splits": ["test"]}
        _step(r, "explore", key, lambda: write_explorer(out),
              also=not (out / "explorer.html").exists())
    return out


def _diagnose(out: Path, progress: bool) -> None:
    """The diagnose stage with the options of its last run (or the defaults), unless its
    stamp says it is current."""
    from .stages.diagnose.stage import diagnose_run, is_current, last_config
    cfg = last_config(out, progress=progress)
    if not is_current(out, cfg):
        diagnose_run(out, cfg)


def _step(run, stage: str, key: dict, compute, *, also: bool = False) -> None:
    """Run `compute` when the stage's stamp differs from the digest of `key` (or `also`)."""
    digest = key_digest(key)
    if run.stamps().get(stage) != digest or also:
        compute()
        run.stamp(stage, digest)


def _optional_stage_digests(out: Path) -> dict:
    """The stages a user runs alone (perturb, depth, finetune) change the report too: their
    summaries' digests join its stamp, so `hardprobe run` redraws it after one of them."""
    files = {d: out / d / "summary.json" for d in ("perturb", "depth", "finetune")}
    return {d: sha256_bytes_of(f) if f.exists() else None for d, f in files.items()}


def rank(run_dir: str | Path, *, top: int = 20, split: str | None = "test",
         by: str = "hardness") -> pd.DataFrame:
    """The `top` hardest examples (highest `by` first). Logs a warning when train examples are
    ranked and the features were trained on their labels (their scores are optimistic)."""
    warning = rank_warning(run_dir, split)
    if warning:
        log.warning(warning)
    df = load_run(run_dir).examples
    if by not in df.columns:
        raise ConfigError(f"no column {by!r} in the run; run `hardprobe classify` first "
                         f"(columns: {', '.join(df.columns)})")
    if split is not None:
        if split not in set(df["split"]):
            raise ConfigError(f"no split {split!r} in the run; splits: {sorted(set(df['split']))}")
        df = df[df["split"] == split]
    return df.sort_values(by, ascending=False, kind="stable").head(top)


__all__ = ["build_config", "classify", "extract", "rank", "run"]
