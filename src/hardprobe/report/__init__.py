"""The run report: one self-contained HTML page (`hardprobe report RUN_DIR`).

    from hardprobe.report import write_report
    write_report("runs/r56")          # -> runs/r56/report.html
"""
from .render import write_report

__all__ = ["write_report"]
