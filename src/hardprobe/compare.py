"""`hardprobe compare RUN_A RUN_B`: the compare stage's tables, then the report's page.

The top layer, like pipeline.py: the stage (`stages.compare.compare_runs`) computes and writes
OUT/summary.json and OUT/overlap.parquet; the report (`report.compare.write_compare_html`)
reads them and writes OUT/compare.html. Neither imports the other.
"""
from __future__ import annotations

from pathlib import Path

from .report.compare import write_compare_html
from .stages.compare import compare_runs


def compare(run_a, run_b, *, out=None, split: str = "test", quantile: float = 0.1,
            top: int = 12) -> Path:
    """Compare two runs of the same images -> OUT (default RUN_A/compare_<name of RUN_B>/)
    holding summary.json, overlap.parquet and compare.html; returns OUT. top: thumbnails
    shown per hard set (the page only)."""
    from .errors import ConfigError
    if top < 0:  # before the tables are written: a bad flag leaves nothing half done
        raise ConfigError(f"top must be >= 0, got {top}")
    out = compare_runs(run_a, run_b, out=out, split=split, quantile=quantile)
    write_compare_html(out, top=top)
    return out
