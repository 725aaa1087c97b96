"""The one builder path: a registry name (and weights) -> a `Backbone` in eval mode.

Importing this module imports every model family, which registers itself into `_registry`
(a leaf that imports no family): the arrows point from the families to the registry only.
"""
from __future__ import annotations

import difflib

from ..errors import ConfigError, UnknownModelError
from . import cifar_resnet, timm_models, torchvision_models  # noqa: F401  (they register)
from ._registry import _REGISTRY, Backbone


def list_backbones() -> list[dict]:
    """Name and one-line summary of every registered backbone (`hardprobe models`)."""
    return [{"name": e.name + ("<name>" if e.prefix else ""), "summary": e.summary}
            for e in sorted(_REGISTRY.values(), key=lambda e: e.name)]


def create_backbone(name: str, *, weights: str | None = None, weights_tag: str | None = None,
                    random_init: bool = False, image_size: int | None = None,
                    trust_weights: bool = False) -> Backbone:
    """Build a backbone by registry name.

    weights:     path to a weights file (offline use); overrides the default download.
    weights_tag: a named set of published weights, e.g. "IMAGENET1K_V1" for resnet50.
    random_init: use random weights. Never done unless asked: for tests and speed runs only.
    image_size:  override the network input size of the weights' preprocessing.
    trust_weights: allow a weights file that needs full unpickling (runs code from the file;
                 only for files you trust). By default only tensors are loaded.
    """
    if weights is not None and random_init:
        raise ConfigError("--weights and --random-init contradict each other; pass one of them")
    entry = _REGISTRY.get(name)
    if entry is None:
        for e in _REGISTRY.values():
            if e.prefix and name.startswith(e.name):
                entry = e
                break
    if entry is None:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownModelError(
            f"unknown model {name!r}.{hint} Run `hardprobe models` to list them; "
            f"any timm model works as 'timm:<name>'.")
    bb = entry.factory(name, weights=weights, weights_tag=weights_tag,
                       random_init=random_init, image_size=image_size,
                       trust_weights=trust_weights)
    bb.model.eval()
    return bb
