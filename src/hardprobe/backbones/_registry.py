"""One registry, one backbone interface.

Every model family (torchvision, timm, our CIFAR ResNets) registers a factory here; the
rest of hardprobe sees only `Backbone`: a model in eval mode, its preprocessing, and a
`forward` that returns (pre-logits embedding, logits).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import nn

from ..errors import ConfigError
from .preprocess import Preprocess


@dataclass
class Backbone:
    """A pretrained network as hardprobe uses it.

    forward(x) takes a preprocessed float batch (N, 3, H, W) and returns
    (embedding (N, embed_dim), logits (N, num_classes) or None for a headless model).
    """

    name: str
    model: nn.Module
    preprocess: Preprocess
    embed_dim: int
    class_names: list[str] | None  # label space of the model's own classifier
    cam_layer: str  # module name Grad-CAM hooks, see `hardprobe layers MODEL`
    weights_id: str  # provenance: "sha256:<hex>" of the weights, or "random-init:seed=<n>"
    forward_fn: Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
    cam_reshape: Callable[[torch.Tensor], torch.Tensor] | None = None  # ViT tokens -> (N, C, h, w)
    depth_layers: list[str] = field(default_factory=list)  # for prediction depth, shallow -> deep
    extra: dict = field(default_factory=dict)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.forward_fn(self.model, x)

    __call__ = forward

    @property
    def num_classes(self) -> int | None:
        return None if self.class_names is None else len(self.class_names)

    def to(self, device) -> "Backbone":
        self.model.to(device)
        return self

    def describe(self) -> dict:
        """Everything about the model that determines its features (part of the cache key)."""
        return {
            "name": self.name,
            "weights": self.weights_id,
            "preprocess": self.preprocess.describe(),
            "embed_dim": self.embed_dim,
            "num_classes": self.num_classes,
        }


class Factory(Protocol):
    def __call__(self, name: str, *, weights: str | None, weights_tag: str | None,
                 random_init: bool, image_size: int | None,
                 trust_weights: bool = False) -> Backbone: ...


@dataclass(frozen=True)
class _Entry:
    name: str
    factory: Factory
    summary: str
    prefix: bool = False  # "timm:" style: the rest of the name is passed on


_REGISTRY: dict[str, _Entry] = {}


def register(name: str, factory: Factory, summary: str, *, prefix: bool = False) -> None:
    if name in _REGISTRY:
        raise ConfigError(f"backbone {name!r} registered twice")
    _REGISTRY[name] = _Entry(name, factory, summary, prefix)



def list_layers(backbone: Backbone, *, leaves_only: bool = False) -> list[str]:
    """Module names of the backbone's model, in definition order (`hardprobe layers MODEL`).

    Any of them can be a Grad-CAM `cam_layer` or a depth layer (forward hooks attach to
    modules). leaves_only: only modules without children (convs, norms, activations, ...).
    """
    return [n for n, m in backbone.model.named_modules()
            if n and (not leaves_only or next(m.children(), None) is None)]


