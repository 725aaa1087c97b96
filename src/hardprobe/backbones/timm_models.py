"""Any timm model as 'timm:<model>[.<tag>]'.

Weights come from timm's own download (Hugging Face hub, cached under HF_HOME), or from a file
given with `weights` (timm checkpoints, torch.hub files, safetensors). Preprocessing follows
timm's data config for the model. One `forward_features` pass gives both the pre-logits
embedding and the logits.

timm is imported only when a timm model is built, so `import hardprobe` does not pay for it.
"""
from __future__ import annotations

import difflib
import sys
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, UnknownModelError
from . import _weights
from ._registry import Backbone, WeightsInfo, register
from .preprocess import Preprocess
from .torchvision_models import tokens_to_grid

PREFIX = "timm:"


class _TimmForward:
    """(embedding, logits) from one forward_features pass; picklable."""

    def __init__(self, has_head: bool):
        self.has_head = has_head

    def __call__(self, model: nn.Module, x: torch.Tensor):
        feats = model.forward_features(x)
        emb = model.forward_head(feats, pre_logits=True)
        # forward_head(pre_logits=False) rather than get_classifier()(emb): also right for
        # models whose head is more than one Linear (distilled DeiT averages two heads).
        logits = model.forward_head(feats) if self.has_head else None
        return emb, logits


class _TokenGrid:
    """cam_reshape for ViT-like timm models: drop the prefix tokens, tokens -> (N, C, h, w)."""

    def __init__(self, grid, num_prefix_tokens: int):
        self.grid = (int(grid[0]), int(grid[1]))
        self.num_prefix_tokens = int(num_prefix_tokens)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        extra = tokens.shape[1] - self.grid[0] * self.grid[1]
        if extra != self.num_prefix_tokens:
            raise ConfigError(f"expected {self.num_prefix_tokens} prefix tokens before a "
                             f"{self.grid[0]}x{self.grid[1]} grid, got {tokens.shape[1]} tokens")
        return tokens_to_grid(tokens, self.grid)

    def __repr__(self) -> str:
        return f"tokens_to_grid(grid={self.grid}, num_prefix_tokens={self.num_prefix_tokens})"


def _nhwc_to_nchw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------- helpers


def _unknown(model_name: str) -> UnknownModelError:
    import timm

    close = difflib.get_close_matches(model_name, timm.list_models(), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(PREFIX + c for c in close)}?" if close else ""
    return UnknownModelError(f"unknown timm model {model_name!r}.{hint} "
                             f"List them with timm.list_models('*pattern*').")


def _hf_cache_hint() -> str:
    try:
        from huggingface_hub import constants
        return str(constants.HF_HUB_CACHE)
    except Exception:  # pragma: no cover - huggingface_hub is a timm dependency
        return "$HF_HOME/hub"


def _unavailable(model_name: str, cfg, err: BaseException) -> _weights.WeightsUnavailableError:
    repo, url = _cfg_get(cfg, "hf_hub_id"), _cfg_get(cfg, "url")
    if repo:
        where = (f"from the Hugging Face hub repo {repo} (https://huggingface.co/{repo}); with "
                 f"network access it is cached under {_hf_cache_hint()} (HF_HOME) and used offline "
                 f"afterwards")
    elif url:
        where = f"from {url} (cached in {_weights.hub_checkpoints_dir()}, TORCH_HOME)"
    else:
        where = "from timm's download"
    return _weights.WeightsUnavailableError(
        f"could not get the pretrained weights of timm model {model_name!r} {where} "
        f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Download them "
        f"once with network access, or pass --weights FILE (a timm / torch / safetensors file). "
        f"Offline, set HF_HUB_OFFLINE=1 so the hub fails at once instead of retrying.")


def _cfg_get(cfg, key: str):
    """Field of a timm pretrained cfg (a dict on models, a PretrainedCfg dataclass in the registry)."""
    if cfg is None:
        return None
    return cfg.get(key) if isinstance(cfg, dict) else getattr(cfg, key, None)


def _pretrained_cfg(model_name: str):
    try:
        from timm.models import get_pretrained_cfg
        return get_pretrained_cfg(model_name)
    except Exception:
        return None


def _cached_pretrained_file(cfg) -> Path | None:
    """The file timm just loaded its pretrained weights from, if we can find it (best effort)."""
    repo = _cfg_get(cfg, "hf_hub_id")
    if repo:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover
            return None
        repo_id, _, revision = repo.partition("@")
        names = ["model.safetensors", _cfg_get(cfg, "hf_hub_filename") or "pytorch_model.bin"]
        for fn in names:
            p = try_to_load_from_cache(repo_id, fn, revision=revision or None)
            if isinstance(p, str) and Path(p).is_file():
                return Path(p)
        return None
    url = _cfg_get(cfg, "url")
    if url:
        p = _weights.hub_checkpoints_dir() / Path(url).name
        return p if p.is_file() else None
    return None


def _load_file(model: nn.Module, path: Path, *, name: str, trust: bool) -> None:
    sd = _weights.load_state_dict(path, trust=trust)
    try:
        _weights.load_into(model, sd, source=str(path), expected=name)
    except _weights.WeightsMismatchError:
        # timm's own checkpoint formats (original JAX/BiT/... layouts, pos-embed of another
        # size): the model's module provides a filter that converts them, as timm's loader does.
        filt = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
        if filt is None:
            raise
        try:
            converted = filt(dict(sd), model)
            _weights.load_into(model, converted, source=str(path), expected=name)
        except Exception:
            _weights.load_into(model, sd, source=str(path), expected=name)  # report the raw keys


