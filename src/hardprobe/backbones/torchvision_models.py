"""torchvision ImageNet models: resnet50 and vit_b_16.

The model is torchvision's own, unchanged; our forward functions run its layers in order and
return the pre-classifier embedding and the logits from one pass (hooks on named modules such
as `layer4` still fire).

Image size: ResNet-50 is fully convolutional with adaptive pooling, so `image_size` only changes
the preprocessing. ViT-B/16 has a fixed token grid: with `image_size` we build
`vit_b_16(image_size=S)` and bicubically interpolate the pretrained positional embedding to the
new (S/16)^2 grid (torchvision's `interpolate_embeddings`, the usual fine-tuning-at-new-resolution
recipe). S must be a multiple of the patch size. Accuracy at a size the weights were not trained
at is lower; that is the user's experiment to make.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torchvision import models as tvm
from torchvision.models.vision_transformer import interpolate_embeddings

from ..errors import ConfigError
from . import _weights
from ._registry import Backbone, WeightsInfo, register
from .preprocess import Preprocess

# ---------------------------------------------------------------------------- forwards


def _resnet_forward(m: tvm.ResNet, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    x = m.layer4(m.layer3(m.layer2(m.layer1(x))))
    emb = torch.flatten(m.avgpool(x), 1)
    return emb, m.fc(emb)


def _vit_forward(m: tvm.VisionTransformer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = m._process_input(x)
    x = torch.cat([m.class_token.expand(x.shape[0], -1, -1), x], dim=1)
    x = m.encoder(x)  # ends with the final LayerNorm
    emb = x[:, 0]
    return emb, m.heads(emb)


def tokens_to_grid(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(N, prefix + h*w, C) tokens -> (N, C, h, w), dropping every prefix token.

    The number of prefix tokens (class, registers, distillation) is what the sequence has beyond
    the h*w patch tokens; prefix tokens come first in torchvision and timm ViTs.
    """
    h, w = grid
    n, seq, c = tokens.shape
    prefix = seq - h * w
    if prefix < 0:
        raise ConfigError(f"{seq} tokens cannot hold a {h}x{w} patch grid")
    return tokens[:, prefix:, :].reshape(n, h, w, c).permute(0, 3, 1, 2)


class _GridReshape:
    """Picklable cam_reshape bound to a patch grid."""

    def __init__(self, grid: tuple[int, int]):
        self.grid = (int(grid[0]), int(grid[1]))

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens_to_grid(tokens, self.grid)

    def __repr__(self) -> str:
        return f"tokens_to_grid(grid={self.grid})"


# ---------------------------------------------------------------------------- weights

IMAGENET1K_TRAIN = "imagenet-1k:train"
_PRETRAINED_ON = {"SWAG": "instagram-3.6b (weakly supervised) + "}  # SWAG: IG-3.6B first


def weights_info(name: str, tvw) -> WeightsInfo:
    """torchvision's own description of a weights enum member, as registry data."""
    extra = next((v for k, v in _PRETRAINED_ON.items() if k in tvw.name), "")
    acc = tvw.meta.get("_metrics", {}).get("ImageNet-1K", {}).get("acc@1")
    return WeightsInfo(
        name=f"{name}.{tvw.name}", file=Path(tvw.url).name, url=tvw.url,
        sha256=_weights.hash_prefix_in_name(tvw.url), trained_on=extra + IMAGENET1K_TRAIN,
        licence="BSD-3-Clause (torchvision)",
        metric={} if acc is None else {"imagenet-1k:val top-1": acc / 100}, tag=tvw.name)


def _info(name: str, tvw, weights: str | None, wid: str) -> WeightsInfo | None:
    """The registry entry of the weights loaded: torchvision's file, or a --weights FILE that
    is one of the published files (same sha256 prefix); None for anything else."""
    if weights is None:
        return weights_info(name, tvw)
    digest = wid.split(":", 1)[1]
    return next((w for w in _published(name) if w.matches(digest)), None)


def _published(name: str) -> tuple[WeightsInfo, ...]:
    enum = {"resnet50": tvm.ResNet50_Weights, "vit_b_16": tvm.ViT_B_16_Weights}[name]
    default = enum.DEFAULT
    return tuple(weights_info(name, w) for w in [default, *(w for w in enum if w != default)])


def _hub_file(weights) -> Path:
    return _weights.hub_checkpoints_dir() / Path(weights.url).name


def _published_state_dict(weights, trust: bool) -> tuple[dict, Path]:
    """torchvision's weights from the torch.hub cache, downloading them if needed."""
    path = _hub_file(weights)
    if not path.is_file():
        try:
            weights.get_state_dict(progress=True)
        except Exception as e:
            if not _weights.is_download_error(e):
                raise
            raise _weights.WeightsUnavailableError(
                f"could not download {weights.url} ({type(e).__name__}: {e}). Fetch that file "
                f"yourself and put it at {path} (torch.hub's checkpoint folder; set TORCH_HOME to "
                f"move it), or pass --weights FILE.") from e
        if not path.is_file():  # pragma: no cover - torch.hub changed where it stores files
            raise _weights.WeightsUnavailableError(f"downloaded {weights.url} but cannot find {path}")
    _weights.verify_hash_prefix(path)
    return _weights.load_state_dict(path, trust=trust), path


