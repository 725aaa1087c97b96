"""Pretrained backbones behind one interface (see registry.py)."""
from .preprocess import Preprocess
from .registry import Backbone, UnknownModelError, create_backbone, list_backbones, register

__all__ = ["Backbone", "Preprocess", "UnknownModelError", "create_backbone", "list_backbones", "register"]
