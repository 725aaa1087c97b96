"""The run directory's layout: which stage owns which files and table columns.

This module is a leaf (it imports nothing of hardprobe's but the errors): the stages, the
report and the CLI read it; it reads none of them.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import StageOrderError

# The primary head is the model's final prediction: its own classifier, else the linear
# probe, else kNN. Every stage and the report use this one order.
HEAD_ORDER = ("model", "linear", "knn")


def primary_head(columns) -> str:
    """The head whose prediction is the model's final one: model, else linear, else knn."""
    for h in HEAD_ORDER:
        if f"pred_{h}" in columns:
            return h
    raise StageOrderError("the run has no prediction column (pred_model, pred_linear or "
                          "pred_knn); run `hardprobe classify` first")

FIT_SPLIT = "train"  # the split every head is fitted on
TABLE = "examples.parquet"
STAMPS = "stages.json"


@dataclass(frozen=True)
class Stage:
    """What one stage owns in the run directory, as data.

    files: paths (relative to RUN_DIR) it writes; a folder ends in '/'.
    columns / prefixes: the table columns it owns, by exact name or by prefix. Only the owner
      writes them (`Run.join` refuses others), and a re-run replaces exactly these.
    requires: the stages whose output it reads. When a stage's stamp changes, the columns and
      stamps of every stage that requires it (transitively) are dropped: they were computed
      from the old output.
    stamp: what its stamp digests (documentation; the stage computes the digest).
    """
    name: str
    files: tuple[str, ...] = ()
    columns: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()
    stamp: str = ""

    def owns(self, column: str) -> bool:
        return column in self.columns or column.startswith(self.prefixes)


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("extract", files=("config.yaml", "provenance.json", "skipped.csv", "features/"),
          columns=("id", "split", "path", "label", "label_name", "clean_label",
                   "planted_noise"),
          stamp="backbone, weights sha256, preprocessing, precision, dataset manifest, split"),
    Stage("classify", files=("metrics.json", "heads/", "duplicates/"),
          columns=("knn_disagreement", "heads_disagree", "hardness", "label_quality",
                   "label_issue", "duplicate_group", "train_duplicate"),
          prefixes=("pred_", "prob_true_", "margin_", "entropy_", "correct_"),
          requires=("extract",), stamp="feature cache keys and every head option"),
    Stage("similarity", files=("similarity/",), requires=("classify",),
          stamp="classify's stamp, top, neighbours, map method, seed"),
    Stage("explain", files=("explain/",), requires=("classify",),
          stamp="classify's stamp, top, CAM method and layer"),
    Stage("perturb", files=("perturb/",), prefixes=("flip_severity",),
          columns=("occlusion_max_drop", "erase_flip_area", "blend_flip_weight"),
          requires=("classify",), stamp="perturb's options and the run's heads"),
    Stage("depth", files=("depth/",), columns=("prediction_depth",), requires=("classify",),
          stamp="depth's options and the layer features' cache key"),
    Stage("finetune", files=("finetune/",), prefixes=("ft_",), requires=("classify",),
          stamp="fine-tuning options, feature keys, train ids and labels"),
    Stage("diagnose", files=("diagnose/", "slices/"),
          columns=("failure_mode", "evidence", "n_models_wrong", "n_models_agree_wrong",
                   "hardness_rank_mean", "slice_id", "human_p_given", "human_entropy",
                   "human_majority"),
          prefixes=("cause_", "dx_", "iq_"), requires=("classify",),
          stamp="classify's, perturb's and finetune's stamps, its options, the --with runs, "
                "the --soft-labels file's sha256"),
    Stage("report", files=("report.html",), requires=("classify",),
          stamp="the stamps of every stage it shows"),
    Stage("explore", files=("explorer.html",), requires=("classify",),
          stamp="the stamps of classify, similarity and explain, the splits and the options"),
)}


def owner(column: str) -> str | None:
    """The stage that owns a table column, or None (a column no stage declares)."""
    return next((s.name for s in STAGES.values() if s.owns(column)), None)


def dependents(stage: str) -> list[str]:
    """Every stage that requires `stage`, directly or through another, in table order."""
    out: list[str] = []
    frontier = {stage}
    while frontier:
        nxt = {s.name for s in STAGES.values() if set(s.requires) & frontier} - set(out)
        out += [n for n in STAGES if n in nxt]
        frontier = nxt
    return out


def require(columns, stage: str, needed: str = "hardness") -> None:
    """Stop with the fix when the table lacks the output of the stage that `stage` needs."""
    if needed not in columns:
        need = owner(needed) or "classify"
        raise StageOrderError(f"{stage} needs the {needed!r} column that `hardprobe {need}` "
                              f"writes; run `hardprobe {need} RUN_DIR` first")