def _resolve_tag(enum, tag: str | None, name: str):
    if tag is None:
        return enum.DEFAULT
    try:
        return enum[tag]
    except KeyError:
        raise ConfigError(f"{name} has no weights {tag!r}; choose one of "
                         f"{', '.join(w.name for w in enum)}") from None


def _state_dict(tv_weights, weights: str | None, trust: bool) -> tuple[dict, Path]:
    """The state_dict to load and the file it came from: `weights`, else torchvision's own."""
    if weights is not None:
        return _weights.load_state_dict(weights, trust=trust), Path(weights)
    return _published_state_dict(tv_weights, trust)


# ---------------------------------------------------------------------------- families


def _build_resnet50(name: str, *, weights: str | None, weights_tag: str | None, random_init: bool,
                    image_size: int | None, trust_weights: bool = False) -> Backbone:
    tvw = _resolve_tag(tvm.ResNet50_Weights, weights_tag, name)
    # weights first: a missing file fails before the (slow) model init
    sd, path = (None, None) if random_init else _state_dict(tvw, weights, trust_weights)
    with _weights.seeded(0) as wid, _weights.on_meta_if(sd is not None):
        model = tvm.resnet50(weights=None)  # on meta when weights follow: no random init
    if sd is not None:
        _weights.load_into(model, sd, source=str(path), expected=name, assign=True)
        wid = _weights.weights_id(path)
    info = None if sd is None else _info(name, tvw, weights, wid)
    pre = Preprocess.from_torchvision(tvw.transforms())
    if image_size is not None:
        pre = pre.with_image_size(image_size)
    return Backbone(
        name=name, model=model, preprocess=pre, embed_dim=model.fc.in_features,
        class_names=list(tvw.meta["categories"]), cam_layer="layer4", weights_id=wid,
        forward_fn=_resnet_forward, depth_layers=["layer1", "layer2", "layer3", "layer4"],
        extra={"family": "torchvision", "weights_tag": tvw.name, "url": tvw.url},
        weights_info=info,
    )


def _build_vit_b_16(name: str, *, weights: str | None, weights_tag: str | None, random_init: bool,
                    image_size: int | None, trust_weights: bool = False) -> Backbone:
    tvw = _resolve_tag(tvm.ViT_B_16_Weights, weights_tag, name)
    native = int(tvw.meta["min_size"][0])
    size = native if image_size is None else int(image_size)
    if size % 16:
        raise ConfigError(f"{name}: image_size must be a multiple of the patch size 16, got {size}")
    sd, path = (None, None) if random_init else _state_dict(tvw, weights, trust_weights)
    with _weights.seeded(0) as wid, _weights.on_meta_if(sd is not None):
        model = tvm.vit_b_16(weights=None, image_size=size)  # on meta when weights follow
    if sd is not None:
        pos = sd.get("encoder.pos_embedding")
        if pos is not None and pos.shape != model.encoder.pos_embedding.shape:
            # pretrained pos-embedding -> this model's token grid (bicubic)
            sd = interpolate_embeddings(size, model.patch_size, sd)
        _weights.load_into(model, sd, source=str(path), expected=name, assign=True)
        wid = _weights.weights_id(path)
    info = None if sd is None else _info(name, tvw, weights, wid)
    pre = Preprocess.from_torchvision(tvw.transforms())
    if size != pre.crop_size:
        pre = pre.with_image_size(size)
    grid = (model.image_size // model.patch_size,) * 2
    last = len(model.encoder.layers) - 1
    return Backbone(
        name=name, model=model, preprocess=pre, embed_dim=model.hidden_dim,
        class_names=list(tvw.meta["categories"]),
        cam_layer=f"encoder.layers.encoder_layer_{last}.ln_1", weights_id=wid,
        forward_fn=_vit_forward, cam_reshape=_GridReshape(grid),
        depth_layers=[f"encoder.layers.encoder_layer_{i}" for i in range(last + 1)],
        extra={"family": "torchvision", "weights_tag": tvw.name, "url": tvw.url, "grid": grid},
        weights_info=info,
    )


register("resnet50", _build_resnet50,
         "torchvision ResNet-50, ImageNet-1k (weights IMAGENET1K_V2, or IMAGENET1K_V1), 2048-d",
         weights=_published("resnet50"))
register("vit_b_16", _build_vit_b_16,
         "torchvision ViT-B/16, ImageNet-1k (weights IMAGENET1K_V1), 224x224, 768-d class token",
         weights=_published("vit_b_16"))
