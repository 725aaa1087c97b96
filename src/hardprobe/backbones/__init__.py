"""Pretrained backbones behind one interface (see registry.py)."""
from ._weights import WeightsError, WeightsUnavailableError
from .preprocess import Preprocess
from .registry import (Backbone, UnknownModelError, create_backbone, list_backbones, list_layers,
                       register)

__all__ = ["Backbone", "Preprocess", "UnknownModelError", "WeightsError", "WeightsUnavailableError",
           "create_backbone", "list_backbones", "list_layers", "register"]
