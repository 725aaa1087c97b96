"""Grad-CAM of the hardest examples: cams.py computes maps, stage.py writes RUN_DIR/explain/."""
from .cams import CamWarning, cam_stats, compute_cams
from .stage import explain_run

__all__ = ["CamWarning", "cam_stats", "compute_cams", "explain_run"]