def _cam_and_depth(model: nn.Module) -> tuple[str, object, list[str]]:
    """(cam_layer, cam_reshape, depth_layers) for a timm model."""
    blocks = getattr(model, "blocks", None)
    if (isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks)
            and hasattr(model, "num_prefix_tokens") and hasattr(model, "patch_embed")):
        last = len(blocks) - 1
        cam = f"blocks.{last}.norm1" if hasattr(blocks[last], "norm1") else f"blocks.{last}"
        reshape = _TokenGrid(model.patch_embed.grid_size, model.num_prefix_tokens)
        return cam, reshape, [f"blocks.{i}" for i in range(len(blocks))]
    modules = dict(model.named_modules())
    info = getattr(model, "feature_info", None) or []
    stages = [fi["module"] for fi in info if isinstance(fi, dict) and fi.get("module") in modules]
    if stages:
        cam = stages[-1]
        depth = list(dict.fromkeys(stages))
    else:  # no feature_info: the last conv is as good a guess as any
        convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
        if not convs:
            raise ConfigError(f"cannot choose a CAM layer for {type(model).__name__}; "
                             f"pick one with `hardprobe layers`")
        cam, depth = convs[-1], convs
    reshape = _nhwc_to_nchw if getattr(model, "output_fmt", "NCHW") == "NHWC" else None
    return cam, reshape, depth


_TAG_DATA = (("laion2b", "laion-2b"), ("lvd142m", "lvd-142m"), ("in21k", "imagenet-21k:train"),
             ("in22k", "imagenet-21k:train"), ("in12k", "imagenet-12k:train"),
             ("in1k", "imagenet-1k:train"))


def weights_info(model_name: str, cfg) -> WeightsInfo:
    """timm's pretrained cfg as registry data. trained_on is read from the weights tag's
    dataset tokens (e.g. "in21k_ft_in1k" -> "imagenet-21k:train + imagenet-1k:train", in the
    tag's order); None when the tag names no dataset we know."""
    tag = _cfg_get(cfg, "tag") or ""
    found = sorted((tag.find(tok), data) for tok, data in _TAG_DATA if tok in tag)
    trained = " + ".join(dict.fromkeys(d for _, d in found)) or None
    return WeightsInfo(name=f"{PREFIX}{model_name}", file=_cfg_get(cfg, "hf_hub_filename") or "",
                       url=_cfg_get(cfg, "url") or _cfg_get(cfg, "hf_hub_id"),
                       trained_on=trained, licence=_cfg_get(cfg, "license"), tag=tag or None)


def _class_names(model: nn.Module) -> list[str] | None:
    n = getattr(model, "num_classes", 0)
    if not n:
        return None
    from timm.data import ImageNetInfo, infer_imagenet_subset

    try:
        subset = infer_imagenet_subset(model)
        if subset is None:
            return None
        info = ImageNetInfo(subset)
    except Exception:
        return None
    if info.num_classes() != n:
        return None
    return [info.index_to_description(i) for i in range(n)]


# ---------------------------------------------------------------------------- factory


def _build(name: str, *, weights: str | None, weights_tag: str | None, random_init: bool,
           image_size: int | None, trust_weights: bool = False) -> Backbone:
    import timm
    from timm.data import resolve_data_config

    model_name = name[len(PREFIX):]
    if weights_tag:
        if "." in model_name:
            raise ConfigError(f"{name} already names its weights tag; drop weights_tag {weights_tag!r}")
        model_name = f"{model_name}.{weights_tag}"
    if not model_name or not timm.is_model(model_name):
        raise _unknown(model_name)
    cfg = _pretrained_cfg(model_name)
    kwargs = {}
    if image_size is not None and getattr(cfg, "fixed_input_size", False):
        kwargs["img_size"] = int(image_size)  # ViT-like: token grid follows the input size
    pretrained = not random_init and weights is None
    with _weights.seeded(0) as seed_id:
        try:
            model = timm.create_model(model_name, pretrained=pretrained, **kwargs)
        except TypeError as e:
            if "img_size" in kwargs and "img_size" in str(e):
                raise ConfigError(f"{name} has a fixed input size and does not accept "
                                 f"image_size={image_size}") from e
            raise
        except Exception as e:
            if pretrained and _weights.is_download_error(e):
                raise _unavailable(model_name, cfg, e) from e
            raise
    info = None
    if random_init:
        wid = seed_id
    elif weights is not None:
        path = Path(weights)
        _load_file(model, path, name=name, trust=trust_weights)
        wid = _weights.weights_id(path)
    else:
        cfg = getattr(model, "pretrained_cfg", None) or cfg
        used = _cached_pretrained_file(cfg)
        source = _cfg_get(cfg, "hf_hub_id") or _cfg_get(cfg, "url") or _cfg_get(cfg, "tag")
        wid = _weights.weights_id(used) if used is not None else f"timm:{model_name}:{source}"
        info = weights_info(model_name, cfg)

    pre = Preprocess.from_timm(resolve_data_config({}, model=model))
    if image_size is not None:
        pre = pre.with_image_size(int(image_size))
    cam, reshape, depth = _cam_and_depth(model)
    embed_dim = int(getattr(model, "head_hidden_size", None) or model.num_features)
    has_head = bool(getattr(model, "num_classes", 0))
    return Backbone(
        name=name, model=model, preprocess=pre, embed_dim=embed_dim,
        class_names=_class_names(model) if has_head else None, cam_layer=cam, weights_id=wid,
        forward_fn=_TimmForward(has_head), cam_reshape=reshape, depth_layers=depth,
        extra={"family": "timm", "timm_name": model_name,
               "num_classes": getattr(model, "num_classes", 0)},
        weights_info=info,
    )


register(PREFIX, _build, "any timm model, e.g. timm:resnet18, timm:vit_small_patch14_reg4_dinov2",
         prefix=True)
