"""The report's duplicates section: the near-duplicate groups, side by side.

Shown only when the table has `duplicate_group` (see `scoring.duplicates`). It reads the
table and metrics.json's "duplicates" entry; it computes nothing beyond grouping and counting
for display: test accuracy with and without the test images that have a near-copy in train
comes from metrics["duplicates"]["accuracy"] (written by classify via `duplicate_metrics`).
"""
from __future__ import annotations

import pandas as pd

from .template import esc, fmt, kv_table, pct, table, truncation_note

MAX_GROUPS = 40   # groups shown at most
MAX_MEMBERS = 8   # thumbnails per group at most


def duplicates_section(ctx) -> str:
    ex = ctx.ex
    if "duplicate_group" not in ex.columns:
        return '<p class="note off">no duplicate_group column: duplicates not computed</p>'
    dup = ex[ex["duplicate_group"].fillna(-1).astype(int) >= 0]
    m = ctx.metrics.get("duplicates") or {}
    out = _overview(ctx, dup, m) + _accuracy(m)
    if dup.empty:
        return out + '<p class="note">no duplicate groups found</p>'
    return out + _groups(ctx, dup)


def _overview(ctx, dup: pd.DataFrame, m: dict) -> str:
    """The counts classify stored in metrics.json["duplicates"] (scoring.duplicate_metrics)."""
    within = m.get("n_groups") or {}
    pairs = [("groups", f"<b>{fmt(m.get('n_groups_total'))}</b> holding {fmt(len(dup))} examples"),
             ("groups within a split", ", ".join(f"{esc(s)} {fmt(within.get(s))}"
                                                 for s in ctx.splits)),
             ("groups spanning splits", fmt(m.get("n_cross_split_groups"))),
             ("groups whose labels disagree", f"<b>{fmt(m.get('n_label_conflicts'))}</b>"),
             ("test examples with a near-copy in train",
              f"<b>{fmt(m.get('n_train_duplicates_in_test'))}</b>")]
    if m.get("threshold") is not None:
        pairs.append(("rule", esc(f"{m.get('descriptor', 'shift_correlation')} >= "
                                  f"{m['threshold']}")))
    return kv_table(pairs)


def _accuracy(m: dict) -> str:
    acc = m.get("accuracy") or {}
    if not acc or not m.get("n_train_duplicates_in_test"):  # nothing to take out: same figures
        return ""
    rows = []
    for h, a in acc.items():
        d = (None if a.get("all") is None or a.get("without_train_duplicates") is None
             else a["without_train_duplicates"] - a["all"])
        rows.append([esc(h), pct(a.get("all")), pct(a.get("without_train_duplicates")),
                     fmt(a.get("n_without")), "—" if d is None else f"{100 * d:+.2f} pt"])
    return (table(["head", "test accuracy (all)", "without train duplicates", "n without",
                   "change"], rows, num_cols=range(1, 5)) +
            '<p class="caption">Accuracy on all test images is optimistic: a near-copy of '
            f"{fmt(m.get('n_train_duplicates_in_test'))} of them was fitted on (in train). "
            "Higher = better.</p>")


def _groups(ctx, dup: pd.DataFrame) -> str:
    """Groups with conflicting labels first, then those spanning splits, then the largest."""
    by = dup.groupby("duplicate_group")
    order = pd.DataFrame({"conflict": by["label"].nunique() > 1,
                          "cross": by["split"].nunique() > 1, "size": by.size()})
    order = order.sort_values(["conflict", "cross", "size"], ascending=False, kind="stable")
    shown = order.index[:MAX_GROUPS]
    rows = []
    for g in shown:
        members = dup[dup["duplicate_group"] == g]
        cells = "".join(
            f'<figure style="display:inline-block;margin:2px">{ctx.thumb(r["id"], alt=r["id"])}'
            f'<figcaption class="muted">{esc(r["split"])} · {esc(r["label_name"])}</figcaption>'
            f"</figure>" for _, r in members.head(MAX_MEMBERS).iterrows())
        more = len(members) - MAX_MEMBERS
        flags = ("<b>labels disagree</b>" if order.at[g, "conflict"] else "same label") + (
            " · spans splits" if order.at[g, "cross"] else "")
        rows.append([fmt(int(g)), fmt(len(members)), flags,
                     cells + (f" <span class=muted>+{more} more</span>" if more > 0 else "")])
    return (truncation_note(len(shown), len(order), "duplicate groups") +
            table(["group", "size", "", "examples (split · given label)"], rows,
                  num_cols=(0, 1)))
