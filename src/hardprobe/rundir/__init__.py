"""The run directory, the contract between stages: layout.py declares what each stage owns,
run.py reads it (`Run`) and writes it (`Run.join`, `Run.stamp`)."""
from .run import Run, load_run

__all__ = ["Run", "load_run"]
