"""Fine-tuning and training dynamics: stage.py writes RUN_DIR/finetune/; images.py holds the
image-mode network and data; summary.py condenses what the report shows."""
from .stage import finetune_run

__all__ = ["finetune_run"]
