"""Pretrained backbones behind one interface (see registry.py)."""
from ..errors import UnknownModelError, WeightsError, WeightsUnavailableError
from ._registry import Backbone, list_layers, register
from .build import create_backbone, list_backbones
from .preprocess import Preprocess

__all__ = ["Backbone", "Preprocess", "UnknownModelError", "WeightsError", "WeightsUnavailableError",
           "create_backbone", "list_backbones", "list_layers", "register"]
