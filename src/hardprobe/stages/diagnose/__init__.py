"""Why is an example hard: causes.py holds the rules (pure), evidence.py gathers what they read,
stage.py writes the diagnosis into the run, why.py prints one example's."""
from .stage import DiagnoseConfig, diagnose_run
from .why import why

__all__ = ["DiagnoseConfig", "diagnose_run", "why"]
