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
    weights_info: "WeightsInfo | None" = None  # what the loaded weights are (None: unknown)

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
class WeightsInfo:
    """A published set of weights, described as data (in the spirit of timm's PretrainedCfg).

    trained_on: "<dataset>:<split>" the weights were trained on, e.g. "cifar10:train" or
    "imagenet-1k:train" (several joined by " + "); None when unknown. It decides whether a
    run's train split is data the features were fitted to (`stages.extract.trained_on`).
    sha256: the file's full hex digest, or its leading digits when only those are published
    (torch.hub file names carry them). metric: the published figure, {"<data> <name>": value}.
    """

    name: str  # "<backbone>" or "<backbone>.<tag>"
    file: str  # file name in torch.hub's checkpoint folder (or the hub repo's file)
    url: str | None = None
    sha256: str | None = None
    trained_on: str | None = None
    licence: str | None = None
    metric: dict = field(default_factory=dict)
    tag: str | None = None  # weights_tag selecting it (None: the family's default)

    def matches(self, digest: str) -> bool:
        """True if `digest` (hex sha256 of a file) is this file's (full or published prefix)."""
        return bool(self.sha256) and digest.lower().startswith(self.sha256.lower())


@dataclass(frozen=True)
class _Entry:
    name: str
    factory: Factory
    summary: str
    prefix: bool = False  # "timm:" style: the rest of the name is passed on
    weights: tuple[WeightsInfo, ...] = ()  # published weights, the default first


_REGISTRY: dict[str, _Entry] = {}


def register(name: str, factory: Factory, summary: str, *, prefix: bool = False,
             weights: tuple[WeightsInfo, ...] = ()) -> None:
    if name in _REGISTRY:
        raise ConfigError(f"backbone {name!r} registered twice")
    _REGISTRY[name] = _Entry(name, factory, summary, prefix, tuple(weights))


def registered_weights() -> list[WeightsInfo]:
    """Every published weights file the registry knows (what `hardprobe doctor` lists)."""
    return [w for e in sorted(_REGISTRY.values(), key=lambda e: e.name) for w in e.weights]


def identify_weights(name: str, digest: str) -> WeightsInfo | None:
    """The registered weights of backbone `name` whose sha256 is `digest` (hex), if any:
    a `--weights FILE` that is the published file is then known for what it is."""
    entry = _REGISTRY.get(name)
    return next((w for w in (entry.weights if entry else ()) if w.matches(digest)), None)



def list_layers(backbone: Backbone, *, leaves_only: bool = False) -> list[str]:
    """Module names of the backbone's model, in definition order (`hardprobe layers MODEL`).

    Any of them can be a Grad-CAM `cam_layer` or a depth layer (forward hooks attach to
    modules). leaves_only: only modules without children (convs, norms, activations, ...).
    """
    return [n for n, m in backbone.model.named_modules()
            if n and (not leaves_only or next(m.children(), None) is None)]


