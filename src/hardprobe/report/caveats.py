"""Caveats the report prints next to a figure, read from what the stages recorded.

`upper_bound(metrics, split)`: the train split is data the backbone's weights were trained on
(metrics.json "features_trained_on_train", from provenance.json), so the figure is optimistic.
"""
from __future__ import annotations

from .template import esc


def upper_bound_text(metrics: dict, split: str = "train") -> str | None:
    """The recorded caveat of `split`'s figures ("features trained on these labels: upper
    bound"), or None."""
    if not metrics.get("features_trained_on_train"):
        return None
    return (metrics.get("label_issue_caveat") or {}).get(split)


def upper_bound(metrics: dict, split: str = "train") -> str:
    """An HTML badge to put next to a figure of `split`, or "" when there is nothing to say."""
    text = upper_bound_text(metrics, split)
    return f' <span class="badge warn">{esc(text)}</span>' if text else ""
